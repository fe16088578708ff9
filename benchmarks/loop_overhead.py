"""How much throughput does layerwise's `train()` loop cost over a bare PyTorch loop?

Both variants train the same convnet_s (a fresh copy of one initialisation each time) on the same
real Fashion-MNIST images held in memory as uint8 (N, 1, 28, 28):

  layerwise  `train()` fed by `TensorBatches`: bf16 autocast and channels_last as layerwise does
             by default, no augmentation, `out_dir=None`, no progress bar, patience never reached,
             a tiny validation set.
  bare       a hand-written loop doing the same work: same batch size, same AdamW (layerwise's
             `make_optimizer`), same loss, `autocast_to` + `prepare_model`, the same number of
             optimizer steps and the same per-epoch validation pass. It does NOT clip gradients,
             update the learning rate, check for NaN or read the loss back each step: those are
             the loop's overhead we want to see.

After a short warm-up of each, the variants alternate (layerwise, bare, layerwise, bare, ...) for
`--rounds` rounds; each round prints one line per variant. Throughput is training examples per
second of wall time for the whole call, validation included. The machine is shared and noisy, so
read ratios, not absolute numbers. Besides the ratio of the medians, the script prints the median
of the per-round ratios, the ratio of the best runs and the ratio of CPU seconds per run; when
these disagree, other processes disturbed the runs: use more rounds or a quieter moment. On a
loaded 2-core machine `--threads 1` is steadier (two OpenMP threads stall whenever one of them is
descheduled).

`--profile` then times, on a real batch, each thing `train()` does per step beyond the bare loop
(learning-rate update, gradient clipping, NaN checks, `loss.item()`, accuracy, progress update)
and the per-epoch copies of the weights and optimizer state, in microseconds and as a fraction of
one bare training step; and it alternates bare steps with steps carrying all of those extras,
step by step, so both see the same load: the most noise-proof measure of the per-step overhead.

The last line is always `ratio=<layerwise throughput / bare throughput>`; 1.000 means no overhead,
the target is >= 0.95.

    .venv/bin/python benchmarks/loop_overhead.py [--n 8192] [--epochs 1] [--rounds 3] [--profile] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, replace

import torch
from rich.progress import Progress
from torch import nn

from layerwise.data.batches import TensorBatches
from layerwise.data.datasets import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_idx,
)
from layerwise.data.image import ImageFrontEnd, ImagePreprocessing
from layerwise.models import create_model
from layerwise.runtime import autocast_for, autocast_to, resolve_precision
from layerwise.training.checkpoint import training_tensors
from layerwise.training.loop import TrainConfig, learning_rate, make_optimizer, prepare_model, train

VAL_SIZE = 512  # tiny: the per-epoch validation pass should not dominate either variant
VAL_BATCH = 512  # what layerwise.api uses for validation batches
WARMUP_STEPS = 4  # per variant, before any timing (oneDNN primitive caches, allocator)


@dataclass(frozen=True)
class Data:
    train_x: torch.Tensor  # uint8 (N, 1, 28, 28)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor  # uint8 (VAL_SIZE, 1, 28, 28)
    val_y: torch.Tensor  # int64 (VAL_SIZE,)
    frontend: ImageFrontEnd  # its `model_input` normalises uint8 batches for both variants


def load_data(n: int) -> Data:
    """The first `n` + VAL_SIZE images of the Fashion-MNIST training split, decoded from IDX."""
    image_file, label_file = FASHION_MNIST_FILES["train"]
    images = read_idx(FASHION_MNIST_DIR / image_file, IDX_IMAGES_MAGIC)  # (60000, 28, 28)
    labels = read_idx(FASHION_MNIST_DIR / label_file, IDX_LABELS_MAGIC)  # (60000,)
    if n + VAL_SIZE > len(images):
        raise SystemExit(f"--n must be at most {len(images) - VAL_SIZE}, not {n}")
    x = torch.from_numpy(images[: n + VAL_SIZE].copy())[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
    y = torch.from_numpy(labels[: n + VAL_SIZE].astype("int64"))
    prep = ImagePreprocessing(side=28, channels=1, mean=(0.5,), std=(0.25,), hflip=False)
    frontend = ImageFrontEnd(prep)
    frontend.fit_statistics(x[:n])
    return Data(x[:n], y[:n], x[n:], y[n:], frontend)


def run_layerwise(model: nn.Module, data: Data, config: TrainConfig) -> int:
    """One `train()` call; returns the optimizer steps it took."""
    train_batches = TensorBatches(
        data.train_x, data.train_y, config.batch_size, data.frontend.model_input, shuffle=True
    )
    val_batches = TensorBatches(data.val_x, data.val_y, VAL_BATCH, data.frontend.model_input)
    result = train(model, train_batches, val_batches, config, show_progress=False, log=lambda *_: None)
    return result.global_step


def run_bare(model: nn.Module, data: Data, config: TrainConfig) -> int:
    """The hand-written loop; returns the optimizer steps it took."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = prepare_model(model, device)  # channels_last, as layerwise does
    optimizer = make_optimizer(model, config, fused=True)  # as `train()` in one process (on a GPU: bf16 or fp32)
    # On a GPU the data is held there, as `train()` holds it (training/memory.py); on the CPU these are no-ops.
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    n, batch = len(data.train_y), config.batch_size
    steps_per_epoch = n // batch if n >= 2 * batch else -(-n // batch)  # TensorBatches' drop_last
    generator = torch.Generator().manual_seed(config.seed)
    steps = 0
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)  # once an epoch, as TensorBatches does
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            x = data.frontend.model_input(train_x[index])  # (B, 1, 28, 28) float
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast_to(device, resolve_precision(config.precision, device)):
                loss = loss_fn(model(x).float(), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        model.eval()  # the same per-epoch validation pass as `predict_logits`
        with torch.no_grad(), autocast_to(device, resolve_precision(config.precision, device)):
            logits = [
                model(data.frontend.model_input(x).contiguous(memory_format=torch.channels_last)).float()
                for x in val_x.split(VAL_BATCH)
            ]
        float((torch.cat(logits).argmax(1) == val_y).float().mean())
    return steps


def fresh(initial: nn.Module) -> nn.Module:
    return copy.deepcopy(initial)  # same initial weights, own parameters and optimizer


def timed(run, initial: nn.Module, data: Data, config: TrainConfig) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, steps) of `run` on a fresh model copy."""
    model = fresh(initial)
    wall, cpu = time.perf_counter(), time.process_time()
    steps = run(model, data, config)
    return time.perf_counter() - wall, time.process_time() - cpu, steps


def median_ms(fn, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the mean milliseconds of `inner` back-to-back calls of `fn`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - started) * 1000 / inner)
    return statistics.median(times)


def profile_extras(initial: nn.Module, data: Data, config: TrainConfig, repeats: int) -> None:
    """Time of each thing `train()` does beyond the bare loop, against one bare step.

    Timed in place on a real batch, each extra many times, so the machine's noise averages out
    better than in whole-run ablations.
    """
    device = torch.device("cpu")
    model = prepare_model(fresh(initial), device)
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    x = data.frontend.model_input(data.train_x[: config.batch_size])
    x, y = x.contiguous(memory_format=torch.channels_last), data.train_y[: config.batch_size]
    state: dict = {}

    def bare_step() -> None:
        with autocast_to(device, resolve_precision(config.precision, device)):
            state["logits"] = model(x)
            state["loss"] = loss_fn(state["logits"].float(), y)
        optimizer.zero_grad(set_to_none=True)
        state["loss"].backward()
        optimizer.step()

    def lr_update() -> None:
        lr = learning_rate(config, 0.5)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def clip_grad() -> None:
        state["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)

    def finite_check() -> None:
        assert torch.isfinite(state["loss"]) and torch.isfinite(state["grad_norm"])

    def accuracy() -> None:
        int((state["logits"].argmax(1) == y).sum())

    progress = Progress(disable=True)  # as train() runs with show_progress=False
    bar = progress.add_task("train", total=10**9, epoch=1, loss=0.0, acc=0.0, rate=0.0)
    started = time.perf_counter()

    def progress_update() -> None:
        rate = config.batch_size / max(time.perf_counter() - started, 1e-9)
        progress.update(bar, advance=1, epoch=1, loss=0.1, acc=0.1, rate=rate)

    def clone_weights() -> None:
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    per_step = {
        "lr update": lr_update,
        "clip_grad_norm_": clip_grad,
        "isfinite(loss, norm)": finite_check,
        "loss.item()": lambda: state["loss"].item(),
        "argmax accuracy": accuracy,
        "progress.update (off)": progress_update,
    }
    for _ in range(WARMUP_STEPS):
        bare_step()
    clip_grad()
    step_ms = median_ms(bare_step, repeats)
    print(f"\nprofile: what train() adds per step, against one bare step ({step_ms:.1f} ms)")
    costs = {name: median_ms(fn, repeats, inner=10) for name, fn in per_step.items()}
    costs["all per-step extras"] = sum(costs.values())
    for name, ms in costs.items():
        print(f"  {name:<24} {ms * 1000:9.1f} us/step  {ms / step_ms:7.3%} of a step")
    per_epoch = {
        "best-weights copy": clone_weights,
        "training_tensors copy": lambda: training_tensors(model, optimizer),
    }
    for name, fn in per_epoch.items():
        ms = median_ms(fn, repeats)
        print(f"  {name:<24} {ms * 1000:9.1f} us/epoch  {ms / step_ms:7.3%} of a step")

    def full_step() -> None:  # a bare step plus everything train() adds to one
        lr_update()
        bare_step()
        clip_grad()  # after step() here, before it in train(): the same work on the same grads
        finite_check()
        state["loss"].item()
        accuracy()
        progress_update()

    bare_ms, full_ms = [], []
    for _ in range(repeats):  # alternate step by step: both see the same machine load
        bare_ms.append(median_ms(bare_step, 1))
        full_ms.append(median_ms(full_step, 1))
    bare_ms_median, full_ms_median = statistics.median(bare_ms), statistics.median(full_ms)
    print(
        f"  interleaved steps: bare {bare_ms_median:.1f} ms, with train()'s extras "
        f"{full_ms_median:.1f} ms: step throughput ratio {bare_ms_median / full_ms_median:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="training images (default 8192)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations a/b (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--profile", action="store_true", help="also time each per-step extra (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_data(args.n)
    torch.manual_seed(0)
    initial = create_model("convnet_s", in_channels=1, num_classes=10)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=10**6, seed=0, device=args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"convnet_s, {args.n} train / {VAL_SIZE} val Fashion-MNIST images, "
        f"batch {args.batch_size}, {args.epochs} epoch(s), {args.device} ({hardware}), "
        f"bf16 autocast: {isinstance(autocast_for(device, True), torch.autocast)}"
    )

    warmup_n = WARMUP_STEPS * args.batch_size
    warmup = Data(data.train_x[:warmup_n], data.train_y[:warmup_n], data.val_x, data.val_y, data.frontend)
    timed(run_layerwise, initial, warmup, replace(config, epochs=1))
    timed(run_bare, initial, warmup, replace(config, epochs=1))

    print(f"\n{'round':>5}  {'variant':<18} {'wall s':>7} {'cpu s':>7} {'ex/s':>7}")
    rates: dict[str, list[float]] = {"layerwise": [], "bare": []}
    cpus: dict[str, list[float]] = {"layerwise": [], "bare": []}
    for r in range(args.rounds):
        steps = {}
        for name, run in (("layerwise", run_layerwise), ("bare", run_bare)):
            wall, cpu, steps[name] = timed(run, initial, data, config)
            rates[name].append(steps[name] * args.batch_size / wall)
            cpus[name].append(cpu)
            label = "layerwise train()" if name == "layerwise" else "bare loop"
            print(f"{r + 1:>5}  {label:<18} {wall:7.2f} {cpu:7.2f} {rates[name][-1]:7.0f}")
        assert steps["layerwise"] == steps["bare"], f"step counts differ: {steps}"
        ratio = rates["layerwise"][-1] / rates["bare"][-1]
        print(f"{'':>5}  {'round ratio':<18} {ratio:23.3f}", flush=True)

    layerwise, bare = statistics.median(rates["layerwise"]), statistics.median(rates["bare"])
    round_ratios = [a / b for a, b in zip(rates["layerwise"], rates["bare"], strict=True)]
    print(
        f"\nmedians over {args.rounds} rounds: layerwise {layerwise:.0f} ex/s, "
        f"bare {bare:.0f} ex/s; median round ratio {statistics.median(round_ratios):.3f}"
    )
    cpu_ratio = statistics.median(cpus["bare"]) / statistics.median(cpus["layerwise"])
    best_ratio = max(rates["layerwise"]) / max(rates["bare"])
    print(f"best run of each (other load only ever slows a run down): ratio {best_ratio:.3f}")
    print(f"CPU seconds per run, bare / layerwise (less sensitive to other load): {cpu_ratio:.3f}")
    if args.profile and device.type == "cpu":
        profile_extras(initial, data, config, repeats=15)
    print(f"ratio={layerwise / bare:.3f}")


if __name__ == "__main__":
    main()
