"""Unit tests for the image, audio and text front ends: decoding, preprocessing, augmentation.

Fixture files are written here with PIL, soundfile, the stdlib `wave` module and plain bytes.
Expected values come from hand computations or from an independent library call (numpy FFT,
scipy's resampler, PIL's documented grey conversion).
"""

import json
import math
import re
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from scipy.signal import resample_poly

from layerwise.data import image as image_module
from layerwise.data.audio import (
    AudioFrontEnd,
    AudioPreprocessing,
    choose_seconds,
    load_waveform,
    log_mel,
    mel_filterbank,
)
from layerwise.data.frontend import fit_frontend, frontend_from_json
from layerwise.data.image import (
    ImageFrontEnd,
    ImagePreprocessing,
    augment,
    choose_preprocessing,
    decode,
)
from layerwise.data.sources import Example
from layerwise.data.text import CLS_ID, MASK_ID, PAD_ID, UNK_ID, TextFrontEnd, read_text
from layerwise.errors import DecodeError


def image_prep(side: int = 8, channels: int = 3, hflip: bool = True) -> ImagePreprocessing:
    return ImagePreprocessing(side=side, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels, hflip=hflip)


def grey(rgb: tuple[int, int, int]) -> float:
    """PIL's documented RGB -> L conversion (ITU-R 601-2 luma)."""
    r, g, b = rgb
    return r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000


# --- image: every format and mode -------------------------------------------------------------

# Two halves, left and right, in each mode; `expected` is the RGB a viewer shows for each half.
LEFT_RGB, RIGHT_RGB = (200, 30, 30), (30, 30, 200)
LEFT_L, RIGHT_L = 40, 200
LEFT_16, RIGHT_16 = 10_000, 50_000  # 16-bit: 0..65535 maps to 0..255


def two_halves(mode: str, width: int = 32, height: int = 24) -> tuple[Image.Image, tuple, tuple]:
    """An image in `mode` whose left half and right half differ, and the RGB of each half."""
    half = width // 2
    if mode == "I;16":
        array = np.full((height, width), LEFT_16, np.uint16)
        array[:, half:] = RIGHT_16
        left, right = (round(LEFT_16 / 257),) * 3, (round(RIGHT_16 / 257),) * 3
        return Image.fromarray(array), left, right
    if mode in ("L", "LA"):
        img = Image.new(mode, (width, height), (LEFT_L, 255) if mode == "LA" else LEFT_L)
        img.paste((RIGHT_L, 255) if mode == "LA" else RIGHT_L, (half, 0, width, height))
        return img, (LEFT_L,) * 3, (RIGHT_L,) * 3
    if mode == "P":
        img = Image.new("P", (width, height), 0)
        img.putpalette([*LEFT_RGB, *RIGHT_RGB] + [0] * 762)
        img.paste(1, (half, 0, width, height))
        return img, LEFT_RGB, RIGHT_RGB
    img = Image.new(mode, (width, height), LEFT_RGB + ((255,) if mode == "RGBA" else ()))
    img.paste(RIGHT_RGB + ((255,) if mode == "RGBA" else ()), (half, 0, width, height))
    return img, LEFT_RGB, RIGHT_RGB


ALL_MODES = ["L", "RGB", "RGBA", "P", "LA", "I;16"]
# Every (format, mode) pair the format can store: JPEG and BMP refuse the others, GIF and WebP
# convert the others to 8-bit on writing (clipping 16-bit values), so the file holds other pixels.
FORMAT_MODES = {
    "png": ALL_MODES,
    "jpg": ["L", "RGB"],
    "bmp": ["L", "RGB", "RGBA", "P"],
    "gif": ["L", "RGB", "RGBA", "P", "LA"],
    "webp": ["L", "RGB", "RGBA", "P", "LA"],
    "tiff": ALL_MODES,
}
LOSSY = {"jpg": 12, "webp": 20}  # tolerance, in grey levels, at the middle of each half


