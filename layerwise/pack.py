"""`layerwise pack DATA --out SHARDS`: decode and validate a dataset once, into shards that train streams.

The split, the preprocessing and the problems are decided here, as `layerwise train DATA` would decide
them; `layerwise train SHARDS` then reads only the shards (see layerwise/data/shards.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from layerwise.data.frontend import fit_frontend
from layerwise.data.shards import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    SHARD_FORMAT,
    load_shard,
    publish,
    refuse_pack,
    write_shards,
)
from layerwise.data.sources import check_trainable, discover
from layerwise.errors import InputError
from layerwise.files import write_json
from layerwise.tasks import detect_task
from layerwise.tasks.base import fingerprint
from layerwise.tasks.classify import example_key, stratified_split

PACKABLE_TASKS = ("classify", "generate", "fold")


def pack(
    data: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    modality: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    log=print,
) -> dict:
    """Write DATA's decoded examples as shards into `out`; returns the index (also `out/index.json`)."""
    data, out = Path(data), Path(out)
    refuse_pack(data)
    task = task or detect_task(data)
    if task not in PACKABLE_TASKS:
        raise InputError(f"--task {task}: packing into shards is available for {', '.join(PACKABLE_TASKS)} data so far")
    if not 0 < val_fraction < 0.5:
        raise InputError(f"--val-fraction must be between 0 and 0.5, not {val_fraction}")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, not {shard_size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: already exists and is not an empty folder; choose another")
    started = time.perf_counter()
    if task in ("generate", "fold"):
        return _pack_task(task, data, out, modality, val_fraction, seed, log)
    source = discover(data, modality)
    train_examples, val_examples = stratified_split(source.examples, val_fraction, seed)
    frontend = fit_frontend(source.modality, train_examples)
    staging = out.parent / f".tmp_{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards, kept, problems = write_shards(
            staging, {"train": train_examples, "val": val_examples}, source.class_names, frontend, shard_size, seed, log
        )
        problems = source.problems + problems
        check_trainable([ex.label for split in kept.values() for ex in split], source.class_names, source.root)
        if not kept["val"]:
            raise InputError(f"{source.root}: too few usable examples to hold any out for validation")
        # Statistics (an image's per-channel mean and std) from the first training shard: a random sample.
        if not kept["train"]:
            raise InputError(f"{source.root}: no usable training examples to pack")
        first_train = next(shard for shard in shards if shard["split"] == "train")
        frontend.fit_statistics(load_shard(staging, first_train)[0])
        index = {
            "format": SHARD_FORMAT, "task": task, "modality": source.modality, "source": str(source.root),
            "preprocessing": frontend.to_json(), "class_labels": source.class_names,
            "n_train": len(kept["train"]), "n_val": len(kept["val"]), "val_fraction": val_fraction, "seed": seed,
            "shard_size": shard_size, "shards": shards,
            "fingerprint": fingerprint(
                [f"{split} {example_key(e, source.root)}" for split, examples in kept.items() for e in examples]
            ),
            "val_examples": [
                {"origin": e.origin, "label": e.label, "path": str(e.path) if e.path else None, "text": e.text}
                for e in kept["val"]
            ],
            "skipped": [p.to_json() for p in problems],
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        write_json(staging / INDEX_FILE, index)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _pack_task(task: str, data: Path, out: Path, modality: str | None, val_fraction: float, seed: int, log) -> dict:
    """A corpus for text generation (token streams, tokenizer and texts: tasks/generate.py, pack_corpus) or
    structures for folding (the chains and their identity split: tasks/fold.py, pack_structures)."""
    from layerwise.tasks.fold import pack_structures
    from layerwise.tasks.generate import pack_corpus

    started = time.perf_counter()
    expected = {"generate": "text", "fold": "protein"}[task]
    if modality not in (None, expected):
        raise InputError(f"--modality {modality}: --task {task} learns from {expected}")
    writer = pack_corpus if task == "generate" else pack_structures
    staging = out.parent / f".tmp_{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        index = {"format": SHARD_FORMAT} | writer(data, staging, val_fraction, seed, log)
        index["seconds"] = round(time.perf_counter() - started, 1)
        write_json(staging / INDEX_FILE, index)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index
