"""layerwise's `train()` against a bare PyTorch loop, for every task's own loss, model and batches.

Each task prepares small real data through its own `prepare` (the batches the loop would see, made
once up front, so data preparation is not timed): Fashion-MNIST images (classify), Debian's fortunes
(generate), composed scenes of Fashion-MNIST objects (detect), espeak-ng speech (transcribe) and
ProMod3 protein chains (fold). `loop_pair.compare_loops` then alternates layerwise's loop and a
hand-written loop over the same batches with the same task loss and optimizer; the ratio is the cost of
the loop itself (learning-rate schedule, clipping, NaN guard, the rank agreement, progress, checkpoint
bookkeeping). Target: >= 0.97 for every task.

    .venv/bin/python benchmarks/task_loops.py [--rounds 5] [--steps 24] [--tasks classify ... fold]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loop_pair import compare_loops  # noqa: E402

from layerwise.data.datasets import prepare_fashion_mnist  # noqa: E402
from layerwise.models import create_model  # noqa: E402
from layerwise.tasks import task_class  # noqa: E402
from layerwise.tasks.base import FitOptions  # noqa: E402
from layerwise.training.loop import TrainConfig  # noqa: E402

TASKS = ["classify", "generate", "detect", "transcribe", "fold"]


def task_data(root: Path, tasks: list[str]) -> dict[str, tuple[Path, dict]]:
    """task -> (DATA, FitOptions overrides): small real data of each kind, made for `tasks` only."""
    from layerwise.data.scenes import compose_scenes
    from layerwise.data.speech_demo import prepare_speech_demo

    def text() -> Path:
        path = root / "text.txt"
        path.write_text(Path("/usr/share/games/fortunes/computers").read_text(errors="replace")[:60_000])
        return path

    makers = {
        "classify": (lambda: prepare_fashion_mnist(root / "fashion", "train", per_class=100), {}),
        "generate": (text, {}),
        "detect": (lambda: compose_scenes(root / "scenes", 96, seed=0, split="train"), {}),
        "transcribe": (
            lambda: prepare_speech_demo(root / "speech", clips_per_language=12).train_manifest,
            {"batch_size": 16},
        ),
        "fold": (lambda: structures(root / "structures"), {"model": "fold_xs"}),
    }
    return {name: (makers[name][0](), makers[name][1]) for name in TASKS if name in tasks}


def structures(folder: Path) -> Path:
    """40 ProMod3 chains of 40-120 residues as Cα PDB files."""
    from layerwise.data.promod3 import read_structure_db
    from layerwise.data.structures import write_ca_pdb

    folder.mkdir()
    chains = (chain for chain in read_structure_db(limit=400) if 40 <= len(chain[1]) <= 120)
    for written, (name, sequence, ca) in enumerate(chains):
        if written == 40:
            break
        write_ca_pdb(folder / f"{name}.pdb", sequence, ca, np.zeros(len(sequence)))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24, help="training batches per timed run")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS, help="which tasks (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, overrides) in task_data(Path(tmp), args.tasks).items():
            prepared = task_class(name).prepare(
                data, FitOptions(**overrides), saved=None, donor=None, log=lambda _: None
            )
            batches, epoch = [], 0
            while len(batches) < args.steps:  # epochs of the task's own seeded batches, made up front
                batches += list(prepared.train_batches.epoch(epoch))
                epoch += 1
            batches = batches[: args.steps]
            torch.manual_seed(0)
            initial = create_model(prepared.model_name, **prepared.model_config)
            config = TrainConfig(epochs=1, batch_size=prepared.batch_size, lr=prepared.lr, device="cpu", patience=100)

            def loss(model, x, y, task=prepared.task):
                return task.loss(model, x, y)[0]

            print(f"\n{name}: {prepared.model_name}, {args.steps} batches of {prepared.batch_size}")
            ratios[name] = compare_loops(initial, batches, loss, config, args.steps, "batches", args.rounds)
    print()
    for name, ratio in ratios.items():
        print(f"{name:<11} ratio={ratio:.3f} {'PASS' if ratio >= 0.97 else 'below 0.97'}")
    print(f"ratio={min(ratios.values()):.3f} (the lowest; target >= 0.97)")


if __name__ == "__main__":
    main()
