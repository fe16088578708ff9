"""`layerwise pack DATA --out SHARDS`: decode and validate a dataset once, into shards that train streams.

The split, the preprocessing and the problems are decided here, as `layerwise train DATA` would decide
them; `layerwise train SHARDS` then reads only the shards (see layerwise/data/shards.py). What a task packs is
its own (`pack_into` on the task class); this module checks the options and writes the folder atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layerwise.data.shards import INDEX_FILE, SHARD_FORMAT, publish, refuse_pack
from layerwise.errors import InputError
from layerwise.files import write_json
from layerwise.tasks import TASKS, detect_task, task_class
from layerwise.tasks.base import PackOptions

CUT_INTO_SHARDS = {"classify", "detect"}  # the others pack a split (text, structures, speech) as one mapped file


def packable_tasks() -> list[str]:
    return [name for name, task in TASKS.items() if hasattr(task, "pack_into")]


def pack(
    data: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    modality: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int | None = None,
    log=print,
) -> dict:
    """Write DATA's decoded examples as shards into `out`; returns the index (also `out/index.json`)."""
    data, out = Path(data), Path(out)
    refuse_pack(data)
    task = task or detect_task(data)
    pack_into = getattr(task_class(task), "pack_into", None)
    if pack_into is None:
        raise InputError(f"--task {task}: packing is for training data ({', '.join(packable_tasks())})")
    if not 0 < val_fraction < 0.5:
        raise InputError(f"--val-fraction must be between 0 and 0.5, not {val_fraction}")
    if shard_size is not None and shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, not {shard_size}")
    if shard_size is not None and task not in CUT_INTO_SHARDS:
        log(f"note: --shard-size does not apply to {task} data, which packs as one file per split")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: already exists and is not an empty folder; choose another")
    started = time.perf_counter()
    with _staged(out) as staging:
        found = pack_into(data, staging, PackOptions(modality, val_fraction, seed, shard_size), log)
        index = {"format": SHARD_FORMAT, "task": task} | found | {"seconds": round(time.perf_counter() - started, 1)}
        write_json(staging / INDEX_FILE, index)
    return index


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A staging folder beside `out`, renamed to `out` when the block completes and removed when it fails: an
    interrupted pack never looks complete."""
    staging = out.parent / f".tmp_{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
