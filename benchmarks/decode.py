"""How fast does layerwise's image front end turn a folder of PNGs into training batches?

Prepares `--n` real Fashion-MNIST images as 28x28 grayscale PNGs (cached under `--cache`, so only
the first run pays for writing them), then alternates for `--rounds` rounds:

  layerwise  `ImageFrontEnd.decode_all` (worker processes above 4096 files) on the folder, then one
             pass of `augment` (random translate + flip) over the result in batches of 256.
  bare       a single-process PIL loop: open, convert("L"), np.asarray, then np.stack.

Each round prints wall seconds, CPU seconds (this process plus decode_all's worker processes) and
images/s for both (layerwise split into decode and augment), and their ratio; both outputs are
checked to hold the same pixels. Each round also times `--train-steps` convnet_s training steps at
batch 256 (bf16 autocast, channels_last, gradient clipping, as `train()` runs them), so the front
end is compared with training under the same load. The summary says whether the front end limits
a training run: decoding happens once per run (the uint8 images are then cached in memory),
augmentation once per epoch, both on the training process itself.

The machine is shared and noisy: read the ratios of medians, not the absolute numbers. Small torch
ops (augment, and training on 28x28 images) suffer most when other processes compete for the two
cores: an OpenMP thread that is descheduled makes the other spin, so CPU seconds close to twice the
wall seconds mean a clean measurement (for training and augment, which use both threads).

The last line is `ratio=<layerwise images/s (decode + augment) / bare images/s>`.

    .venv/bin/python benchmarks/decode.py [--n 10000] [--rounds 5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from layerwise.data.datasets import prepare_fashion_mnist
from layerwise.data.image import ImageFrontEnd
from layerwise.data.sources import Example, discover
from layerwise.models import create_model
from layerwise.runtime import autocast_to, resolve_precision
from layerwise.training.loop import TrainConfig, make_optimizer, prepare_model

AUGMENT_BATCH = 256  # images per `augment` call, as in training
TRAIN_BATCH = 256
TRAIN_WARMUP_STEPS = 2
CLASSES = 10  # Fashion-MNIST


def prepare_examples(cache: Path, n: int) -> list[Example]:
    """`n` Fashion-MNIST training images as PNG files (the first n/10 of each class)."""
    per_class = -(-n // CLASSES)
    root = prepare_fashion_mnist(cache / f"fashion-mnist-{per_class}", "train", per_class)
    return discover(root, "image").examples[:n]


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes (decode_all's pool)."""
    own, workers = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def run_layerwise(frontend: ImageFrontEnd, examples: list[Example]) -> tuple[dict, torch.Tensor]:
    """({"decode"|"augment": (wall s, cpu s)}, decoded uint8 (N, 1, 28, 28))."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    images, kept, problems = frontend.decode_all(examples)
    decode = (time.perf_counter() - wall, cpu_seconds() - cpu)
    assert len(kept) == len(examples) and not problems, problems[:3]
    wall, cpu = time.perf_counter(), cpu_seconds()
    for i, batch in enumerate(images.split(AUGMENT_BATCH)):
        frontend.augment(batch, torch.Generator().manual_seed(i))
    augment = (time.perf_counter() - wall, cpu_seconds() - cpu)
    return {"decode": decode, "augment": augment}, images


def run_bare(paths: list[Path]) -> tuple[tuple[float, float], np.ndarray]:
    """((wall s, cpu s), uint8 (N, 28, 28)) for the simplest correct single-process loop."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert("L")))
    images = np.stack(arrays)
    return (time.perf_counter() - wall, cpu_seconds() - cpu), images


