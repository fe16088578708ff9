"""What one AdamW step costs on this machine: PyTorch's default CPU implementation against its fused kernel.

`make_optimizer` asks for the fused kernel on the CPU and CUDA (one kernel over every weight instead of a Python
loop of a dozen tensor operations per weight). For each task's default network: milliseconds per optimizer step
with the default implementation (a loop over tensors on the CPU), `foreach=True` and `fused=True`, alternating,
with random gradients; and the ratio default / fused. The step's arithmetic is the same; only its cost differs.

    .venv/bin/python benchmarks/optimizer_step.py [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerwise.models import create_model

NETWORKS = {  # each task's default network, at the demo's sizes
    "classify (convnet_s)": ("convnet_s", {"in_channels": 1, "num_classes": 10}),
    "detect (fcos_resnet_s)": ("fcos_resnet_s", {"num_classes": 5, "side": 128, "head_convs": 1, "head_levels": 1}),
    "generate (gpt_small)": ("gpt_small", {"vocab_size": 2048, "context_len": 256}),
    "transcribe (speech_xs)": ("speech_xs", {"n_mels": 80, "vocab_size": 60, "n_languages": 5}),
    "fold (fold_xs)": ("fold_xs", {}),
}
IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def milliseconds_per_step(params: list[torch.nn.Parameter], options: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **options)
    for _ in range(3):  # the moments are created on the first step
        optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'network':<24} {'tensors':>7} {'weights':>10}  " + "  ".join(f"{n:>8}" for n in IMPLEMENTATIONS)
          + "  default/fused")  # fmt: skip
    for label, (name, config) in NETWORKS.items():
        torch.manual_seed(0)
        params = list(create_model(name, **config).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        times = {n: [] for n in IMPLEMENTATIONS}
        for _ in range(args.rounds):
            for n, options in IMPLEMENTATIONS.items():
                times[n].append(milliseconds_per_step(params, options, args.steps))
        ms = {n: statistics.median(t) for n, t in times.items()}
        columns = "  ".join(f"{ms[n]:>6.2f}ms" for n in IMPLEMENTATIONS)
        print(f"{label:<24} {len(params):>7} {sum(p.numel() for p in params):>10,}  {columns}  "
              f"{ms['default'] / ms['fused']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
