"""Does self-supervised pretraining pay off when labels are few? Fashion-MNIST with 100 and 1,000 labels.

For each seed, N labelled training images are drawn, stratified (N/10 per class; the 100 are the first 10 per
class of the 1,000, so the sets are nested), and three models are scored on the same 1,000 held-out test
images (the first 100 per class of Fashion-MNIST's test split):
(a) from scratch: `layerwise.fit` on the N labelled images (default settings: 10% of them hold out for early
    stopping);
(b) pretrained + fine-tuned: `layerwise.pretrain` (SimCLR) on the other 59,000 training images, unlabelled (all
    but the seed's 1,000 labelled ones, so one pretraining per seed serves both N), for PRETRAIN_SECONDS of
    training on this machine's CPUs; then `layerwise.fit(init=...)` with the same defaults as (a);
(c) classical: the runs' own baseline (logistic regression on 14x14 downsampled pixels) fitted on the same N
    labelled images.
Targets: (b) beats (a) by >= 5 points at 100 labels, and beats (c) at 1,000 labels (means over the seeds).
Pretraining runs are cached under .cache/bench/low_label/ (an interrupted one resumes), so a rerun only
fine-tunes.

    .venv/bin/python benchmarks/low_label.py [--seeds 0 1 2] [--pretrain-seconds 300] [--labels 100 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import layerwise
from layerwise.baseline import DESCRIPTIONS, fit_baseline
from layerwise.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays, prepare_fashion_mnist
from layerwise.data.image import baseline_features
from layerwise.pretrain import pretrain

PRETRAIN_SECONDS = 300.0  # of pretraining per seed (decoding the 59,000 images comes on top)
TEST_PER_CLASS = 100  # 1,000 test images
CACHE = Path(".cache/bench/low_label")
SCRATCH, PRETRAINED, CLASSICAL = "from scratch", "pretrained + fine-tuned", "classical"


def labelled_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n training indices, n/10 per class, seeded; nested: the first k per class of a larger draw."""
    rng = np.random.default_rng(seed)
    per_class = n // len(FASHION_MNIST_CLASSES)
    draws = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(FASHION_MNIST_CLASSES))]
    return np.sort(np.concatenate([d[:per_class] for d in draws]))


def link_folder(final: Path, files: dict[str, Path]) -> Path:
    """A folder of symbolic links (relative name -> target), built aside and renamed so it is never half there."""
    if final.is_dir():
        return final
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for name, target in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).symlink_to(target.resolve())
    os.replace(staging, final)
    return final


def seed_data(all_train: Path, labels: np.ndarray, seed: int, sizes: list[int]) -> tuple[dict[int, Path], Path]:
    """Class folders of each labelled set, and a flat folder of the remaining (unlabelled) training images."""
    path_of = {int(p.stem.split("_")[1]): p for p in all_train.rglob("*.png")}
    labelled = {}
    for n in sizes:
        chosen = labelled_indices(labels, n, seed)
        files = {f"{FASHION_MNIST_CLASSES[labels[i]]}/{path_of[i].name}": path_of[i] for i in chosen}
        labelled[n] = link_folder(CACHE / f"seed{seed}" / f"labelled{n}", files)
    held = set(labelled_indices(labels, max(sizes), seed).tolist())
    rest = {path_of[i].name: path_of[i] for i in sorted(path_of) if i not in held}
    return labelled, link_folder(CACHE / f"seed{seed}" / f"unlabelled{max(sizes)}", rest)


def pretrained_run(unlabelled: Path, probe: Path, seed: int, seconds: float) -> Path:
    """The seed's pretraining run, from the cache when it finished before; resumed when it was interrupted."""
    run = CACHE / f"seed{seed}" / f"pretrain-{seconds:g}s"
    if (run / "metrics.json").is_file():
        print(f"  seed {seed}: pretraining cached in {run}", flush=True)
    else:
        pretrain(unlabelled, run, time_budget=seconds, epochs=1000, seed=seed, probe=probe,
                 resume=(run / "config.json").is_file(), show_progress=False)  # fmt: skip
    summary = json.loads((run / "metrics.json").read_text())
    print(f"  seed {seed}: pretrained {summary['epochs_run']} epochs in {summary['train_seconds']} s "
          f"(+{summary['decode_seconds']} s decoding); frozen kNN {summary['metrics']['knn_accuracy']:.1%} "
          f"vs {summary['random_init']['knn_accuracy']:.1%} untrained", flush=True)  # fmt: skip
    return run


