from pathlib import Path

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from layerwise.tasks.speech_baseline import MODEL_NAME, PocketsphinxBaseline, pocketsphinx_wer

ASTERISK_EN = Path("/usr/share/asterisk/sounds/en")
# Short prompts a general-purpose English recogniser should get on telephone audio (a human voice).
PROMPTS = {
    "auth-thankyou": "thank you",
    "privacy-thankyou": "thank you",
    "please-try-again": "please try again",
    "vm-no": "no",
}
needs_pocketsphinx = pytest.mark.skipif(not PocketsphinxBaseline.available(), reason="pip install pocketsphinx")


def load_prompt(name: str) -> np.ndarray:
    wave, rate = soundfile.read(ASTERISK_EN / f"{name}.wav", dtype="float32")
    assert rate == 8000
    return resample_poly(wave, 2, 1).astype(np.float32)  # 8 kHz -> 16 kHz


@needs_pocketsphinx
@pytest.mark.skipif(not ASTERISK_EN.is_dir(), reason="needs asterisk-core-sounds-en-wav")
def test_transcribes_human_prompts():
    clips = [(load_prompt(name), text) for name, text in PROMPTS.items()]
    result, reason = pocketsphinx_wer(clips)
    assert reason == "" and result["model"] == MODEL_NAME and result["n"] == len(PROMPTS)
    assert result["wer"] < 0.5 and result["cer"] < 0.5


@needs_pocketsphinx
def test_silence_and_empty_give_empty_text():
    recogniser = PocketsphinxBaseline()
    assert recogniser.transcribe(np.zeros(0, np.float32)) == ""
    assert recogniser.transcribe(np.zeros(16_000, np.float32)) == ""
    # nothing recognised against a two-word reference: every word and character is an error
    result, _ = pocketsphinx_wer([(np.zeros(8_000, np.float32), "Hello World")])
    assert result["wer"] == pytest.approx(1.0) and result["cer"] == pytest.approx(1.0)


def test_missing_pocketsphinx_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(PocketsphinxBaseline, "available", staticmethod(lambda: False))
    result, reason = pocketsphinx_wer([(np.zeros(16_000, np.float32), "hello")])
    assert result is None and "pip install pocketsphinx" in reason
