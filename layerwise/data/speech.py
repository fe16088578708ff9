"""Speech-to-text data: transcript manifests, text normalisation, waveforms, log-mel batches and VAD.

A manifest is a CSV with `path` (audio relative to the CSV's folder) and `text` columns, optional
`language` (ISO 639-1) and `speaker`; or a folder holding `manifest.csv`; or a Hugging Face
audiofolder holding `metadata.csv` with `file_name` and `transcription`. Every row that cannot be
used becomes a `Problem` naming the CSV line, so nothing is dropped silently. Audio is decoded
whole (a transcript covers the whole clip), mixed to mono and resampled to 16 kHz.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import soundfile
import torch

from layerwise.data.audio import SAMPLE_RATE, mel_filterbank, resample_poly
from layerwise.data.sources import Problem, manifest_rows, open_manifest
from layerwise.errors import DecodeError, InputError

MANIFEST_CSV, METADATA_CSV = "manifest.csv", "metadata.csv"
PATH_COLUMNS = {"path": "text", "file_name": "transcription"}  # audio column -> transcript column
ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv "
    "dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig "
    "ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh "
    "mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru "
    "rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug "
    "uk ur uz ve vi vo wa wo xh yi yo za zh zu".split()
)  # all 184 two-letter codes
APOSTROPHES = frozenset("'\u2019")  # ' and ’, both written as '
SPACED_CATEGORIES = frozenset({"Sm", "Sc", "Sk", "Cc"})  # with every P*: become a space
SCRIPT_JOINERS = frozenset("\u200c\u200d")  # ZWNJ, ZWJ: part of Persian and Indic spelling

MIN_LIMIT_SECONDS, MAX_CLIP_SECONDS = 5.0, 30.0  # choose_max_seconds bounds
N_FFT, HOP_LENGTH, N_MELS = 400, 160, 80  # 25 ms window, 10 ms hop, as Whisper
LOG_MEL_RANGE = 8.0  # log10 units kept below each clip's peak (80 dB)

SPEED_PROB, SPEED_RANGE = 0.5, (0.9, 1.1)
NOISE_PROB, SNR_RANGE_DB, PINK_PROB = 0.5, (10.0, 40.0), 0.5
GAIN_PROB, GAIN_RANGE_DB = 0.5, (-6.0, 6.0)
TELEPHONE_PROB, TELEPHONE_BAND_HZ, TELEPHONE_ORDER = 0.2, (300.0, 3400.0), 4
SPEED_DENOMINATOR = 100  # speed factors become p/q with q <= 100 for resample_poly: 1% steps
N_FREQ_MASKS, FREQ_MASK_BINS = 2, 10
N_TIME_MASKS, TIME_MASK_FRACTION = 2, 0.05

VAD_FRAME_SECONDS = 0.03
NOISE_PERCENTILE, FLOOR_MARGIN_DB, PEAK_RANGE_DB = 10, 10.0, 50.0
SILENCE_DBFS = -60.0  # frames quieter than this are never speech
VAD_PAD_SECONDS = 0.1

NORMALISATION_RULES = (
    "Transcripts are normalised before training and scoring: Unicode NFC; lowercase (Python str.lower, "
    "which leaves caseless scripts unchanged); every punctuation character (Unicode category P*) and every "
    "math, currency or modifier symbol (Sm, Sc, Sk) becomes a space, except an apostrophe (' or \u2019, "
    "written as ') between two letters, as in l'homme or don't; a hyphen between two letters also becomes "
    "a space (peut-\u00eatre -> peut \u00eatre); digits are kept as written; other symbols such as emoji "
    "(So) and private-use or unassigned characters are kept but counted and reported as outside every "
    "known script; runs of whitespace become one space and the ends are stripped."
)


@dataclass(frozen=True)
class Utterance:
    """One audio file and its normalised transcript."""

    origin: str  # "manifest.csv line 7" or the path
    path: Path
    text: str  # normalised with normalise_text
    language: str | None  # ISO 639-1
    speaker: str | None


def _is_letter(char: str) -> bool:
    return unicodedata.category(char)[0] in "LM"  # marks too: Devanagari vowel signs are part of words


def normalise_text(text: str) -> str:
    """Apply NORMALISATION_RULES."""
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    out = []
    for i, char in enumerate(text):
        if char in APOSTROPHES:
            inside_word = 0 < i < len(text) - 1 and _is_letter(text[i - 1]) and _is_letter(text[i + 1])
            out.append("'" if inside_word else " ")
        elif unicodedata.category(char)[0] == "P" or unicodedata.category(char) in SPACED_CATEGORIES:
            out.append(" ")
        else:
            out.append(char)
    return " ".join("".join(out).split())


def unknown_script_characters(text: str) -> list[str]:
    """Every occurrence, in order, of a character that is not a letter, mark, digit, space or apostrophe."""
    return [
        c for c in text if c not in " '" and c not in SCRIPT_JOINERS and unicodedata.category(c)[0] not in "LMN"
    ]  # Co (private use) and Cn (unassigned) fall through to here too


def read_speech_manifest(data: Path) -> tuple[list[Utterance], list[Problem], dict]:
    """Utterances, skipped rows and counts from a speech manifest (see the module docstring).

    info = {"rows", "manifest", "languages", "duplicates", "unknown_characters": {char: count}}.
    Raises InputError when DATA or a required column is missing.
    """
    csv_path = _find_manifest(Path(data))
    reader, columns = open_manifest(csv_path)
    path_column = "file_name" if "file_name" in columns and "path" not in columns else "path"
    text_column = PATH_COLUMNS[path_column]
    for column in (path_column, text_column):
        if column not in columns:
            raise InputError(
                f"{csv_path}: no '{column}' column (columns found: {', '.join(columns) or 'none'}); "
                f"expected '{path_column}', '{text_column}' and optionally 'language', 'speaker'"
            )
    utterances: list[Utterance] = []
    problems: list[Problem] = []
    seen: set[tuple[Path, str]] = set()
    n_rows = duplicates = 0
    for raw_row in manifest_rows(reader, csv_path):
        n_rows += 1
        row = {(k or "").strip(): v.strip() for k, v in raw_row.items() if isinstance(v, str)}
        origin = f"{csv_path.name} line {reader.line_num}"  # the header is line 1
        text = normalise_text(row.get(text_column, ""))
        language = row.get("language", "").lower() or None
        path = (csv_path.parent / row.get(path_column, "")).resolve()  # ../audio is allowed
        reason = _row_problem(row.get(path_column, ""), path, row.get(text_column, ""), text, language)
        if reason:
            problems.append(Problem(origin, reason))
        elif (path, text) in seen:
            duplicates += 1
        else:
            seen.add((path, text))
            utterances.append(Utterance(origin, path, text, language, row.get("speaker") or None))
    info = {
        "rows": n_rows,
        "manifest": str(csv_path),
        "languages": sorted({u.language for u in utterances if u.language}),
        "duplicates": duplicates,
        "unknown_characters": dict(Counter(c for u in utterances for c in unknown_script_characters(u.text))),
    }
    return utterances, problems, info


def _find_manifest(data: Path) -> Path:
    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    if data.is_file() and data.suffix.lower() == ".csv":
        return data
    for name in (MANIFEST_CSV, METADATA_CSV):
        if data.is_dir() and (data / name).is_file():
            return data / name
    raise InputError(
        f"{data}: expected a CSV with 'path' and 'text' columns, or a folder holding {MANIFEST_CSV} "
        f"or {METADATA_CSV} ('file_name' and 'transcription' columns)"
    )


def _row_problem(raw_path: str, path: Path, raw_text: str, text: str, language: str | None) -> str | None:
    """Why a manifest row cannot be used, or None."""
    if not raw_path:
        return "empty audio path"
    if language is not None and language not in ISO_639_1:
        return f"language {language!r} is not an ISO 639-1 code (two letters, e.g. 'en', 'fr', 'zh')"
    if not text:
        return f"empty transcript after normalisation ({raw_text!r})" if raw_text else "empty transcript"
    if not path.is_file():
        return f"audio file not found: {raw_path}"
    if path.stat().st_size == 0:
        return f"empty audio file (0 bytes): {raw_path}"
    return None


def load_speech(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """The whole file as float32 mono (n_samples,) at SAMPLE_RATE. Raises DecodeError with the reason."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DecodeError(f"cannot read: {err.strerror}") from err
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with soundfile.SoundFile(str(path)) as file:
            rate, promised = file.samplerate, file.frames
            if max_seconds is not None and promised / rate > max_seconds:  # refuse before decoding an hour
                raise DecodeError(
                    f"{promised / rate:.1f} s long, longer than the {max_seconds:g} s the model takes; cut it "
                    "into shorter clips or use `transcribe`, which cuts long recordings at silences"
                )
            audio = file.read(dtype="float32", always_2d=True)  # (T, channels)
    except (RuntimeError, soundfile.LibsndfileError, TypeError) as err:
        raise DecodeError(f"not a readable audio file: {err}") from err
    # libsndfile quietly shortens a WAV whose data chunk runs past the end of the file: read the header.
    promised = max(promised, _wav_header_frames(path) or 0)
    if len(audio) < promised:
        raise DecodeError(f"truncated: header promises {promised} frames, file holds {len(audio)}")
    if len(audio) == 0:
        raise DecodeError("audio file has no samples")
    if not np.isfinite(audio).all():
        raise DecodeError("audio contains NaN or infinite samples")
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, rate).limit_denominator(1000)
        mono = resample_poly(mono, ratio.numerator, ratio.denominator)
    return mono.astype(np.float32)


