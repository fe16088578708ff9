"""Fitting training into the device's memory, for every task alike.

- On a GPU, a new run whose batch size the user left open trains with the largest batch that fits
  (`largest_batch`), its learning rate scaled with it.
- A step that runs out of memory is retried as smaller micro-batches whose gradients add up to the same
  step (`accumulate`): the global batch, the schedule, the data order and the checkpoints stay those of the
  run, so nothing already trained is lost (batch norm sees the smaller parts: close, not identical).
- Training data small enough is held on the GPU once (`hold_on_device`), and batches are cut and augmented
  there, so no host-to-device copy waits in every step.

PyTorch Lightning's batch-size finder does the first by trial too; it is not used here because layerwise's loop
is its own and the search needs only a few forward/backward passes of the run's own step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerwise.runtime import autocast_to, channels_last_for, prepare_model, to_device
from layerwise.training.distributed import LossOf, part_of

MAX_AUTO_BATCH = 4096
# The search stops below the batch that would leave an epoch fewer steps than this: a huge batch that fits
# the memory still learns less per example than smaller steps would.
MIN_STEPS_PER_EPOCH = 50
# Of the device's memory, the share the search plans to fill: the search measures one step of a copy of the
# network, and the optimizer's moments, the kept best weights and the allocator's fragmentation come on top.
MEMORY_HEADROOM = 0.8
# Training tensors are held on the GPU when they take at most this share of its free memory.
HOLD_FRACTION = 0.25
MAX_LR_SCALE = 4.0  # the learning rate follows a larger batch up to this factor
SEARCH_BATCHES = 3  # batches measured at each size (their lengths vary in some tasks): the largest peak counts


@dataclass(frozen=True)
class BatchSearch:
    """What `largest_batch` tried and chose; kept in the run's config.json as "batch_search"."""

    device: str
    start: int  # the task's default batch
    chosen: int
    limit: int  # the largest batch the data allows (MAX_AUTO_BATCH, MIN_STEPS_PER_EPOCH)
    peak_gib: dict[int, float | None]  # batch -> peak memory of one step in GiB; None: out of memory

    def lr_for(self, lr: float) -> float:
        """The learning rate for the chosen batch: scaled with the square root of the batch ratio, the rule for
        Adam-type optimizers (a linear scaling, right for SGD, overshoots with AdamW at large ratios)."""
        return lr * min(MAX_LR_SCALE, math.sqrt(self.chosen / self.start))

    def to_json(self) -> dict:
        return {
            "device": self.device, "start": self.start, "chosen": self.chosen, "limit": self.limit,
            "peak_gib": {str(k): v for k, v in self.peak_gib.items()},
        }  # fmt: skip