@pytest.mark.parametrize(("ext", "mode"), [(ext, mode) for ext, modes in FORMAT_MODES.items() for mode in modes])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_mode_decodes_to_uint8(tmp_path: Path, ext: str, mode: str, channels: int) -> None:
    img, left, right = two_halves(mode)
    path = tmp_path / f"x.{ext}"
    img.save(path)
    out = decode(path, image_prep(side=8, channels=channels))
    assert out.dtype == np.uint8 and out.shape == (channels, 8, 8)
    tolerance = LOSSY.get(ext, 2)
    for expected, cols in ((left, slice(0, 2)), (right, slice(6, 8))):  # away from the edge
        got = out[:, :, cols].reshape(channels, -1).mean(axis=1)
        want = np.array(expected, float) if channels == 3 else np.array([grey(expected)])
        np.testing.assert_allclose(got, want, atol=tolerance)


def test_sixteen_bit_keeps_absolute_brightness(tmp_path: Path) -> None:
    # A uniformly white 16-bit image is white, not stretched to black by its own min and max.
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white.png")
    Image.fromarray(np.full((4, 4), 0x8080, np.uint16)).save(tmp_path / "mid.png")
    assert (decode(tmp_path / "white.png", image_prep(4, 1)) == 255).all()
    assert (decode(tmp_path / "mid.png", image_prep(4, 1)) == 128).all()


def transparent_images(tmp_path: Path) -> dict[str, Path]:
    """Left half opaque dark, right half fully transparent, in each way a file can say so."""
    paths = {}
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent *black*: must not come out black
    rgba.paste((20, 20, 20, 255), (0, 0, 4, 8))
    for ext in ("png", "webp", "tiff"):
        rgba.save(paths.setdefault(f"RGBA.{ext}", tmp_path / f"rgba.{ext}"), lossless=True)
    la = Image.new("LA", (8, 8), (0, 0))
    la.paste((20, 255), (0, 0, 4, 8))
    la.save(paths.setdefault("LA.png", tmp_path / "la.png"))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([20, 20, 20, 0, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    for ext in ("png", "gif"):
        palette.save(paths.setdefault(f"P.{ext}", tmp_path / f"p.{ext}"), transparency=1)
    rgb = Image.new("RGB", (8, 8), (0, 0, 0))  # PNG tRNS: black is the transparent colour
    rgb.paste((20, 20, 20), (0, 0, 4, 8))
    rgb.save(paths.setdefault("RGB+tRNS.png", tmp_path / "rgb.png"), transparency=(0, 0, 0))
    return paths


@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_become_white(tmp_path: Path, channels: int) -> None:
    for name, path in transparent_images(tmp_path).items():
        out = decode(path, image_prep(side=8, channels=channels)).astype(int)
        assert (abs(out[:, :, :3] - 20) <= 2).all(), name  # opaque half unchanged
        assert (out[:, :, 5:] == 255).all(), name  # transparent half white


def test_half_transparent_black_is_mid_grey(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(tmp_path / "half.png")
    out = decode(tmp_path / "half.png", image_prep(side=4, channels=3))
    assert np.abs(out.astype(int) - round(255 * (1 - 128 / 255))).max() <= 1  # alpha over white


def test_one_pixel_image(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 120, 250)).save(tmp_path / "dot.png")
    out = decode(tmp_path / "dot.png", image_prep(side=16, channels=3))
    assert out.shape == (3, 16, 16)
    assert (out == np.array([10, 120, 250], np.uint8)[:, None, None]).all()


def write_huge(path: Path) -> Path:
    img = Image.new("RGB", (4000, 4000), LEFT_RGB)
    img.paste(RIGHT_RGB, (2000, 0, 4000, 4000))
    img.save(path)
    return path


def best_seconds(function, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def assert_halves(out: np.ndarray) -> None:
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[:, :, :8].reshape(3, -1).mean(1), LEFT_RGB, atol=6)
    np.testing.assert_allclose(out[:, :, 24:].reshape(3, -1).mean(1), RIGHT_RGB, atol=6)


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path: Path) -> None:
    path = write_huge(tmp_path / "big.jpg")
    prep = image_prep(side=32, channels=3)
    assert_halves(decode(path, prep))

    def full_size() -> None:
        with Image.open(path) as img:
            img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)

    # JPEG draft mode decodes at 1/8 scale: many times faster than decoding every pixel.
    assert best_seconds(lambda: decode(path, prep)) < best_seconds(full_size) / 4


