"""A classical speech recogniser as the transcribe task's baseline: CMU PocketSphinx, English only.

PocketSphinx 5 ships a US-English acoustic model (continuous HMMs trained on 16 kHz wideband speech),
a pronunciation dictionary and a general trigram language model; nothing is trained on our data. It is
what a learned model must beat on English. On 8 kHz telephone recordings (the Asterisk prompts of the
speech demo, resampled to 16 kHz) it loses much: the model expects energy up to ~6.8 kHz.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000  # Hz, what the default en-us model expects
MODEL_NAME = "pocketsphinx (CMU Sphinx, en-us)"
INSTALL_HINT = "pip install pocketsphinx==5.1.1"
SILENCE_DBFS = -60.0  # RMS below this is silence: the decoder would otherwise hallucinate a word ("dog")


class PocketsphinxBaseline:
    """Transcribe 16 kHz English speech with PocketSphinx's default model; one decoder, reused."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(loglevel="FATAL")  # the default config; FATAL keeps its log off stderr

    @staticmethod
    def available() -> bool:
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            return False
        return True

    def transcribe(self, wave_16k: np.ndarray) -> str:
        """Lower-case words for a float waveform (T,) in [-1, 1] at 16 kHz; "" when nothing is recognised."""
        wave = np.asarray(wave_16k, dtype=np.float64).reshape(-1)
        if wave.size == 0 or 20 * np.log10(np.sqrt(np.mean(wave**2)) + 1e-12) < SILENCE_DBFS:
            return ""  # process_raw rejects an empty buffer; digital silence decodes to a random word
        pcm = (np.clip(wave, -1.0, 1.0) * 32767).astype("<i2")  # little-endian int16, as the decoder reads it
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)  # whole utterance: normalise with its own stats
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return " ".join(hypothesis.hypstr.lower().split()) if hypothesis is not None else ""


def pocketsphinx_wer(clips: list[tuple[np.ndarray, str]]) -> tuple[dict | None, str]:
    """Word and character error rates of PocketSphinx on (16 kHz waveform, reference text) pairs.

    Returns ({"model", "wer", "cer", "n"}, "") or (None, why not) when pocketsphinx is not installed or
    there is nothing to score. References are compared lower-cased, as the hypotheses are.
    """
    if not PocketsphinxBaseline.available():
        return None, f"pocketsphinx is not installed ({INSTALL_HINT})"
    if not clips:
        return None, "no clips to score"
    from torchmetrics.text import CharErrorRate, WordErrorRate

    recogniser = PocketsphinxBaseline()
    hypotheses = [recogniser.transcribe(wave) for wave, _ in clips]
    references = [" ".join(text.lower().split()) for _, text in clips]
    result = {
        "model": MODEL_NAME,
        "wer": float(WordErrorRate()(hypotheses, references)),
        "cer": float(CharErrorRate()(hypotheses, references)),
        "n": len(clips),
    }
    return result, ""