def test_accuracy(data: Path, test: Path, seed: int, init: Path | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        model = layerwise.fit(data, Path(tmp) / "run", seed=seed, init=init, show_progress=False)
        metrics, _ = model.evaluate(test)
    return float(metrics["accuracy"])


def classical_accuracy(images: np.ndarray, labels: np.ndarray, chosen: np.ndarray, test_x, test_y, seed: int):
    train_x = baseline_features(torch.from_numpy(images[chosen][:, None]))
    return fit_baseline("image", train_x, labels[chosen], test_x, test_y, seed)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-seconds", type=float, default=PRETRAIN_SECONDS)
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    sizes = sorted(args.labels)
    print(f"Fashion-MNIST, {sizes} labels, seeds {args.seeds}; pretraining budget {args.pretrain_seconds:g} s per "
          f"seed on {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads, "
          f"{'CUDA' if torch.cuda.is_available() else 'no GPU'})", flush=True)  # fmt: skip
    started = time.perf_counter()
    all_train = prepare_fashion_mnist(CACHE / "fashion", "train")  # all 60,000, written once
    test = prepare_fashion_mnist(CACHE / "fashion", "test", per_class=TEST_PER_CLASS)
    images, labels = load_fashion_mnist_arrays("train")
    test_images, test_labels = load_fashion_mnist_arrays("test")
    test_chosen = np.sort(np.concatenate([np.flatnonzero(test_labels == c)[:TEST_PER_CLASS] for c in range(10)]))
    test_x = baseline_features(torch.from_numpy(test_images[test_chosen][:, None]))
    test_y = test_labels[test_chosen]

    scores: dict[tuple[int, str], list[float]] = {}
    for seed in args.seeds:
        labelled, unlabelled = seed_data(all_train, labels, seed, sizes)
        run = pretrained_run(unlabelled, labelled[max(sizes)], seed, args.pretrain_seconds)
        for n in sizes:
            chosen = labelled_indices(labels, n, seed)
            row = {
                SCRATCH: test_accuracy(labelled[n], test, seed, None),
                PRETRAINED: test_accuracy(labelled[n], test, seed, run),
                CLASSICAL: classical_accuracy(images, labels, chosen, test_x, test_y, seed),
            }
            for method, accuracy in row.items():
                scores.setdefault((n, method), []).append(accuracy)
            print(f"  seed {seed}, {n} labels: " + ", ".join(f"{m} {a:.1%}" for m, a in row.items()), flush=True)

    print(f"\naccuracy on {len(test_y):,} Fashion-MNIST test images, mean ± std over seeds {args.seeds}; "
          f"classical = {DESCRIPTIONS['image']}; pretraining {args.pretrain_seconds:g} s per seed")  # fmt: skip
    print(f"{'labels':>7}  {'method':<24} {'accuracy':>16}   per seed")
    for n in sizes:
        for method in (SCRATCH, PRETRAINED, CLASSICAL):
            values = scores[(n, method)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            each = " ".join(f"{100 * v:.1f}" for v in values)
            print(f"{n:>7}  {method:<24} {100 * statistics.mean(values):>8.1f} ± {100 * spread:4.1f}   {each}")
    mean = {key: statistics.mean(values) for key, values in scores.items()}
    low, high = sizes[0], sizes[-1]
    gain = 100 * (mean[(low, PRETRAINED)] - mean[(low, SCRATCH)])
    print(f"\ntarget: pretrained + fine-tuned beats from scratch by >= 5 points at {low} labels: "
          f"{gain:+.1f} points -> {'PASS' if gain >= 5 else 'FAIL'}")  # fmt: skip
    lead = 100 * (mean[(high, PRETRAINED)] - mean[(high, CLASSICAL)])
    print(f"target: pretrained + fine-tuned beats the classical baseline at {high} labels: "
          f"{lead:+.1f} points -> {'PASS' if lead > 0 else 'FAIL'}")  # fmt: skip
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
