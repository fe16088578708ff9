"""Training throughput when other programs compete for the cores: OpenMP's spin-waiting against yielding.

PyTorch's CPU kernels run on OpenMP threads, which by default spin for a while at the end of each
parallel region waiting for work. When another process holds one of the cores, the spinning thread
burns the time slice its partner needs, and each step waits for the thread that was descheduled.
`OMP_WAIT_POLICY=PASSIVE` makes idle threads sleep instead. It must be set before the OpenMP runtime
starts (before `import torch`), so each variant runs in its own process.

Each variant trains convnet_s (batch 256, 28x28 inputs, AdamW) for `--seconds` seconds and reports
images/s, first on a quiet machine, then with `--hogs` CPU-bound processes (at `--hog-nice`, default
0: another training run, a test suite) running beside it. Ratios are against the default (2 threads,
spin-waiting) in the same scenario.

    .venv/bin/python benchmarks/busy_machine.py [--seconds 15] [--hogs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "2 threads, OpenMP default": {},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}

WORKER = """
import json, sys, time, torch
from layerwise.models import create_model
threads = int(sys.argv[2])
torch.set_num_threads(threads)
model = create_model("convnet_s", in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
x = torch.randn(256, 1, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (256,))
optimizer = torch.optim.AdamW(model.parameters())
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(3):
    step()
steps, started = 0, time.perf_counter()
while time.perf_counter() - started < float(sys.argv[1]):
    step(); steps += 1
print(json.dumps({"images_per_s": steps * 256 / (time.perf_counter() - started)}))
"""

HOG = "while True: pass"


def measure(env_extra: dict, seconds: float) -> float:
    threads = env_extra.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, **env_extra}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(seconds), threads], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--hog-nice", type=int, default=0, help="niceness of the competing processes")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cpus; each variant trains for {args.seconds:g} s")
    for scenario in ("quiet", f"{args.hogs} CPU-bound processes (nice {args.hog_nice}) beside it"):
        hogs = []
        if scenario != "quiet":
            hogs = [
                subprocess.Popen(["nice", "-n", str(args.hog_nice), sys.executable, "-c", HOG])
                for _ in range(args.hogs)
            ]
        try:
            rates = {name: measure(extra, args.seconds) for name, extra in VARIANTS.items()}
        finally:
            for hog in hogs:
                hog.kill()
        base = rates["2 threads, OpenMP default"]
        print(f"\n{scenario}:")
        for name, rate in rates.items():
            print(f"  {name:<36} {rate:>7.0f} images/s  ratio={rate / base:.2f}")


if __name__ == "__main__":
    main()
