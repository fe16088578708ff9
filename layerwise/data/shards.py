"""Data larger than memory: decoded, validated examples packed once into shards, then streamed.

`layerwise pack DATA --out SHARDS` reads DATA as training would (the split, the preprocessing fitted on
the training part, every bad file reported by name), decodes it in shards of `shard_size` examples and
writes each as `train-00000.safetensors` / `val-00000.safetensors` (`inputs`: the cached tensor the
front end makes, `labels`: int64) with an `index.json` — into a staging folder renamed at the end, so
an interrupted pack never looks complete. The examples are shuffled (seeded) before they are cut into
shards, so every shard is a random sample of the classes.

`ShardBatches` streams the training shards with bounded memory, whatever the dataset size: per epoch
the shard order is shuffled, and the examples within each shard; batch `i` of epoch `e` depends only on
(seed, e, i), so a run resumes mid-epoch exactly. At most the current shard and the examples of one batch
are in memory. safetensors, not pickle: a shard executes no code when read.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerwise.data.batches import seeded_generator, worker_stream, workers_for
from layerwise.data.sources import Example, Problem
from layerwise.errors import InputError

SHARD_FORMAT = "layerwise-shards/1"
INDEX_FILE = "index.json"
DEFAULT_SHARD_SIZE = 4096


def is_shard_folder(data: Path) -> bool:
    """A folder `layerwise pack` wrote (its index.json names the format)."""
    index = Path(data) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == SHARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def refuse_pack(data: Path) -> None:
    """A folder `layerwise pack` wrote, given where raw files are read (evaluate, export, pack itself): an error
    naming the raw data it came from."""
    if is_shard_folder(data):
        source = json.loads((Path(data) / INDEX_FILE).read_text()).get("source")
        raise InputError(
            f"{data} holds packed examples (`layerwise pack`), where raw files are needed"
            + (f": give the data it was packed from ({source})" if source else "")
        )


def read_pack(data: Path, task: str, val_fraction: float, log=print) -> dict:
    """The index of a pack to train `task` on: refused when it was packed for another task; a note when the
    requested --val-fraction differs from the split fixed at packing."""
    index = read_index(data)
    packed_for = index.get("task", "classify")  # packs from before the key were classification's
    if packed_for != task:
        raise InputError(f"{data}: packed for --task {packed_for}, not for {task}")
    if val_fraction != index["val_fraction"]:
        log(f"note: the validation split was fixed when {data} was packed ({index['val_fraction']:.0%}); "
            f"--val-fraction {val_fraction} does not change it")  # fmt: skip
    return index


def read_index(data: Path) -> dict:
    path = Path(data) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable shard index ({err})") from err
    if index.get("format") != SHARD_FORMAT:
        raise InputError(f"{path}: format {index.get('format')!r}, expected {SHARD_FORMAT!r}")
    for shard in index["shards"]:
        if not (Path(data) / shard["file"]).is_file():
            raise InputError(f"{Path(data) / shard['file']}: shard listed in {path} is missing")
    return index


def load_shard(data: Path, shard: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one shard, checked against the index."""
    path = Path(data) / shard["file"]
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable shard ({err})") from err
    sizes = {len(tensor) for tensor in tensors.values()}
    if set(tensors) != {"inputs", "labels"} or sizes != {shard["n"]}:
        raise InputError(f"{path}: does not hold the {shard['n']} examples its index lists")
    return tensors["inputs"], tensors["labels"]


def write_shards(
    out: Path,
    splits: dict[str, list[Example]],
    class_names: list[str],
    frontend,
    shard_size: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, list[Example]], list[Problem]]:
    """Decode each split's examples shard by shard into `out` (a staging folder).

    Returns the shard entries, the examples kept per split (in shard order) and the problems.
    """
    label_index = {name: i for i, name in enumerate(class_names)}
    shards, kept_by_split, problems = [], {}, []
    for split, examples in splits.items():
        order = torch.randperm(len(examples), generator=seeded_generator(seed, len(examples))).tolist()
        examples = [examples[i] for i in order]
        kept_by_split[split] = []
        for k, first in enumerate(range(0, len(examples), shard_size)):
            chunk = examples[first : first + shard_size]
            inputs, kept, chunk_problems = frontend.decode_all(chunk)
            problems += chunk_problems
            chunk = [chunk[i] for i in kept]
            if not chunk:
                continue
            labels = torch.tensor([label_index[ex.label] for ex in chunk], dtype=torch.int64)
            name = f"{split}-{k:05d}.safetensors"
            save_file({"inputs": inputs.contiguous(), "labels": labels}, str(out / name))
            shards.append({"file": name, "split": split, "n": len(chunk)})
            kept_by_split[split] += chunk
            log(f"{split} shard {k + 1}/{-(-len(examples) // shard_size)}: {len(chunk)} examples")
    return shards, kept_by_split, problems


def publish(staging: Path, out: Path) -> None:
    """Make the finished staging folder `out`, in one rename."""
    for path in staging.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if out.exists():
        out.rmdir()  # only ever an empty folder: `pack` refused a non-empty one, and nothing else is removed
    os.replace(staging, out)


