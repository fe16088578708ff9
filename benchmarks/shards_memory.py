"""Peak memory of training from shards as the dataset grows, against training from the raw files.

Fashion-MNIST PNG folders of `--n` and 10x `--n` images (Debian's dataset-fashion-mnist) are each
prepared and trained for the same number of steps (10 epochs of 1x, 1 epoch of 10x; convnet_s; the
classify task's preparation and the real loop) in a fresh process, twice: from the raw folder (decoded
into memory, as `layerwise train DATA` does) and from `layerwise pack` shards (streamed). The peak
resident memory of each process is read from the kernel (ru_maxrss). What a run does after training
(the classical baseline, calibration, the report) works on the validation split and a training sample
of at most 20,000 examples, and is not part of this figure. The 10x/1x ratio of the peak is the figure:
flat (1.00) is the target for shards; from raw files it grows with the data. (At 28x28 grayscale the
decoded data is small — 0.8 kB an image — so the growth is modest; larger images grow it in proportion.)

    .venv/bin/python benchmarks/shards_memory.py [--n 3000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from layerwise.data.datasets import prepare_fashion_mnist

PROBE = """
import resource, sys
from pathlib import Path
from layerwise.models import create_model
from layerwise.tasks.base import FitOptions
from layerwise.tasks.classify import ClassifyTask
from layerwise.training.loop import TrainConfig, train
prepared = ClassifyTask.prepare(Path(sys.argv[1]), FitOptions(), log=lambda _: None)
network = create_model(prepared.model_name, **prepared.model_config)
config = TrainConfig(epochs=int(sys.argv[2]), batch_size=prepared.batch_size, patience=100)
train(network, prepared.train_batches, prepared.val_batches, config, show_progress=False, log=lambda _: None)
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(data: Path, epochs: int) -> float:
    """Peak RSS (MB) of a fresh process that prepares DATA as `layerwise train` does and trains `epochs`."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(data), str(epochs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return int(done.stdout.strip().splitlines()[-1].split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images in the 1x dataset (10 classes)")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for scale in (1, 10):
            data = prepare_fashion_mnist(root / f"fashion{scale}", "train", per_class=args.n * scale // 10)
            shards = root / f"shards{scale}"
            subprocess.run([sys.executable, "-m", "layerwise", "pack", str(data), "--out", str(shards), "--json"],
                           check=True, capture_output=True)  # fmt: skip
            # The same number of steps at both sizes: the allocator's high-water mark grows with the steps too.
            epochs = 10 // scale
            rows[("raw files", scale)] = peak_rss_mb(data, epochs)
            rows[("shards", scale)] = peak_rss_mb(shards, epochs)
    print(f"{'source':<10} {'1x peak MB':>11} {'10x peak MB':>12} {'10x/1x':>7}")
    for source in ("raw files", "shards"):
        one, ten = rows[(source, 1)], rows[(source, 10)]
        print(f"{source:<10} {one:>11.0f} {ten:>12.0f} {ten / one:>7.2f}")
    print(f"ratio={rows[('shards', 10)] / rows[('shards', 1)]:.2f} (shards, 10x over 1x; target: flat, 1.00)")


if __name__ == "__main__":
    main()
