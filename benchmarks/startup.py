"""What a command costs before it does anything: `layerwise predict` as a new process against importing torch.

Every command, every `--devices` worker and every test that starts `python -m layerwise` pays Python's start and
the imports. torch's own import is the floor no layerwise command can go under, so it is the baseline, measured
in the same run: `python -c "import torch"`. The measured command is `layerwise predict RUN IMAGE --json` on a
tiny image run trained here (one epoch of 30 Fashion-MNIST images), timed as a whole, alternating with the
baseline for `--rounds` rounds.

    .venv/bin/python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerwise.data.datasets import prepare_fashion_mnist


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = prepare_fashion_mnist(Path(tmp) / "fashion", "train", per_class=3)
        run = Path(tmp) / "run"
        layerwise = [sys.executable, "-m", "layerwise"]
        subprocess.run([*layerwise, "train", images, "--out", run, "--epochs", "1", "--no-progress"], check=True,
                       capture_output=True)  # fmt: skip
        image = next(images.rglob("*.png"))
        torch_only, predict = [], []
        for _ in range(args.rounds):
            torch_only.append(seconds([sys.executable, "-c", "import torch"]))
            predict.append(seconds([*layerwise, "predict", str(run), str(image), "--json"]))
    base, measured = statistics.median(torch_only), statistics.median(predict)
    print(f"import torch: {base:.2f} s; layerwise predict (one image, start to exit): {measured:.2f} s")
    print(f"ratio={measured / base:.2f} (layerwise predict / import torch, medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
