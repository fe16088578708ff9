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
from layerwise.data.sources import Problem
from layerwise.errors import DecodeError, InputError

MIN_SIDE, MAX_SIDE = 128, 512
SCALE_JITTER = (0.75, 1.25)  # the augmentation's range of object scales
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


class BoxAugmentation:
    """Flip, scale jitter with translation (a crop when zooming in), colour: boxes follow the pixels exactly.

    Called on a uint8 batch (B, 3, H, W) with each image's boxes (K, 4) xyxy and labels (K,). Flip and colour
    are whole-batch tensor operations with a draw per image; the scale jitter goes image by image through
    torchvision.transforms.v2, whose BoundingBoxes type moves the boxes with the pixels.
    Draws come from torch's global generator, which `box_batch` seeds per batch.
    """

    def __init__(self, colour: float = 0.3, scale_jitter_p: float = 0.25) -> None:
        from torchvision.transforms import v2

        self.colour = colour
        # Scale jitter on a quarter of the images: on every image it slowed learning within a 5-minute CPU budget
        # (composed scenes: 0.797 test mAP@0.5 against 0.838 without it); on a quarter it measured the same
        # mAP@0.5 as none (0.867, 0.868) and a better mAP@[.5:.95] (0.593, 0.584), for a third of its cost.
        self.scale_jitter_p = scale_jitter_p
        self.scale_jitter = v2.Compose([
            v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=SCALE_JITTER),  # nearest: pixels stay pixels
            v2.SanitizeBoundingBoxes(min_size=2),  # boxes pushed (almost) out of the frame go, with their labels
        ])  # fmt: skip

    def __call__(
        self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        images, boxes, labels = self.geometric(images, boxes, labels)
        return self.photometric(images), boxes, labels

    def geometric(
        self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """A horizontal flip of half the images, then the scale jitter on `scale_jitter_p` of them."""
        flipped = (torch.rand(len(images)) < 0.5).tolist()
        images = torch.where(torch.tensor(flipped, dtype=torch.bool).view(-1, 1, 1, 1), images.flip(-1), images)
        width = images.shape[-1]
        boxes = [torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1) if flip else b
                 for b, flip in zip(boxes, flipped, strict=True)]  # fmt: skip
        labels = list(labels)
        for i in torch.nonzero(torch.rand(len(images)) < self.scale_jitter_p).flatten().tolist():
            images[i], boxes[i], labels[i] = augment_one(self.scale_jitter, images[i], boxes[i], labels[i])
        return images, boxes, labels

    def photometric(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation, each by a factor drawn per image from [1 - colour, 1 + colour]."""
        brightness, contrast, saturation = 1 + self.colour * (2 * torch.rand(3, len(images)) - 1)
        return jitter_colour(images, brightness, contrast, saturation)


def jitter_colour(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """uint8 (B, 3, H, W) with a factor (B,) per image for each of brightness, contrast and saturation, as
    torchvision's ColorJitter defines them (contrast about the image's mean grey, saturation towards its grey),
    in that order, on the whole batch at once. Written here because ColorJitter draws one factor per call, and a
    call per image cost 11.6 ms of a 16-image batch's 25 ms of augmentation."""
    x = images.float()
    brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    x = (x * brightness).clamp(0, 255)
    x = (contrast * x + (1 - contrast) * _grey(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)
    x = (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 255)
    return x.round().to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma, ITU-R 601 weights as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


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
        self.transform = BoxAugmentation() if augment else None
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
        # The augmentation (transforms.v2 with it) draws from torch's global generator: fork it, so augmentation is
        # seeded by (seed, epoch, batch) and leaves the training's own random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash(key) % 2**31)
            images, boxes, labels = transform(images, boxes, labels)
    # Copies: a batch never holds the dataset's own tensors (a DataLoader worker would share each one it sent).
    out = [
        {"boxes": b.to(torch.float32, copy=True), "labels": lab.to(torch.int64, copy=True)}
        for b, lab in zip(boxes, labels, strict=True)
    ]
    return normalise(images, mean, std), out


def shard_box_batches(
    data: Path,
    shards: list[dict],
    batch_size: int,
    targets: BoxTable,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
) -> ShardBatches:
    """Detection batches streamed from `layerwise pack`'s shards, with bounded memory: a shard's `inputs` are
    letterboxed uint8 images and its `labels` each image's row in `targets`, its split's box table.

    The order is ShardBatches' (shards shuffled per epoch, then images within each shard), so batch i of epoch e
    is a function of (seed, e, i) and a run resumes mid-epoch exactly, from one process or DataLoader workers.
    """
    transform = BoxAugmentation() if augment else None

    def make_batch(pieces: list[tuple[torch.Tensor, torch.Tensor]], epoch: int, i: int):
        images = torch.cat([piece[0] for piece in pieces])
        rows = torch.cat([piece[1] for piece in pieces]).tolist()
        return box_batch(images, [targets[row] for row in rows], transform, (seed, epoch, i), mean, std)

    as_is = lambda images: images  # noqa: E731 (make_batch normalises)
    return ShardBatches(data, shards, batch_size, as_is, shuffle=shuffle, seed=seed, make_batch=make_batch)


def decode_annotated(images: list, side: int):
    """Letterbox every annotated image: uint8 (N, 3, side, side), [(boxes (K, 4), labels (K,))], kept, problems."""
    pixels, targets, kept, problems = [], [], [], []
    for i, image in enumerate(images):
        try:
            array, scale, _ = letterbox(image.path, side)
        except DecodeError as err:
            problems.append(Problem(image.origin, str(err)))
            continue
        pixels.append(torch.from_numpy(array))
        targets.append(
            (torch.from_numpy(image.boxes * scale).float().reshape(-1, 4), torch.from_numpy(image.labels).long())
        )
        kept.append(i)
    stacked = torch.stack(pixels) if pixels else torch.zeros((0, 3, side, side), dtype=torch.uint8)
    return stacked, targets, kept, problems


class BoxTable:
    """Every image of a packed split's boxes (letterboxed pixels) and labels, in three flat tensors:
    `table[row]` is image `row`'s (boxes (K, 4), labels (K,)), as views. Flat, not a pair of tensors per image: a
    million images are three tensors, not two million."""

    def __init__(self, path: Path, counts: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> None:
        self.path, self.ends = path, counts.cumsum(0)
        self.boxes, self.labels = boxes, labels

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= row < len(self.ends):  # a shard's label that is not a row here: a damaged pack
            raise InputError(f"{self.path}: has no row {row} for a shard's image; pack the data again")
        end = int(self.ends[row])
        start = int(self.ends[row - 1]) if row > 0 else 0
        return self.boxes[start:end], self.labels[start:end]


def write_box_shards(
    out: Path, split: str, images: list, side: int, shard_size: int, seed: int, log=print
) -> tuple[list[dict], list[int], list[Problem]]:
    """Letterbox `images` (AnnotatedImage) shard by shard into `out` (a staging folder), in a seeded order, and
    `out/{split}-targets.safetensors`: every kept image's boxes (in letterboxed pixels) and labels, row r being
    the image whose shard label is r.

    Returns the shard entries, the kept images' indices into `images` (in shard order) and the problems.
    """
    order = torch.randperm(len(images), generator=seeded_generator(seed, len(images))).tolist()
    shards, kept, counts, boxes, labels, problems = [], [], [], [], [], []
    for k, first in enumerate(range(0, len(order), shard_size)):
        chunk = order[first : first + shard_size]
        pixels, chunk_targets, chunk_kept, chunk_problems = decode_annotated([images[i] for i in chunk], side)
        problems += chunk_problems
        if not chunk_kept:
            continue
        rows = torch.arange(len(kept), len(kept) + len(chunk_kept), dtype=torch.int64)
        name = f"{split}-{k:05d}.safetensors"
        save_file({"inputs": pixels.contiguous(), "labels": rows}, str(out / name))
        shards.append({"file": name, "split": split, "n": len(chunk_kept)})
        kept += [chunk[i] for i in chunk_kept]
        counts += [len(image_labels) for _, image_labels in chunk_targets]
        boxes += [image_boxes for image_boxes, _ in chunk_targets]
        labels += [image_labels for _, image_labels in chunk_targets]
        log(f"{split} shard {k + 1}/{-(-len(order) // shard_size)}: {len(chunk_kept)} images")
    table = {
        "counts": torch.tensor(counts, dtype=torch.int64),
        "boxes": torch.cat(boxes).contiguous() if boxes else torch.zeros((0, 4)),
        "labels": torch.cat(labels).contiguous() if labels else torch.zeros(0, dtype=torch.int64),
    }
    save_file(table, str(out / f"{split}-targets.safetensors"))
    return shards, kept, problems


def read_box_targets(data: Path, split: str, n: int) -> BoxTable:
    """The box table of a packed split's `n` images, from `{split}-targets.safetensors`, checked."""
    path = Path(data) / f"{split}-targets.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable targets file ({err})") from err
    counts, boxes, labels = (tensors.get(name) for name in ("counts", "boxes", "labels"))
    if (
        set(tensors) != {"counts", "boxes", "labels"} or counts.shape != (n,) or bool((counts < 0).any())
        or not int(counts.sum()) == len(boxes) == len(labels) or boxes.shape[1:] != (4,)
    ):  # fmt: skip
        raise InputError(f"{path}: does not hold the boxes of the {n} images its index lists")
    return BoxTable(path, counts, boxes, labels)
