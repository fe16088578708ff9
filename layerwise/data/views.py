"""What self-supervised pretraining learns from: two augmented views of each input, or masked tokens.

Everything works on whole batches of cached inputs with torch ops (one `grid_sample` crops a batch of
images), because a per-example Python loop would cost more than the network on 2 CPU cores. Every
random draw comes from the batch's generator, which depends only on (seed, epoch, batch index), so a
resumed pretraining run sees exactly the views an unbroken one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from layerwise.data.batches import seeded_generator
from layerwise.data.image import ImagePreprocessing
from layerwise.data.text import MASK_ID

# Images (SimCLR's recipe, scaled to small images: no blur, which erases 28-px detail).
CROP_SCALE = (0.25, 1.0)  # area of the random crop, as a fraction of the image
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio
JITTER_PROBABILITY = 0.8  # brightness/contrast (and saturation, for colour) jitter is applied this often ...
BRIGHTNESS, CONTRAST, SATURATION = 0.4, 0.4, 0.4  # ... with factors drawn from 1 +- these
GRAYSCALE_PROBABILITY = 0.2  # colour images only
# Spectrograms (log-mel, natural-log power).
SHIFT_FRACTION = 0.2  # time shift of up to 20% of the frames, the gap filled with the clip's floor
GAIN_DB = 6.0  # level change of up to +-6 dB
NOISE_PROBABILITY = 0.5  # a noise floor this often, between the clip's median level and 12 dB below it
NOISE_DB = 12.0
TIME_MASK_FRACTION = 0.2  # one time mask of up to 20% of the frames ...
FREQ_MASK_BANDS = 12  # ... and one frequency mask of up to 12 mel bands
DB_TO_LOG = math.log(10) / 10  # a power ratio in dB -> its natural log
# Text (BERT): 15% of the real tokens are predicted; of those 80% become [MASK], 10% a random token, 10% stay.
MASK_FRACTION, MASK_REPLACE, MASK_RANDOM = 0.15, 0.8, 0.1
IGNORE = -100  # target of a position that is not predicted (cross-entropy's ignore_index)

MakeBatch = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class ViewBatches:
    """Seeded batches (inputs, targets) that `make` builds from cached unlabelled inputs (N, ...).

    Training batches are shuffled and all full-sized (the few left over change every epoch); evaluation
    batches cover every input in near-equal batches, because a contrastive loss over a ragged batch of one
    has nothing to contrast with.
    """

    def __init__(
        self, inputs: torch.Tensor, batch_size: int, make: MakeBatch, shuffle: bool = False, seed: int = 0
    ) -> None:
        self.inputs, self.batch_size, self.make = inputs, batch_size, make
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        n = len(self.inputs)
        return n // self.batch_size if self.shuffle else max(1, round(n / self.batch_size)) if n else 0

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        parts = self._parts(epoch)
        for i in range(start, len(self)):
            yield self.make(self.inputs[parts[i]], seeded_generator(self.seed, epoch, i))

    def epoch_part(
        self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s share of each batch's inputs, made into views on its own (the pairs stay whole)."""
        parts = self._parts(epoch)
        for i in range(start, len(self)):
            index = parts[i].tensor_split(world_size)[rank]
            yield self.make(self.inputs[index], seeded_generator(self.seed, epoch, i, rank))

    def _parts(self, epoch: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n = len(self.inputs)
        order = torch.randperm(n, generator=seeded_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        if self.shuffle:  # full batches; the few inputs left over differ from epoch to epoch
            return order[: len(self) * self.batch_size].view(len(self), -1)
        return order.tensor_split(len(self))


# ---------------------------------------------------------------------- images


def image_views(batch: torch.Tensor, prep: ImagePreprocessing, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> two augmented views, float (2B, C, H, W) in [0, 255]; rows i and B + i are a pair."""
    x = batch.float().repeat(2, 1, 1, 1)
    x = random_resized_crop(x, generator, flip=prep.hflip)
    x = colour_jitter(x, generator)
    if x.shape[1] == 3:
        gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        to_gray = torch.rand(len(x), generator=generator) < GRAYSCALE_PROBABILITY
        x = torch.where(to_gray[:, None, None, None], gray.expand_as(x), x)
    return x.clamp(0, 255)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Crop a random box of CROP_SCALE area and CROP_RATIO aspect from each image, resized back (bilinear)."""
    n = len(x)
    area = torch.empty(n).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # as a fraction of the side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    # Centres in grid_sample's [-1, 1] coordinates, so that the box stays inside the image.
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx  # a negative x scale mirrors the crop
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness and contrast (and, for colour images, saturation) factors in 1 +- 0.4, each image its own."""
    n = len(x)
    apply = (torch.rand(n, generator=generator) < JITTER_PROBABILITY).float().view(n, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:  # (N, 1, 1, 1); 1 where the jitter is not applied
        drawn = torch.empty(n).uniform_(1 - strength, 1 + strength, generator=generator).view(n, 1, 1, 1)
        return 1 + apply * (drawn - 1)

    x = x * factor(BRIGHTNESS)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor(CONTRAST) + mean
    if x.shape[1] == 3:
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * factor(SATURATION) + gray
    return x


# ---------------------------------------------------------------------- spectrograms


def spectrogram_views(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """log-mel (B, 1, M, T) -> two augmented views (2B, 1, M, T): time shift, gain, noise floor, time and
    frequency masks. Rows i and B + i are a pair."""
    x = batch.float().repeat(2, 1, 1, 1)
    n, _, n_mels, n_frames = x.shape
    floor = x.amin(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1): the clip's silence
    max_shift = max(1, round(SHIFT_FRACTION * n_frames))
    shift = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    source = torch.arange(n_frames)[None] - shift[:, None]  # (N, T): the frame each output frame comes from
    inside = ((source >= 0) & (source < n_frames))[:, None, None, :]
    shifted = x.gather(3, source.clamp(0, n_frames - 1)[:, None, None, :].expand(n, 1, n_mels, n_frames))
    x = torch.where(inside, shifted, floor)
    x = x + torch.empty(n, 1, 1, 1).uniform_(-GAIN_DB, GAIN_DB, generator=generator) * DB_TO_LOG
    median = x.flatten(1).median(dim=1).values.view(n, 1, 1, 1)
    level = median - torch.rand(n, 1, 1, 1, generator=generator) * NOISE_DB * DB_TO_LOG
    noise = level + 0.5 * torch.randn(x.shape, generator=generator)  # a noisy floor, not a constant one
    noisy = torch.rand(n, generator=generator) < NOISE_PROBABILITY
    x = torch.where(noisy[:, None, None, None], torch.logaddexp(x, noise), x)  # adds powers, in the log domain
    t_width = torch.randint(0, max(1, round(TIME_MASK_FRACTION * n_frames)) + 1, (n,), generator=generator)
    t_start = (torch.rand(n, generator=generator) * (n_frames - t_width + 1)).long()
    f_width = torch.randint(0, min(FREQ_MASK_BANDS, n_mels - 1) + 1, (n,), generator=generator)
    f_start = (torch.rand(n, generator=generator) * (n_mels - f_width + 1)).long()
    frames, bands = torch.arange(n_frames)[None], torch.arange(n_mels)[None]
    t_mask = (frames >= t_start[:, None]) & (frames < (t_start + t_width)[:, None])  # (N, T)
    f_mask = (bands >= f_start[:, None]) & (bands < (f_start + f_width)[:, None])  # (N, M)
    return torch.where(t_mask[:, None, None, :] | f_mask[:, None, :, None], floor, x)


# ---------------------------------------------------------------------- tokens


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of int64 ids (B, T): (inputs, targets), targets IGNORE except at the chosen positions.

    Only real tokens are chosen (ids above [MASK]: not padding, [UNK], [CLS] or [MASK]); a batch where the
    draw chose none predicts each text's first real token instead, so that every step has a loss.
    """
    real = ids > MASK_ID
    chosen = real & (torch.rand(ids.shape, generator=generator) < MASK_FRACTION)
    if not chosen.any():
        first = real.float().argmax(dim=1)  # (B,) the first real token of each text
        chosen = torch.zeros_like(real).scatter_(1, first[:, None], True) & real
    draw = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(MASK_ID + 1, max(vocab_size, MASK_ID + 2), ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < MASK_REPLACE), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (draw >= MASK_REPLACE) & (draw < MASK_REPLACE + MASK_RANDOM), random_ids, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, IGNORE))