def test_huge_png_decodes(tmp_path: Path) -> None:
    path = write_huge(tmp_path / "big.png")
    started = time.perf_counter()
    assert_halves(decode(path, image_prep(side=32, channels=3)))
    assert time.perf_counter() - started < 2.0  # PNG has no draft mode: this is mostly inflating


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file (0 bytes)"), (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "image")],
)
def test_unreadable_image_raises_decode_error(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(DecodeError, match=re.escape(reason)):
        decode(tmp_path / "bad.png", image_prep())
    with pytest.raises(DecodeError, match="cannot read"):  # deleted since discovery
        decode(tmp_path / "gone.png", image_prep())
    with pytest.raises(DecodeError, match=re.escape(reason)):  # the same bytes uploaded to `serve`
        decode(content, image_prep())


def test_bytes_in_memory_decode_like_their_file(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    soundfile.write(tmp_path / "a.wav", np.random.default_rng(1).normal(0, 0.1, 16_000), 16_000)
    (tmp_path / "a.txt").write_text("a short text")
    assert np.array_equal(
        decode((tmp_path / "a.png").read_bytes(), image_prep()), decode(tmp_path / "a.png", image_prep())
    )
    prep = AudioPreprocessing(seconds=1.0)
    assert np.array_equal(
        load_waveform((tmp_path / "a.wav").read_bytes(), prep), load_waveform(tmp_path / "a.wav", prep)
    )
    uploaded = Example("upload 0", None, data=(tmp_path / "a.txt").read_bytes())
    assert read_text(uploaded) == read_text(Example("a.txt", None, path=tmp_path / "a.txt")) == "a short text"


# --- image: preprocessing choices -------------------------------------------------------------


def save_sized(tmp_path: Path, sizes: list[tuple[int, int]], mode: str = "L") -> list[Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        Image.new(mode, size).save(paths[-1])
    return paths


def test_choose_preprocessing_channels(tmp_path: Path) -> None:
    greys = save_sized(tmp_path, [(20, 20)] * 3, "L")
    sixteen = tmp_path / "16.png"
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(sixteen)
    assert choose_preprocessing([*greys, sixteen]).channels == 1
    colour = tmp_path / "c.png"
    Image.new("RGB", (20, 20)).save(colour)
    prep = choose_preprocessing([*greys, colour])
    assert prep.channels == 3 and len(prep.mean) == len(prep.std) == 3


def test_choose_preprocessing_side_is_the_clamped_median(tmp_path: Path) -> None:
    assert choose_preprocessing(save_sized(tmp_path / "a", [(20, 10), (40, 30), (25, 50)])).side == 40
    assert choose_preprocessing(save_sized(tmp_path / "b", [(4, 4), (2, 3)])).side == 16
    assert choose_preprocessing(save_sized(tmp_path / "c", [(900, 500)] * 2)).side == 128
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    assert choose_preprocessing([corrupt, *save_sized(tmp_path / "d", [(30, 30)])]).side == 30


# --- image: augmentation ----------------------------------------------------------------------


def test_augment_keeps_dtype_and_shape_and_is_seeded() -> None:
    batch = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prep = image_prep(side=20, channels=3)
    first = augment(batch, prep, torch.Generator().manual_seed(1))
    again = augment(batch, prep, torch.Generator().manual_seed(1))
    other = augment(batch, prep, torch.Generator().manual_seed(2))
    assert first.dtype == torch.uint8 and first.shape == batch.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, batch)


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_translation_moves_a_bright_pixel(hflip: bool) -> None:
    side, row, col = 10, 4, 6
    batch = torch.zeros((5, 1, side, side), dtype=torch.uint8)
    batch[:, 0, row, col] = 255
    prep = image_prep(side=side, channels=1, hflip=hflip)
    out = augment(batch, prep, torch.Generator().manual_seed(3))
    # Hand computation: the same draws, in the order augment makes them.
    generator = torch.Generator().manual_seed(3)
    pad = 1  # 10% of 10 pixels
    dy = torch.randint(0, 2 * pad + 1, (5,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (5,), generator=generator)
    flips = torch.rand(5, generator=generator) < 0.5 if hflip else torch.zeros(5, dtype=torch.bool)
    assert (dy != pad).any() or (dx != pad).any()  # the seed exercises a real move
    for i in range(5):
        # out[y, x] = padded[y + dy, x + dx] = image[y + dy - pad, x + dx - pad]
        y, x = row - (int(dy[i]) - pad), col - (int(dx[i]) - pad)
        if flips[i]:
            x = side - 1 - x
        expected = torch.zeros((side, side), dtype=torch.uint8)
        expected[y, x] = 255
        assert torch.equal(out[i, 0], expected), i
    if hflip:
        assert flips.any() and not flips.all()


def test_augment_shifts_content_off_the_edge_as_black() -> None:
    batch = torch.full((64, 1, 10, 10), 200, dtype=torch.uint8)
    out = augment(batch, image_prep(side=10, channels=1, hflip=False), torch.Generator().manual_seed(0))
    black_rows = (out == 0).all(dim=3).sum(dim=(1, 2))  # rows padded in by a vertical move
    assert set(black_rows.tolist()) == {0, 1}
    assert ((out == 0) | (out == 200)).all()


# --- image: the front end -------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4096, 2])  # one chunk in-process, and the worker-pool path
def test_decode_all_skips_a_corrupt_file_by_path_and_keeps_order(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(image_module, "DECODE_CHUNK", chunk)
    examples = []
    for i, value in enumerate([10, 60, None, 110, 160, 210]):
        path = tmp_path / f"{i}.png"
        if value is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
        else:
            Image.new("L", (6, 6), value).save(path)
        examples.append(Example(str(path), "a", path=path))
    frontend = ImageFrontEnd(image_prep(side=6, channels=1))
    inputs, kept, problems = frontend.decode_all(examples)
    assert kept == [0, 1, 3, 4, 5]
    assert inputs.dtype == torch.uint8 and inputs.shape == (5, 1, 6, 6)
    assert inputs[:, 0, 0, 0].tolist() == [10, 60, 110, 160, 210]
    assert [p.origin for p in problems] == [str(tmp_path / "2.png")]
    assert "image" in problems[0].reason


def test_image_statistics_standardise_the_training_set() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator)
    inputs[:, 1] //= 4  # channels with different means
    frontend = ImageFrontEnd(image_prep(side=8, channels=3))
    frontend.fit_statistics(inputs)
    x = frontend.model_input(inputs).double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)


def test_image_front_end_round_trips_through_json(tmp_path: Path) -> None:
    paths = save_sized(tmp_path, [(24, 24), (24, 30)], "RGB")
    frontend = fit_frontend("image", [Example(str(p), "a", path=p) for p in paths])
    frontend.fit_statistics(torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8))
    config = json.loads(json.dumps(frontend.to_json()))
    restored = frontend_from_json(config)
    assert isinstance(restored, ImageFrontEnd) and restored.prep == frontend.prep
    assert restored.model_inputs == {"in_channels": 3}


def test_image_preview_is_a_png() -> None:
    png = ImageFrontEnd(image_prep(side=8, channels=1)).preview(torch.zeros((1, 8, 8), dtype=torch.uint8))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


# --- audio: decoding ----------------------------------------------------------------------------


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)


