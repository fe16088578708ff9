"""A small training run for the distributed tests, started by `python` (one process) or by torchrun.

    python tests/ddp_worker.py OUT [--epochs E] [--die-at STEP] [--strategy ddp|fsdp] [--resume]

Trains a fixed MLP (no dropout, no batch norm: the only difference between 1 and N processes is then
how the gradient of each global batch is summed) on seeded data with the real training loop and
writes OUT/final.safetensors (rank 0). With --die-at, rank 1 of the first attempt exits abruptly at
that step; a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes from OUT's last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from layerwise.data.batches import TensorBatches
from layerwise.tasks.classify import CrossEntropyObjective
from layerwise.training.checkpoint import load_latest_checkpoint
from layerwise.training.distributed import process_group_from_env, restarted_by_torchrun
from layerwise.training.loop import TrainConfig, train


class DyingObjective(CrossEntropyObjective):
    """Cross-entropy; on rank 1 of a first attempt, the process dies at step `die_at`."""

    def __init__(self, die_at: int | None) -> None:
        super().__init__(label_smoothing=0.0)
        self.die_at, self.steps = die_at, 0

    def loss(self, model, inputs, targets):
        self.steps += 1
        if self.die_at is not None and self.steps == self.die_at and os.environ.get("RANK") == "1":
            if not restarted_by_torchrun():
                os._exit(17)
        return super().loss(model, inputs, targets)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--strategy", default="ddp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 8, generator=generator)
    labels = (inputs[:, 0] + inputs[:, 1] > 0).long() + (inputs[:, 2] > 1).long()
    train_batches = TensorBatches(inputs[:64], labels[:64], 16, lambda x: x, shuffle=True, seed=0)
    val_batches = TensorBatches(inputs[64:], labels[64:], 16, lambda x: x)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    config = TrainConfig(
        epochs=args.epochs, batch_size=16, lr=1e-2, device="cpu", precision="fp32", patience=100,
        checkpoint_every_s=0.0 if args.die_at else 300.0, strategy=args.strategy,
    )  # fmt: skip
    resume = args.resume or (restarted_by_torchrun() and (args.out / "checkpoints").is_dir())
    result = train(
        model, train_batches, val_batches, config, out_dir=args.out, resume=resume, show_progress=False,
        objective=DyingObjective(args.die_at), log=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    # The last weights (the final checkpoint's), not the best: what the steps did is what 1 and N
    # processes must agree on.
    if process_group_from_env().writes_run:
        tensors = load_latest_checkpoint(args.out / "checkpoints").tensors
        save_file({k: v for k, v in tensors.items() if k.startswith("model.")}, str(args.out / "final.safetensors"))
        print(f"steps {result.global_step}", file=sys.stderr)


if __name__ == "__main__":
    main()
