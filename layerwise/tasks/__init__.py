"""The tasks layerwise learns, one explicit table (no registration side effects).

A task is what differs between a category, a generated word, a box, a transcript and a structure:
how targets are read, the head, the loss, the metrics, the decoder, the baseline and the report.
"""

from __future__ import annotations

from pathlib import Path

from layerwise.errors import InputError
from layerwise.tasks.classify import ClassifyTask
from layerwise.tasks.detect import DetectTask
from layerwise.tasks.fold import FoldTask
from layerwise.tasks.generate import GenerateTask
from layerwise.tasks.pretrain import PretrainTask
from layerwise.tasks.transcribe import TranscribeTask

# Tried in this order by detect_task: a detection folder (images + annotations), a folder of protein
# structures and a speech manifest (a CSV with `path` and `text`) before a text corpus.
TASKS: dict[str, type] = {
    "classify": ClassifyTask, "detect": DetectTask, "fold": FoldTask, "transcribe": TranscribeTask,
    "generate": GenerateTask,
    # Never detected (it has no `claims`) and never trained by `train`: `layerwise pretrain` writes its runs.
    "pretrain": PretrainTask,
}  # fmt: skip


def task_class(name: str) -> type:
    if name not in TASKS:
        raise InputError(f"--task: {name!r} is not available (available: {', '.join(TASKS)})")
    return TASKS[name]


def detect_task(data: Path) -> str:
    """The task the data's layout implies; classification unless it is unambiguously something else."""
    from layerwise.data.shards import is_shard_folder, read_index

    if is_shard_folder(data):  # `layerwise pack` wrote it, for the task it names
        return read_index(data).get("task", "classify")
    for name, task in TASKS.items():
        detect = getattr(task, "claims", None)
        if detect is not None and detect(data):
            return name
    return "classify"


def task_from_config(config: dict):
    """The fitted task of a saved run (config.json)."""
    return task_class(config.get("task", "classify")).from_config(config)
