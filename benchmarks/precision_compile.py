"""Training throughput on this machine per precision, with and without torch.compile, and with 2 processes.

Each variant trains the same convnet_s (one initialisation) on the same real Fashion-MNIST images held in
memory, through layerwise's own `train()` (TensorBatches, channels_last, no augmentation), for
`--epochs` epochs; the first epoch pays for compilation and warm-up, so images/s is measured on the
epochs after it (from history.jsonl's per-epoch seconds). Every ratio is against fp32 eager measured in
the same run. `--devices 2` adds `layerwise train`-style data parallelism (torchrun, gloo) with the
same global batch, replicated (DDP) and sharded (FSDP, `--strategy fsdp`: the cost of gathering weights and
reduce-scattering gradients); on a 2-core CPU it shows the cost of splitting the cores, not a speed-up.

    .venv/bin/python benchmarks/precision_compile.py [--n 8192] [--epochs 3] [--devices 2 [--processes-only]]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loop_overhead import VAL_BATCH, load_data  # noqa: E402  (the same data and front end)

from layerwise.data.batches import TensorBatches  # noqa: E402
from layerwise.models import create_model  # noqa: E402
from layerwise.runtime import _cpu_has_bf16  # noqa: E402
from layerwise.training.loop import TrainConfig, train  # noqa: E402

VARIANTS = [("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True), ("bf16", True)]


def measure(initial, data, precision: str, compile: bool, epochs: int, batch: int, strategy: str = "ddp") -> dict:
    config = TrainConfig(
        epochs=epochs, batch_size=batch, device="cpu", precision=precision, compile=compile, patience=100,
        strategy=strategy,
    )  # fmt: skip
    train_batches = TensorBatches(data.train_x, data.train_y, batch, data.frontend.model_input, shuffle=True)
    val_batches = TensorBatches(data.val_x, data.val_y, VAL_BATCH, data.frontend.model_input)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train(copy.deepcopy(initial), train_batches, val_batches, config, out_dir=Path(out),
                       show_progress=False, log=lambda *_: None)  # fmt: skip
        wall = time.perf_counter() - started
    seconds = [h["seconds"] for h in result.history]
    steady = (seconds[-1] - seconds[0]) / (len(seconds) - 1)
    return {
        "precision": precision,
        "compile": compile,
        "images_per_s": len(train_batches) * batch / steady,
        "first_epoch_s": seconds[0],
        "wall_s": wall,
        "val_accuracy": result.history[-1]["val_accuracy"],
    }


def two_processes(n: int, epochs: int, batch: int, strategy: str) -> dict:
    """The same run as fp32 eager, as 2 torchrun processes (each half of every batch, 1 thread each)."""
    script = f"""
import sys, json, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from precision_compile import measure, load_data
from layerwise.models import create_model
data = load_data({n})
torch.manual_seed(0)
initial = create_model("convnet_s", in_channels=1, num_classes=10)
row = measure(initial, data, "fp32", False, {epochs}, {batch}, {strategy!r})
if __import__("os").environ.get("RANK") == "0":
    print("RESULT " + json.dumps(row))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    with tempfile.TemporaryDirectory() as folder:
        worker = Path(folder) / "worker.py"
        worker.write_text(script)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"the 2-process run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "precision": f"fp32 x2 processes {strategy}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--devices", type=int, default=1, choices=(1, 2))
    parser.add_argument("--processes-only", action="store_true", help="of the 1-process variants, fp32 eager only")
    args = parser.parse_args()
    data = load_data(args.n)
    torch.manual_seed(0)
    initial = create_model("convnet_s", in_channels=1, num_classes=10)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, "
          f"native bf16: {_cpu_has_bf16()}, {args.n} images, batch {args.batch}")  # fmt: skip
    variants = VARIANTS[:1] if args.processes_only else VARIANTS
    rows = [measure(initial, data, precision, compile, args.epochs, args.batch) for precision, compile in variants]
    if args.devices == 2:
        rows += [two_processes(args.n, args.epochs, args.batch, strategy) for strategy in ("ddp", "fsdp")]
    base = rows[0]["images_per_s"]
    print(f"{'variant':<26} {'images/s':>9} {'ratio':>6} {'1st epoch s':>12} {'val acc':>8}")
    for row in rows:
        name = f"{row['precision']}{' compiled' if row['compile'] else ''}"
        print(f"{name:<26} {row['images_per_s']:>9.0f} {row['images_per_s'] / base:>6.2f} "
              f"{row['first_epoch_s']:>12.1f} {row['val_accuracy']:>8.3f}")  # fmt: skip
    best = max(rows, key=lambda r: r["images_per_s"])
    print(
        f"fastest: {best['precision']}{' compiled' if best['compile'] else ''}, "
        f"ratio={best['images_per_s'] / base:.2f} against fp32 eager"
    )


if __name__ == "__main__":
    main()