def batch_limit(start: int, n_train: int) -> int:
    """The largest power-of-two multiple of `start` that still leaves MIN_STEPS_PER_EPOCH steps per epoch."""
    limit = start
    while limit * 2 <= min(MAX_AUTO_BATCH, n_train // MIN_STEPS_PER_EPOCH):
        limit *= 2
    return limit


def largest_batch(
    network: nn.Module,
    objective,
    batches_of: Callable[[int], Any],
    start: int,
    n_train: int,
    device: torch.device,
    precision: str,
    held_bytes: int = 0,
) -> BatchSearch:
    """The largest batch (`start` times a power of two, up to `batch_limit`) whose training step fits in
    MEMORY_HEADROOM of the GPU's memory beside `held_bytes` (training data to be held there), measured with
    real batches on a copy of the network (the network itself, its normalisation statistics included, is not
    touched)."""
    limit = batch_limit(start, n_train)
    peaks: dict[int, float | None] = {}
    chosen = start
    if limit > start:
        total = torch.cuda.get_device_properties(device).total_memory
        probe = prepare_model(copy.deepcopy(network), device)
        probe.train()
        # AdamW's two moments and the gradients, in float32, come on top of what one step measures.
        optimizer_bytes = 3 * sum(p.numel() * 4 for p in probe.parameters() if p.requires_grad)
        step = LossOf(probe, objective)
        size = start * 2
        while size <= limit:
            peak = _peak_bytes(step, batches_of(size), device, precision)
            peaks[size] = None if peak is None else round(peak / 2**30, 3)
            if peak is None or peak + optimizer_bytes + held_bytes > MEMORY_HEADROOM * total:
                break
            chosen, size = size, size * 2
        del probe, step
        torch.cuda.empty_cache()
    return BatchSearch(str(device), start, chosen, limit, peaks)


def _peak_bytes(step: nn.Module, batches, device: torch.device, precision: str) -> int | None:
    """Peak memory of forward and backward passes over the first SEARCH_BATCHES batches of `batches`; None if
    one runs out."""
    channels_last = channels_last_for(step.network, device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    ran_out = False
    for n, (inputs, targets) in enumerate(batches.epoch(0)):
        if n == SEARCH_BATCHES or ran_out:
            break
        try:
            with autocast_to(device, precision):
                loss, _ = step(to_device(inputs, device, channels_last), to_device(targets, device))
            loss.backward()
        except torch.OutOfMemoryError:
            ran_out = True
        step.zero_grad(set_to_none=True)
        inputs = targets = loss = None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return None if ran_out else peak


def count_examples(value: Any) -> int:
    """How many examples a batch's inputs hold: the first dimension of a tensor, the length of a list, the
    first part of a tuple or dict (the convention `part_of` cuts by)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else 1
    if isinstance(value, list):
        return len(value)
    if isinstance(value, tuple) and value:
        return count_examples(value[0])
    if isinstance(value, dict) and value:
        return count_examples(next(iter(value.values())))
    return 1


def accumulate(
    step: nn.Module,
    inputs: Any,
    targets: Any,
    micro_batches: int,
    backward: Callable[[torch.Tensor], None],
    forward_context: Callable[[], Any] = nullcontext,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its gradients (through `backward`), computed in `micro_batches` parts.

    Each part's mean loss is weighted by its share of the examples, so the gradients add up to those of the
    whole batch's mean loss: exactly for per-example losses of a network without batch statistics; batch norm
    normalises each part over its own examples, and losses averaged over tokens or boxes weigh the parts by
    examples rather than tokens (close, not identical). The forward passes run in `forward_context` (autocast),
    the backward passes outside it, as PyTorch's mixed precision asks.
    """
    if micro_batches == 1:
        with forward_context():
            loss, stats = step(inputs, targets)
        backward(loss)
        return loss.detach(), stats
    total = count_examples(inputs)
    loss_sum: torch.Tensor | None = None
    stat_sums: dict[str, float] = {}
    for i in range(micro_batches):
        part_inputs = part_of(inputs, i, micro_batches)
        share = count_examples(part_inputs) / total
        if share == 0:
            continue
        with forward_context():
            loss, stats = step(part_inputs, part_of(targets, i, micro_batches))
        backward(loss * share)
        loss_sum = loss.detach() * share if loss_sum is None else loss_sum + loss.detach() * share
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value * share
    return loss_sum, stat_sums


def release_memory(device: torch.device) -> None:
    """Return the cached blocks a failed step left, so that the retry starts from what is really in use."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bytes_to_hold(batches, device: torch.device) -> int:
    """How many bytes of training data `hold_on_device` will copy to `device`: the batches' tensors when they
    know how to move (`on_device`) and fit in HOLD_FRACTION of the GPU's free memory, else 0."""
    if device.type != "cuda" or getattr(batches, "on_device", None) is None:
        return 0
    size = batches.nbytes()
    return size if size <= HOLD_FRACTION * torch.cuda.mem_get_info(device)[0] else 0


def hold_on_device(batches, device: torch.device, log=print):
    """`batches` drawn from copies of their tensors on the GPU, when they fit in HOLD_FRACTION of its free
    memory and the batches know how (`on_device`); batches made on the host (`streamed_to`) as they stream to
    `device`; otherwise `batches` as they are."""
    streamed_to = getattr(batches, "streamed_to", None)
    if streamed_to is not None:
        return streamed_to(device)
    if device.type != "cuda" or getattr(batches, "on_device", None) is None:
        return batches
    if bytes_to_hold(batches, device) == 0:
        log(
            f"the training data ({batches.nbytes() / 2**30:.1f} GiB) stays in host memory: it would take more than "
            f"{HOLD_FRACTION:.0%} of the GPU's free memory ({torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB)"
        )
        return batches
    return batches.on_device(device)
