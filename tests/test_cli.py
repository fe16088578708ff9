"""Behaviour: `layerwise train / evaluate / predict` on small real data, as a user runs them."""

import json
from pathlib import Path

import pytest


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_train_writes_the_run_directory(fashion_run: Path) -> None:
    for name in ("config.json", "model.safetensors", "metrics.json", "history.jsonl", "report.html", "problems.json"):
        assert (fashion_run / name).is_file(), name
    config = read_json(fashion_run / "config.json")
    assert config["modality"] == "image" and config["task"] == "classify"
    assert config["class_labels"][:2] == ["ankle_boot", "bag"]
    metrics = read_json(fashion_run / "metrics.json")
    assert metrics["metrics"]["accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert metrics["baseline"]["model"].startswith("logistic regression")
    assert 0 < metrics["baseline"]["accuracy"] <= 1
    history = [json.loads(line) for line in (fashion_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_evaluate_json_on_the_test_split(cli, fashion_run, fashion_test) -> None:
    code, out, _ = cli("evaluate", fashion_run, fashion_test, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 200
    assert result["accuracy"] > 0.6


def test_predict_json_one_line_per_input(cli, fashion_run, fashion_test) -> None:
    files = sorted((fashion_test / "trouser").glob("*.png"))[:5]
    code, out, _ = cli("predict", fashion_run, *files, "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == [str(f) for f in files]
    for line in lines:
        assert line["label"] == line["top_k"][0]["label"]
        assert 0 < line["confidence"] <= 1
        assert len(line["top_k"]) == 3
    assert sum(line["label"] == "trouser" for line in lines) >= 4  # trousers are the easiest class


def test_predict_reports_a_broken_file_and_predicts_the_rest(cli, fashion_run, fashion_test, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    good = next((fashion_test / "bag").glob("*.png"))
    code, out, err = cli("predict", fashion_run, good, broken, "--json")
    assert code == 2
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["path"] == str(good) and "label" in lines[0]
    assert lines[1]["path"] == str(broken) and "image" in lines[1]["error"]
    assert str(broken) in err


def test_api_round_trip_matches_the_cli(cli, fashion_run, fashion_test) -> None:
    import layerwise

    model = layerwise.load(fashion_run)
    metrics, skipped = model.evaluate(fashion_test)
    assert skipped == []
    code, out, _ = cli("evaluate", fashion_run, fashion_test, "--json")
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(metrics | {"skipped": 0}))
    # The saved weights are the ones whose validation accuracy metrics.json reports.
    history = [json.loads(line) for line in (fashion_run / "history.jsonl").read_text().splitlines()]
    best = read_json(fashion_run / "metrics.json")["best_epoch"]
    assert read_json(fashion_run / "metrics.json")["metrics"]["accuracy"] == pytest.approx(
        history[best - 1]["val_accuracy"], abs=1e-6
    )


def test_spoken_digits_audio(cli, spoken_digits, tmp_path) -> None:
    run = tmp_path / "digits"
    code, _, err = cli("train", spoken_digits, "--out", run, "--epochs", "12", "--no-progress")
    assert code == 0, err
    config = read_json(run / "config.json")
    assert config["modality"] == "audio"
    assert config["preprocessing"]["sample_rate"] == 16000
    assert read_json(run / "metrics.json")["metrics"]["accuracy"] > 0.5  # 10 classes
    clip = next((spoken_digits / "seven").glob("*.wav"))
    code, out, _ = cli("predict", run, clip, "--json")
    assert code == 0 and json.loads(out)["path"] == str(clip)


def test_fortunes_text_from_a_csv(fortunes_run) -> None:
    run = fortunes_run  # trained through the CLI from the CSV, 5 epochs (validation accuracy 0.62-0.67)
    config = read_json(run / "config.json")
    assert config["modality"] == "text" and config["model"]["name"] == "transformer_tiny"
    n_classes = len(config["class_labels"])
    assert n_classes == 3
    assert read_json(run / "metrics.json")["metrics"]["accuracy"] > 0.5  # chance is 1/3
    import layerwise

    predictions, _ = layerwise.load(run).predict(["a raw string is classified too"])
    assert predictions[0].label in config["class_labels"]


def test_same_seed_gives_the_same_weights(cli, fashion_train, tmp_path) -> None:
    from safetensors.torch import load_file

    for name in ("a", "b"):
        code, _, err = cli(
            "train", fashion_train, "--out", tmp_path / name, "--epochs", "1", "--seed", "3", "--no-progress"
        )
        assert code == 0, err
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_time_budget_stops_cleanly_and_keeps_the_best_model(cli, fashion_train, tmp_path) -> None:
    run = tmp_path / "budget"
    code, out, err = cli("train", fashion_train, "--out", run, "--epochs", "500", "--time-budget", "4", "--no-progress")
    assert code == 0, err
    metrics = read_json(run / "metrics.json")
    assert "time budget" in metrics["stop_reason"]
    assert metrics["epochs_run"] < 500
    assert (run / "model.safetensors").is_file()


def test_refuses_to_overwrite_a_run_without_resume(cli, fashion_run, fashion_train) -> None:
    before = {p: p.read_bytes() for p in sorted(fashion_run.rglob("*")) if p.is_file()}
    code, _, err = cli("train", fashion_train, "--out", fashion_run, "--epochs", "1", "--no-progress")
    assert code == 2
    assert "--resume" in err
    assert {p: p.read_bytes() for p in sorted(fashion_run.rglob("*")) if p.is_file()} == before


def test_init_from_another_run_transfers_weights(cli, fashion_run, fashion_train, tmp_path) -> None:
    code, _, err = cli(
        "train", fashion_train, "--out", tmp_path / "t", "--epochs", "1", "--init", fashion_run, "--no-progress"
    )
    assert code == 0, err
    assert "initialised" in err
    # Started from the trained run, the first epoch's loss is far below a fresh start's (see test_run_integrity).
    first = json.loads((tmp_path / "t" / "history.jsonl").read_text().splitlines()[0])
    assert first["train_accuracy"] > 0.6
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert summary["approach"] == f"transferred in {fashion_run.name}, then fine-tuned"
    assert summary["approach"] in summary["verdict"]  # the one sentence says which approach won
    assert json.loads((tmp_path / "t" / "config.json").read_text())["train"]["freeze_fraction"] > 0
