"""Speech data: normalisation, manifests and their problems, decoding, alphabet, augmentation, log-mel, VAD."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from layerwise.data.speech import (
    ISO_639_1,
    NORMALISATION_RULES,
    Alphabet,
    augment_waveform,
    choose_max_seconds,
    load_speech,
    load_utterances,
    log_mel_batch,
    normalise_text,
    read_speech_manifest,
    spec_augment,
    speech_segments,
    speed_perturb,
    telephone_band,
    unknown_script_characters,
)
from layerwise.errors import DecodeError, InputError

RATE = 16_000


def speech_like(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A 4 Hz amplitude-modulated 220 Hz tone plus harmonics: voiced-speech-like energy, never silent."""
    t = np.arange(round(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in (1, 2, 3))
    return (0.2 * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) * tone).astype(np.float32)


def silence(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(seconds * RATE)) * 1e-4).astype(np.float32)


def write_wav(path: Path, wave: np.ndarray, rate: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, subtype="PCM_16")
    return path


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World!  It's 5 o'clock...", "hello world it's 5 o'clock"),
        ("“Quoted” - dash-separated 'words'", "quoted dash separated words"),
        ("L’Homme est là, à l'école ÉTÉ", "l'homme est là à l'école été"),
        ("Cafe\u0301 NOËL", "café noël"),  # decomposed é composed by NFC
        ("Die Straße, GRÜN; Äpfel & Öl über Maß.", "die straße grün äpfel öl über maß"),
        ("Привет, МИР! Ёлка — «ёж».", "привет мир ёлка ёж"),
        ("Price: $100 + 5% = ?", "price 100 5"),
    ],
)
def test_normalise_text(raw, expected):
    assert normalise_text(raw) == expected


def test_normalisation_rules_are_stated():
    assert "NFC" in NORMALISATION_RULES and "apostrophe" in NORMALISATION_RULES
    assert len(ISO_639_1) == 184 and {"en", "fr", "de", "ru", "zh", "sw"} <= ISO_639_1


def test_unknown_script_characters_are_kept_and_listed():
    text = normalise_text("Great job 🎉🎉 \ue000 नमस्ते 北京 5")
    assert "🎉🎉" in text and "नमस्ते" in text  # kept; Devanagari marks are letters of a script
    assert unknown_script_characters(text) == ["🎉", "🎉", "\ue000"]
    assert unknown_script_characters("l'homme 42 straße") == []