def audio_prep(seconds: float = 0.5) -> AudioPreprocessing:
    return AudioPreprocessing(seconds=seconds)


def test_stereo_unsigned_8bit_wav_mixes_to_mono(tmp_path: Path) -> None:
    path = tmp_path / "u8.wav"
    frames = 4000
    with wave.open(str(path), "wb") as w:  # stdlib writer: 8-bit WAV samples are unsigned, 128 = 0
        w.setnchannels(2)
        w.setsampwidth(1)
        w.setframerate(16_000)
        w.writeframes(bytes([128 + 64, 128 - 32]) * frames)  # left +0.5, right -0.25
    assert soundfile.info(str(path)).subtype == "PCM_U8"
    out = load_waveform(path, audio_prep(0.5))
    assert out.dtype == np.float32 and out.shape == (8000,)
    np.testing.assert_allclose(out[:frames], 0.125, atol=1e-6)  # (0.5 - 0.25) / 2
    assert (out[frames:] == 0).all()  # padded to the clip length


@pytest.mark.parametrize(("ext", "tolerance"), [("flac", 1e-3), ("ogg", 0.05)])
def test_flac_and_ogg_decode(tmp_path: Path, ext: str, tolerance: float) -> None:
    signal = sine(440, 0.5, 16_000)
    soundfile.write(tmp_path / f"a.{ext}", np.stack([signal, signal], axis=1), 16_000)
    out = load_waveform(tmp_path / f"a.{ext}", audio_prep(0.5))
    assert out.shape == (8000,)
    middle = slice(1000, 7000)  # lossy codecs differ most at the ends
    assert np.abs(out[middle] - signal[middle]).max() < tolerance * 10
    assert np.sqrt(np.mean((out[middle] - signal[middle]) ** 2)) < tolerance


