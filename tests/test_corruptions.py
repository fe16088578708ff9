"""Unit tests for the corruption suite and the front ends' raw decode/encode.

Inputs are tiny synthetic images, waveforms and sentences. Expected values come from the corruption's
definition measured independently: SNR from the added signal, frequencies from a numpy FFT, contrast
from the pixel standard deviation, text damage from a Levenshtein distance written here.
"""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from layerwise.data.audio import AudioFrontEnd, AudioPreprocessing
from layerwise.data.frontend import fit_frontend
from layerwise.data.sources import Example
from layerwise.shift.corruptions import (
    CONTRAST_KEPT,
    CORRUPTIONS,
    DROPOUT_FRACTION,
    GAIN_DB,
    NOISE_SNR_DB,
    NOISE_STD,
    SEVERITIES,
    SPEED_FACTOR,
    TYPO_WORD_FRACTION,
    corrupt,
    describe,
)

RATE = 16_000
DETERMINISTIC = {"dusk", "contrast", "blur", "jpeg"}  # the same output for every seed
ALL = [(modality, name) for modality, names in CORRUPTIONS.items() for name in names]


def scene(channels: int = 3, side: int = 32, n: int = 4) -> torch.Tensor:
    """uint8 (n, C, side, side): gradients, a bright square and a little texture, different per image."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    texture = torch.rand((n, channels, side, side), generator=torch.Generator().manual_seed(1))
    base = torch.stack([xx, yy, (xx + yy) / 2])[:channels]  # (C, side, side)
    images = 0.6 * base[None] + 0.2 * texture
    q = side // 4
    for i in range(n):
        images[i, :, q + i : 2 * q + i, q : 3 * q] = 0.95
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def waves(n: int = 8, seconds: float = 0.5) -> torch.Tensor:
    """float32 (n, T): a speech-like mix of harmonics with an envelope, different level per clip."""
    t = torch.arange(round(seconds * RATE)) / RATE
    rows = []
    for i in range(n):
        f0 = 120 + 15 * i
        tone = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 12))
        envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t) ** 2
        rows.append((0.05 + 0.03 * i) * tone * envelope)
    return torch.stack(rows).float()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate.",
    "Machine learning models are often brittle when the input distribution shifts away from training data.",
    "She sold sea shells by the sea shore, and the shells she sold were surely sea shells.",
    "Please remember to water the plants on Tuesday and Friday, and close the windows at night.",
    "one",
    "two words",
]


def sample(modality: str):
    return {"image": scene(), "audio": waves(), "text": list(SENTENCES)}[modality]


def same(a, b) -> bool:
    return a == b if isinstance(a, list) else bool(torch.equal(a, b))


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# --- every corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "name"), ALL)
def test_keeps_type_is_deterministic_and_leaves_input_alone(modality: str, name: str) -> None:
    raw = sample(modality)
    before = raw.clone() if isinstance(raw, torch.Tensor) else list(raw)
    for severity in SEVERITIES:
        out = corrupt(modality, raw, name, severity, seed=0)
        if modality == "text":
            assert isinstance(out, list) and len(out) == len(raw) and all(isinstance(t, str) for t in out)
        else:
            assert out.shape == raw.shape and out.dtype == raw.dtype
        assert not same(out, raw), f"{name} at severity {severity} changed nothing"
        assert same(out, corrupt(modality, raw, name, severity, seed=0))
        if modality != "text":  # text at low severity touches few words: see the test below
            assert same(out, corrupt(modality, raw, name, severity, seed=1)) == (name in DETERMINISTIC)
        assert same(raw, before), f"{name} modified its input"
        assert describe(modality, name, severity).startswith(f"{name}: ")
    assert len({describe(modality, name, s) for s in SEVERITIES}) == 5


def test_random_corruptions_differ_between_seeds() -> None:
    # Text at severity 1 touches few words, so a change of seed is checked where many words are touched.
    for name in CORRUPTIONS["text"]:
        assert corrupt("text", SENTENCES, name, 5, seed=0) != corrupt("text", SENTENCES, name, 5, seed=1)


@pytest.mark.parametrize(
    ("modality", "name", "severity", "message"),
    [
        ("image", "fog", 1, "unknown image corruption 'fog'"),
        ("audio", "typos", 1, "unknown audio corruption 'typos'"),
        ("video", "blur", 1, "unknown modality 'video'"),
        ("image", "blur", 0, "severity 0 is out of range"),
        ("text", "typos", 6, "severity 6 is out of range"),
    ],
)
def test_bad_requests_raise_value_error_naming_them(modality: str, name: str, severity: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(modality, sample("image"), name, severity)
    with pytest.raises(ValueError, match=message):
        describe(modality, name, severity)


def test_wrong_raw_type_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        corrupt("image", scene().float(), "blur", 1)
    with pytest.raises(ValueError, match="list of str"):
        corrupt("text", "a single string", "typos", 1)


# --- image ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS["image"])
@pytest.mark.parametrize(("channels", "side"), [(3, 32), (1, 28)])
def test_image_damage_grows_with_severity(name: str, channels: int, side: int) -> None:
    clean = scene(channels, side)
    damage = [(corrupt("image", clean, name, s).float() - clean.float()).abs().mean().item() for s in SEVERITIES]
    assert all(a < b for a, b in zip(damage, damage[1:], strict=False)), damage


def test_dusk_is_clearly_dark_at_severity_3_with_a_blue_cast() -> None:
    clean = scene(3)
    dark = corrupt("image", clean, "dusk", 3).float()
    assert dark.mean() < 0.4 * clean.float().mean()
    per_channel = dark.mean(dim=(0, 2, 3)) / clean.float().mean(dim=(0, 2, 3))  # (3,) kept brightness
    assert per_channel[2] > per_channel[1] > per_channel[0]


def test_contrast_keeps_the_stated_share_of_pixel_spread() -> None:
    clean = scene(3, 64).float()
    for severity, kept in zip(SEVERITIES, CONTRAST_KEPT, strict=True):
        out = corrupt("image", clean.to(torch.uint8), "contrast", severity).float()
        ratio = out.flatten(1).std(dim=1) / clean.flatten(1).std(dim=1)  # (N,)
        torch.testing.assert_close(ratio, torch.full_like(ratio, kept), atol=0.01, rtol=0)
        torch.testing.assert_close(out.mean(dim=(1, 2, 3)), clean.mean(dim=(1, 2, 3)), atol=0.5, rtol=0)


def test_gaussian_noise_has_the_stated_std() -> None:
    grey = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)  # mid grey: no clipping at severities 1..3
    for severity in (1, 2, 3):
        noise = (corrupt("image", grey, "gaussian_noise", severity).float() - 128) / 255
        assert noise.std().item() == pytest.approx(NOISE_STD[severity - 1], rel=0.05)


def test_jpeg_output_is_what_a_jpeg_decoder_reproduces() -> None:
    # A JPEG round trip is nearly idempotent at the same quality: re-encoding changes little.
    clean = scene(3, 64, n=2)
    once = corrupt("image", clean, "jpeg", 3)
    twice = corrupt("image", once, "jpeg", 3)
    assert (twice.float() - once.float()).abs().mean() < 0.5 * (once.float() - clean.float()).abs().mean()


def test_rotate_translate_moves_a_dot() -> None:
    dot = torch.zeros((8, 1, 33, 33), dtype=torch.uint8)
    dot[:, :, 16, 24] = 255  # off centre, so rotation and translation both move it
    out = corrupt("image", dot, "rotate_translate", 5).float()
    ys, xs = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    mass = out.sum(dim=(1, 2, 3)).clamp_min(1)
    moved = ((out[:, 0] * ys).sum(dim=(1, 2)) / mass - 16) ** 2 + ((out[:, 0] * xs).sum(dim=(1, 2)) / mass - 24) ** 2
    assert (moved.sqrt() > 1).sum() >= 6  # most images moved by more than a pixel
    assert out.sum(dim=(1, 2, 3)).min() > 0  # the dot stays in frame for a point this close to the centre


# --- audio ---------------------------------------------------------------------------------------


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> np.ndarray:
    clean64, noise = clean.double(), noisy.double() - clean.double()
    return (10 * torch.log10((clean64**2).mean(dim=1) / (noise**2).mean(dim=1))).numpy()


def test_background_noise_is_at_the_stated_snr_and_silence_gets_a_little() -> None:
    clean = waves()
    for severity, target in zip(SEVERITIES, NOISE_SNR_DB, strict=True):
        np.testing.assert_allclose(snr_db(clean, corrupt("audio", clean, "background_noise", severity)), target, atol=1)
    silent = corrupt("audio", torch.zeros((2, RATE)), "background_noise", 5)
    rms = silent.pow(2).mean(dim=1).sqrt()
    assert (rms > 1e-3).all() and (rms < 0.01).all()  # audible hiss at 0 dB SNR, but not loud


def test_background_noise_is_pink() -> None:
    noise = corrupt("audio", torch.zeros((4, RATE)), "background_noise", 5).double().numpy()
    power = np.abs(np.fft.rfft(noise, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(RATE, 1 / RATE)
    low, high = power[:, (freqs >= 100) & (freqs < 200)].mean(), power[:, (freqs >= 3200) & (freqs < 6400)].mean()
    assert 10 < low / high < 60  # 1/f: about 32x more power per Hz at 150 Hz than at 4800 Hz


def test_gain_scales_down_or_boosts_with_clipping() -> None:
    clean = waves()
    for severity, db in zip(SEVERITIES, GAIN_DB, strict=True):
        out = corrupt("audio", clean, "gain", severity)
        ratio = (out.pow(2).mean(dim=1) / clean.pow(2).mean(dim=1)).sqrt()  # (N,) amplitude ratio
        quieter = torch.isclose(ratio, torch.tensor(10 ** (-db / 20)), rtol=1e-4)
        louder = ratio > 1
        assert (quieter | louder).all() and quieter.any() and louder.any()
        assert out.abs().max() <= 1.0
        if db >= 18:  # these clips peak near -10 dBFS, so a big boost must hit full scale
            assert (out[louder].abs().amax(dim=1) == 1.0).all()


def test_speed_shifts_pitch_by_the_stated_factor() -> None:
    t = torch.arange(RATE) / RATE
    tone = torch.sin(2 * torch.pi * 500 * t).repeat(8, 1) * 0.3  # (8, RATE): 500 Hz, 1 Hz FFT bins
    for severity, factor in zip(SEVERITIES, SPEED_FACTOR, strict=True):
        out = corrupt("audio", tone, "speed", severity).numpy()
        peak = np.abs(np.fft.rfft(out * np.hanning(RATE), axis=-1)).argmax(axis=-1)  # Hz
        faster, slower = np.isclose(peak, 500 * factor, rtol=0.01), np.isclose(peak, 500 / factor, rtol=0.01)
        assert (faster | slower).all() and faster.any() and slower.any(), peak


def test_telephone_removes_energy_above_4khz_and_below_300hz() -> None:
    white = torch.from_numpy(np.random.default_rng(0).standard_normal((4, RATE)).astype(np.float32) * 0.1)
    freqs = np.fft.rfftfreq(RATE, 1 / RATE)
    before = np.abs(np.fft.rfft(white.numpy(), axis=-1)) ** 2
    assert before[:, freqs > 4000].sum() / before.sum() > 0.4
    for severity in SEVERITIES:
        after = np.abs(np.fft.rfft(corrupt("audio", white, "telephone", severity).numpy(), axis=-1)) ** 2
        assert after[:, freqs > 4000].sum() / after.sum() < 0.005
        assert after[:, freqs < 150].sum() / after.sum() < 0.005
    # Speech-band content survives: a 1 kHz tone keeps most of its amplitude at the mildest severity.
    tone = (0.3 * torch.sin(2 * torch.pi * 1000 * torch.arange(RATE) / RATE))[None]
    kept = corrupt("audio", tone, "telephone", 1)
    assert kept.pow(2).mean().sqrt() > 0.8 * tone.pow(2).mean().sqrt()


def test_telephone_quantisation_gets_worse_with_severity() -> None:
    clean = waves(4)
    errors = [(corrupt("audio", clean, "telephone", s) - clean).pow(2).mean().item() for s in SEVERITIES]
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors


# --- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS["text"])
def test_text_damage_grows_with_severity(name: str) -> None:
    distances = [
        sum(levenshtein(a, b) for a, b in zip(SENTENCES, corrupt("text", SENTENCES, name, s), strict=True))
        for s in SEVERITIES
    ]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances


def words_changed(clean: list[str], corrupted: list[str]) -> float:
    pairs = [(a, b) for c, k in zip(clean, corrupted, strict=True) for a, b in zip(c.split(), k.split(), strict=True)]
    return sum(a != b for a, b in pairs) / len(pairs)


def test_typos_touch_about_the_stated_share_of_words() -> None:
    long_texts = [" ".join(f"word{i}x{j}" for j in range(50)) for i in range(20)]  # 1000 words
    for severity, share in zip(SEVERITIES, TYPO_WORD_FRACTION, strict=True):
        # A typo never splits or removes a word, so words line up; every chosen word changes.
        changed = words_changed(long_texts, corrupt("text", long_texts, "typos", severity))
        assert changed == pytest.approx(share, abs=0.04)


def test_casing_reaches_random_case_within_words() -> None:
    out = corrupt("text", SENTENCES, "casing", 5)
    assert words_changed([s.lower() for s in SENTENCES], [s.lower() for s in out]) == 0  # only case changed
    assert any(w[1:] != w[1:].lower() and w[1:] != w[1:].upper() for s in out for w in s.split() if len(w) > 3)


def test_word_dropout_drops_the_stated_share_and_never_empties_a_text() -> None:
    texts = [" ".join(f"w{i}_{j}" for j in range(50)) for i in range(20)]
    for severity, share in zip(SEVERITIES, DROPOUT_FRACTION, strict=True):
        kept = sum(len(t.split()) for t in corrupt("text", texts, "word_dropout", severity))
        assert 1 - kept / 1000 == pytest.approx(share, abs=0.04)
    short = ["one", "two words", "a b c", "  spaced  "] * 50
    for seed in range(5):
        out = corrupt("text", short, "word_dropout", 5, seed=seed)
        assert all(t.strip() for t in out)
        assert all(set(o.split()) <= set(s.split()) for s, o in zip(short, out, strict=True))


def test_severities_share_random_draws_so_damage_is_nested() -> None:
    texts = [" ".join(f"w{i}_{j}" for j in range(50)) for i in range(4)]
    kept = [set(" ".join(corrupt("text", texts, "word_dropout", s)).split()) for s in SEVERITIES]
    assert all(a > b for a, b in zip(kept, kept[1:], strict=False))  # each severity drops a strict superset
    typo_words = [
        {(i, w) for i, t in enumerate(corrupt("text", texts, "typos", s)) for w in t.split()} for s in SEVERITIES
    ]
    clean_words = {(i, w) for i, t in enumerate(texts) for w in t.split()}
    misspelt = [words - clean_words for words in typo_words]
    assert all(a < b for a, b in zip(misspelt, misspelt[1:], strict=False))  # the same typos, plus more
    grey = torch.full((1, 1, 32, 32), 128, dtype=torch.uint8)
    mild, strong = (corrupt("image", grey, "gaussian_noise", s).float() - 128 for s in (1, 2))
    assert torch.corrcoef(torch.stack([mild.flatten(), strong.flatten()]))[0, 1] > 0.95  # one noise pattern


def test_whitespace_only_text_is_left_alone() -> None:
    assert corrupt("text", ["   ", ""], "typos", 5) == ["   ", ""]


# --- front ends: raw level -----------------------------------------------------------------------


def test_image_encode_raw_of_decode_raw_is_decode_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(20, 20), (31, 17), (24, 24)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    examples = [Example(str(p), "a", path=p) for p in [*paths, tmp_path / "bad.png"]]
    frontend = fit_frontend("image", examples[:3])
    raw, kept, problems = frontend.decode_raw(examples)
    cached, kept_all, problems_all = frontend.decode_all(examples)
    assert raw.dtype == torch.uint8 and kept == kept_all == [0, 1, 2] and problems == problems_all
    assert torch.equal(frontend.encode_raw(raw), cached)
    assert frontend.encode_raw(corrupt("image", raw, "blur", 3)).shape == cached.shape


def test_audio_encode_raw_of_decode_raw_is_decode_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "bad.wav"]
    soundfile.write(paths[0], rng.standard_normal(6000).astype(np.float32) * 0.1, 16_000)
    soundfile.write(paths[1], rng.standard_normal(11_025).astype(np.float32) * 0.1, 22_050)  # resampled
    paths[2].write_bytes(b"RIFF" + bytes(60))
    examples = [Example(str(p), "a", path=p) for p in paths]
    frontend = AudioFrontEnd(AudioPreprocessing(seconds=0.5))
    raw, kept, problems = frontend.decode_raw(examples)
    cached, kept_all, problems_all = frontend.decode_all(examples)
    assert raw.shape == (2, frontend.prep.n_samples) and raw.dtype == torch.float32
    assert kept == kept_all == [0, 1] and problems == problems_all and len(problems) == 1
    assert torch.equal(frontend.encode_raw(raw), cached)
    noisy = frontend.encode_raw(corrupt("audio", raw, "background_noise", 5))
    assert noisy.shape == cached.shape and not torch.equal(noisy, cached)


def test_text_encode_raw_of_decode_raw_is_decode_all(tmp_path: Path) -> None:
    paths = []
    for i, text in enumerate(SENTENCES * 3):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text)
    (tmp_path / "empty.txt").write_text("")
    examples = [Example(str(p), "a", path=p) for p in [*paths, tmp_path / "empty.txt"]]
    examples.append(Example("inline", "a", text="an inline text"))
    frontend = fit_frontend("text", examples)
    raw, kept, problems = frontend.decode_raw(examples)
    cached, kept_all, problems_all = frontend.decode_all(examples)
    assert raw[0] == SENTENCES[0] and raw[-1] == "an inline text"
    assert kept == kept_all and len(kept) == len(examples) - 1 and problems == problems_all
    assert torch.equal(frontend.encode_raw(raw), cached)
    dropped = frontend.encode_raw(corrupt("text", raw, "word_dropout", 5))
    assert dropped.shape == cached.shape and not torch.equal(dropped, cached)
