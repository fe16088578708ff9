"""Images with boxes for the detection task: letterboxing to a square, batches with box-safe augmentation.

An image of any size is scaled so its longer side is `side` and padded (right and bottom) to a square,
so a batch is one tensor and boxes only scale: a box in the letterboxed image divided by the image's
`scale` is the box in the original file's pixels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerwise.data.batches import made_by_workers, seeded_generator, workers_for
from layerwise.data.shards import ShardBatches
from layerwise.errors import DecodeError, InputError

MIN_SIDE, MAX_SIDE = 128, 512
SIDE_MULTIPLE = 32  # the feature pyramid's coarsest stride: sides divisible by it need no extra padding


def choose_side(sizes: list[tuple[int, int]]) -> int:
    """The letterbox side: the median longer side, rounded up to a multiple of 32, within [128, 512]."""
    longer = sorted(max(w, h) for w, h in sizes) or [MIN_SIDE]
    median = longer[len(longer) // 2]
    return int(min(MAX_SIDE, max(MIN_SIDE, math.ceil(median / SIDE_MULTIPLE) * SIDE_MULTIPLE)))


def letterbox(path: Path, side: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Decode an image file to uint8 (3, side, side), its scale factor and its original (width, height)."""
    try:
        with Image.open(path) as img:
            width, height = img.size  # the file's pixels, before draft() reduces a JPEG while decoding
            img.draft("RGB", (side, side))
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"not a readable image: {err}") from err
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = rgb.resize(size, Image.Resampling.BILINEAR)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    canvas[: resized.height, : resized.width] = np.asarray(resized)
    return canvas.transpose(2, 0, 1).copy(), scale, (width, height)


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) standardised per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def box_augmentation():
    """Flip, scale jitter with translation (a crop when zooming in), colour: boxes follow the pixels exactly."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.75, 1.25)),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),  # no hue: it tripled the cost per image
        v2.SanitizeBoundingBoxes(min_size=2),  # boxes pushed (almost) out of the frame go, with their labels
    ])  # fmt: skip


def augment_one(
    transform, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One uint8 (3, H, W) image with its boxes (K, 4) xyxy and labels (K,) through `transform`."""
    from torchvision import tv_tensors

    side = image.shape[-2:]
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(side)),
        "labels": labels,
    }
    out = transform(sample)
    return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]


class BoxBatches:
    """Seeded batches of letterboxed images and their targets; epoch `e`, batch `i` depend only on (seed, e, i).

    Yields (float (B, 3, side, side) normalised images, [{"boxes": (K, 4), "labels": (K,)}] per image).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.images, self.targets = images, targets
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.transform = box_augmentation() if augment else None
        self.workers, self.pin_memory = 0, False  # see `streamed_to`
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its example order), made once an epoch

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def streamed_to(self, device: torch.device) -> BoxBatches:
        """These batches as the training loop on `device` reads them: on a GPU made (augmented per image on the
        CPU) by DataLoader worker processes into pinned memory while it trains; on a CPU in the training process."""
        streamed = copy.copy(self)
        streamed.workers, streamed.pin_memory = workers_for(device), device.type == "cuda"
        return streamed

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        if self.workers:
            return made_by_workers(self, epoch, start, self.workers, self.pin_memory)
        return (self.batch_at(epoch, i) for i in range(start, len(self)))

    def batch_at(self, epoch: int, i: int) -> tuple[torch.Tensor, list[dict]]:
        """Batch `i` of epoch `epoch`: a function of (seed, epoch, i) alone."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.images)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n))
        index = self._order[1][i * self.batch_size : (i + 1) * self.batch_size]
        targets = [self.targets[j] for j in index.tolist()]
        return box_batch(self.images[index], targets, self.transform, (self.seed, epoch, i), self.mean, self.std)