def make_train_step(frontend: ImageFrontEnd, images: torch.Tensor) -> Callable[[], None]:
    """One convnet_s training step at batch 256, as `train()` takes it (bf16, channels_last)."""
    device = torch.device("cpu")
    config = TrainConfig(batch_size=TRAIN_BATCH, device="cpu")
    torch.manual_seed(0)
    model = prepare_model(create_model("convnet_s", in_channels=1, num_classes=CLASSES), device)
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    labels = torch.randint(0, CLASSES, (TRAIN_BATCH,))
    x = frontend.model_input(images[:TRAIN_BATCH]).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast_to(device, resolve_precision(config.precision, device)):
            loss = loss_fn(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return step


def run_training(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """(wall s, cpu s) of `steps` training steps."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        step()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="PNG files (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations a/b (default 5)")
    parser.add_argument("--train-steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "layerwise-bench",
        help="where the PNGs are written once and reused (default: $TMPDIR/layerwise-bench)",
    )
    args = parser.parse_args()
    if not 1 <= args.n <= 60_000:
        raise SystemExit(f"--n must be between 1 and 60000, not {args.n}")

    started = time.perf_counter()
    examples = prepare_examples(args.cache, args.n)
    paths = [ex.path for ex in examples]
    frontend = ImageFrontEnd.fit(examples)  # side 28, 1 channel, horizontal flips
    print(
        f"{len(examples)} PNGs in {paths[0].parents[1]} (ready in "
        f"{time.perf_counter() - started:.1f} s), side {frontend.prep.side}, "
        f"{frontend.prep.channels} channel(s), {torch.get_num_threads()} torch threads"
    )

    _, images = run_layerwise(frontend, examples)  # warm-up: page cache, first pool start
    _, bare_images = run_bare(paths)
    assert torch.equal(images[:, 0], torch.from_numpy(bare_images)), "decoded pixels differ"
    train_step = make_train_step(frontend, images)
    run_training(train_step, TRAIN_WARMUP_STEPS)

    print(f"\n{'round':>5}  {'variant':<24} {'wall s':>7} {'cpu s':>7} {'images/s':>9}")
    rates: dict[str, list[float]] = {"layerwise": [], "decode": [], "augment": [], "bare": [], "train": []}
    n = len(paths)
    for r in range(args.rounds):
        parts, _ = run_layerwise(frontend, examples)
        bare, _ = run_bare(paths)
        train_wall, train_cpu = run_training(train_step, args.train_steps)
        rates["train"].append(args.train_steps * TRAIN_BATCH / train_wall)
        both = tuple(d + a for d, a in zip(parts["decode"], parts["augment"], strict=True))
        rows = {
            "layerwise": ("layerwise decode+augment", both),
            "decode": ("  of which decode_all", parts["decode"]),
            "augment": ("  of which augment", parts["augment"]),
            "bare": ("bare PIL loop", bare),
        }
        for key, (label, (wall, cpu)) in rows.items():
            rates[key].append(n / wall)
            print(f"{r + 1:>5}  {label:<24} {wall:7.3f} {cpu:7.3f} {n / wall:9.0f}")
        train_label = f"convnet_s {args.train_steps} steps"
        train_rate = rates["train"][-1]
        print(f"{r + 1:>5}  {train_label:<24} {train_wall:7.3f} {train_cpu:7.3f} {train_rate:9.0f} examples/s")
        ratio = rates["layerwise"][-1] / rates["bare"][-1]
        print(f"{'':>5}  {'round ratio':<24} {ratio:25.3f}", flush=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    train_rate = median["train"]
    epoch_s = n / train_rate  # seconds of training per epoch over these n images
    decode_s, augment_s = n / median["decode"], n / median["augment"]
    print(
        f"\nmedians (images/s): layerwise {median['layerwise']:.0f} (decode_all "
        f"{median['decode']:.0f}, augment {median['augment']:.0f}), bare {median['bare']:.0f}"
    )
    print(f"convnet_s training at batch {TRAIN_BATCH}: {train_rate:.0f} examples/s (median of rounds)")
    print(
        f"per run: decoding {n} images takes {decode_s:.2f} s once = {decode_s / epoch_s:.1%} of "
        f"one training epoch over them ({epoch_s:.1f} s); augmenting takes {augment_s:.2f} s = "
        f"{augment_s / epoch_s:.1%} of every epoch"
    )
    # Decoding is paid once per run, augmentation once per epoch, both on the training process:
    # call it limiting when either costs more than a tenth of an epoch of training.
    limits = max(decode_s, augment_s) > 0.1 * epoch_s
    print(
        "verdict: the front end "
        + ("LIMITS" if limits else "does not limit")
        + f" a {torch.get_num_threads()}-thread CPU training run of convnet_s: it decodes "
        f"{median['decode'] / train_rate:.0f}x and augments {median['augment'] / train_rate:.0f}x "
        "faster than the model trains"
    )
    print(f"ratio={median['layerwise'] / median['bare']:.3f}")


if __name__ == "__main__":
    main()
