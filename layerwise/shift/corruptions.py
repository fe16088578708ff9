"""Synthetic distribution shift: named corruptions of raw inputs at five severities each.

Corruptions act on what a sensor or a person would produce (uint8 pixels, waveforms, strings), before
the front end's cached representation, so `encode_raw(corrupt(...))` is what a deployed model would see.

Randomness comes from one stream per (seed, modality, name), shared by all five severities: severity
only scales the same random draws (the same noise pattern, the same rotation directions, the same words
picked, in nested sets). Damage then grows with severity for every input, not just on average, and a
metric-versus-severity curve is not jagged from resampling. Random draws follow an item's position in
the batch, so corrupt a whole evaluation set in one call to reproduce a result.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch
from PIL import Image
from scipy.signal import butter, resample_poly, sosfiltfilt
from torchvision.transforms.v2 import functional as tvf

SEVERITIES = (1, 2, 3, 4, 5)
CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "image": ("dusk", "contrast", "gaussian_noise", "blur", "jpeg", "rotate_translate"),
    "audio": ("background_noise", "gain", "speed", "telephone"),
    "text": ("typos", "casing", "word_dropout"),
}

# --- parameters, one entry per severity 1..5 ------------------------------------------------------
# image (pixel values in [0, 1] units)
DUSK_BRIGHTNESS = (0.7, 0.5, 0.35, 0.25, 0.15)  # overall light level
DUSK_GAMMA = (1.2, 1.4, 1.6, 1.8, 2.0)  # > 1 darkens shadows more than highlights
DUSK_RED_GREEN_LOSS = (0.03, 0.06, 0.09, 0.12, 0.15)  # red (and half as much green) fades: a blue cast
CONTRAST_KEPT = (0.6, 0.45, 0.3, 0.2, 0.1)  # share of the distance from the image mean kept
NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.28)  # ImageNet-C-like, in [0, 1] units
BLUR_SIGMA_FRACTION = (0.015, 0.025, 0.035, 0.05, 0.07)  # Gaussian sigma as a share of the side
JPEG_QUALITY = (60, 35, 20, 12, 6)
ROTATE_MAX_DEGREES = (8, 15, 22, 30, 40)  # each image turns by uniform(-max, max)
TRANSLATE_MAX_FRACTION = (0.04, 0.08, 0.12, 0.16, 0.20)  # ... and shifts by up to this share of the side
# audio (waveforms in [-1, 1])
NOISE_SNR_DB = (30, 20, 10, 5, 0)  # pink noise relative to each clip's own power
SILENT_POWER = 1e-5  # -50 dBFS: the reference power for a silent clip, instead of dividing by zero
GAIN_DB = (6, 12, 18, 24, 30)  # each clip gets quieter or louder (and clips at +-1) by this much
SPEED_FACTOR = (1.05, 1.1, 1.15, 1.2, 1.3)  # each clip plays this much faster or slower, pitch with it
PHONE_RATE = 8_000  # Hz, the narrowband telephone rate
PHONE_BAND_HZ = (300.0, 3400.0)
PHONE_BITS = (8, 7, 6, 5, 4)  # mu-law bit depth; 8 is G.711, lower is a worse codec
PHONE_NOISE_SNR_DB = (45, 40, 35, 30, 25)  # line noise
MU = 255.0
# text
TYPO_WORD_FRACTION = (0.05, 0.1, 0.2, 0.35, 0.5)
CASING_WORD_FRACTION = (0.1, 0.25, 0.5, 0.75, 1.0)
CASING_PER_CHARACTER = (0.0, 0.0, 0.25, 0.5, 0.75)  # share of recased words that get rAnDoM case per letter
DROPOUT_FRACTION = (0.05, 0.1, 0.2, 0.3, 0.4)

KEYBOARD_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")


def corrupt(modality: str, raw, name: str, severity: int, seed: int = 0, sample_rate: int = 16000):
    """Apply corruption `name` at `severity` (1..5) to a batch of raw inputs; the input is not changed.

    image: uint8 (N, C, H, W), C = 1 or 3 -> uint8 (N, C, H, W)
    audio: float (N, n_samples) waveforms at `sample_rate` Hz -> float (N, n_samples), same dtype
    text:  list[str] -> list[str] of the same length
    """
    level = _check(modality, name, severity)
    stream = _stream_seed(seed, modality, name)
    if modality == "image":
        return _corrupt_images(raw, IMAGE[name], level, stream)
    if modality == "audio":
        return _corrupt_audio(raw, AUDIO[name], level, stream, sample_rate)
    return _corrupt_texts(raw, TEXT[name], level, stream)


def describe(modality: str, name: str, severity: int) -> str:
    """One line for a table, e.g. 'dusk: brightness x0.35, gamma 1.6'."""
    level = _check(modality, name, severity)
    return f"{name}: {DESCRIPTIONS[name](level)}"


def _check(modality: str, name: str, severity: int) -> int:
    """Validate the request; returns the 0-based index into the parameter tables."""
    if modality not in CORRUPTIONS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(CORRUPTIONS)}")
    if name not in CORRUPTIONS[modality]:
        known = ", ".join(CORRUPTIONS[modality])
        raise ValueError(f"unknown {modality} corruption {name!r}; expected one of {known}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is out of range; expected an integer from 1 to 5")
    return int(severity) - 1


def _stream_seed(seed: int, modality: str, name: str) -> int:
    """A stable 63-bit seed (Python's hash() of a str changes between runs)."""
    digest = hashlib.blake2b(f"{seed}/{modality}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --- image ----------------------------------------------------------------------------------------
ImageCorruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _corrupt_images(images: torch.Tensor, fn: ImageCorruption, level: int, stream: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("image corruptions take a uint8 tensor (N, C, H, W)")
    generator = torch.Generator().manual_seed(stream)
    out = fn(images.float() / 255, level, generator)  # float (N, C, H, W) in [0, 1]
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


def _dusk(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    out = DUSK_BRIGHTNESS[level] * x ** DUSK_GAMMA[level]
    if x.shape[1] == 3:  # evening light: reds fade first, blue stays
        loss = DUSK_RED_GREEN_LOSS[level]
        out = out * torch.tensor([1 - loss, 1 - loss / 2, 1.0]).view(1, 3, 1, 1)
    return out


def _contrast(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1), one grey level per image
    return mean + CONTRAST_KEPT[level] * (x - mean)


def _gaussian_noise(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    return (x + NOISE_STD[level] * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def _blur(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    sigma = BLUR_SIGMA_FRACTION[level] * x.shape[-1]
    # Three sigmas each side, but the reflect padding must stay inside the image.
    radius = min(math.ceil(3 * sigma), x.shape[-1] - 1, x.shape[-2] - 1)
    return tvf.gaussian_blur(x, [2 * radius + 1] * 2, [sigma] * 2)


def _jpeg(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    pixels = (x * 255).round().to(torch.uint8).numpy()  # exact: x came from uint8
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):  # (C, H, W)
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY[level])
        decoded = np.asarray(Image.open(buffer))
        out[i] = decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)
    return torch.from_numpy(out).float() / 255


def _rotate_translate(x: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
    """A random rotation and translation per image, all images in one `grid_sample` call.

    torchvision's `affine` takes one angle per call: a Python loop over thousands of small images
    cost 20 s where this batched warp takes a fraction of a second.
    """
    n, _, h, w = x.shape
    draws = torch.rand((n, 3), generator=generator) * 2 - 1  # (N, [angle, dx, dy]) in [-1, 1]
    angle = torch.deg2rad(draws[:, 0] * ROTATE_MAX_DEGREES[level])
    shift = 2 * TRANSLATE_MAX_FRACTION[level] * draws[:, 1:]  # in normalised units: the side spans [-1, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input ones: the inverse rotation applied after undoing the shift.
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (N, 2, 2)
    offset = -(inverse @ shift[:, :, None])  # (N, 2, 1)
    theta = torch.cat([inverse, offset], 2)  # (N, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    # zeros outside the frame: what a camera sees there is nothing
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


IMAGE: dict[str, ImageCorruption] = {
    "dusk": _dusk,
    "contrast": _contrast,
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "jpeg": _jpeg,
    "rotate_translate": _rotate_translate,
}


# --- audio ----------------------------------------------------------------------------------------
AudioCorruption = Callable[[np.ndarray, int, np.random.Generator, int], np.ndarray]


def _corrupt_audio(waves: torch.Tensor, fn: AudioCorruption, level: int, stream: int, rate: int) -> torch.Tensor:
    if not isinstance(waves, torch.Tensor) or not waves.is_floating_point() or waves.ndim != 2:
        raise ValueError("audio corruptions take a float tensor of waveforms (N, n_samples)")
    rng = np.random.default_rng(stream)
    out = fn(waves.detach().cpu().double().numpy(), level, rng, rate)  # float64 (N, T); never written to
    return torch.from_numpy(np.ascontiguousarray(out)).to(waves.dtype)


def _power(x: np.ndarray) -> np.ndarray:
    """Mean power per clip, (N, T) -> (N, 1), floored so silence gets a small absolute noise level."""
    return np.maximum((x**2).mean(axis=-1, keepdims=True), SILENT_POWER)


def _pink_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-power 1/f noise (N, T): white noise whose spectrum is shaped by 1/sqrt(f)."""
    spectrum = np.fft.rfft(rng.standard_normal(shape), axis=-1)  # (N, T//2+1)
    bins = np.arange(spectrum.shape[-1])
    spectrum *= np.where(bins > 0, 1 / np.sqrt(np.maximum(bins, 1)), 0.0)  # no DC offset
    noise = np.fft.irfft(spectrum, n=shape[-1], axis=-1)
    return noise / np.sqrt(np.maximum((noise**2).mean(axis=-1, keepdims=True), 1e-20))


def _background_noise(x: np.ndarray, level: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    noise_power = _power(x) / 10 ** (NOISE_SNR_DB[level] / 10)  # (N, 1)
    return x + np.sqrt(noise_power) * _pink_noise(x.shape, rng)


def _gain(x: np.ndarray, level: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    louder = rng.random((len(x), 1)) < 0.5  # (N, 1): a hot microphone, or a distant one
    factor = 10 ** (np.where(louder, GAIN_DB[level], -GAIN_DB[level]) / 20)
    out = x * factor
    return np.where(louder, np.clip(out, -1.0, 1.0), out)  # a converter cannot go past full scale


def _speed(x: np.ndarray, level: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    faster = rng.random(len(x)) < 0.5  # (N,)
    factor = Fraction(SPEED_FACTOR[level]).limit_denominator(100)
    out = np.zeros_like(x)
    for rows, ratio in ((faster, 1 / factor), (~faster, factor)):  # faster playback = fewer samples
        if rows.any():
            played = resample_poly(x[rows], ratio.numerator, ratio.denominator, axis=-1)
            n = min(played.shape[-1], x.shape[-1])
            out[rows, :n] = played[:, :n]  # crop, or pad with silence, to the clip length
    return out


def _mu_law(x: np.ndarray, bits: int) -> np.ndarray:
    """Mu-law companding and quantisation to `bits` bits, as a telephone codec does."""
    x = np.clip(x, -1.0, 1.0)
    companded = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    steps = 2 ** (bits - 1)
    quantised = np.round(companded * steps) / steps
    return np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(MU)) / MU


def _telephone(x: np.ndarray, level: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    low, high = PHONE_BAND_HZ[0], min(PHONE_BAND_HZ[1], 0.45 * rate)
    sos = butter(4, [low, high], btype="bandpass", fs=rate, output="sos")
    band = sosfiltfilt(sos, x, axis=-1, padlen=min(3 * (2 * len(sos) + 1), x.shape[-1] - 1))
    down = Fraction(PHONE_RATE, rate).limit_denominator(1000)
    narrow = resample_poly(band, down.numerator, down.denominator, axis=-1) if rate > PHONE_RATE else band
    # The line adds hiss and the codec quantises, both inside the 8 kHz channel.
    hiss = np.sqrt(_power(narrow) / 10 ** (PHONE_NOISE_SNR_DB[level] / 10)) * rng.standard_normal(narrow.shape)
    coded = _mu_law(narrow + hiss, PHONE_BITS[level])
    wide = resample_poly(coded, down.denominator, down.numerator, axis=-1) if rate > PHONE_RATE else coded
    out = np.zeros_like(x)
    n = min(wide.shape[-1], x.shape[-1])
    out[:, :n] = wide[:, :n]
    return out


AUDIO: dict[str, AudioCorruption] = {
    "background_noise": _background_noise,
    "gain": _gain,
    "speed": _speed,
    "telephone": _telephone,
}


# --- text -----------------------------------------------------------------------------------------
TextCorruption = Callable[[list[str], int, random.Random], list[str]]


def _corrupt_texts(texts: list[str], fn: TextCorruption, level: int, stream: int) -> list[str]:
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("text corruptions take a list of str")
    out = []
    for i, text in enumerate(texts):
        pieces = re.findall(r"\S+\s*", text)  # each word with the whitespace after it
        if not pieces:
            out.append(text)  # nothing but whitespace: nothing to corrupt
            continue
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        # One generator per text, drawing the same numbers at every severity, so changes are nested.
        changed = fn(pieces, level, random.Random(f"{stream}/{i}"))
        out.append(lead + "".join(changed).rstrip() + trail)  # a dropped last word leaves no dangling space
    return out


def _split(piece: str) -> tuple[str, str]:
    word = piece.rstrip()
    return word, piece[len(word) :]


def _neighbour(char: str, pick: float) -> str:
    """A key next to `char` on a QWERTY keyboard (same row or the rows above and below), same case."""
    lower = char.lower()
    for r, row in enumerate(KEYBOARD_ROWS):
        c = row.find(lower)
        if c < 0:
            continue
        near = [
            KEYBOARD_ROWS[rr][cc]
            for rr in (r - 1, r, r + 1)
            for cc in (c - 1, c, c + 1)
            if 0 <= rr < len(KEYBOARD_ROWS) and 0 <= cc < len(KEYBOARD_ROWS[rr]) and (rr, cc) != (r, c)
        ]
        key = near[int(pick * len(near))]
        return key.upper() if char.isupper() else key
    return char


def _typo(word: str, kind: float, where: float, pick: float) -> str:
    """One keyboard slip on a letter or digit: swap with the next, drop, double, or hit a neighbour."""
    positions = [i for i, ch in enumerate(word) if ch.isalnum()]
    if not positions:
        return word  # punctuation only
    i = positions[int(where * len(positions))]
    swappable = i + 1 < len(word) and word[i + 1] != word[i]
    edits = ["drop", "double", "neighbour"] + (["swap"] if swappable else [])
    edit = edits[int(kind * len(edits))]
    if edit == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == "drop" and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    replaced = _neighbour(word[i], pick)
    return word[:i] + replaced + word[i + 1 :] if replaced != word[i] else word[:i] + word[i] + word[i:]


def _typos(pieces: list[str], level: int, rng: random.Random) -> list[str]:
    out = []
    for piece in pieces:
        chosen, kind, where, pick = (rng.random() for _ in range(4))  # drawn for every word, at any severity
        word, space = _split(piece)
        out.append((_typo(word, kind, where, pick) if chosen < TYPO_WORD_FRACTION[level] else word) + space)
    return out


def _casing(pieces: list[str], level: int, rng: random.Random) -> list[str]:
    out = []
    for piece in pieces:
        word, space = _split(piece)
        chosen, per_character, style = rng.random(), rng.random(), rng.random()
        coins = [rng.random() < 0.5 for _ in word]
        if chosen < CASING_WORD_FRACTION[level]:
            if per_character < CASING_PER_CHARACTER[level]:
                word = "".join(ch.upper() if coin else ch.lower() for ch, coin in zip(word, coins, strict=True))
            else:
                word = (str.lower, str.upper, str.capitalize)[int(style * 3)](word)
        out.append(word + space)
    return out


def _word_dropout(pieces: list[str], level: int, rng: random.Random) -> list[str]:
    draws = [rng.random() for _ in pieces]
    kept = [p for p, d in zip(pieces, draws, strict=True) if d >= DROPOUT_FRACTION[level]]
    return kept or [pieces[max(range(len(pieces)), key=draws.__getitem__)]]  # never an empty text


TEXT: dict[str, TextCorruption] = {"typos": _typos, "casing": _casing, "word_dropout": _word_dropout}


# --- descriptions for tables ----------------------------------------------------------------------
def _describe_casing(level: int) -> str:
    share = CASING_PER_CHARACTER[level]
    extra = f", {share:.0%} of those in random case per letter" if share else ""
    return f"{CASING_WORD_FRACTION[level]:.0%} of words lower/UPPER/Title{extra}"


def _describe_telephone(level: int) -> str:
    low, high = PHONE_BAND_HZ
    return (
        f"{low:.0f}-{high:.0f} Hz through {PHONE_RATE // 1000} kHz, {PHONE_BITS[level]}-bit mu-law, "
        f"line noise at {PHONE_NOISE_SNR_DB[level]} dB SNR"
    )


DESCRIPTIONS: dict[str, Callable[[int], str]] = {
    "dusk": lambda s: f"brightness x{DUSK_BRIGHTNESS[s]}, gamma {DUSK_GAMMA[s]}",
    "contrast": lambda s: f"{CONTRAST_KEPT[s]:.0%} of contrast kept",
    "gaussian_noise": lambda s: f"noise std {NOISE_STD[s]} of full scale",
    "blur": lambda s: f"Gaussian sigma {BLUR_SIGMA_FRACTION[s]:.1%} of the side",
    "jpeg": lambda s: f"quality {JPEG_QUALITY[s]}",
    "rotate_translate": lambda s: (
        f"rotation up to {ROTATE_MAX_DEGREES[s]} deg, shift up to {TRANSLATE_MAX_FRACTION[s]:.0%} of the side"
    ),
    "background_noise": lambda s: f"pink noise at {NOISE_SNR_DB[s]} dB SNR",
    "gain": lambda s: f"+/-{GAIN_DB[s]} dB (louder clips clip at full scale)",
    "speed": lambda s: f"x{SPEED_FACTOR[s]} faster or slower, pitch with it",
    "telephone": _describe_telephone,
    "typos": lambda s: f"typos in {TYPO_WORD_FRACTION[s]:.0%} of words",
    "casing": _describe_casing,
    "word_dropout": lambda s: f"{DROPOUT_FRACTION[s]:.0%} of words dropped",
}
