"""What a task is: the part of learning that differs between a category, a generated word, a box, ...

The shared core (the training loop, the run directory, checkpoints, the CLI plumbing) talks to a task
only through these small interfaces and never asks which task it is. See DESIGN.md, "Tasks".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from layerwise.data.sources import Problem
from layerwise.errors import InputError


class Batches(Protocol):
    """Seeded batches: epoch `e`, batch `i` depends only on (seed, e, i), so resume is exact."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]: ...  # (inputs, targets)


class Objective(Protocol):
    """What the training loop needs from a task."""

    monitor: str  # the evaluate() key that picks the best weights and drives early stopping
    higher_is_better: bool

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch, and per-batch statistics (means, as floats or 0-d tensors) for
        history.jsonl."""
        ...

    def evaluate(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Validation metrics, including "loss" and `monitor`."""
        ...


class Task(Objective, Protocol):
    """A fitted task: the objective plus what inference needs (labels, tokenizer, decoder).

    Everything `fit`, `Model`, the run directory and the CLI ask of a task is listed here; what a
    task's own command needs beyond it (`predict(...)`, `generate(...)`) is reached through
    `Model.require(command)`, which checks `commands` first.
    """

    name: str
    modality: str
    commands: frozenset[str]  # the CLI commands that answer for this task's runs, e.g. {"predict", "evaluate"}

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None, donor: Any, log: Callable) -> Prepared:
        """Read DATA, split it, fit (or, with `saved` config.json, restore) preprocessing; choose the model."""
        ...

    @classmethod
    def from_config(cls, config: dict) -> Task:
        """Rebuild the fitted task from config.json (no training imports)."""
        ...

    def to_json(self) -> dict:
        """The fields of config.json that rebuild this task at load time (preprocessing, labels, ...)."""
        ...

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict:
        """metrics.json "metrics": the held-out metrics of the best weights."""
        ...

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        """The honest classical model on the same split, scored with the same metric."""
        ...

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        """One plain sentence: which approach won here (the deep model, started as `approach` says, or the
        classical baseline), and by how much?"""
        ...

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        """(model, monitored value) rows for the CLI's result table."""
        ...

    def write_report(self, run_dir: Path, bundle: Any, summary: dict, result: Any, prepared: Prepared, log) -> None:
        """RUN/report.html."""
        ...

    def evaluate_data(self, network: nn.Module, data: Path) -> tuple[dict, list[Problem]]:
        """`layerwise evaluate`: metrics on held-out data in the task's own format."""
        ...

    # Optional: `claims(data) -> bool` (classmethod) lets the task be detected from DATA's layout;
    # `run_files() -> dict[str, str | bytes]` adds files to the run directory (e.g. tokenizer.json), and
    # `load_run_files(run_dir)` reads them back at load time; `calibrate(network, prepared, log)` fits
    # what inference needs from the held-out split after training (temperature, shift reference);
    # `explain(bundle, inputs, out_dir, methods, target, texts, box)` answers `layerwise explain`.


@dataclass
class Prepared:
    """Everything `fit` needs from a task's data preparation, before a network exists."""

    task: Task
    train_batches: Batches
    val_batches: Batches
    model_name: str
    model_config: dict
    data_summary: dict  # config.json "data": source, n_train, n_val, fingerprint, ...
    problems: list[Problem]
    batch_size: int
    extras: dict = field(default_factory=dict)  # task-private leftovers for the baseline and report
    lr: float = 3e-3  # the peak learning rate when the user gives none
    patience: int | None = None  # epochs without a better validation score before stopping early (None: the loop's)
    # The training batches at another batch size (same data, seed and augmentation), for the GPU's batch search;
    # None: the batch size is fixed.
    batches_of: Callable[[int], Batches] | None = None


def result_rows(summary: dict, key: str, show: Callable[[float], str]) -> list[tuple[str, str]]:
    """(model, value) rows of the CLI's result table for metric `key`: the deep model first, then the baseline."""
    rows = [(f"deep: {summary['model']}", show(summary["metrics"][key]))]
    if summary["baseline"] and summary["baseline"].get(key) is not None:
        rows.append((f"classical: {summary['baseline']['model']}", show(summary["baseline"][key])))
    return rows


def score(objective: Objective, metrics: dict[str, float]) -> float:
    """The monitored metric as a number where higher is better."""
    value = float(metrics[objective.monitor])
    return value if objective.higher_is_better else -value


@dataclass(frozen=True)
class FitOptions:
    """The user's training options that data preparation needs (the rest go to `TrainConfig`)."""

    modality: str | None = None
    model: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    batch_size: int | None = None
    time_budget: float | None = None  # seconds; a task may size its default model by it


@dataclass(frozen=True)
class PackOptions:
    """What `layerwise pack` asks of a task's `pack_into(data, staging, options, log) -> index entries`."""

    modality: str | None
    val_fraction: float
    seed: int
    shard_size: int | None  # examples per shard, where a task cuts its data into shards; None: the task's default


def default_batch_size(n_train: int) -> int:
    """256 for large data; smaller for small data so each epoch still takes several steps."""
    return int(min(256, max(16, 2 ** round(math.log2(max(n_train, 1) / 8)))))


def fingerprint(items: list[str]) -> str:
    """A short digest of what a run was trained on, so that `--resume` can tell when the data changed."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


class RunMismatch(InputError):
    """--resume (or --init) met data or settings that do not fit the saved run."""
