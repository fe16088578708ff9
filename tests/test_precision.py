"""--device, --precision and --compile on the one training loop (CPU here; the same code paths on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from layerwise.bundle import load_weights
from layerwise.data.batches import TensorBatches
from layerwise.errors import InputError
from layerwise.runtime import resolve_device, resolve_precision
from layerwise.training.checkpoint import list_checkpoints
from layerwise.training.loop import TrainConfig, train


def small_problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 8, generator=generator)
    labels = (inputs[:, 0] + inputs[:, 1] > 0).long()
    train_batches = TensorBatches(inputs[:64], labels[:64], 16, lambda x: x, shuffle=True, seed=0)
    val_batches = TensorBatches(inputs[64:], labels[64:], 16, lambda x: x)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)), train_batches, val_batches


def fit(precision: str = "fp32", compile: bool = False, epochs: int = 3, out=None, resume=False):
    model, train_batches, val_batches = small_problem()
    config = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, device="cpu", precision=precision, compile=compile)
    result = train(model, train_batches, val_batches, config, out_dir=out, resume=resume, show_progress=False,
                   log=lambda message: None)  # fmt: skip
    return model, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_like_fp32_and_differs_from_it(precision):
    fp32_model, fp32 = fit("fp32")
    model, result = fit(precision)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # it learns
    assert losses != [h["train_loss"] for h in fp32.history]  # autocast really ran in lower precision
    assert losses == pytest.approx([h["train_loss"] for h in fp32.history], abs=0.02)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_fp16_checkpoints_its_loss_scale_and_resumes_with_it(tmp_path):
    fit("fp16", epochs=2, out=tmp_path)
    state = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 1 and state["config"]["precision"] == "fp16"
    _, result = fit("fp16", epochs=3, out=tmp_path, resume=True)
    assert len(result.history) == 3


def test_an_overflowing_fp16_step_lowers_the_scale_instead_of_counting_as_divergence(tmp_path):
    # A loss scale of 2**40 overflows fp16 gradients on the first steps: the scaler skips them and halves the
    # scale until it fits, and training still ends normally.
    model, train_batches, val_batches = small_problem()
    original = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "init_scale": 2.0**40})

    torch.amp.GradScaler.__init__ = huge_scale
    try:
        config = TrainConfig(epochs=2, batch_size=16, device="cpu", precision="fp16")
        train(model, train_batches, val_batches, config, out_dir=tmp_path, show_progress=False, log=print)
    finally:
        torch.amp.GradScaler.__init__ = original
    state = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "state.json").read_text())
    assert state["grad_scaler"]["scale"] < 2.0**40
    assert state["loop"]["stop_kind"] == "epochs"


@pytest.mark.slow
def test_a_compiled_run_saves_plain_names_and_resumes_uncompiled(tmp_path):
    _, plain = fit("fp32", compile=False, epochs=3)
    _, compiled = fit("fp32", compile=True, epochs=3, out=tmp_path)
    losses = [h["train_loss"] for h in compiled.history]
    assert losses == pytest.approx([h["train_loss"] for h in plain.history], rel=1e-4)
    state = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "state.json").read_text())
    assert state["config"]["compile"] is True
    # The compiled run's checkpoint continues in an uncompiled process (one more epoch).
    model, resumed = fit("fp32", compile=False, epochs=4, out=tmp_path, resume=True)
    assert not any("_orig_mod" in name for name in model.state_dict())
    assert [h["train_loss"] for h in resumed.history][:3] == losses and len(resumed.history) == 4


def test_weights_saved_from_a_compiled_network_by_another_tool_load(tmp_path):
    model, _, _ = small_problem()
    save_file({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    load_weights(fresh, tmp_path / "w.safetensors")
    torch.testing.assert_close(fresh[0].weight, model[0].weight)


def test_bad_devices_and_precisions_are_clear_errors():
    with pytest.raises(InputError, match="--precision fp64"):
        TrainConfig(precision="fp64")
    with pytest.raises(InputError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")


def test_the_cli_refuses_a_device_that_is_not_there(cli, tmp_path, fashion_train):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli("train", fashion_train, "--out", tmp_path / "run", "--device", "cuda", "--no-progress")
    assert code == 2 and "no CUDA GPU" in err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_idle_openmp_threads_sleep_unless_the_user_chose_otherwise(given):
    # In a fresh interpreter: the command line sets the policy before torch (and OpenMP) start.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": given} if given else {}
    )
    code = "import os, layerwise.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == (given or "PASSIVE")


def test_a_non_finite_fp16_loss_is_skipped_and_training_goes_on(tmp_path):
    from layerwise.tasks.classify import CrossEntropyObjective

    class NanAtStep3(CrossEntropyObjective):
        steps = 0

        def loss(self, model, inputs, targets):
            self.steps += 1
            loss, stats = super().loss(model, inputs, targets)
            return (loss * float("nan") if self.steps == 3 else loss), stats

    model, train_batches, val_batches = small_problem()
    messages = []
    config = TrainConfig(epochs=2, batch_size=16, device="cpu", precision="fp16")
    result = train(model, train_batches, val_batches, config, out_dir=tmp_path, show_progress=False,
                   log=messages.append, objective=NanAtStep3(0.0))  # fmt: skip
    assert any("step 2: non-finite loss" in m for m in messages)
    assert result.global_step == 8 and all(torch.isfinite(p).all() for p in model.parameters())
