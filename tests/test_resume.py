"""Long runs lose nothing: exact resume after SIGKILL / SIGINT, damaged checkpoints, NaN, safe loading."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise.errors import InputError

TRAIN_ARGS = ["--epochs", "3", "--batch-size", "16", "--checkpoint-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def small_data(fashion_train, tmp_path_factory) -> Path:
    """3 classes x 40 real images: 6 steps an epoch at batch 16, 18 steps in all."""
    root = tmp_path_factory.mktemp("resume_data")
    for name in ("bag", "sneaker", "trouser"):
        (root / name).mkdir()
        for f in sorted((fashion_train / name).glob("*.png"))[:40]:
            shutil.copy(f, root / name / f.name)
    return root


def layerwise_command(*args) -> list[str]:
    return [sys.executable, "-m", "layerwise", *map(str, args)]


def run_layerwise(*args) -> subprocess.CompletedProcess:
    return subprocess.run(layerwise_command(*args), capture_output=True, text=True, timeout=300)


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def start_and_wait_for_step(run: Path, data: Path, seed: int, step: int) -> subprocess.Popen:
    process = subprocess.Popen(
        layerwise_command("train", data, "--out", run, "--seed", seed, *TRAIN_ARGS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (run / "checkpoints").is_dir() or not checkpoint_steps(run) or checkpoint_steps(run)[-1] < step:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "training never reached the step"
        time.sleep(0.02)
    return process


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def history_without_time(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def reference_runs(small_data, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, one per seed."""
    runs = {}
    for seed in (0, 1):
        run = tmp_path_factory.mktemp("reference") / f"seed{seed}"
        result = run_layerwise("train", small_data, "--out", run, "--seed", seed, *TRAIN_ARGS)
        assert result.returncode == 0, result.stderr
        runs[seed] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(seed, small_data, reference_runs, tmp_path) -> None:
    kill_step = random.Random(seed).randint(2, 15)  # mid-epoch for most draws
    run = tmp_path / "killed"
    process = start_and_wait_for_step(run, small_data, seed, kill_step)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "model.safetensors").exists()

    resumed = run_layerwise("train", small_data, "--out", run, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step_" in resumed.stderr
    assert_identical(weights(run), weights(reference_runs[seed]))
    assert history_without_time(run) == history_without_time(reference_runs[seed])


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(small_data, reference_runs, tmp_path) -> None:
    run = tmp_path / "damaged"
    process = start_and_wait_for_step(run, small_data, 0, 8)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = (run / "checkpoints").glob("step_*")
    newest = max(newest, key=lambda p: p.name)
    tensor_file = newest / "tensors.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte
    tensor_file.write_bytes(bytes(data))

    resumed = run_layerwise("train", small_data, "--out", run, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest} is damaged (checksum mismatch)" in " ".join(resumed.stderr.split())
    assert_identical(weights(run), weights(reference_runs[0]))


@pytest.mark.slow
def test_sigint_leaves_a_resumable_checkpoint(small_data, reference_runs, tmp_path) -> None:
    run = tmp_path / "interrupted"
    process = start_and_wait_for_step(run, small_data, 1, 5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert "--resume" in stderr.decode()
    resumed = run_layerwise("train", small_data, "--out", run, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(weights(run), weights(reference_runs[1]))


def test_checkpoints_are_pruned_and_need_no_pickle(reference_runs) -> None:
    run = reference_runs[0]
    folders = sorted((run / "checkpoints").glob("step_*"))
    assert len(folders) == 3  # the newest and two before it
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors.safetensors"]
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_a_failed_checkpoint_write_keeps_the_previous_one(reference_runs, tmp_path, monkeypatch) -> None:
    from layerwise.training import checkpoint as ckpt

    directory = tmp_path / "checkpoints"
    shutil.copytree(reference_runs[0] / "checkpoints", directory)
    before = ckpt.load_latest_checkpoint(directory)

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # a half-written file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    state = json.loads((before.path / "state.json").read_text())
    state["loop"]["global_step"] += 1
    with pytest.raises(OSError):
        ckpt.save_checkpoint(directory, before.tensors, state)
    after = ckpt.load_latest_checkpoint(directory)
    assert after.path == before.path
    assert_identical(after.tensors, before.tensors)


class NanAtSteps(torch.nn.Module):
    """A real small CNN whose output is NaN on chosen training steps (a stand-in for a bad batch)."""

    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__()
        from layerwise.models import create_model

        self.inner = create_model("convnet_s", in_channels=1, num_classes=3)
        self.nan_steps, self.calls = nan_steps, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_steps:
                return out * float("nan")
        return out


def train_with_nans(nan_steps: set[int], fashion_train) -> tuple[torch.nn.Module, list[str], object]:
    from layerwise import TrainConfig, train
    from layerwise.data.batches import TensorBatches
    from layerwise.data.image import ImageFrontEnd
    from layerwise.data.sources import discover

    source = discover(fashion_train)
    examples = [e for e in source.examples if e.label in ("bag", "sneaker", "trouser")][::2]
    frontend = ImageFrontEnd.fit(examples)
    inputs, _, _ = frontend.decode_all(examples)
    labels = torch.tensor([("bag", "sneaker", "trouser").index(e.label) for e in examples])
    batches = TensorBatches(inputs, labels, 16, frontend.model_input, frontend.augment, shuffle=True)
    val = TensorBatches(inputs[:30], labels[:30], 64, frontend.model_input)
    model, messages = NanAtSteps(nan_steps), []
    result = train(model, batches, val, TrainConfig(epochs=4), show_progress=False, log=messages.append)
    return model, messages, result


def test_a_nan_step_is_skipped(fashion_train) -> None:
    model, messages, result = train_with_nans({4}, fashion_train)
    assert any("step 3: non-finite loss or gradient, update skipped" in m for m in messages)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.best_accuracy > 0.5  # 3 classes


def test_repeated_nans_roll_back_with_a_lower_learning_rate(fashion_train) -> None:
    model, messages, result = train_with_nans(set(range(8, 14)), fashion_train)
    assert any("rolled back to step" in m and "scaled by 0.1" in m for m in messages)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(result.history) == 4


def test_persistent_nans_stop_with_the_step(fashion_train) -> None:
    from layerwise.training.loop import TrainingDiverged

    with pytest.raises(
        TrainingDiverged, match=r"non-finite for 5 steps in a row up to step \d+, even after 1 roll-back"
    ):
        train_with_nans(set(range(3, 1000)), fashion_train)


def tampered(run: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(run, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


def test_tampered_model_files_name_the_tensor(reference_runs, tmp_path) -> None:
    import layerwise

    run = reference_runs[0]
    name = "head.fc.weight"
    cases = [
        (lambda t: t.pop(name), f"tensor '{name}' is missing"),
        (lambda t: t.update({name: torch.zeros(2, 2)}), f"tensor '{name}' has shape (2, 2)"),
        (lambda t: t.update({name: t[name].double()}), f"tensor '{name}' has dtype torch.float64"),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            layerwise.load(tampered(run, tmp_path / str(i), change))


def test_a_run_from_another_format_says_which_version(reference_runs, tmp_path) -> None:
    import layerwise

    copy = tmp_path / "old"
    shutil.copytree(reference_runs[0], copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(format=0, layerwise_version="0.0.1")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="written by layerwise 0.0.1"):
        layerwise.load(copy)


def test_loading_runs_no_pickle(reference_runs) -> None:
    files = sorted(p.name for p in reference_runs[0].iterdir() if p.is_file())
    assert files == [
        "config.json",
        "history.jsonl",
        "metrics.json",
        "model.safetensors",
        "problems.json",
        "report.html",
    ]
    with open(reference_runs[0] / "model.safetensors", "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        json.loads(f.read(header_size))  # a safetensors file: a JSON header, then raw bytes


def test_an_unwritable_output_stops_before_training(small_data, tmp_path, cli) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("train", small_data, "--out", blocker / "run")
    assert code == 2
    assert f"--out {blocker / 'run'}: cannot write there" in " ".join(err.split())


def test_resume_without_a_run_is_a_clear_error(small_data, tmp_path, cli) -> None:
    code, _, err = cli("train", small_data, "--out", tmp_path / "fresh", "--resume")
    assert code == 2 and "holds no run to resume" in err


def test_a_fused_optimizer_resumes_channels_last_weights_exactly() -> None:
    """GPUs train with fused AdamW, which walks a weight and its moments in memory order: moments restored from a
    checkpoint (saved contiguous) must take the layout of their channels-last weights again."""
    from pathlib import Path

    from layerwise.models import create_model
    from layerwise.training.checkpoint import Checkpoint, restore_training_tensors, training_tensors
    from layerwise.training.loop import TrainConfig, make_optimizer, prepare_model

    x, y = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.arange(8) % 3

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = prepare_model(create_model("convnet_s", in_channels=1, num_classes=3), torch.device("cpu"))
        return model, make_optimizer(model, TrainConfig(lr=1e-2), fused=True)

    def steps(model, optimizer, n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    model, optimizer = fresh(0)
    steps(model, optimizer, 2)
    saved = Checkpoint(
        Path("memory"), {"param_groups": optimizer.state_dict()["param_groups"]},
        {k: v.clone().contiguous() for k, v in training_tensors(model, optimizer).items()},
    )  # fmt: skip
    steps(model, optimizer, 2)
    resumed, resumed_optimizer = fresh(1)
    restore_training_tensors(saved, resumed, resumed_optimizer)
    steps(resumed, resumed_optimizer, 2)
    assert_identical(resumed.state_dict(), model.state_dict())
