"""A run directory is never damaged by a refused or resumed command (issue: run integrity).

Each refusal is checked by hashing every file of the run before and after.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TRAIN_ARGS = ["--epochs", "3", "--batch-size", "16", "--checkpoint-every", "0", "--no-progress"]


def digest(run: Path) -> dict[str, str]:
    """sha256 of every file under `run`, by relative path."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def copy_classes(source: Path, dest: Path, classes: tuple[str, ...], per_class: int = 40) -> Path:
    for name in classes:
        (dest / name).mkdir(parents=True)
        for f in sorted((source / name).glob("*.png"))[:per_class]:
            shutil.copy(f, dest / name / f.name)
    return dest


@pytest.fixture(scope="module")
def three_classes(fashion_train, tmp_path_factory) -> Path:
    return copy_classes(fashion_train, tmp_path_factory.mktemp("three"), ("bag", "sneaker", "trouser"))


@pytest.fixture(scope="module")
def other_classes(fashion_train, tmp_path_factory) -> Path:
    return copy_classes(fashion_train, tmp_path_factory.mktemp("other"), ("coat", "dress", "pullover"))


@pytest.fixture(scope="module")
def finished_run(three_classes, tmp_path_factory) -> Path:
    """A 3-epoch run, finished; tests copy it before changing anything."""
    from typer.testing import CliRunner

    from layerwise.cli import app

    run = tmp_path_factory.mktemp("runs") / "finished"
    result = CliRunner().invoke(app, ["train", str(three_classes), "--out", str(run), *TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["--model", "resnet_s"], ["--epochs", "1"]])
def test_a_refused_overwrite_leaves_the_run_untouched(cli, finished_run, other_classes, tmp_path, extra) -> None:
    run = copy_run(finished_run, tmp_path)
    before = digest(run)
    code, _, err = cli("train", other_classes, "--out", run, "--no-progress", *extra)
    assert code == 2 and "--resume" in err
    assert digest(run) == before
    bag = next((three_classes_of(run) / "bag").glob("*.png"))
    code, out, _ = cli("predict", run, bag, "--json")
    assert code == 0 and json.loads(out)["label"] in ("bag", "sneaker", "trouser")


def three_classes_of(run: Path) -> Path:
    return Path(json.loads((run / "config.json").read_text())["data"]["source"])


def test_generate_on_a_classification_run_is_refused(cli, finished_run) -> None:
    code, _, err = cli("generate", finished_run, "--prompt", "hello")
    assert code == 2 and "`layerwise generate` does not apply to a classify run" in err


