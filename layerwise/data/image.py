"""Image front end: decode any image file to a fixed-size uint8 tensor; augment and normalise batches.

Decoded images are cached in memory as uint8 (C, H, W), so decoding happens once per run and each
epoch only pays for indexing and the batched augmentation below.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import statistics
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from layerwise.data.sources import Example, Problem
from layerwise.errors import DecodeError
from layerwise.runtime import host_to

MIN_SIDE, MAX_SIDE = 16, 128  # decoded square side, chosen from the data within these bounds
DECODE_CHUNK = 4096  # files per worker task
SIZE_SAMPLE = 256  # images whose headers are read to choose size and channels
CROP_PADDING_FRACTION = 0.1  # random translation of up to 10% of the side
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow large photos; we reduce them on load
# Errors meaning "this is not an image we will open", as opposed to a damaged one.
NOT_AN_IMAGE = (
    UnidentifiedImageError,
    Image.DecompressionBombWarning,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class ImagePreprocessing:
    side: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True

    def to_json(self) -> dict:
        return {"modality": "image", **asdict(self)}


def choose_preprocessing(paths: list[Path], hflip: bool = True) -> ImagePreprocessing:
    """Pick the side (median of a sample, clamped) and channels (1 if every sample is grayscale)."""
    step = max(1, len(paths) // SIZE_SAMPLE)
    sides: list[int] = []
    grayscale = True
    for path in paths[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as img:
                sides.append(max(img.size))
                grayscale &= img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16")
        except (OSError, UnidentifiedImageError, ValueError):
            continue  # reported by decode() later, by name
    side = int(statistics.median(sides)) if sides else 32
    side = min(MAX_SIDE, max(MIN_SIDE, side))
    channels = 1 if grayscale else 3
    return ImagePreprocessing(side=side, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels, hflip=hflip)


def decode(content: Path | bytes, prep: ImagePreprocessing) -> np.ndarray:
    """Decode one image (a file, or its bytes) to uint8 (C, side, side). Raises DecodeError with a reason."""
    try:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
    except OSError as err:  # deleted or unreadable since discovery: skip it, like a corrupt file
        raise DecodeError(f"cannot read: {err.strerror}") from err
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content) if isinstance(content, bytes) else content) as img:
                img.draft("RGB" if prep.channels == 3 else "L", (prep.side, prep.side))  # fast JPEG downscale
                img = _flatten_alpha(img)
                target = "L" if prep.channels == 1 else "RGB"
                if img.mode != target:  # convert() copies even when the mode is the same
                    img = img.convert(target)
                img = img.resize((prep.side, prep.side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                array = np.asarray(img, dtype=np.uint8)
    except NOT_AN_IMAGE as err:
        raise DecodeError(f"not a readable image ({type(err).__name__})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DecodeError(f"corrupt image: {err}") from err
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images over white, so transparent pixels do not become black."""
    # P, L and RGB images can mark one colour transparent (GIF, PNG tRNS) instead of an alpha band.
    keyed = img.mode in ("P", "L", "RGB") and "transparency" in img.info
    if img.mode in ("RGBA", "LA", "PA") or keyed:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba)
    if img.mode.startswith("I;16"):  # 16-bit grayscale: the full range 0..65535 maps to 0..255
        return Image.fromarray((np.asarray(img, dtype=np.float32) / 257).round().astype(np.uint8))
    if img.mode in ("I", "F"):  # 32-bit int / float grayscale of unknown range: stretch to 8-bit
        array = np.asarray(img, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        return Image.fromarray(((array - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8))
    return img


def _decode_chunk(contents: list[Path | bytes], prep: ImagePreprocessing) -> list[np.ndarray | str]:
    """Decode several files; a failure becomes its reason string (workers cannot raise per item)."""
    out: list[np.ndarray | str] = []
    for content in contents:
        try:
            out.append(decode(content, prep))
        except DecodeError as err:
            out.append(str(err))
    return out


class ImageFrontEnd:
    """Images of any size and mode -> uint8 (N, C, side, side) in memory -> normalised batches."""

    modality = "image"

    def __init__(self, prep: ImagePreprocessing) -> None:
        self.prep = prep

    @classmethod
    def fit(cls, examples: list[Example], hflip: bool = True) -> ImageFrontEnd:
        return cls(choose_preprocessing([ex.path for ex in examples], hflip=hflip))

    @classmethod
    def from_json(cls, config: dict) -> ImageFrontEnd:
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k != "modality"}
        return cls(ImagePreprocessing(**fields))

    def to_json(self) -> dict:
        return self.prep.to_json()

    @property
    def model_inputs(self) -> dict:
        """What a backbone needs to know about its input."""
        return {"in_channels": self.prep.channels}

    def decode_all(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]:
        """Decode every example; returns uint8 (N_ok, C, H, W), the kept indices, and problems."""
        contents = [ex.content for ex in examples]
        chunks = [contents[i : i + DECODE_CHUNK] for i in range(0, len(contents), DECODE_CHUNK)]
        if len(chunks) > 1:
            # PIL decoding holds the GIL for small images: processes, not threads.
            with multiprocessing.get_context("fork").Pool(min(len(chunks), os.cpu_count() or 1)) as pool:
                results = [r for chunk in pool.starmap(_decode_chunk, [(c, self.prep) for c in chunks]) for r in chunk]
        else:
            results = _decode_chunk(contents, self.prep)
        kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
        problems = [Problem(examples[i].origin, r) for i, r in enumerate(results) if isinstance(r, str)]
        shape = (self.prep.channels, self.prep.side, self.prep.side)
        stacked = np.stack([results[i] for i in kept]) if kept else np.zeros((0, *shape), np.uint8)
        return torch.from_numpy(stacked), kept, problems

    def decode_raw(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]:
        """The signal before caching, for corruptions: for images that is the decoded uint8 (N, C, H, W)."""
        return self.decode_all(examples)

    def encode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> the cached tensor, which for images is the same uint8 (N, C, H, W)."""
        return raw

    def fit_statistics(self, train_inputs: torch.Tensor) -> None:
        """Per-channel mean/std from the training images, uint8 (N, C, H, W)."""
        sample = train_inputs[:: max(1, len(train_inputs) // 5000)].float() / 255
        mean = sample.mean(dim=(0, 2, 3)).tolist()
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        self.prep = replace(self.prep, mean=tuple(mean), std=tuple(std))

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W), standardised per channel."""
        mean = host_to(torch.tensor(self.prep.mean), batch.device).view(1, -1, 1, 1)
        std = host_to(torch.tensor(self.prep.std), batch.device).view(1, -1, 1, 1)
        return (batch.float() / 255 - mean) / std

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(batch, self.prep, generator)

    def baseline_features(self, inputs: torch.Tensor) -> np.ndarray:
        return baseline_features(inputs)

    def preview(self, item: torch.Tensor) -> bytes:
        return preview_png(item)


def augment(batch: torch.Tensor, prep: ImagePreprocessing, generator: torch.Generator) -> torch.Tensor:
    """Random translation (pad + crop) and horizontal flip, per sample. uint8 in, uint8 out."""
    b, _, h, w = batch.shape
    pad = max(1, round(CROP_PADDING_FRACTION * h))
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))  # zeros: (B, C, H+2p, W+2p)
    # Drawn on the CPU's seeded generator wherever the batch is (a batch held on a GPU gets the same draws).
    device = batch.device
    dy = host_to(torch.randint(0, 2 * pad + 1, (b,), generator=generator), device)
    dx = host_to(torch.randint(0, 2 * pad + 1, (b,), generator=generator), device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    out = padded.gather(2, rows.expand(-1, padded.shape[1], -1, padded.shape[3]))  # (B, C, H, W+2p)
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :].expand(-1, out.shape[1], h, -1)
    out = out.gather(3, cols)  # (B, C, H, W)
    if prep.hflip:
        flip = host_to(torch.rand(b, generator=generator) < 0.5, device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def baseline_features(images: torch.Tensor) -> np.ndarray:
    """Downsampled pixels for the classical baseline: uint8 (N, C, H, W) -> float (N, C*14*14)."""
    small = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 14)
    return small.flatten(1).numpy()


def preview_png(image: torch.Tensor) -> bytes:
    """One uint8 (C, H, W) image as PNG bytes, upscaled so small images are visible in a report."""
    array = image.numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    scale = max(1, 96 // max(pil.size))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
