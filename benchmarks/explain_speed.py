"""How long does `layerwise explain` take per image, and how does that compare with one backward pass?

A convnet_s Fashion-MNIST run (trained here for one short epoch on real images unless `--run` names
one; speed does not depend on how well it is trained) explains `--n` real Fashion-MNIST test images
with Integrated Gradients (32 steps) and Grad-CAM, as `layerwise explain --method both` does:

  explain      `explain_inputs` end to end per image: decoding, prediction, both attributions, the
               two PNG pictures and explanations.json
  attribution  only the two attributions (the Captum calls), per image, batched as explain batches
  fwd+bwd      one plain forward + backward pass of one image (logit of the predicted class w.r.t.
               the input), the unit of work everything else is measured in
  cli          `layerwise explain` as a new process for all `--n` images, Python start-up included

Each timing is the median of `--rounds` rounds after a warm-up. The last line is
`ratio=<explain seconds per image / fwd+bwd seconds per image>`; the target is < 2 s per image on 2
CPU cores (the ratio says what that costs in backward passes: IG alone needs 32 of them).

    .venv/bin/python benchmarks/explain_speed.py [--n 20] [--rounds 3] [--threads 2] [--run RUN]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import layerwise
from layerwise.data.datasets import prepare_fashion_mnist
from layerwise.data.sources import discover_files
from layerwise.explain import attribute
from layerwise.explain.run import explain_inputs

TRAIN_PER_CLASS = 200  # images per class for the quick run (2,000 in all, one epoch)
FWD_BWD_REPS = 200


def quick_run(work: Path) -> Path:
    train_dir = prepare_fashion_mnist(work / "fashion", "train", per_class=TRAIN_PER_CLASS)
    run = work / "run"
    layerwise.fit(train_dir, run, model="convnet_s", epochs=1, show_progress=False)
    return run


def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up: oneDNN primitive caches, allocator
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="test images explained per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=None, help="an existing convnet_s Fashion-MNIST run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.run or quick_run(work)
        bundle = layerwise.load(run)
        test_dir = prepare_fashion_mnist(work / "fashion", "test", per_class=max(1, -(-args.n // 10)))
        images = sorted(test_dir.glob("*/*.png"))[: args.n]
        print(f"model {bundle.config['model']['name']} from {run}; {len(images)} Fashion-MNIST test images")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

        explain = median_seconds(
            lambda: explain_inputs(bundle, images, work / "out", ("ig", "gradcam")), args.rounds
        ) / len(images)

        tensors, _, _ = bundle.frontend.decode_all(discover_files(images, "image").examples)
        x = bundle.frontend.model_input(tensors)
        with torch.no_grad():
            targets = bundle.network(x).argmax(1)

        def attributions_only() -> None:
            for start in range(0, len(x), 16):  # the batch explain uses
                for method in ("ig", "gradcam"):
                    attribute(bundle.network, x[start : start + 16], targets[start : start + 16], method)

        attribution = median_seconds(attributions_only, args.rounds) / len(images)

        one, target = x[:1], targets[:1]

        def fwd_bwd() -> None:
            for _ in range(FWD_BWD_REPS):
                pixels = one.clone().requires_grad_(True)
                bundle.network(pixels).gather(1, target[:, None]).sum().backward()

        fwd_bwd_s = median_seconds(fwd_bwd, args.rounds) / FWD_BWD_REPS

        started = time.perf_counter()
        cli = [sys.executable, "-m", "layerwise", "explain", str(run), *map(str, images), "--out", str(work / "cli")]
        subprocess.run(cli, check=True, capture_output=True)
        cli_s = time.perf_counter() - started

    print(f"explain      {explain:.3f} s per image (IG + Grad-CAM, pictures and JSON included)")
    print(f"attribution  {attribution:.3f} s per image (the Captum calls alone)")
    print(f"fwd+bwd      {1000 * fwd_bwd_s:.2f} ms per image (one plain forward + backward pass)")
    print(f"cli          {cli_s:.2f} s for {len(images)} images in a new process ({cli_s / len(images):.3f} s each)")
    print(f"target < 2 s per image: {'met' if explain < 2 else 'MISSED'}")
    print(f"ratio={explain / fwd_bwd_s:.1f}")


if __name__ == "__main__":
    main()
