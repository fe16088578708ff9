"""Fitting training into the device's memory: micro-batches after an out-of-memory step, the batch search,
training data held on the GPU. The CPU tests run everywhere; the CUDA ones where a GPU is (they ran on an
H200: benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from layerwise.data.batches import TensorBatches
from layerwise.data.image import ImagePreprocessing, augment
from layerwise.tasks.classify import CrossEntropyObjective
from layerwise.training.distributed import LossOf
from layerwise.training.loop import TrainConfig, train
from layerwise.training.memory import accumulate, batch_limit, count_examples, largest_batch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class MemoryLimited(nn.Module):
    """A small MLP whose training forward fails like a full GPU once a batch holds more than `max_examples`
    rows: the error PyTorch raises (torch.OutOfMemoryError), at the size a device of that memory would raise it.
    Evaluation keeps no activations for a backward pass, so it fits (as it does on a GPU, at far larger sizes)."""

    def __init__(self, max_examples: int | None) -> None:
        super().__init__()
        self.max_examples = max_examples
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.max_examples is not None and len(x) > self.max_examples:
            raise torch.OutOfMemoryError(f"out of memory: {len(x)} rows, room for {self.max_examples}")
        return self.layers(x)


def toy_data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 1).long()
    return inputs, labels


def test_micro_batches_give_the_gradients_of_the_whole_batch():
    inputs, labels = toy_data()
    torch.manual_seed(0)
    model = MemoryLimited(None)
    step = LossOf(model, CrossEntropyObjective(0.0))
    grads = []
    for parts in (1, 3, 4):  # 3 parts of 32, 32, 32; 4 of 24
        model.zero_grad()
        loss, stats = accumulate(step, inputs, labels, parts, lambda loss: loss.backward())
        grads.append(([p.grad.clone() for p in model.parameters()], loss.item(), stats))
    (whole, whole_loss, whole_stats), *split = grads
    for grad, loss, stats in split:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, grad, strict=True))
        assert loss == pytest.approx(whole_loss, abs=1e-6)
        assert stats.keys() == whole_stats.keys()


def test_uneven_micro_batches_weigh_by_examples():
    inputs, labels = toy_data()
    torch.manual_seed(0)
    model = MemoryLimited(None)
    step = LossOf(model, CrossEntropyObjective(0.0))
    model.zero_grad()
    accumulate(step, inputs[:10], labels[:10], 1, lambda loss: loss.backward())
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    accumulate(step, inputs[:10], labels[:10], 4, lambda loss: loss.backward())  # parts of 3, 3, 2, 2
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(whole, model.parameters(), strict=True))


def train_toy(max_examples: int | None, batch_size: int = 16):
    inputs, labels = toy_data()
    train_batches = TensorBatches(inputs[:80], labels[:80], batch_size, lambda x: x, shuffle=True, seed=0)
    val_batches = TensorBatches(inputs[80:], labels[80:], 16, lambda x: x)
    torch.manual_seed(0)
    model = MemoryLimited(max_examples)
    config = TrainConfig(epochs=3, batch_size=batch_size, lr=1e-2, device="cpu", precision="fp32", label_smoothing=0)
    messages: list[str] = []
    result = train(model, train_batches, val_batches, config, show_progress=False, log=messages.append)
    return model, result, messages


def test_a_step_out_of_memory_is_retried_in_parts_and_trains_the_same_weights():
    unlimited, unlimited_result, _ = train_toy(None)
    limited, result, messages = train_toy(max_examples=5)  # 16 examples: 2 parts of 8 still fail, 4 of 4 fit
    assert [m for m in messages if "out of cpu memory" in m or "again" in m] == [
        "step 0: out of cpu memory with 16 examples at once; retrying as 2 micro-batches whose gradients add up "
        "to one step",
        "step 0: out of cpu memory with 16 examples at once; retrying as 4 micro-batches whose gradients add up "
        "to one step",
        # Each epoch tries parts twice as large once, and goes back to 4 when they still do not fit.
        "epoch 2: trying 2 micro-batch(es) a step again",
        "step 5: out of cpu memory with 16 examples at once; retrying as 4 micro-batches whose gradients add up "
        "to one step",
        "epoch 3: trying 2 micro-batch(es) a step again",
        "step 10: out of cpu memory with 16 examples at once; retrying as 4 micro-batches whose gradients add up "
        "to one step",
    ]
    assert [h["micro_batches"] for h in result.history] == [4, 4, 4]
    assert result.global_step == unlimited_result.global_step == 15
    for a, b in zip(unlimited.parameters(), limited.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_whole_batches_come_back_once_the_memory_is_free_again():
    class MemoryFreedAfterValidation(TensorBatches):
        """Validation batches; once the first validation starts, the device's memory is free again (as when
        another process that held it ends)."""

        def epoch(self, epoch: int, start: int = 0):
            model.max_examples = None
            return super().epoch(epoch, start)

    inputs, labels = toy_data()
    train_batches = TensorBatches(inputs[:80], labels[:80], 16, lambda x: x, shuffle=True, seed=0)
    val_batches = MemoryFreedAfterValidation(inputs[80:], labels[80:], 16, lambda x: x)
    torch.manual_seed(0)
    model = MemoryLimited(max_examples=5)
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, device="cpu", precision="fp32", label_smoothing=0)
    result = train(model, train_batches, val_batches, config, show_progress=False, log=lambda _: None)
    assert [h.get("micro_batches", 1) for h in result.history] == [4, 2, 1, 1]  # halved each epoch, not kept


def test_a_single_example_that_does_not_fit_is_an_error():
    with pytest.raises(torch.OutOfMemoryError):
        train_toy(max_examples=0)


def test_count_examples_follows_the_way_batches_are_cut():
    assert count_examples(torch.zeros(5, 3)) == 5
    assert count_examples([{"boxes": 1}, {"boxes": 2}]) == 2
    assert count_examples((torch.zeros(7, 2), torch.zeros(7))) == 7


def test_the_batch_search_leaves_every_epoch_enough_steps():
    assert batch_limit(256, 54_000) == 1024  # 54,000 / 50 = 1,080
    assert batch_limit(256, 1_000_000) == 4096
    assert batch_limit(64, 3_000) == 64  # 3,000 / 50 = 60: no room to grow


def image_batches(n: int = 64) -> TensorBatches:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 10
    prep = ImagePreprocessing(side=28, channels=1, mean=(0.5,), std=(0.25,), hflip=True)
    return TensorBatches(
        images, labels, 16, lambda x: x.float(), augment=lambda b, g: augment(b, prep, g), shuffle=True, seed=3
    )


def test_batches_held_on_a_device_are_the_batches_of_the_host_copy():
    host = image_batches()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held = host.on_device(torch.device(device))
    assert held.inputs.device.type == device and host.inputs.device.type == "cpu"
    for (x, y), (hx, hy) in zip(host.epoch(2), held.epoch(2), strict=True):
        assert hx.device.type == device
        assert torch.equal(x, hx.cpu()) and torch.equal(y, hy.cpu())


@needs_cuda
def test_the_batch_search_finds_a_larger_batch_that_fits_and_leaves_the_network_untouched():
    inputs, labels = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8), torch.arange(60_000) % 10
    from layerwise.models.registry import create_model

    network = create_model("convnet_s", in_channels=1, num_classes=10)
    before = {k: v.clone() for k, v in network.state_dict().items()}

    def batches_of(size: int) -> TensorBatches:
        return TensorBatches(inputs, labels, size, lambda x: x.float() / 255, shuffle=True)

    search = largest_batch(
        network, CrossEntropyObjective(0.1), batches_of, 256, 60_000, torch.device("cuda"), "bf16"
    )  # fmt: skip
    assert search.chosen == 1024 and search.limit == 1024
    assert set(search.peak_gib) == {512, 1024} and all(v > 0 for v in search.peak_gib.values())
    assert search.lr_for(3e-3) == pytest.approx(6e-3)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # BatchNorm statistics too


@needs_cuda
def test_a_real_out_of_memory_step_on_the_gpu_is_retried_in_parts():
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # 17M parameters (with gradients and AdamW's moments, ~0.3 GB) and 1 GiB more for activations: one batch of
    # 4096 needs ~2 GB of them (two 4096 x 65536 bf16 tensors kept for the backward pass, and their gradients).
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**30) / total)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 65536), nn.ReLU(), nn.Linear(65536, 2))
        inputs = torch.randn(4096 + 64, 256)
        labels = torch.arange(4096 + 64) % 2
        train_batches = TensorBatches(inputs[:4096], labels[:4096], 4096, lambda x: x, shuffle=True)
        val_batches = TensorBatches(inputs[4096:], labels[4096:], 64, lambda x: x)
        config = TrainConfig(epochs=1, batch_size=4096, device="cuda", precision="bf16")
        messages: list[str] = []
        result = train(model, train_batches, val_batches, config, show_progress=False, log=messages.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("out of cuda memory with 4096 examples at once" in m for m in messages), messages
    assert result.history[0]["micro_batches"] >= 2 and result.global_step == 1


@needs_cuda
@pytest.mark.slow
def test_a_gpu_run_searches_its_batch_and_records_it(tmp_path, fashion_train):
    import layerwise

    model = layerwise.fit(fashion_train, tmp_path / "run", epochs=2, device="cuda", show_progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    search = config["batch_search"]
    # 540 training images leave no room above the task's default batch for 50 steps an epoch.
    assert search["device"] == "cuda" and search["chosen"] == config["train"]["batch_size"]
    assert model.summary["device"].startswith("cuda")


def test_token_windows_held_on_a_device_are_the_windows_of_the_host_stream():
    from layerwise.data.windows import RandomWindows

    tokens = np.random.default_rng(0).integers(0, 500, 5_000).astype(np.uint16)  # as a memory-mapped stream
    host = RandomWindows(tokens, context_len=32, batch_size=8, seed=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held = host.on_device(torch.device(device))
    for (x, y), (hx, hy) in zip(host.epoch(1, start=3), held.epoch(1, start=3), strict=True):
        assert hx.device.type == device and hx.dtype == x.dtype == torch.int64
        assert torch.equal(x, hx.cpu()) and torch.equal(y, hy.cpu())