@pytest.mark.parametrize("rate", [8000, 44_100])
def test_any_rate_gives_the_clip_at_16khz(tmp_path: Path, rate: int) -> None:
    soundfile.write(tmp_path / "a.wav", sine(300, 0.25, rate), rate)  # 0.25 s of sound
    out = load_waveform(tmp_path / "a.wav", audio_prep(0.5))
    assert out.shape == (8000,)
    loud = np.flatnonzero(np.abs(out) > 0.05)
    assert abs(loud[-1] - 4000) < 20  # the sound still lasts 0.25 s at 16 kHz
    assert (out[4100:] == 0).all()


def test_resampling_keeps_a_sines_frequency(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "a.wav", sine(1000, 1.0, 44_100), 44_100, subtype="FLOAT")
    out = load_waveform(tmp_path / "a.wav", audio_prep(1.0))
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    freqs = np.fft.rfftfreq(len(out), 1 / 16_000)
    assert abs(freqs[spectrum.argmax()] - 1000) <= 1
    assert 0.45 < np.abs(out[1000:-1000]).max() < 0.55  # amplitude kept too


def test_long_file_matches_resampling_the_whole_signal(tmp_path: Path) -> None:
    signal = np.random.default_rng(0).normal(0, 0.1, 5 * 44_100)  # 5 s, only 0.5 s is kept
    soundfile.write(tmp_path / "long.wav", signal, 44_100, subtype="FLOAT")
    out = load_waveform(tmp_path / "long.wav", audio_prep(0.5))
    reference = resample_poly(signal.astype(np.float32), 160, 441)[:8000]
    np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize(("content", "reason"), [(b"", "empty file"), (b"RIFF" + bytes(60), "not a readable audio")])
def test_unreadable_audio_raises_decode_error(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(DecodeError, match=re.escape(reason)):
        load_waveform(tmp_path / "bad.wav", audio_prep())


def test_audio_decode_all_skips_bad_files_by_path(tmp_path: Path) -> None:
    paths = [tmp_path / "a.wav", tmp_path / "bad.wav", tmp_path / "b.flac"]
    soundfile.write(paths[0], sine(440, 0.3, 8000), 8000)
    paths[1].write_bytes(np.random.default_rng(0).bytes(500))
    soundfile.write(paths[2], sine(880, 0.3, 22_050), 22_050)
    frontend = AudioFrontEnd(audio_prep(0.5))
    inputs, kept, problems = frontend.decode_all([Example(str(p), "a", path=p) for p in paths])
    assert kept == [0, 2]
    assert inputs.dtype == torch.float16 and inputs.shape == (2, 1, 64, 51)
    assert [p.origin for p in problems] == [str(paths[1])]
    assert "not a readable audio file" in problems[0].reason


# --- audio: clip length ---------------------------------------------------------------------------


def write_durations(folder: Path, seconds: list[float], rate: int = 8000) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, s in enumerate(seconds):
        paths.append(folder / f"{i}.wav")
        soundfile.write(paths[-1], np.zeros(round(s * rate)), rate)
    return paths


def test_clip_length_is_the_clamped_95th_percentile(tmp_path: Path) -> None:
    durations = [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 3.9]
    paths = write_durations(tmp_path / "a", durations)
    (tmp_path / "a" / "bad.wav").write_bytes(b"garbage")  # unreadable: ignored here
    assert choose_seconds([*paths, tmp_path / "a" / "bad.wav"]) == round(float(np.percentile(durations, 95)), 1)
    assert choose_seconds(write_durations(tmp_path / "short", [0.1, 0.2])) == 0.5
    assert choose_seconds(write_durations(tmp_path / "long", [12.0])) == 10.0
    assert choose_seconds([]) == 1.0


# --- audio: log-mel ------------------------------------------------------------------------------


def htk_mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700)


