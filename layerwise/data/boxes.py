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

from layerwise.data.batches import made_by_workers, workers_for
from layerwise.errors import DecodeError

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
        images = self.images[index]
        boxes = [self.targets[j][0] for j in index.tolist()]
        labels = [self.targets[j][1] for j in index.tolist()]
        if self.transform is not None:
            # transforms.v2 draws from torch's global generator: fork it, so augmentation is seeded by
            # (seed, epoch, batch) and leaves the training's own random stream untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, i)) % 2**31)
                results = [
                    augment_one(self.transform, im, b, lab) for im, b, lab in zip(images, boxes, labels, strict=True)
                ]
            images = torch.stack([r[0] for r in results])
            boxes, labels = [r[1] for r in results], [r[2] for r in results]
        targets = [{"boxes": b.float(), "labels": lab.long()} for b, lab in zip(boxes, labels, strict=True)]
        return normalise(images, self.mean, self.std), targets
