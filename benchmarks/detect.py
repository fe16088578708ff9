"""What does the detect task cost, and does the network beat HOG + SVM?

On the composed demo scenes (Fashion-MNIST objects on scikit-image's photographs, 128 px):
(a) Training throughput: images/s of layerwise's `train()` (the detect task's loss, augmented batches)
    against a bare hand-written PyTorch loop on the same FCOS initialisation and the same batches,
    alternating rounds. Target ratio >= 0.95.
(b) Inference: images/s of the network at batch 1 and batch 32 (letterboxed tensors in, boxes out).
(c) Quality: mAP@0.5 on 300 held-out test scenes (objects from Fashion-MNIST's test images) after
    `--budget` seconds of training (default 300, i.e. 5 minutes on 2 CPU cores), beside HOG + linear
    SVM fitted on the same training scenes and scored with the same torchmetrics code. Target >= 0.9. The
    network detects at the inference side its validation split chose (the training side or 1.25 times it).

    .venv/bin/python benchmarks/detect.py [--steps 20] [--rounds 3] [--budget 300] [--skip-quality]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from loop_pair import compare_loops

from layerwise.demo import default_cache, detect_demo_scenes
from layerwise.models import create_model
from layerwise.tasks.base import FitOptions
from layerwise.tasks.detect import DetectTask
from layerwise.training.loop import TrainConfig


def throughput(prepared, steps: int, rounds: int) -> None:
    config = TrainConfig(epochs=1, batch_size=prepared.batch_size, lr=3e-3, patience=10**6)
    batches = list(itertools.islice(prepared.train_batches.epoch(0), steps))  # augmented once, for both loops
    torch.manual_seed(0)
    initial = create_model(prepared.model_name, **prepared.model_config)
    n_images = sum(len(x) for x, _ in batches)
    ratio = compare_loops(
        initial, batches, lambda m, x, y: prepared.task.loss(m, x, y)[0], config, n_images, "images", rounds
    )
    print(f"(a) training throughput ratio layerwise/bare = {ratio:.3f} (target >= 0.95)")


def inference_speed(prepared, repeats: int = 3) -> None:
    torch.manual_seed(0)
    model = create_model(prepared.model_name, **prepared.model_config).eval()
    images, _ = next(iter(prepared.val_batches.epoch(0)))
    rates = {}
    with torch.no_grad():
        for batch in (1, 32):
            x = images[:batch] if len(images) >= batch else images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch]
            model(x)  # warm-up
            n = max(1, 64 // batch) * repeats
            started = time.perf_counter()
            for _ in range(n):
                model(x)
            rates[batch] = n * batch / (time.perf_counter() - started)
    print(f"(b) inference: {rates[1]:,.1f} images/s at batch 1, {rates[32]:,.1f} images/s at batch 32 "
          f"(ratio {rates[32] / rates[1]:.2f}x)")  # fmt: skip


def quality(train_scenes: Path, test_scenes: Path, budget: float) -> None:
    from layerwise.api import fit

    with tempfile.TemporaryDirectory() as tmp:
        model = fit(
            train_scenes, Path(tmp) / "run", task="detect", epochs=1000, time_budget=budget, show_progress=False
        )
        test, _ = model.evaluate(test_scenes)
    summary = model.summary
    print(f"(c) after {budget:g} s of training ({summary['epochs_run']} epochs): held-out test scenes "
          f"mAP@0.5 {test['map_50']:.3f}, mAP@[.5:.95] {test['map']:.3f} (target mAP@0.5 >= 0.9); validation "
          f"mAP@0.5 {summary['metrics']['map_50']:.3f} vs {summary['baseline']['model']} "
          f"{summary['baseline']['map_50']:.3f}")  # fmt: skip
    metrics = summary["metrics"]
    by_side = ", ".join(f"{side} px {score:.3f}" for side, score in metrics["map_50_by_inference_side"].items())
    print(f"    inference side chosen on validation: {metrics['inference_side']} px (validation mAP@0.5 "
          f"{by_side})")  # fmt: skip
    print(summary["verdict"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    train_scenes, test_scenes = detect_demo_scenes(default_cache())
    prepared = DetectTask.prepare(train_scenes, FitOptions(), log=lambda *_: None)
    print(f"scenes: {prepared.data_summary['n_train']} train / {prepared.data_summary['n_val']} validation, "
          f"side {prepared.task.prep.side}; model {prepared.model_name}, batch {prepared.batch_size}")  # fmt: skip
    throughput(prepared, args.steps, args.rounds)
    inference_speed(prepared)
    if not args.skip_quality:
        quality(train_scenes, test_scenes, args.budget)


if __name__ == "__main__":
    main()