def write_manifest(folder: Path, lines: list[str], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / name


def test_manifest_reads_rows_and_names_every_bad_one(tmp_path):
    write_wav(tmp_path / "audio" / "a.wav", speech_like(0.5))
    write_wav(tmp_path / "audio" / "b.wav", speech_like(0.5))
    (tmp_path / "audio" / "empty.wav").write_bytes(b"")
    write_wav(tmp_path / "outside.wav", speech_like(0.5))
    csv_path = write_manifest(
        tmp_path / "data",
        [
            "path,text,language,speaker",
            "../audio/a.wav,Hello there!,en,s1",  # line 2
            "../audio/b.wav,Bonjour 🎉,FR,",  # line 3: language upper case accepted
            "../audio/missing.wav,hello,en,s1",  # line 4
            "../audio/a.wav,  ...  ,en,s1",  # line 5: nothing left after normalisation
            "../audio/b.wav,hello,english,s1",  # line 6
            "../audio/b.wav,hello,xx,s1",  # line 7
            "../audio/empty.wav,hello,en,s1",  # line 8
            "../audio/a.wav,HELLO THERE,en,s1",  # line 9: duplicate of line 2 once normalised
            "../outside.wav,fine,,",  # line 10: outside the CSV's folder is fine
        ],
    )
    utterances, problems, info = read_speech_manifest(csv_path.parent)
    assert [(u.origin, u.text, u.language, u.speaker) for u in utterances] == [
        ("manifest.csv line 2", "hello there", "en", "s1"),
        ("manifest.csv line 3", "bonjour 🎉", "fr", None),
        ("manifest.csv line 10", "fine", None, None),
    ]
    assert utterances[0].path == (tmp_path / "audio" / "a.wav").resolve()
    reasons = {p.origin: p.reason for p in problems}
    assert set(reasons) == {f"manifest.csv line {n}" for n in (4, 5, 6, 7, 8)}
    assert "not found" in reasons["manifest.csv line 4"] and "missing.wav" in reasons["manifest.csv line 4"]
    assert "empty transcript" in reasons["manifest.csv line 5"]
    assert "'english'" in reasons["manifest.csv line 6"] and "ISO 639-1" in reasons["manifest.csv line 6"]
    assert "'xx'" in reasons["manifest.csv line 7"]
    assert "0 bytes" in reasons["manifest.csv line 8"]
    assert info == {
        "rows": 9,
        "manifest": str(csv_path),
        "languages": ["en", "fr"],
        "duplicates": 1,
        "unknown_characters": {"🎉": 1},
    }


def test_manifest_missing_column_or_file_is_an_input_error(tmp_path):
    csv_path = write_manifest(tmp_path, ["path,transcript", "a.wav,hello"], name="speech.csv")
    with pytest.raises(InputError, match=r"speech\.csv: no 'text' column"):
        read_speech_manifest(csv_path)
    with pytest.raises(InputError, match="no such file"):
        read_speech_manifest(tmp_path / "nothing.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="manifest.csv or metadata.csv"):
        read_speech_manifest(tmp_path / "empty_dir")
    metadata = write_manifest(tmp_path / "hf", ["file_name,text", "a.wav,hi"], name="metadata.csv")
    with pytest.raises(InputError, match="no 'transcription' column"):
        read_speech_manifest(metadata.parent)


def test_metadata_csv_audiofolder_convention(tmp_path):
    write_wav(tmp_path / "data" / "clips" / "1.wav", speech_like(0.3))
    write_manifest(
        tmp_path / "data",
        ["file_name,transcription,language", "clips/1.wav,Guten Morgen!,de", "clips/2.wav,Hallo,de"],
        name="metadata.csv",
    )
    utterances, problems, info = read_speech_manifest(tmp_path / "data")
    assert [(u.text, u.language) for u in utterances] == [("guten morgen", "de")]
    assert [p.origin for p in problems] == ["metadata.csv line 3"]
    assert info["manifest"].endswith("metadata.csv") and info["rows"] == 2


def test_load_speech_resamples_stereo_44k(tmp_path):
    stereo = np.stack([speech_like(1.5, rate=44_100), np.zeros(round(1.5 * 44_100), np.float32)], axis=1)
    wave = load_speech(write_wav(tmp_path / "stereo.wav", stereo, rate=44_100))
    assert wave.dtype == np.float32 and wave.shape == (24_000,)
    # mixed to mono: half the left channel's RMS
    left_rms = np.sqrt(np.mean(speech_like(1.5) ** 2))
    assert np.sqrt(np.mean(wave**2)) == pytest.approx(left_rms / 2, rel=0.05)


def test_load_speech_reasons(tmp_path):
    path = write_wav(tmp_path / "ok.wav", speech_like(2.0))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(path.read_bytes()[:-16_000])  # header still promises 32,000 frames
    with pytest.raises(DecodeError, match="truncated: header promises 32000 frames, file holds 24000"):
        load_speech(truncated)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(DecodeError, match="0 bytes"):
        load_speech(tmp_path / "empty.wav")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 10)
    with pytest.raises(DecodeError, match="not a readable audio file"):
        load_speech(tmp_path / "text.wav")
    with pytest.raises(DecodeError, match="cannot read"):
        load_speech(tmp_path / "gone.wav")
    nan = np.full(1000, np.nan, np.float32)
    soundfile.write(str(tmp_path / "nan.wav"), nan, RATE, subtype="FLOAT")
    with pytest.raises(DecodeError, match="NaN"):
        load_speech(tmp_path / "nan.wav")
    with pytest.raises(DecodeError, match="2.0 s long, longer than the 1.5 s the model takes.*transcribe"):
        load_speech(path, max_seconds=1.5)
    assert load_speech(path, max_seconds=2.0).shape == (32_000,)


def test_load_utterances_turns_failures_into_problems(tmp_path):
    write_wav(tmp_path / "a.wav", speech_like(0.5))
    write_wav(tmp_path / "long.wav", speech_like(3.0))
    write_manifest(tmp_path, ["path,text", "a.wav,one", "long.wav,two"])
    utterances, _, _ = read_speech_manifest(tmp_path / "manifest.csv")
    waves, kept, problems = load_utterances(utterances, max_seconds=2.0)
    assert [w.shape for w in waves] == [(8000,)] and [u.text for u in kept] == ["one"]
    assert problems[0].origin.startswith("manifest.csv line 3 (") and "longer than" in problems[0].reason


def test_choose_max_seconds():
    assert choose_max_seconds([2.0] * 100) == 5.0  # the 5 s minimum
    assert choose_max_seconds([3.1] * 200 + [60.0]) == 6.5  # one far-longer clip does not raise it
    assert choose_max_seconds([20.0] * 50) == 30.0  # capped
    assert choose_max_seconds([3.1, 3.1, 3.1]) == 6.5  # rounded up to 0.5 s


def test_alphabet_round_trip():
    texts = ["привет мир", "l'homme", "straße"]
    alphabet = Alphabet.fit(texts, ["ru", None, "fr", "de", "ru"])
    assert alphabet.languages == ("de", "fr", "ru") and " " in alphabet.characters
    assert alphabet.vocab_size == len(set("".join(texts))) + 1 and Alphabet.blank == 0
    for text in texts:
        ids = alphabet.encode(text)
        assert min(ids) >= 1 and alphabet.decode(ids) == text
    assert alphabet.decode([0, *alphabet.encode("мир"), 0]) == "мир"
    assert alphabet.decode(alphabet.encode("qир!")) == "ир"  # Latin q and ! are not in it: dropped
    assert Alphabet.from_json(alphabet.to_json()) == alphabet
    assert Alphabet.fit(["a"], [None]).languages == ()


def test_augmentation_is_seeded_and_only_speed_changes_length():
    wave = speech_like(1.0)
    outputs = [augment_waveform(wave, np.random.default_rng(seed)) for seed in range(12)]
    again = [augment_waveform(wave, np.random.default_rng(seed)) for seed in range(12)]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, again, strict=True))
    assert len({o.tobytes() for o in outputs}) > 8  # a few seeds draw no augmentation at all
    assert {len(o) == len(wave) for o in outputs} == {True, False}  # some sped up, some not
    for seed, out in enumerate(outputs):
        rng = np.random.default_rng(seed)
        if rng.random() < 0.5:  # the first draws decide speed perturbation and its factor
            factor = rng.uniform(0.9, 1.1)
            assert len(out) == len(speed_perturb(wave, factor)) and 0.89 < len(wave) / len(out) < 1.11
        else:
            assert len(out) == len(wave)


