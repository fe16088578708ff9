"""Distribution shift end to end on small real data: calibration, drift test, OOD flag, robustness, adaptation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layerwise.shift.corruptions import corrupt


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def corrupted_copy(source: Path, out: Path, name: str, severity: int, flat: bool = False) -> Path:
    """Every PNG of a class-folder tree, corrupted, as class folders (or one flat folder: unlabelled)."""
    for path in sorted(source.rglob("*.png")):
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("L")).copy())[None, None]  # (1, 1, H, W)
        damaged = corrupt("image", pixels, name, severity)[0, 0].numpy()
        target = out / (path.name if flat else f"{path.parent.name}/{path.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(damaged).save(target)
    return out


@pytest.fixture(scope="module")
def dusk(fashion_test, tmp_path_factory) -> Path:
    return corrupted_copy(fashion_test, tmp_path_factory.mktemp("dusk"), "dusk", 5)


def test_training_stores_calibration_and_a_shift_reference(fashion_run: Path) -> None:
    config = read_json(fashion_run / "config.json")
    calibration = config["calibration"]
    assert calibration["temperature"] > 0 and calibration["ece_after"] <= calibration["ece_before"] + 1e-9
    assert (fashion_run / "shift.safetensors").is_file()
    report = (fashion_run / "report.html").read_text()
    assert "Calibration" in report and "Robustness to corruptions" in report and "reliability diagram" in report


def test_clean_data_passes_and_dusk_is_detected(cli, fashion_run, fashion_test, dusk) -> None:
    code, out, err = cli("shift", fashion_run, fashion_test, "--json")
    assert code == 0, err
    clean = json.loads(out)
    assert {"shift_detected", "p_value", "effect_size", "estimated_accuracy", "n", "accuracy"} <= clean.keys()
    assert clean["shift_detected"] is False and clean["n"] == 200
    code, out, err = cli("shift", fashion_run, dusk, "--json")
    assert code == 0, err
    dark = json.loads(out)
    assert dark["shift_detected"] is True and dark["p_value"] < 0.01
    assert dark["effect_size"] > clean["effect_size"]
    assert dark["accuracy"] < clean["accuracy"] - 0.2  # the darkness really costs accuracy ...
    assert dark["estimated_accuracy"] < clean["estimated_accuracy"] - 0.1  # ... and the estimate sees it unlabelled
    assert dark["ood_fraction"] > clean["ood_fraction"]


def test_unlabelled_new_data_gets_an_estimate_but_no_true_accuracy(cli, fashion_run, fashion_test, tmp_path) -> None:
    flat = corrupted_copy(fashion_test, tmp_path / "flat", "dusk", 1, flat=True)
    code, out, err = cli("shift", fashion_run, flat, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["accuracy"] is None and 0 <= result["estimated_accuracy"] <= 1 and result["n"] == 200
    code, out, _ = cli("shift", fashion_run, flat)
    assert code == 0 and "estimated accuracy" in out and "true accuracy" not in out


def test_predict_flags_out_of_distribution_inputs(cli, fashion_run, fashion_test, dusk) -> None:
    code, out, _ = cli("predict", fashion_run, fashion_test, "--json")
    clean = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and all({"ood", "ood_score"} <= line.keys() for line in clean)
    code, out, _ = cli("predict", fashion_run, dusk, "--json")
    dark = [json.loads(line) for line in out.splitlines()]
    clean_rate = np.mean([line["ood"] for line in clean])
    assert clean_rate <= 0.25  # calibrated at 5% on validation; 200 test images of a tiny run
    assert np.mean([line["ood"] for line in dark]) > clean_rate + 0.3
    code, out, _ = cli("predict", fashion_run, next(dusk.rglob("*.png")))
    assert (
        code == 0
        and ("OUT-OF-DISTRIBUTION" in out)
        == json.loads(cli("predict", fashion_run, next(dusk.rglob("*.png")), "--json")[1])["ood"]
    )


def test_robustness_table_per_corruption_and_severity(cli, fashion_run, fashion_test, tmp_path) -> None:
    code, out, err = cli("robustness", fashion_run, fashion_test, "--json", "--max-examples", "100", "--out", tmp_path)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 100 and 0 < result["clean"] <= 1
    assert set(result["corruptions"]) == {"dusk", "contrast", "gaussian_noise", "blur", "jpeg", "rotate_translate"}
    for cells in result["corruptions"].values():
        assert len(cells["accuracy"]) == 5 and len(cells["estimated_accuracy"]) == 5
    assert result["corruptions"]["dusk"]["accuracy"][4] < result["clean"] - 0.2
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert read_json(tmp_path / "robustness.json") == result


def test_adapt_recovers_accuracy_at_dusk_into_a_new_run(cli, fashion_run, dusk, tmp_path) -> None:
    before_files = {p.name: p.read_bytes() for p in fashion_run.iterdir() if p.is_file()}
    code, out, err = cli("adapt", fashion_run, dusk, "--out", tmp_path / "adapted", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["method"].startswith("batchnorm") and report["n"] == 200
    assert report["accuracy_after"] > report["accuracy_before"] + 0.1
    code, out, _ = cli("evaluate", tmp_path / "adapted", dusk, "--json")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(report["accuracy_after"])
    assert {p.name: p.read_bytes() for p in fashion_run.iterdir() if p.is_file()} == before_files  # untouched
    code, _, err = cli("adapt", fashion_run, dusk, "--out", tmp_path / "adapted")
    assert code == 2 and "already holds a run" in err


def test_a_run_without_reference_says_how_to_add_one(cli, fashion_run, fashion_test, tmp_path) -> None:
    old = tmp_path / "old"
    shutil.copytree(fashion_run, old)
    (old / "shift.safetensors").unlink()
    config = read_json(old / "config.json")
    del config["calibration"]
    (old / "config.json").write_text(json.dumps(config))
    code, out, _ = cli("predict", old, next(fashion_test.rglob("*.png")), "--json")
    assert code == 0 and "ood" not in json.loads(out)  # older runs still predict
    code, _, err = cli("shift", old, fashion_test)
    assert code == 2 and "layerwise shift --fit-reference RUN DATA" in err
    code, out, err = cli("shift", "--fit-reference", old, fashion_test, "--json")
    assert code == 0 and json.loads(out)["reference_examples"] == 200, err
    assert "calibration" in read_json(old / "config.json") and (old / "shift.safetensors").is_file()
    code, out, _ = cli("shift", old, fashion_test, "--json")
    assert code == 0 and json.loads(out)["shift_detected"] is False


def test_bad_new_data_is_named(cli, fashion_run, fashion_test, spoken_digits, tmp_path) -> None:
    code, _, err = cli("shift", fashion_run, spoken_digits)
    assert code == 2 and "audio" in err and "image" in err
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(fashion_test.rglob("*.png"))[:10]:
        shutil.copy(path, few / path.name)
    (few / "broken.png").write_bytes(b"not a png")
    code, _, err = cli("shift", fashion_run, few)
    assert code == 2 and "at least 30" in err and "broken.png" in err


def test_shift_tools_on_a_generate_run_say_they_do_not_apply(cli, tiny_generate_run, tmp_path) -> None:
    for command in ("shift", "robustness", "adapt"):
        extra = ["--out", str(tmp_path / "x")] if command == "adapt" else []
        code, _, err = cli(command, tiny_generate_run, tmp_path, *extra)
        assert code == 2 and "does not apply to a generate run" in err


def test_the_server_answers_with_the_calibrated_confidence_and_the_ood_flag(cli, fashion_run, dusk) -> None:
    import httpx
    from test_serve import running_server, upload

    files = sorted(dusk.rglob("*.png"))[:3]
    code, out, _ = cli("predict", fashion_run, *files, "--json")
    expected = [json.loads(line) for line in out.splitlines()]
    with running_server(fashion_run, max_wait_ms=5) as url:
        got = httpx.post(f"{url}/predict", files=upload(*files)).json()["predictions"]
    assert [g["ood"] for g in got] == [e["ood"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["confidence"] == pytest.approx(e["confidence"], abs=1e-5)
        assert g["ood_score"] == pytest.approx(e["ood_score"], rel=1e-4)


@pytest.fixture(scope="module")
def text_run(fortunes_run) -> Path:
    return fortunes_run


def test_text_runs_get_text_corruptions_and_tent(cli, text_run, fortunes_csv, tmp_path) -> None:
    from safetensors.torch import load_file

    assert (text_run / "shift.safetensors").is_file()  # 60 validation texts: enough for a reference
    code, out, err = cli("robustness", text_run, fortunes_csv, "--json", "--max-examples", "300")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["corruptions"]) == {"typos", "casing", "word_dropout"}
    assert result["corruptions"]["word_dropout"]["accuracy"][4] <= result["clean"]
    code, out, err = cli("shift", text_run, fortunes_csv, "--json")
    assert code == 0 and json.loads(out)["n"] == 600, err
    code, out, err = cli("adapt", text_run, fortunes_csv, "--out", tmp_path / "adapted", "--json")
    assert code == 0, err
    assert json.loads(out)["method"].startswith("TENT")
    before, after = load_file(text_run / "model.safetensors"), load_file(tmp_path / "adapted" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("norm" in name for name in changed)  # only normalisation scales and shifts move


def test_audio_robustness_uses_the_audio_corruptions(cli, spoken_digits, tmp_path) -> None:
    run = tmp_path / "digits"
    code, _, err = cli("train", spoken_digits, "--out", run, "--epochs", "2", "--no-progress")
    assert code == 0, err
    code, out, err = cli("robustness", run, spoken_digits, "--json", "--max-examples", "40")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["corruptions"]) == {"background_noise", "gain", "speed", "telephone"}
    assert all(len(cells["accuracy"]) == 5 for cells in result["corruptions"].values())