def _wav_header_frames(path: Path) -> int | None:
    """Frames the data chunk of a RIFF/WAVE header declares; None for other files or an unset size."""
    with path.open("rb") as file:
        head = file.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = 0
        while len(chunk := file.read(8)) == 8:
            name, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            padding = size % 2  # chunks are padded to even sizes
            if name == b"data":  # streaming writers leave 0 or 0xFFFFFFFF here
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            if name == b"fmt ":
                block_align = int.from_bytes(file.read(16)[12:14], "little")  # bytes per frame
                size -= 16
            file.seek(size + padding, 1)
    return None


def load_utterances(
    utterances: list[Utterance], max_seconds: float | None
) -> tuple[list[np.ndarray], list[Utterance], list[Problem]]:
    """Decode in order: waveforms and the utterances they belong to, and a Problem per failure."""
    waves, kept, problems = [], [], []
    for utterance in utterances:
        try:
            waves.append(load_speech(utterance.path, max_seconds))
            kept.append(utterance)
        except DecodeError as err:
            problems.append(Problem(f"{utterance.origin} ({utterance.path})", str(err)))
    return waves, kept, problems


def choose_max_seconds(durations: list[float]) -> float:
    """Longest clip accepted, seconds: max(2 x 99th percentile, 5 s), at most 30 s, rounded up to 0.5 s."""
    if not durations:
        return MAX_CLIP_SECONDS
    limit = max(2 * float(np.percentile(durations, 99)), MIN_LIMIT_SECONDS)
    return math.ceil(min(limit, MAX_CLIP_SECONDS) * 2) / 2


