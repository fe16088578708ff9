"""Audio front end: any wav/flac/ogg -> mono 16 kHz waveform -> log-mel spectrogram computed in torch.

torchaudio is not available on our machines, so the mel filterbank is written here (a few lines of
the standard HTK formula); resampling uses scipy's polyphase filter.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
import torch

from layerwise.data.sources import Example, Problem
from layerwise.errors import DecodeError
from layerwise.runtime import host_to

SAMPLE_RATE = 16_000  # Hz, every clip is resampled to this
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
N_MELS = 64
MIN_SECONDS, MAX_SECONDS = 0.5, 10.0  # clip length chosen from the data within these bounds
STFT_BATCH = 256
READ_MARGIN_SECONDS = 0.1  # read this much past the clip so resampling has no edge effect inside it
TIME_MASK_FRACTION = 0.15  # SpecAugment: mask up to 15% of frames ...
FREQ_MASK_BANDS = 8  # ... and up to 8 mel bands


def resample_poly(wave: np.ndarray, up: int, down: int) -> np.ndarray:
    """scipy's polyphase resampling, imported on first use: scipy.signal is 0.9 s of every command's start."""
    from scipy.signal import resample_poly as scipy_resample_poly

    return scipy_resample_poly(wave, up, down)


@dataclass(frozen=True)
class AudioPreprocessing:
    seconds: float
    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    n_mels: int = N_MELS
    mean: float = 0.0
    std: float = 1.0

    @property
    def n_samples(self) -> int:
        return round(self.seconds * self.sample_rate)

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length + 1

    def to_json(self) -> dict:
        return {"modality": "audio", **asdict(self)}


def choose_seconds(paths: list[Path], sample: int = 256) -> float:
    """Clip length: the 95th percentile of durations in a sample, clamped, rounded to 0.1 s."""
    durations = []
    for path in paths[:: max(1, len(paths) // sample)][:sample]:
        try:
            info = soundfile.info(str(path))
            durations.append(info.frames / info.samplerate)
        except (RuntimeError, soundfile.LibsndfileError):
            continue  # reported by decode() later, by name
    seconds = float(np.percentile(durations, 95)) if durations else 1.0
    return round(min(MAX_SECONDS, max(MIN_SECONDS, seconds)), 1)


def load_waveform(content: Path | bytes, prep: AudioPreprocessing) -> np.ndarray:
    """Read (a file, or its bytes), mix to mono, resample, and pad/crop to float32 (n_samples,). Raises
    DecodeError."""
    try:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
    except OSError as err:  # deleted or unreadable since discovery: skip it, like a corrupt file
        raise DecodeError(f"cannot read: {err.strerror}") from err
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with soundfile.SoundFile(io.BytesIO(content) if isinstance(content, bytes) else str(content)) as file:
            rate = file.samplerate
            # Only the start of the file is kept: do not read (and resample) an hour-long recording.
            n_read = math.ceil((prep.seconds + READ_MARGIN_SECONDS) * rate)
            audio = file.read(n_read, dtype="float32", always_2d=True)  # (T, channels)
    except (RuntimeError, soundfile.LibsndfileError, TypeError) as err:
        raise DecodeError(f"not a readable audio file: {err}") from err
    if audio.shape[0] == 0:
        raise DecodeError("audio file has no samples")
    mono = audio.mean(axis=1)
    if rate != prep.sample_rate:
        ratio = Fraction(prep.sample_rate, rate).limit_denominator(1000)
        mono = resample_poly(mono, ratio.numerator, ratio.denominator).astype(np.float32)
    out = np.zeros(prep.n_samples, dtype=np.float32)
    n = min(len(mono), prep.n_samples)
    out[:n] = mono[:n]
    if not np.isfinite(out).all():
        raise DecodeError("audio contains NaN or infinite samples")
    return out


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK mel filters, (n_fft // 2 + 1, n_mels)."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (mel / 2595.0) - 1.0)

    fft_hz = np.fft.rfftfreq(n_fft, 1 / sample_rate)  # centre of each STFT bin, (n_fft // 2 + 1,)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None] - lower) / (center - lower)
    falling = (upper - fft_hz[None]) / (upper - center)
    return torch.from_numpy(np.maximum(0, np.minimum(rising, falling)).T.astype(np.float32))


def log_mel(waveforms: torch.Tensor, prep: AudioPreprocessing) -> torch.Tensor:
    """float (B, n_samples) -> log-mel float (B, 1, n_mels, n_frames)."""
    window = torch.hann_window(prep.n_fft)
    spec = torch.stft(waveforms, prep.n_fft, prep.hop_length, window=window, return_complex=True)
    power = spec.abs() ** 2  # (B, n_fft//2+1, frames)
    mels = power.transpose(1, 2) @ mel_filterbank(prep.n_fft, prep.n_mels, prep.sample_rate)  # (B, frames, mels)
    return torch.log(mels + 1e-6).transpose(1, 2).unsqueeze(1)


class AudioFrontEnd:
    """Audio clips -> log-mel spectrograms cached as float16 (N, 1, n_mels, n_frames)."""

    modality = "audio"

    def __init__(self, prep: AudioPreprocessing) -> None:
        self.prep = prep

    @classmethod
    def fit(cls, examples: list[Example]) -> AudioFrontEnd:
        return cls(AudioPreprocessing(seconds=choose_seconds([ex.path for ex in examples])))

    @classmethod
    def from_json(cls, config: dict) -> AudioFrontEnd:
        return cls(AudioPreprocessing(**{k: v for k, v in config.items() if k != "modality"}))

    def to_json(self) -> dict:
        return self.prep.to_json()

    @property
    def model_inputs(self) -> dict:
        return {"in_channels": 1}

    def decode_all(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]:
        """Decode every example; returns float16 log-mel (N_ok, 1, n_mels, n_frames), kept indices, problems."""
        waves, kept, problems = self.decode_raw(examples)
        return self.encode_raw(waves), kept, problems

    def decode_raw(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]:
        """Waveforms before the spectrogram: float32 (N_ok, n_samples) at prep.sample_rate, kept, problems."""
        # Filled in place rather than stacked from a list: a large set of long clips is not held twice.
        waves = np.empty((len(examples), self.prep.n_samples), np.float32)
        kept, problems = [], []
        for i, example in enumerate(examples):
            try:
                waves[len(kept)] = load_waveform(example.content, self.prep)
                kept.append(i)
            except DecodeError as err:
                problems.append(Problem(example.origin, str(err)))
        return torch.from_numpy(waves[: len(kept)]), kept, problems

    def encode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """float (N, n_samples) waveforms -> float16 log-mel (N, 1, n_mels, n_frames), as cached."""
        specs = [log_mel(raw[i : i + STFT_BATCH].float(), self.prep).half() for i in range(0, len(raw), STFT_BATCH)]
        empty = torch.zeros((0, 1, self.prep.n_mels, self.prep.n_frames), dtype=torch.float16)
        return torch.cat(specs) if specs else empty

    def fit_statistics(self, train_inputs: torch.Tensor) -> None:
        sample = train_inputs[:: max(1, len(train_inputs) // 2000)].float()
        self.prep = replace(self.prep, mean=float(sample.mean()), std=max(float(sample.std()), 1e-3))

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() - self.prep.mean) / self.prep.std

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random time shift plus SpecAugment time and frequency masks, per sample."""
        b, _, n_mels, n_frames = batch.shape
        floor = batch.amin(dim=(1, 2, 3), keepdim=True)  # "silence" value used for padding and masks
        max_shift = max(1, n_frames // 10)
        # Drawn on the CPU's seeded generator wherever the batch is (a batch held on a GPU gets the same draws).
        device = batch.device
        shift = host_to(torch.randint(-max_shift, max_shift + 1, (b,), generator=generator), device)
        frame_index = torch.arange(n_frames, device=device)[None] - shift[:, None]  # (B, frames)
        valid = (frame_index >= 0) & (frame_index < n_frames)
        gathered = batch.gather(3, frame_index.clamp(0, n_frames - 1)[:, None, None, :].expand(b, 1, n_mels, -1))
        out = torch.where(valid[:, None, None, :], gathered, floor)
        t_width = torch.randint(0, max(1, math.ceil(TIME_MASK_FRACTION * n_frames)), (b,), generator=generator)
        t_start = (torch.rand(b, generator=generator) * (n_frames - t_width)).long()
        f_width = torch.randint(0, FREQ_MASK_BANDS + 1, (b,), generator=generator)
        f_start = (torch.rand(b, generator=generator) * (n_mels - f_width)).long()
        t_width, t_start, f_width, f_start = (host_to(v, device) for v in (t_width, t_start, f_width, f_start))
        frames, bands = torch.arange(n_frames, device=device)[None], torch.arange(n_mels, device=device)[None]
        t_mask = (frames >= t_start[:, None]) & (frames < (t_start + t_width)[:, None])  # (B, frames)
        f_mask = (bands >= f_start[:, None]) & (bands < (f_start + f_width)[:, None])  # (B, mels)
        mask = t_mask[:, None, None, :] | f_mask[:, None, :, None]
        return torch.where(mask, floor, out)

    def baseline_features(self, inputs: torch.Tensor) -> np.ndarray:
        """Per-band mean and standard deviation over time: (N, 2 * n_mels)."""
        spec = inputs.float().squeeze(1)
        return torch.cat([spec.mean(dim=2), spec.std(dim=2)], dim=1).numpy()

    def preview(self, item: torch.Tensor) -> bytes:
        """The spectrogram (low frequencies at the bottom) as a PNG."""
        from matplotlib import colormaps
        from PIL import Image

        spec = item.float()[0].flip(0).numpy()
        scaled = (spec - spec.min()) / max(float(spec.max() - spec.min()), 1e-6)
        rgb = (colormaps["magma"](scaled)[..., :3] * 255).astype(np.uint8)
        pil = Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2))
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        return buffer.getvalue()