@pytest.mark.parametrize(("n_fft", "n_mels"), [(2048, 10), (401, 8)])
def test_mel_filterbank_matches_a_hand_computation(n_fft: int, n_mels: int) -> None:
    rate = 16_000
    bank = mel_filterbank(n_fft, n_mels, rate).double().numpy()
    assert bank.shape == (n_fft // 2 + 1, n_mels)
    assert (bank >= 0).all()
    bin_hz = np.arange(n_fft // 2 + 1) * rate / n_fft  # the STFT's bins; below Nyquist for odd n_fft
    mel_edges = np.linspace(0, htk_mel(np.array(rate / 2)), n_mels + 2)
    hz_edges = 700 * (10 ** (mel_edges / 2595) - 1)
    for m in range(n_mels):
        lower, centre, upper = hz_edges[m : m + 3]
        column = bank[:, m]
        nearest = np.abs(bin_hz - centre).min()
        assert abs(bin_hz[column.argmax()] - centre) < rate / n_fft  # peak at the centre ...
        assert column.max() >= 1 - nearest / min(centre - lower, upper - centre) - 1e-6  # ... of height ~1
        assert (column[(bin_hz <= lower) | (bin_hz >= upper)] == 0).all()  # zero outside
        rising = column[(bin_hz > lower) & (bin_hz <= centre)]
        falling = column[(bin_hz >= centre) & (bin_hz < upper)]
        assert (np.diff(rising) > 0).all() and (np.diff(falling) < 0).all()  # a triangle
        up, down = (bin_hz > lower) & (bin_hz < centre), (bin_hz > centre) & (bin_hz < upper)
        np.testing.assert_allclose(column[up], (bin_hz[up] - lower) / (centre - lower), atol=1e-6)
        np.testing.assert_allclose(column[down], (upper - bin_hz[down]) / (upper - centre), atol=1e-6)
    # Neighbouring triangles add up to 1 between the first and last centres: no gaps.
    between = (bin_hz >= hz_edges[1]) & (bin_hz <= hz_edges[-2])
    np.testing.assert_allclose(bank[between].sum(axis=1), 1.0, atol=1e-5)


def band_of(freq: float, prep: AudioPreprocessing) -> int:
    return int(
        mel_filterbank(prep.n_fft, prep.n_mels, prep.sample_rate)[round(freq * prep.n_fft / prep.sample_rate)].argmax()
    )


def test_log_mel_shape_and_energy_in_the_right_band() -> None:
    prep = audio_prep(0.5)
    waves = torch.from_numpy(np.stack([sine(1000, 0.5, 16_000, 0.1), sine(1000, 0.5, 16_000, 0.4)])).float()
    spec = log_mel(waves, prep)
    assert spec.shape == (2, 1, prep.n_mels, prep.n_frames) == (2, 1, 64, 51)
    energy = spec[:, 0, :, 5:-5].mean(dim=2)  # (B, mels), away from the padded ends
    band = band_of(1000, prep)
    assert energy[0].argmax() == band
    assert energy[1, band] > energy[1, band + 10] + 5 and energy[1, band] > energy[1, -1] + 5
    # Four times the amplitude is sixteen times the power: +log(16) in every frame of that band.
    torch.testing.assert_close(energy[1, band] - energy[0, band], torch.tensor(math.log(16)), atol=1e-3, rtol=0)


# --- audio: augmentation and statistics ----------------------------------------------------------


def spectrogram_batch(b: int = 8, n_mels: int = 64, n_frames: int = 51) -> torch.Tensor:
    """Every cell distinct and above the floor, so moves and masks are visible."""
    cells = torch.arange(n_mels * n_frames, dtype=torch.float32).view(1, 1, n_mels, n_frames)
    return (cells / 100 + torch.arange(b).view(b, 1, 1, 1) + 1).half()


def audio_augment_by_hand(batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Reference: the same random draws as AudioFrontEnd.augment, applied one cell at a time."""
    b, _, n_mels, n_frames = batch.shape
    generator = torch.Generator().manual_seed(seed)
    max_shift = n_frames // 10
    shift = torch.randint(-max_shift, max_shift + 1, (b,), generator=generator)
    t_width = torch.randint(0, math.ceil(0.15 * n_frames), (b,), generator=generator)
    t_start = (torch.rand(b, generator=generator) * (n_frames - t_width)).long()
    f_width = torch.randint(0, 9, (b,), generator=generator)
    f_start = (torch.rand(b, generator=generator) * (n_mels - f_width)).long()
    out = batch.clone()
    draws = []
    for i in range(b):
        floor = batch[i].min()
        s, t0, t1 = int(shift[i]), int(t_start[i]), int(t_start[i] + t_width[i])
        f0, f1 = int(f_start[i]), int(f_start[i] + f_width[i])
        for t in range(n_frames):
            source = t - s  # content moves later in time by `shift` frames
            out[i, 0, :, t] = batch[i, 0, :, source] if 0 <= source < n_frames else floor
        out[i, 0, :, t0:t1] = floor  # time mask
        out[i, 0, f0:f1, :] = floor  # frequency mask
        draws.append({"shift": s, "time_mask": t1 - t0, "freq_mask": f1 - f0})
    return out, draws


def test_audio_augment_shifts_and_masks_like_the_hand_computation() -> None:
    frontend = AudioFrontEnd(audio_prep(0.5))
    batch = spectrogram_batch()
    out = frontend.augment(batch, torch.Generator().manual_seed(0))
    expected, draws = audio_augment_by_hand(batch, seed=0)
    assert out.dtype == batch.dtype and out.shape == batch.shape
    assert torch.equal(out, expected)
    # The seed exercises every part: shifts both ways, and both kinds of mask.
    assert min(d["shift"] for d in draws) < 0 < max(d["shift"] for d in draws)
    assert sum(d["time_mask"] > 0 for d in draws) >= 4 and sum(d["freq_mask"] > 0 for d in draws) >= 4


def test_audio_augment_is_seeded() -> None:
    frontend = AudioFrontEnd(audio_prep(0.5))
    batch = spectrogram_batch()
    first = frontend.augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(first, frontend.augment(batch, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, frontend.augment(batch, torch.Generator().manual_seed(2)))


def test_audio_statistics_standardise_the_training_set() -> None:
    frontend = AudioFrontEnd(audio_prep(0.5))
    inputs = spectrogram_batch(4)
    frontend.fit_statistics(inputs)
    x = frontend.model_input(inputs).double()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_audio_baseline_features_are_band_means_and_stds() -> None:
    frontend = AudioFrontEnd(audio_prep(0.5))
    inputs = spectrogram_batch(3)
    features = frontend.baseline_features(inputs)
    assert features.shape == (3, 128)
    spec = inputs.double().numpy()[:, 0]
    np.testing.assert_allclose(features[:, :64], spec.mean(axis=2), rtol=1e-5)
    np.testing.assert_allclose(features[:, 64:], spec.std(axis=2, ddof=1), rtol=1e-4)


def test_audio_front_end_round_trips_through_json(tmp_path: Path) -> None:
    paths = write_durations(tmp_path / "a", [0.7, 0.7])
    frontend = fit_frontend("audio", [Example(str(p), "a", path=p) for p in paths])
    assert frontend.prep.seconds == 0.7
    frontend.fit_statistics(spectrogram_batch(2))
    restored = frontend_from_json(json.loads(json.dumps(frontend.to_json())))
    assert isinstance(restored, AudioFrontEnd) and restored.prep == frontend.prep


# --- text ----------------------------------------------------------------------------------------

TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the mat",
    "the dog ran after the cat",
] * 4


def text_front_end() -> TextFrontEnd:
    return fit_frontend("text", [Example(f"line {i}", "a", text=t) for i, t in enumerate(TEXTS)])


def test_non_utf8_bytes_are_replaced_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    assert read_text(Example(str(path), "a", path=path)) == "caf\ufffd au lait"
    inputs, kept, problems = text_front_end().decode_all([Example(str(path), "a", path=path)])
    assert kept == [0] and problems == [] and inputs[0, 0] == CLS_ID


def test_utf8_bom_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert read_text(Example(str(path), "a", path=path)) == "hello"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file (0 bytes)"), (b" \n\t ", "empty text"), (b"\xef\xbb\xbf", "empty text")],
)
def test_empty_text_file_is_a_decode_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=re.escape(reason)):
        read_text(Example(str(path), "a", path=path))
    inputs, kept, problems = text_front_end().decode_all(
        [Example("inline", "a", text="the cat"), Example(str(path), "a", path=path)]
    )
    assert kept == [0] and inputs.shape[0] == 1
    assert [(p.origin, p.reason) for p in problems] == [(str(path), reason)]


def test_tokenizer_ids_start_with_cls_and_pad_to_max_len() -> None:
    frontend = text_front_end()
    vocab = frontend.tokenizer.get_vocab()
    assert (
        [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]")] == [PAD_ID, UNK_ID, CLS_ID, MASK_ID] == [0, 1, 2, 3]
    )
    max_len = frontend.prep.max_len
    assert max_len == 16  # 95th percentile of ~10 tokens, clamped to the minimum
    inputs, _, _ = frontend.decode_all([Example("x", None, text="The cat sat")])
    ids = inputs[0].tolist()
    assert inputs.dtype == torch.int64 and len(ids) == max_len
    words = [frontend.tokenizer.token_to_id(w) for w in ("the", "cat", "sat")]
    assert ids[:4] == [CLS_ID, *words]  # lowercased, one id per known word
    assert ids[4:] == [PAD_ID] * (max_len - 4)
    assert frontend.preview(inputs[0]) == "the cat sat"


def test_tokenizer_truncates_to_max_len_and_survives_unknown_words() -> None:
    frontend = text_front_end()
    long_text = " ".join(["cat"] * 100)
    unknown = "zebra 猫 ☃ qqq"
    inputs, kept, problems = frontend.decode_all([Example("a", None, text=long_text), Example("b", None, text=unknown)])
    assert kept == [0, 1] and problems == []
    assert inputs.shape == (2, frontend.prep.max_len)
    cat = frontend.tokenizer.token_to_id("cat")
    assert inputs[0].tolist() == [CLS_ID] + [cat] * (frontend.prep.max_len - 1)
    assert inputs[1, 0] == CLS_ID and UNK_ID in inputs[1].tolist()
    assert (inputs[1] < frontend.tokenizer.get_vocab_size()).all()


def test_text_augment_masks_only_real_tokens() -> None:
    frontend = text_front_end()
    inputs, _, _ = frontend.decode_all([Example(str(i), None, text=t) for i, t in enumerate(TEXTS)])
    first = frontend.augment(inputs, torch.Generator().manual_seed(0))
    assert torch.equal(first, frontend.augment(inputs, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, frontend.augment(inputs, torch.Generator().manual_seed(1)))
    changed = first != inputs
    assert changed.any()
    assert (first[changed] == MASK_ID).all()
    assert (inputs[changed] > MASK_ID).all()  # never PAD, UNK, CLS
    assert torch.equal(first[:, 0], inputs[:, 0]) and (first[inputs == PAD_ID] == PAD_ID).all()
    real = inputs > MASK_ID
    assert 0.03 < changed.sum() / real.sum() < 0.2  # about 10% of the real tokens


def test_text_baseline_features_count_tokens() -> None:
    frontend = text_front_end()
    inputs, _, _ = frontend.decode_all(
        [Example("a", None, text="the cat the cat the mat"), Example("b", None, text="dog")]
    )
    counts = frontend.baseline_features(inputs).toarray()
    assert counts.shape == (2, frontend.tokenizer.get_vocab_size())
    tid = frontend.tokenizer.token_to_id
    expected = np.zeros_like(counts)
    expected[0, tid("the")], expected[0, tid("cat")], expected[0, tid("mat")] = 3, 2, 1
    expected[1, tid("dog")] = 1
    np.testing.assert_array_equal(counts, expected)  # PAD and CLS are not counted


def test_text_front_end_round_trips_through_json() -> None:
    frontend = text_front_end()
    restored = frontend_from_json(json.loads(json.dumps(frontend.to_json())))
    assert isinstance(restored, TextFrontEnd)
    assert restored.model_inputs == frontend.model_inputs
    examples = [
        Example("a", None, text="a dog sat on a cat"),
        Example("b", None, text="unknown words here"),
    ]
    assert torch.equal(restored.decode_all(examples)[0], frontend.decode_all(examples)[0])