@dataclass(frozen=True)
class Alphabet:
    """Output characters of a CTC model: id 0 is the blank, ids 1.. are `characters`."""

    characters: tuple[str, ...]
    languages: tuple[str, ...] = ()
    blank: ClassVar[int] = 0

    @property
    def vocab_size(self) -> int:
        return len(self.characters) + 1

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(self.characters)}

    def encode(self, text: str) -> list[int]:
        """Ids of the characters; characters outside the alphabet are dropped (the caller counts them)."""
        return [self._ids[c] for c in text if c in self._ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Characters of the ids, blanks skipped (CTC collapsing of repeats is the decoder's job)."""
        return "".join(self.characters[int(i) - 1] for i in ids if int(i) != self.blank)

    def to_json(self) -> dict:
        return {"characters": list(self.characters), "languages": list(self.languages)}

    @classmethod
    def from_json(cls, config: dict) -> Alphabet:
        return cls(tuple(config["characters"]), tuple(config["languages"]))

    @classmethod
    def fit(cls, texts: Iterable[str], languages: Iterable[str | None]) -> Alphabet:
        characters = set(" ").union(*map(set, texts))
        return cls(tuple(sorted(characters)), tuple(sorted({lang for lang in languages if lang})))


def speed_perturb(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (pitch moves too, as in Kaldi): (T,) -> (about T / factor,)."""
    ratio = Fraction(factor).limit_denominator(SPEED_DENOMINATOR)
    return resample_poly(wave, ratio.denominator, ratio.numerator).astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator, pink: bool = False) -> np.ndarray:
    """Add white (or pink, 1/f power) noise `snr_db` dB below the speech RMS; silence is returned as is."""
    speech_rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if len(wave) else 0.0
    if speech_rms == 0:
        return wave.astype(np.float32)
    noise = rng.standard_normal(len(wave))
    if pink:
        spectrum = np.fft.rfft(noise)
        spectrum[0] = 0
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))  # amplitude 1/sqrt(f): power 1/f
        noise = np.fft.irfft(spectrum, n=len(wave))
    noise *= speech_rms / max(float(np.sqrt(np.mean(noise**2))), 1e-12) / 10 ** (snr_db / 20)
    return (wave + noise).astype(np.float32)


def random_gain(wave: np.ndarray, db: float) -> np.ndarray:
    """Scale by `db` decibels."""
    return (wave * 10 ** (db / 20)).astype(np.float32)


def telephone_band(wave: np.ndarray) -> np.ndarray:
    """Through 8 kHz sampling and a 300-3400 Hz band-pass, as on a phone line; same length."""
    from scipy.signal import butter, sosfilt  # on first use, as resample_poly

    wide = resample_poly(resample_poly(wave, 1, 2), 2, 1)[: len(wave)]
    sos = butter(TELEPHONE_ORDER, TELEPHONE_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, wide).astype(np.float32)


def augment_waveform(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Speed, noise, gain and telephone band, each with its probability; only speed changes the length."""
    if rng.random() < SPEED_PROB:
        wave = speed_perturb(wave, rng.uniform(*SPEED_RANGE))
    if rng.random() < NOISE_PROB:
        snr_db, pink = rng.uniform(*SNR_RANGE_DB), rng.random() < PINK_PROB
        wave = add_noise(wave, snr_db, rng, pink)
    if rng.random() < GAIN_PROB:
        wave = random_gain(wave, rng.uniform(*GAIN_RANGE_DB))
    if rng.random() < TELEPHONE_PROB:
        wave = telephone_band(wave)
    return wave.astype(np.float32)


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment on log-mel (B, n_mels, T) with valid lengths (B,): frequency and time masks filled
    with each clip's mean over its valid frames. Returns a new tensor."""
    b, n_mels, n_frames = features.shape
    lengths = lengths.cpu()
    valid = torch.arange(n_frames)[None] < lengths[:, None]  # (B, T)
    total = features.masked_fill(~valid[:, None].to(features.device), 0).sum((1, 2))
    mean = total / (lengths.clamp(min=1) * n_mels).to(features)  # (B,), over valid frames
    mask = torch.zeros(b, n_mels, n_frames, dtype=torch.bool)
    for _ in range(N_FREQ_MASKS):
        width = torch.randint(0, FREQ_MASK_BINS + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (n_mels - width + 1)).long()
        mask |= _span_mask(start, width, n_mels)[:, :, None]
    max_width = (lengths * TIME_MASK_FRACTION).long()
    for _ in range(N_TIME_MASKS):
        width = (torch.rand(b, generator=generator) * (max_width + 1)).long()
        start = (torch.rand(b, generator=generator) * (lengths - width + 1)).long()
        mask |= _span_mask(start, width, n_frames)[:, None, :]
    mask &= valid[:, None]  # padding frames keep their value
    return torch.where(mask.to(features.device), mean[:, None, None], features)


def _span_mask(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) True on [start, start + width) of each row."""
    index = torch.arange(size)[None]
    return (index >= start[:, None]) & (index < (start + width)[:, None])


def log_mel_batch(waves: list[np.ndarray], n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz waveforms -> Whisper-normalised log-mel float32 (B, n_mels, T) and frame lengths int64 (B,).

    Padding frames hold each clip's floor value (its peak - 8, normalised), the same as silence.
    """
    n_samples = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    longest = max(int(n_samples.max()), 1)
    batch = torch.zeros(len(waves), longest)
    for i, wave in enumerate(waves):
        batch[i, : len(wave)].numpy()[:] = wave  # through numpy: a packed clip is a read-only mapped view
    # Zeros, not a reflection, beyond each end: a clip's frames are the same in any batch.
    window = torch.hann_window(N_FFT)
    spec = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="constant", return_complex=True)
    mel = mel_filterbank(N_FFT, n_mels, SAMPLE_RATE).T @ spec.abs() ** 2  # (B, n_freq, T) -> (B, n_mels, T)
    log = mel.clamp(min=1e-10).log10()
    lengths = n_samples // HOP_LENGTH + 1
    valid = (torch.arange(log.shape[-1])[None] < lengths[:, None])[:, None]  # (B, 1, T)
    floor = log.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True) - LOG_MEL_RANGE  # (B, 1, 1)
    log = torch.where(valid, torch.maximum(log, floor), floor)
    return (log + 4) / 4, lengths


def speech_segments(wave: np.ndarray, max_seconds: float, min_silence: float = 0.3) -> list[tuple[int, int]]:
    """Sample (start, end) chunks of speech, each at most `max_seconds`, cut at silences; [] for silence.

    Energy VAD on 30 ms frames: threshold max(noise floor + 10 dB, peak - 50 dB, -60 dBFS), lowered to
    peak - 10 dB when the whole recording lies within 20 dB (no pauses). Pauses shorter than
    `min_silence` are part of speech; chunks too long are split at their longest pause, and a stretch
    with no pause is cut every `max_seconds`. Chunks carry 0.1 s of padding each side.
    """
    frame = round(VAD_FRAME_SECONDS * SAMPLE_RATE)
    n_frames = -(-len(wave) // frame)
    if n_frames == 0:
        return []
    framed = np.zeros(n_frames * frame)
    framed[: len(wave)] = wave
    db = 10 * np.log10(np.mean(framed.reshape(n_frames, frame) ** 2, axis=1) + 1e-12)  # (frames,)
    peak, noise = float(db.max()), float(np.percentile(db, NOISE_PERCENTILE))
    threshold = max(min(noise + FLOOR_MARGIN_DB, peak - FLOOR_MARGIN_DB), peak - PEAK_RANGE_DB, SILENCE_DBFS)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (db > threshold).astype(np.int8), [0]])))
    regions: list[list[int]] = []  # [start, end) frames of speech, short pauses included
    for start, end in edges.reshape(-1, 2).tolist():
        if regions and start - regions[-1][1] < round(min_silence / VAD_FRAME_SECONDS):
            regions[-1][1] = end
        else:
            regions.append([start, end])
    pad = round(VAD_PAD_SECONDS * SAMPLE_RATE)
    spans = [(max(0, s * frame - pad), min(len(wave), e * frame + pad)) for s, e in regions]
    return _split_at_silences(spans, round(max_seconds * SAMPLE_RATE)) if spans else []


def _split_at_silences(spans: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Chunks of at most `limit` samples covering the speech spans, longest silence cut first."""
    chunks: list[tuple[int, int]] = []
    stack = [spans]  # an explicit stack: an hour of speech has thousands of pauses
    while stack:
        group = stack.pop()
        start, end = group[0][0], group[-1][1]
        if end - start <= limit:
            chunks.append((start, end))
        elif len(group) == 1:  # no pause long enough: cut hard
            chunks += [(s, min(s + limit, end)) for s in range(start, end, limit)]
        else:
            cut = 1 + int(np.argmax([b[0] - a[1] for a, b in zip(group, group[1:], strict=False)]))
            stack += [group[cut:], group[:cut]]  # the earlier half is popped first
    return chunks