def box_batch(
    images: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    transform,
    key: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[torch.Tensor, list[dict]]:
    """uint8 images (B, 3, side, side) and their (boxes, labels), augmented by `transform` (when given) with draws
    seeded by `key` (seed, epoch, batch) alone: normalised images and [{"boxes", "labels"}] per image."""
    boxes, labels = [b for b, _ in targets], [lab for _, lab in targets]
    if transform is not None:
        # transforms.v2 draws from torch's global generator: fork it, so augmentation is seeded by
        # (seed, epoch, batch) and leaves the training's own random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash(key) % 2**31)
            results = [augment_one(transform, im, b, lab) for im, b, lab in zip(images, boxes, labels, strict=True)]
        images = torch.stack([r[0] for r in results])
        boxes, labels = [r[1] for r in results], [r[2] for r in results]
    out = [{"boxes": b.float(), "labels": lab.long()} for b, lab in zip(boxes, labels, strict=True)]
    return normalise(images, mean, std), out


class ShardBoxBatches(ShardBatches):
    """BoxBatches streamed from `layerwise pack`'s shards, with bounded memory: a shard's `inputs` are letterboxed
    uint8 images and its `labels` each image's row in `targets`, the split's boxes (small: held in memory).

    The order is ShardBatches' (shards shuffled per epoch, then images within each shard), so batch i of epoch e
    is a function of (seed, e, i) and a run resumes mid-epoch exactly, from one process or DataLoader workers.
    """

    def __init__(
        self,
        data: Path,
        shards: list[dict],
        batch_size: int,
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(data, shards, batch_size, lambda images: images, shuffle=shuffle, seed=seed)
        self.targets, self.mean, self.std = targets, mean, std
        self.transform = box_augmentation() if augment else None

    def _batch(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], epoch: int, i: int):
        images = torch.cat([piece[0] for piece in pieces])
        targets = [self.targets[j] for piece in pieces for j in piece[1].tolist()]
        return box_batch(images, targets, self.transform, (self.seed, epoch, i), self.mean, self.std)


def write_box_shards(
    out: Path, split: str, images: list, side: int, shard_size: int, seed: int, log=print
) -> tuple[list[dict], list[int], list[tuple[torch.Tensor, torch.Tensor]], list]:
    """Letterbox `images` (AnnotatedImage) shard by shard into `out` (a staging folder), in a seeded order, and
    `out/{split}-targets.safetensors`: every kept image's boxes (in letterboxed pixels) and labels.

    Returns the shard entries, the kept images' indices into `images` (in shard order), their targets (row r of
    the targets file is the image whose shard label is r) and the problems.
    """
    from layerwise.tasks.detect import decode_annotated

    order = torch.randperm(len(images), generator=seeded_generator(seed, len(images))).tolist()
    shards, kept, targets, problems = [], [], [], []
    for k, first in enumerate(range(0, len(order), shard_size)):
        chunk = order[first : first + shard_size]
        pixels, chunk_targets, chunk_kept, chunk_problems = decode_annotated([images[i] for i in chunk], side)
        problems += chunk_problems
        if not chunk_kept:
            continue
        rows = torch.arange(len(targets), len(targets) + len(chunk_kept), dtype=torch.int64)
        name = f"{split}-{k:05d}.safetensors"
        save_file({"inputs": pixels.contiguous(), "labels": rows}, str(out / name))
        shards.append({"file": name, "split": split, "n": len(chunk_kept)})
        kept += [chunk[i] for i in chunk_kept]
        targets += chunk_targets
        log(f"{split} shard {k + 1}/{-(-len(order) // shard_size)}: {len(chunk_kept)} images")
    counts = torch.tensor([len(labels) for _, labels in targets], dtype=torch.int64)
    flat_boxes = torch.cat([b for b, _ in targets]) if targets else torch.zeros((0, 4))
    flat_labels = torch.cat([lab for _, lab in targets]) if targets else torch.zeros(0, dtype=torch.int64)
    save_file({"counts": counts, "boxes": flat_boxes.contiguous(), "labels": flat_labels.contiguous()},
              str(out / f"{split}-targets.safetensors"))  # fmt: skip
    return shards, kept, targets, problems


def read_box_targets(data: Path, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (boxes, labels) of a packed split's `n` images, from `{split}-targets.safetensors`, checked."""
    path = Path(data) / f"{split}-targets.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable targets file ({err})") from err
    counts = tensors.get("counts")
    if set(tensors) != {"counts", "boxes", "labels"} or len(counts) != n or int(counts.sum()) != len(tensors["boxes"]):
        raise InputError(f"{path}: does not hold the boxes of the {n} images its index lists")
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [(tensors["boxes"][a:b].clone(), tensors["labels"][a:b].clone()) for a, b in zip(starts, ends, strict=True)]
