"""Seeded mini-batches from tensors held in memory.

The order and augmentation of epoch `e`, batch `i` depend only on (seed, e, i), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator

import torch

from layerwise.runtime import host_to

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
ToModelInput = Callable[[torch.Tensor], torch.Tensor]


MAX_WORKERS = 4  # DataLoader processes making batches for a GPU


def workers_for(device: torch.device) -> int:
    """DataLoader worker processes for batches made on the host for `device`: on a GPU half the cores (at most
    MAX_WORKERS) make the next batches while it trains; on a CPU the training threads use every core: none."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


class _BatchAt(torch.utils.data.Dataset):
    """Batches `start`, `start+1`, ... of one epoch, each made by `batches.batch_at(epoch, i)` alone."""

    def __init__(self, batches, epoch: int, start: int) -> None:
        self.batches, self.epoch, self.start = batches, epoch, start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __getitem__(self, k: int):
        return self.batches.batch_at(self.epoch, self.start + k)


def made_by_workers(batches, epoch: int, start: int, workers: int, pin_memory: bool) -> Iterator:
    """Batches of `batches` (which has `batch_at(epoch, i)`, a function of (epoch, i) alone) made by `workers`
    DataLoader processes, in order: the same batches the training process would make."""
    return worker_stream(_BatchAt(batches, epoch, start), workers, pin_memory)


def worker_stream(dataset: torch.utils.data.Dataset, workers: int, pin_memory: bool) -> Iterator:
    """The ready-made batches of `dataset` (items are whole batches), made by `workers` DataLoader processes
    and taken from them in turn, into pinned memory on request (its copies to a GPU then need not wait)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, multiprocessing_context="fork"
    )
    return iter(loader)


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator seeded by `keys` alone (seed, epoch, batch, ...), so that any batch can be made again."""
    seed = 0
    for key in keys:  # a simple, stable mix of the keys into one 63-bit seed
        seed = (seed * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class TensorBatches:
    """Batches of (model input, label) from cached inputs (N, ...) and labels (N,)."""

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        to_model_input: ToModelInput,
        augment: Augment | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.to_model_input, self.augment = to_model_input, augment
        self.shuffle, self.seed = shuffle, seed
        # Training drops a ragged last batch (BatchNorm dislikes tiny batches); evaluation keeps all.
        self.drop_last = shuffle and len(labels) >= 2 * batch_size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches `start`, `start+1`, ... of epoch `epoch`."""
        return self.epoch_part(epoch, start)

    def nbytes(self) -> int:
        return self.inputs.nbytes + self.labels.nbytes

    def on_device(self, device: torch.device) -> TensorBatches:
        """The same batches, cut and augmented from copies of the tensors on `device` (the random draws stay
        on the CPU's seeded generators, so the batches are those of the host copy)."""
        held = copy.copy(self)
        held.inputs, held.labels = self.inputs.to(device), self.labels.to(device)
        return held

    def epoch_part(
        self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s part of each batch (of `world_size` near-equal parts), cut before augmenting."""
        n = len(self.labels)
        order = torch.randperm(n, generator=seeded_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        order = host_to(order, self.inputs.device)  # once an epoch, where the tensors are held
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size].tensor_split(world_size)[rank]
            raw = self.inputs[index]
            if self.augment is not None:  # each rank its own draws; one process keeps the single-process ones
                keys = (self.seed, epoch, i) if world_size == 1 else (self.seed, epoch, i, rank)
                raw = self.augment(raw, seeded_generator(*keys))
            yield self.to_model_input(raw), self.labels[index]