def test_telephone_band_removes_energy_above_4khz():
    t = np.arange(RATE) / RATE
    wave = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    out = telephone_band(wave)
    assert out.shape == wave.shape and out.dtype == np.float32
    power = np.abs(np.fft.rfft(out[2000:])) ** 2  # skip the filter's onset
    freqs = np.fft.rfftfreq(len(out) - 2000, 1 / RATE)
    assert power[freqs > 4000].sum() < 1e-4 * power.sum()
    assert power[(freqs > 900) & (freqs < 1100)].sum() > 0.9 * power.sum()


def test_log_mel_batch_shapes_and_padding():
    waves = [speech_like(1.0), speech_like(0.25), np.zeros(100, np.float32)]
    features, lengths = log_mel_batch(waves)
    assert features.dtype == torch.float32 and features.shape == (3, 80, 101)
    assert lengths.tolist() == [101, 26, 1] and lengths.dtype == torch.int64
    for i, n in enumerate(lengths.tolist()):
        floor = float(features[i, :, :n].max()) - 2.0  # the peak - 8 log10 units, normalised by / 4
        if i < 2:  # a tone spans more than 8 log10 units: its quietest bins sit on the floor
            assert float(features[i, :, :n].min()) == pytest.approx(floor, abs=1e-5)
        assert torch.allclose(features[i, :, n:], torch.tensor(floor))  # padding is the clip's floor
    alone, _ = log_mel_batch(waves[1:2])
    assert torch.allclose(alone[0, :, :26], features[1, :, :26], atol=1e-4)


def test_spec_augment_masks_within_valid_length():
    features, lengths = log_mel_batch([speech_like(2.0), speech_like(1.0)])
    out = spec_augment(features, lengths, torch.Generator().manual_seed(0))
    again = spec_augment(features, lengths, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == features.shape and not torch.equal(out, features)
    assert torch.equal(out[1, :, lengths[1] :], features[1, :, lengths[1] :])  # padding untouched
    changed = out != features
    assert changed.any()
    mean = features[1, :, : lengths[1]].mean()
    assert torch.allclose(out[1][changed[1]], mean.expand(int(changed[1].sum())))


def test_speech_segments_finds_bursts_and_nothing_in_silence():
    wave = np.concatenate([silence(0.3), speech_like(1.0), silence(0.5, 1), speech_like(1.0), silence(0.3, 2)])
    first, second = speech_segments(wave, max_seconds=2.0)  # both do not fit in one 2 s chunk
    assert abs(first[0] - 0.2 * RATE) <= 480 and abs(first[1] - 1.4 * RATE) <= 480
    assert abs(second[0] - 1.7 * RATE) <= 480 and abs(second[1] - 2.9 * RATE) <= 480
    assert speech_segments(wave, max_seconds=10.0) == [(first[0], second[1])]  # grouped into one chunk
    hard = speech_segments(speech_like(2.5), max_seconds=1.0)
    assert hard == [(0, 16_000), (16_000, 32_000), (32_000, 40_000)]  # no pause: cut every second
    assert speech_segments(silence(2.0), max_seconds=10.0) == []
    assert speech_segments(np.zeros(0, np.float32), max_seconds=10.0) == []
