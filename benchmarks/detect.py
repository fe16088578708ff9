"""What does the detect task cost, and does the network beat HOG + SVM?

On the composed demo scenes (Fashion-MNIST objects on scikit-image's photographs, 128 px):
(a) Training throughput: images/s of layerwise's `train()` (the detect task's loss, augmented batches)
    against a bare hand-written PyTorch loop on the same FCOS initialisation and the same batches,
    alternating rounds. Target ratio >= 0.95.
(b) Quality: mAP@0.5 on 300 held-out test scenes (objects from Fashion-MNIST's test images) after
    `--budget` seconds of training (default 300, i.e. 5 minutes on 2 CPU cores), beside HOG + linear
    SVM fitted on the same training scenes and scored with the same torchmetrics code. Target >= 0.9. The
    network detects as its validation split chose: at the training side or 1.25 times it, and in test-time
    views (both sides, and their mirror images) when they beat one pass there; one pass is scored too.
(c) Inference: images/s of the trained network at batch 1 and batch 32 (letterboxed tensors in, boxes out),
    for one pass at either side and for each set of test-time views.

    .venv/bin/python benchmarks/detect.py [--steps 40] [--rounds 5] [--budget 300] [--skip-quality]
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


def inference_speed(network, images: torch.Tensor, repeats: int = 3) -> None:
    """Images/s at batch 1 and 32 for each way the run may detect: one pass at either inference side, and the
    test-time views (both sides, then both sides and their mirror images)."""
    from layerwise.models.detector import inference_sides, test_time_views
    from layerwise.tasks.detect import view_label

    sides = inference_sides(network.side)
    choices = [((side, False),) for side in sides] + test_time_views(sides)
    rates = {}
    network.eval()
    with torch.no_grad():
        for views in choices:
            network.set_inference_views(views)
            for batch in (1, 32):
                x = images[:batch] if len(images) >= batch else images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
                network(x)  # warm-up
                n = max(1, 64 // batch) * repeats
                started = time.perf_counter()
                for _ in range(n):
                    network(x)
                rates[views, batch] = n * batch / (time.perf_counter() - started)
    network.set_inference_views(None)
    first = choices[0]
    print("(c) inference images/s (batch 1, batch 32; ratio to one pass at the training side at batch 32):")
    for views in choices:
        print(f"    {view_label(views):>32}: {rates[views, 1]:7,.1f}  {rates[views, 32]:7,.1f}  "
              f"{rates[views, 32] / rates[first, 32]:.2f}x")  # fmt: skip


def quality(train_scenes: Path, test_scenes: Path, budget: float):
    from layerwise.api import fit
    from layerwise.tasks.detect import view_label

    with tempfile.TemporaryDirectory() as tmp:
        model = fit(
            train_scenes, Path(tmp) / "run", task="detect", epochs=1000, time_budget=budget, show_progress=False
        )
        test, _ = model.evaluate(test_scenes)
        chosen = model.network.inference_views
        model.network.set_inference_views(None)
        one_pass, _ = model.evaluate(test_scenes)
        model.network.set_inference_views(chosen)
    summary, metrics = model.summary, model.summary["metrics"]
    print(f"(b) after {budget:g} s of training ({summary['epochs_run']} epochs): held-out test scenes "
          f"mAP@0.5 {test['map_50']:.3f}, mAP@[.5:.95] {test['map']:.3f} (target mAP@0.5 >= 0.9); validation "
          f"mAP@0.5 {metrics['map_50']:.3f} vs {summary['baseline']['model']} "
          f"{summary['baseline']['map_50']:.3f}")  # fmt: skip
    by_views = ", ".join(f"{label} {score:.3f}" for label, score in metrics["map_50_by_inference_views"].items())
    print(f"    validation chose inference side {metrics['inference_side']} px and views "
          f"{view_label(chosen)} (validation mAP@0.5: {by_views})")  # fmt: skip
    print(f"    one pass at {metrics['inference_side']} px instead: test mAP@0.5 {one_pass['map_50']:.3f}, "
          f"mAP@[.5:.95] {one_pass['map']:.3f}")  # fmt: skip
    print(summary["verdict"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    train_scenes, test_scenes = detect_demo_scenes(default_cache())
    prepared = DetectTask.prepare(train_scenes, FitOptions(), log=lambda *_: None)
    print(f"scenes: {prepared.data_summary['n_train']} train / {prepared.data_summary['n_val']} validation, "
          f"side {prepared.task.prep.side}; model {prepared.model_name}, batch {prepared.batch_size}")  # fmt: skip
    throughput(prepared, args.steps, args.rounds)
    if args.skip_quality:  # an untrained network: every location passes the score threshold, so NMS costs more
        torch.manual_seed(0)
        network = create_model(prepared.model_name, **prepared.model_config)
    else:
        network = quality(train_scenes, test_scenes, args.budget).network
    images, _ = next(iter(prepared.val_batches.epoch(0)))
    inference_speed(network, images)


if __name__ == "__main__":
    main()
