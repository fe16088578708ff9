"""`layerwise curve`: the power-law fit and its estimates, nested subsets, and the command on small real data."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise.curve import FRACTIONS, fit_power_law, nested_subsets, summarise
from layerwise.report.html import PNG_SIGNATURE

N = np.array([100, 200, 400, 800, 1600], dtype=np.float64)


def test_power_law_fit_recovers_known_parameters() -> None:
    for a, b, c in [(2.0, 0.5, 0.05), (10.0, 0.8, 0.1), (50.0, 1.0, 0.02)]:
        law = fit_power_law(N, a * N**-b + c)
        assert law.method == "three-parameter"
        assert law.a == pytest.approx(a, rel=1e-4) and law.b == pytest.approx(b, rel=1e-4)
        assert law.c == pytest.approx(c, rel=1e-4)
        assert law.labels_for_error(float(law.error(3000))) == pytest.approx(3000, rel=1e-6)


def test_power_law_without_a_visible_floor_falls_back_to_log_log() -> None:
    # Errors that fall and rise again (noise): three parameters are not determined; a flat line is the honest fit.
    law = fit_power_law(N, [0.20, 0.22, 0.19, 0.21, 0.20])
    assert law.method == "log-log" and law.c == 0
    assert law.b == pytest.approx(0.0, abs=0.02)


def test_estimate_from_exact_curves() -> None:
    deep_error = 2.0 * N**-0.5 + 0.05  # 10% error at the largest n = 1600; 9% at n = (2 / 0.04)^2 = 2500
    classical_error = 0.06 + 0.1 * N**-0.2  # ahead up to about 5,000 labels, then flatter: levels off at 94%
    points = [
        {"fraction": f, "n": int(n), "deep": 1 - d, "classical": 1 - c}
        for f, n, d, c in zip(FRACTIONS, N, deep_error, classical_error, strict=True)
    ]
    curve = summarise(points, target=0.91, n_val=10_000)
    estimate = curve["estimate"]
    assert curve["fit"]["deep"]["c"] == pytest.approx(0.05, rel=1e-4)
    assert estimate["deep"]["target_status"] == "reachable"
    assert estimate["deep"]["n_for_target"] == pytest.approx((2.0 / 0.04) ** 2, rel=1e-3)
    assert estimate["deep"]["more_labels_help"] and estimate["more_labels_help"]
    assert estimate["classical"]["target_status"] == "reached" and estimate["classical"]["n_for_target"] == 800
    assert estimate["leader_at_largest"] == "classical"
    crossing = estimate["deep_overtakes_classical_at"]
    gap = 2.0 * crossing**-0.5 + 0.05 - (0.06 + 0.1 * crossing**-0.2)  # the two fitted errors meet there
    assert 1600 < crossing < 10_000 and abs(gap) < 1e-6
    assert "overtake" in curve["verdict"] and "labels should reach 91.0%" in curve["verdict"]
    unreachable = summarise(points, target=0.96, n_val=10_000)  # beyond the deep model's 95% asymptote
    assert unreachable["estimate"]["deep"]["target_status"] == "not reachable"
    assert "not reachable" in unreachable["verdict"]


def test_nested_subsets_are_nested_and_stratified() -> None:
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 17)
    subsets = nested_subsets(labels, FRACTIONS, seed=3)
    sizes = [len(s) for s in subsets]
    assert sizes == sorted(set(sizes)) and sizes[-1] == len(labels)
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert set(smaller.tolist()) <= set(larger.tolist())
    assert torch.bincount(labels[subsets[0]]).tolist() == [7, 3, 2]  # ceil(n_class / 16): every class is there
    assert nested_subsets(labels, FRACTIONS, seed=3)[2].tolist() == subsets[2].tolist()  # seeded


@pytest.fixture(scope="module")
def three_classes(fashion_train: Path, tmp_path_factory) -> Path:
    """Bag, sneaker and trouser: 60 real Fashion-MNIST images each."""
    data = tmp_path_factory.mktemp("curve_data")
    for name in ("bag", "sneaker", "trouser"):
        shutil.copytree(fashion_train / name, data / name)
    return data


def test_curve_on_small_real_data(cli, three_classes: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve"
    args = ["curve", three_classes, "--out", out, "--epochs", "2", "--val-fraction", "0.2", "--no-progress"]
    code, stdout, stderr = cli(*args, "--target", "0.95", "--json")
    assert code == 0, stderr
    curve = json.loads(stdout)
    assert curve == json.loads((out / "curve.json").read_text())
    points = curve["points"]
    assert [p["fraction"] for p in points] == list(FRACTIONS)
    sizes = [p["n"] for p in points]
    assert sizes == sorted(set(sizes)) and sizes[-1] == curve["data"]["n_train"] == 144
    assert all(0 <= p["deep"] <= 1 and 0 <= p["classical"] <= 1 and p["deep_seconds"] > 0 for p in points)
    assert points[-1]["deep"] > points[0]["deep"] and points[-1]["classical"] > 0.8  # 16x the labels; chance 1/3
    for fit in curve["fit"].values():
        assert all(math.isfinite(fit[key]) for key in ("a", "b", "c", "asymptote", "rmse_log_error"))
        assert fit["method"] in ("three-parameter", "log-log")
    assert curve["estimate"]["deep"]["target_status"] in ("reached", "reachable", "not reachable", "beyond the horizon")
    assert isinstance(curve["notes"], list)
    assert curve["verdict"].endswith(".") and "labels" in curve["verdict"]
    assert (out / "curve.png").read_bytes().startswith(PNG_SIGNATURE)
    report = (out / "report.html").read_text()
    assert "<h2>Learning curve</h2>" in report and "data:image/png;base64," in report
    assert not (out / "curve.partial.json").exists()

    before = (out / "curve.json").read_bytes()
    code, _, stderr = cli(*args)  # a curve is there: nothing is overwritten unasked
    assert code == 2 and "--resume" in stderr and "--overwrite" in stderr
    assert (out / "curve.json").read_bytes() == before

    code, stdout, stderr = cli("curve", three_classes, "--out", out, "--resume", "--target", "0.99", "--no-progress")
    assert code == 0, stderr
    assert stderr.count("reused") == 5  # no point is trained again; only the estimate changes
    resumed = json.loads((out / "curve.json").read_text())
    assert resumed["points"] == points and resumed["estimate"]["target"] == 0.99
    assert "deep time" in stdout and resumed["verdict"] in " ".join(stdout.split())

    # A run trained on the same data and split shows the curve in its report and says its verdict.
    run = tmp_path / "run"
    code, stdout, stderr = cli("train", three_classes, "--out", run, "--epochs", "1", "--val-fraction", "0.2",
                               "--curve", out, "--no-progress")  # fmt: skip
    assert code == 0, stderr
    assert json.loads((run / "curve.json").read_text()) == resumed and "learning curve:" in stdout
    assert json.loads((run / "metrics.json").read_text())["learning_curve"] == resumed["verdict"]
    report = (run / "report.html").read_text()
    assert "<h2>Learning curve</h2>" in report and "not on exactly this run" not in report
    code, stdout, stderr = cli("train", three_classes, "--out", run, "--resume", "--epochs", "2", "--no-progress")
    assert code == 0, stderr  # resumed without --curve: the run keeps the curve it was given
    assert json.loads((run / "metrics.json").read_text())["learning_curve"] == resumed["verdict"]


def test_curve_refuses_too_little_data(cli, fashion_train: Path, tmp_path: Path) -> None:
    data = tmp_path / "small"
    for name in ("bag", "trouser"):
        (data / name).mkdir(parents=True)
        for image in sorted((fashion_train / name).glob("*.png"))[:8]:
            shutil.copy(image, data / name)
    code, _, stderr = cli("curve", data, "--out", tmp_path / "out", "--no-progress")
    assert code == 2
    message = " ".join(stderr.split())
    assert str(data) in message and "too few for 5 nested" in message and "14 training examples" in message
    assert not (tmp_path / "out" / "curve.json").exists()


def test_curve_refuses_what_it_cannot_measure(cli, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path("/usr/share/games/fortunes/computers").read_text(errors="replace")[:5000])
    code, _, stderr = cli("curve", corpus, "--out", tmp_path / "out")
    assert code == 2 and "generate" in stderr and "classification" in stderr

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, stderr = cli("curve", corpus, "--out", run)
    assert code == 2 and "holds a training run" in stderr

    code, _, stderr = cli("curve", corpus, "--out", tmp_path / "out", "--target", "90")
    assert code == 2 and "--target" in stderr and "0.9" in stderr


def test_train_refuses_a_curve_that_is_not_there_or_not_finished(cli, three_classes: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = cli("train", three_classes, "--out", tmp_path / "run", "--curve", empty)
    assert code == 2 and f"--curve {empty}: no finished learning curve there" in " ".join(stderr.split())
    (empty / "curve.json").write_text('{"points": []}')
    code, _, stderr = cli("train", three_classes, "--out", tmp_path / "run", "--curve", empty)
    assert code == 2 and "not a finished learning curve" in stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
