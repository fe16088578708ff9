"""Shared by the task benchmarks: layerwise's `train()` against a bare PyTorch loop on the same batches.

Both variants start from the same initialisation, take the same pre-made batches and the same task
loss; layerwise's validation is reduced to one nominal batch that is never read, so the ratio is the
cost of the loop itself (progress, NaN guard, scheduling, checkpoint bookkeeping).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from layerwise.runtime import autocast_for
from layerwise.training.loop import TrainConfig, make_optimizer, prepare_model, train


def compare_loops(
    initial: nn.Module,
    batches: list,
    loss: Callable[[nn.Module, object, object], torch.Tensor],
    config: TrainConfig,
    units: int,
    unit_name: str,
    rounds: int,
) -> float:
    """Alternating rounds of both loops; prints each round and returns median layerwise / median bare rate."""

    class Fixed:
        def __len__(self) -> int:
            return len(batches)

        def epoch(self, epoch: int, start: int = 0):
            return iter(batches[start:])

    class NoValidation:  # one nominal batch (the loop requires one); Objective.evaluate never reads it
        def __len__(self) -> int:
            return 1

        def epoch(self, epoch: int = 0, start: int = 0):
            return iter(())

    class Objective:
        monitor, higher_is_better = "loss", False

        def loss(self, model, x, y):
            return loss(model, x, y), {}

        def evaluate(self, model, batches):
            return {"loss": 0.0}

    def layerwise_run() -> float:
        model = copy.deepcopy(initial)
        started = time.perf_counter()
        train(model, Fixed(), NoValidation(), config, show_progress=False, log=lambda *_: None, objective=Objective())
        return units / (time.perf_counter() - started)

    def bare_run() -> float:
        model = prepare_model(copy.deepcopy(initial), torch.device("cpu"))
        optimizer = make_optimizer(model, config)
        started = time.perf_counter()
        model.train()
        for x, y in batches:
            with autocast_for(torch.device("cpu"), True):
                value = loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        return units / (time.perf_counter() - started)

    layerwise_run(), bare_run()  # warm-up
    ours, bare = [], []
    for i in range(rounds):
        ours.append(layerwise_run())
        bare.append(bare_run())
        print(f"round {i + 1}: layerwise {ours[-1]:,.1f} {unit_name}/s, bare {bare[-1]:,.1f} {unit_name}/s")
    # Other processes on a shared machine only ever slow a round down, so each loop's fastest round is its least
    # disturbed one: printed beside the median ratio, which is what callers get.
    print(f"fastest rounds: layerwise/bare = {max(ours) / max(bare):.3f}")
    return statistics.median(ours) / statistics.median(bare)