def test_resume_after_a_kill_before_the_first_checkpoint_trains_from_the_start(
    cli, finished_run, three_classes, tmp_path
) -> None:
    run = tmp_path / "early"
    run.mkdir()
    for name in ("config.json", "problems.json"):  # what a run holds when killed before its first checkpoint
        shutil.copy(finished_run / name, run / name)
    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert "no checkpoint was written" in err
    a, b = load_file(str(run / "model.safetensors")), load_file(str(finished_run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_applies_more_epochs_and_refuses_fixed_flags(cli, finished_run, three_classes, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = digest(run)
    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--lr", "0.1", "--no-progress")
    assert code == 2
    assert "--lr 0.1 (the run has 0.003)" in " ".join(err.split())
    assert digest(run) == before

    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--epochs", "5", "--no-progress")
    assert code == 0, err
    assert "epochs: 5 (was 3)" in err
    assert [h["epoch"] for h in history(run)] == [1, 2, 3, 4, 5]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 5
    assert history(run)[:3] == history(finished_run)


def test_resuming_a_finished_run_changes_nothing(cli, finished_run, three_classes, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = digest(run)
    code, out, err = cli("train", three_classes, "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert "already finished" in err and "nothing to do" in err
    assert digest(run) == before


def test_resuming_a_run_stopped_by_its_time_budget_trains_no_more(cli, three_classes, tmp_path) -> None:
    run = tmp_path / "budget"
    args = ["--epochs", "500", "--time-budget", "1", "--batch-size", "16", "--no-progress"]
    code, _, err = cli("train", three_classes, "--out", run, *args)
    assert code == 0, err
    before = digest(run)
    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--no-progress")
    assert code == 0 and "time budget" in err and "nothing to do" in err
    assert digest(run) == before


def test_resume_refuses_changed_data(cli, finished_run, three_classes, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = digest(run)
    fewer = copy_classes(three_classes, tmp_path / "fewer", ("bag", "sneaker"))
    code, _, err = cli("train", fewer, "--out", run, "--resume", "--no-progress")
    assert code == 2 and "class 'trouser' missing" in err
    more = copy_classes(three_classes, tmp_path / "more", ("bag", "sneaker", "trouser"))
    shutil.copy(next((more / "bag").glob("*.png")), more / "bag" / "extra.png")
    code, _, err = cli("train", more, "--out", run, "--resume", "--no-progress")
    assert code == 2 and "no longer matches the run" in err
    assert digest(run) == before
    # Moving the same data elsewhere is fine: the run is identified by relative paths.
    moved = copy_classes(three_classes, tmp_path / "moved", ("bag", "sneaker", "trouser"))
    code, _, err = cli("train", moved, "--out", run, "--resume", "--epochs", "4", "--no-progress")
    assert code == 0, err


def test_ctrl_c_after_training_exits_130_and_resume_finishes_without_training(
    cli, three_classes, tmp_path, monkeypatch
) -> None:
    from layerwise.tasks.classify import ClassifyTask

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while the baseline was being fitted

    run = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(ClassifyTask, "baseline", interrupted)
        code, _, err = cli("train", three_classes, "--out", run, *TRAIN_ARGS)
    assert code == 130 and "Aborted" not in err
    assert not (run / "model.safetensors").exists()
    trained = history(run)
    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert history(run) == trained  # nothing more was trained
    assert (run / "model.safetensors").is_file() and (run / "report.html").is_file()


def test_outputs_of_an_earlier_stop_are_not_taken_for_a_finished_run(
    cli, finished_run, three_classes, tmp_path, monkeypatch
) -> None:
    from layerwise.tasks.classify import ClassifyTask

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    run = copy_run(finished_run, tmp_path)  # holds the 3-epoch model, metrics and report
    with monkeypatch.context() as patch:
        patch.setattr(ClassifyTask, "baseline", interrupted)
        code, _, _ = cli("train", three_classes, "--out", run, "--resume", "--epochs", "5", "--no-progress")
    assert code == 130
    code, _, err = cli("train", three_classes, "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert "nothing to do" not in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 5 and len(history(run)) == 5


def test_best_weights_are_restored_at_the_end(finished_run) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    best = max(history(finished_run), key=lambda h: h["val_accuracy"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["metrics"]["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)  # float32 mean


class ScriptedScore:
    """Cross-entropy training with validation scores given in advance (a deterministic worst-last run)."""

    monitor, higher_is_better = "score", True

    def __init__(self, scores: list[float]) -> None:
        from layerwise.tasks.classify import CrossEntropyObjective

        self.inner, self.scores, self.snapshots = CrossEntropyObjective(), list(scores), []

    def loss(self, model, inputs, targets):
        return self.inner.loss(model, inputs, targets)

    def evaluate(self, model, batches) -> dict[str, float]:
        self.snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": 0.0, "score": self.scores[len(self.snapshots) - 1]}


def test_the_loop_ends_with_the_best_epochs_weights_not_the_last(fashion_train) -> None:
    from layerwise import TrainConfig, create_model, train
    from layerwise.data.batches import TensorBatches

    torch.manual_seed(0)
    inputs = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64) % 3
    to_input = lambda x: x.float() / 255  # noqa: E731
    batches = TensorBatches(inputs, labels, 16, to_input, shuffle=True)
    objective = ScriptedScore([0.2, 0.9, 0.4, 0.3])
    model = create_model("convnet_s", in_channels=1, num_classes=3)
    result = train(model, batches, batches, TrainConfig(epochs=4), show_progress=False, objective=objective)
    assert result.best_epoch == 2
    final = model.state_dict()
    assert all(torch.equal(final[k], objective.snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], objective.snapshots[3][k]) for k in final)


def test_init_starts_from_the_donor_weights(cli, finished_run, three_classes, tmp_path) -> None:
    import layerwise
    from layerwise.api import transfer_weights

    donor = layerwise.load(finished_run)
    fresh = layerwise.create_model(donor.config["model"]["name"], **donor.config["model"]["config"])
    transfer_weights(fresh, donor, donor.task, finished_run)
    ours, theirs = fresh.state_dict(), donor.network.state_dict()
    assert all(torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in theirs)

    one_epoch = ["--epochs", "1", "--batch-size", "16", "--no-progress"]
    code, _, err = cli("train", three_classes, "--out", tmp_path / "scratch", *one_epoch)
    assert code == 0, err
    code, _, err = cli("train", three_classes, "--out", tmp_path / "init", "--init", finished_run, *one_epoch)
    assert code == 0, err
    assert history(tmp_path / "init")[0]["train_loss"] < history(tmp_path / "scratch")[0]["train_loss"]


@pytest.fixture(scope="module")
def text_run(fortunes_run) -> Path:
    return fortunes_run


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_a_mistyped_file_name_is_an_error_and_text_needs_the_text_option(cli, text_run, tmp_path, command) -> None:
    out = ["--out", tmp_path / "why"] if command == "explain" else []
    code, _, err = cli(command, text_run, "reviw_typo.txt", *out)
    assert code == 2 and "reviw_typo.txt: no such file or directory" in err
    code, stdout, err = cli(command, text_run, "--text", "the computer crashed again", *out)
    assert code == 0, err
    assert "the computer crashed again" in stdout


def test_binary_files_named_txt_are_not_text(cli, text_run, tmp_path) -> None:
    binary = tmp_path / "random.txt"
    binary.write_bytes(os.urandom(2000) + b"\0" * 2000)
    code, out, err = cli("predict", text_run, binary, "--json")
    assert code == 2
    assert json.loads(out)["error"].startswith("not text")
    assert str(binary) in err


def test_init_from_a_text_run_reuses_its_tokenizer(cli, text_run, data_root, tmp_path) -> None:
    from layerwise.data.datasets import prepare_fortunes

    other = prepare_fortunes(data_root / "fortunes-other", topics=("science", "wisdom"), per_class=80)
    run = tmp_path / "init"
    code, _, err = cli("train", other, "--out", run, "--init", text_run, "--epochs", "1", "--no-progress")
    assert code == 0, err
    ours = json.loads((run / "config.json").read_text())["preprocessing"]
    donor = json.loads((text_run / "config.json").read_text())["preprocessing"]
    assert ours == donor


def test_loading_and_predicting_imports_no_training_code(finished_run, three_classes) -> None:
    bag = next((three_classes / "bag").glob("*.png"))
    script = (
        "import sys, layerwise\n"
        f"model = layerwise.load({str(finished_run)!r})\n"
        f"predictions, _ = model.predict([{str(bag)!r}])\n"
        "assert predictions[0].label\n"
        "banned = ['layerwise.training', 'layerwise.training.loop', 'layerwise.training.checkpoint', "
        "'layerwise.api', 'rich.progress']\n"
        "print([name for name in banned if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path, monkeypatch) -> None:
    from layerwise import files

    target = tmp_path / "config.json"
    files.write_json(target, {"a": 1})

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        files.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
