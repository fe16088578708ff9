"""Checkpoint cost at the default cadence, as a percentage of training time.

Trains convnet_s on real Fashion-MNIST images (decoded into memory) with a run directory, so the
loop writes its checkpoints at the default cadence (every epoch, and mid-epoch at most every
`TrainConfig.checkpoint_every_s`). Every `save_checkpoint` call is timed; the last line prints
`percent=<checkpoint seconds / training seconds * 100>` (target <= 2). A second figure compares
whole runs with and without a run directory, alternated, as a ratio of wall times.

    .venv/bin/python benchmarks/checkpoint_cost.py [--n 12000] [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from layerwise.data.batches import TensorBatches
from layerwise.data.datasets import prepare_fashion_mnist
from layerwise.data.image import ImageFrontEnd
from layerwise.data.sources import discover
from layerwise.models import create_model
from layerwise.training import checkpoint, loop
from layerwise.training.loop import TrainConfig


def load_images(n: int, cache: Path) -> tuple[ImageFrontEnd, torch.Tensor, torch.Tensor]:
    folder = prepare_fashion_mnist(cache, "train", per_class=n // 10)
    source = discover(folder)
    frontend = ImageFrontEnd.fit(source.examples)
    inputs, kept, _ = frontend.decode_all(source.examples)
    names = sorted(source.class_names)
    labels = torch.tensor([names.index(source.examples[i].label) for i in kept])
    frontend.fit_statistics(inputs)
    return frontend, inputs, labels


def timed_run(frontend, inputs, labels, epochs: int, out_dir: Path | None) -> tuple[float, float, int]:
    """Train once; returns (training seconds, seconds inside save_checkpoint, checkpoints written)."""
    spent: list[float] = []
    original = checkpoint.save_checkpoint

    def timed_save(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    loop.save_checkpoint = timed_save  # instrument the loop's own reference
    try:
        model = create_model("convnet_s", in_channels=1, num_classes=10)
        train = TensorBatches(inputs, labels, 256, frontend.model_input, frontend.augment, shuffle=True)
        val = TensorBatches(inputs[:1000], labels[:1000], 512, frontend.model_input)
        started = time.perf_counter()
        config = TrainConfig(epochs=epochs)
        loop.train(model, train, val, config, out_dir=out_dir, show_progress=False, log=lambda m: None)
        return time.perf_counter() - started, sum(spent), len(spent)
    finally:
        loop.save_checkpoint = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12_000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        frontend, inputs, labels = load_images(args.n, Path(tmp) / "data")
        percents, with_dir, without_dir = [], [], []
        for round_ in range(args.rounds):
            seconds, ckpt_seconds, count = timed_run(frontend, inputs, labels, args.epochs, Path(tmp) / f"run{round_}")
            bare_seconds, _, _ = timed_run(frontend, inputs, labels, args.epochs, None)
            percents.append(100 * ckpt_seconds / seconds)
            with_dir.append(seconds)
            without_dir.append(bare_seconds)
            print(
                f"round {round_ + 1}: {count} checkpoints, {ckpt_seconds:.3f} s of {seconds:.1f} s training "
                f"({percents[-1]:.2f}%); same run without a run directory: {bare_seconds:.1f} s"
            )
        size = sum(f.stat().st_size for f in (Path(tmp) / "run0" / "checkpoints").rglob("*") if f.is_file())
        print(f"checkpoint folder: {size / 1e6:.1f} MB for the last {checkpoint.KEEP_LAST + 1} checkpoints")
        ratio = statistics.median(with_dir) / statistics.median(without_dir)
        print(f"wall-time ratio with/without checkpoints: {ratio:.3f}")
        print(f"percent={statistics.median(percents):.2f}")


if __name__ == "__main__":
    main()
