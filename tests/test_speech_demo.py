import csv
import time
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile

from layerwise.data.speech_demo import (
    SPEECH_LANGUAGES,
    _plan,
    normalise_text,
    number_text,
    prepare_speech_demo,
)

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz").is_file(),
    reason="needs espeak-ng and asterisk-core-sounds-* (scripts/setup.sh)",
)
CLIPS = 6
HUMAN = 3


def rows(manifest: Path) -> list[dict]:
    with open(manifest, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["path", "text", "language", "speaker"]
        return list(reader)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("speech-cache")
    return prepare_speech_demo(cache, clips_per_language=CLIPS, human_per_language=HUMAN)


def test_every_row_is_16k_audio_of_its_text(demo):
    for manifest in (demo.train_manifest, demo.synthetic_test_manifest, demo.human_test_manifest):
        for row in rows(manifest):
            wave, rate = soundfile.read(manifest.parent / row["path"], dtype="float32")
            assert rate == 16_000 and wave.ndim == 1, row
            assert len(wave) > 0.2 * rate and abs(wave).max() > 0.05, row  # not silence
            assert row["text"] and normalise_text(row["text"]) == row["text"], row


def test_languages_and_counts(demo):
    train, test, human = (
        rows(m) for m in (demo.train_manifest, demo.synthetic_test_manifest, demo.human_test_manifest)
    )
    assert {r["language"] for r in train} == {r["language"] for r in test} == set(SPEECH_LANGUAGES)
    assert len(train) + len(test) == CLIPS * len(SPEECH_LANGUAGES)
    per_language = defaultdict(int)
    for row in human:
        per_language[row["language"]] += 1
        assert row["speaker"].startswith("asterisk:")
    assert per_language == {"en": HUMAN, "es": HUMAN, "fr": HUMAN, "it": HUMAN}  # none for German
    assert "German" in demo.info["notes"]["de"]
    assert demo.info["counts"]["human_test"]["de"] == 0


def test_test_split_holds_out_sentences_and_voices(demo):
    train, test = rows(demo.train_manifest), rows(demo.synthetic_test_manifest)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert not {r["speaker"] for r in train} & {r["speaker"] for r in test}
    for language in SPEECH_LANGUAGES:
        voices = demo.info["voices"][language]
        assert voices["train"] and voices["test"] and not set(voices["train"]) & set(voices["test"])


def test_held_out_at_full_size():
    # The split at the demo's size, planned but not rendered: a handful of rendered clips proves little.
    clips, info = _plan(300, seed=0)
    for language in SPEECH_LANGUAGES:
        train = [c for c in clips if c.language == language and c.path.startswith("audio/train/")]
        test = [c for c in clips if c.language == language and c.path.startswith("audio/synthetic_test/")]
        assert len(train) == 255 and len(test) == 45
        assert not {c.text for c in train} & {c.text for c in test}
        # no held-out variant is heard in training, in any accent of any language
        variants = {c.speaker.split("+")[-1] for c in train if c.engine == "espeak-ng"}
        assert not variants & set(info["held_out_variants"])
        assert not {c.speaker for c in train} & {c.speaker for c in test}
    english = {c.speaker for c in clips if c.language == "en"}
    assert any(s.startswith("flite:") for s in english)
    assert any(s.startswith("en-gb-scotland+") for s in english)


def test_second_call_reuses_the_cache(demo):
    first = demo.train_manifest.stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare_speech_demo(demo.train_manifest.parent.parent, clips_per_language=CLIPS, human_per_language=HUMAN)
    assert time.perf_counter() - start < 2.0
    assert again == demo and again.train_manifest.stat().st_mtime_ns == first


def test_normalise_text():
    assert normalise_text("Please try again...") == "please try again"
    assert normalise_text("un moment s’il-vous-plaît") == "un moment s'il vous plaît"
    assert normalise_text("dollar [$]") == "dollar"
    assert normalise_text("[ascending tones]") is None
    assert normalise_text("Press 1 to mute") is None  # how "1" is read is unknown
    assert normalise_text("“Pour quitter, appuyez.”") == "pour quitter appuyez"


def test_numbers_are_written_as_words():
    import random

    rng = random.Random(0)
    for language in SPEECH_LANGUAGES:
        texts = [number_text(language, rng) for _ in range(20)]
        assert all(t == normalise_text(t) for t in texts)
    pytest.importorskip("num2words")
    assert "quatre vingt" in " ".join(number_text("fr", random.Random(i)) for i in range(400))