class ShardBatches:
    """Seeded batches streamed from shards: the shard order and each shard's order are shuffled per epoch."""

    def __init__(
        self,
        data: Path,
        shards: list[dict],
        batch_size: int,
        to_model_input: Callable[[torch.Tensor], torch.Tensor],
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        make_batch: Callable[[list[tuple[torch.Tensor, torch.Tensor]], int, int], Any] | None = None,
    ) -> None:
        """`make_batch(pieces, epoch, i)`, when given, makes batch i of epoch `epoch` from its (inputs, labels)
        pieces, in place of joining them, `augment` and `to_model_input` (detection's shards: labels are rows
        of a box table)."""
        self.data, self.shards = Path(data), shards
        self.batch_size, self.to_model_input, self.augment = batch_size, to_model_input, augment
        self.make_batch = make_batch
        self.shuffle, self.seed = shuffle, seed
        self.n = sum(shard["n"] for shard in shards)
        self.drop_last = shuffle and self.n >= 2 * batch_size  # as TensorBatches: no tiny last training batch
        self.workers, self.pin_memory = 0, False  # see `streamed_to`

    def streamed_to(self, device: torch.device) -> ShardBatches:
        """These batches as the training loop on `device` reads them: on a GPU, made by DataLoader worker
        processes (reading shards, augmenting, while the GPU trains) into pinned memory, whose copies to the
        GPU do not wait. On a CPU the training threads already use every core: no workers."""
        streamed = copy.copy(self)
        streamed.workers, streamed.pin_memory = workers_for(device), device.type == "cuda"
        return streamed

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches `start`, `start+1`, ... of epoch `epoch` (made by worker processes when `workers`)."""
        if self.workers == 0:
            return (self._batch(pieces, epoch, i) for i, pieces in self._pieces(epoch, start))
        # Worker w makes batches start + w, start + w + W, ...; the DataLoader takes them from the workers in
        # turn, so the order is exactly that of the single-process stream.
        return worker_stream(_WorkerShare(self, epoch, start), self.workers, self.pin_memory)

    def _pieces(
        self, epoch: int, start: int, wanted: Callable[[int], bool] = lambda i: True
    ) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """(i, the pieces of batch i) for batches `start`, `start+1`, ... of epoch `epoch` that are `wanted`.

        A batch is gathered from the loaded shard by index (a copy of just its examples), so when the next
        shard is read only the current one and the pieces of one batch are held.
        """
        shard_order = list(range(len(self.shards)))
        if self.shuffle:
            shard_order = torch.randperm(len(self.shards), generator=seeded_generator(self.seed, epoch)).tolist()
        skip = start * self.batch_size  # examples before batch `start`, in this epoch's order
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending, i = 0, start
        for s in shard_order:
            if i >= len(self):
                return
            shard = self.shards[s]
            if skip >= shard["n"]:  # wholly before `start`: not even read
                skip -= shard["n"]
                continue
            inputs, labels = load_shard(self.data, shard)
            order = torch.arange(shard["n"])
            if self.shuffle:
                order = torch.randperm(shard["n"], generator=seeded_generator(self.seed, epoch, s, 1))
            order, skip = order[skip:], 0
            while len(order) and i < len(self):
                take, order = order[: self.batch_size - pending], order[self.batch_size - pending :]
                if wanted(i):
                    pieces.append((inputs[take], labels[take]))
                pending += len(take)
                if pending == self.batch_size:
                    if wanted(i):
                        yield i, pieces
                    pieces, pending, i = [], 0, i + 1
            del inputs, labels  # before the next shard is read
        if pending and i < len(self) and wanted(i):  # the ragged last batch (evaluation)
            yield i, pieces

    def _batch(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], epoch: int, i: int):
        if self.make_batch is not None:
            return self.make_batch(pieces, epoch, i)
        inputs = torch.cat([piece[0] for piece in pieces])
        labels = torch.cat([piece[1] for piece in pieces])
        if self.augment is not None:
            inputs = self.augment(inputs, seeded_generator(self.seed, epoch, i))
        return self.to_model_input(inputs), labels


class _WorkerShare(torch.utils.data.IterableDataset):
    """The batches of one epoch that a DataLoader worker makes: every `num_workers`-th from `start`. Each
    worker reads the shards itself (each shard once per worker: the reading is repeated, the page cache
    shares it) and copies out, joins and augments only its own batches' examples."""

    def __init__(self, batches: ShardBatches, epoch: int, start: int) -> None:
        self.batches, self.epoch, self.start = batches, epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = lambda i: (i - self.start) % workers == worker  # noqa: E731
        for i, pieces in self.batches._pieces(self.epoch, self.start, mine):
            yield self.batches._batch(pieces, self.epoch, i)


def load_split(data: Path, shards: list[dict], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of `shards` in memory, in index order (the first `limit` of them when given), copied shard by
    shard into tensors of their final size: at most one shard more than the result is held at once."""
    if not shards:
        raise InputError(f"{data}: no shards of this split to read")
    total = sum(shard["n"] for shard in shards)
    total = total if limit is None else min(limit, total)
    inputs = labels = None
    n = 0
    for shard in shards:
        if n >= total:
            break
        shard_inputs, shard_labels = load_shard(data, shard)
        if inputs is None:
            inputs = shard_inputs.new_empty((total, *shard_inputs.shape[1:]))
            labels = shard_labels.new_empty((total, *shard_labels.shape[1:]))
        take = min(len(shard_labels), total - n)
        inputs[n : n + take], labels[n : n + take] = shard_inputs[:take], shard_labels[:take]
        n += take
        del shard_inputs, shard_labels  # before the next shard is read
    return inputs, labels
