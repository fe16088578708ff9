import base64
import re

import jiwer
import pytest

from layerwise.report.html import PNG_SIGNATURE
from layerwise.report.transcribe_sections import align_words, transcribe_sections

HISTORY = [
    {"epoch": 1, "train_loss": 3.1, "val_loss": 2.9, "val_wer": 0.9, "val_cer": 0.5},
    {"epoch": 2, "train_loss": 2.0, "val_loss": 2.1},  # an epoch without WER/CER
    {"epoch": 3, "train_loss": 1.2, "val_loss": 1.4, "val_wer": 0.4, "val_cer": 0.2},
]
PER_LANGUAGE = {
    "en": {"wer": 0.12, "cer": 0.05, "language_accuracy": 0.98, "n": 120},
    "de": {"wer": 0.2, "cer": 0.08, "language_accuracy": 0.95, "n": 80},
    "xx": {"wer": 0.5, "cer": None, "language_accuracy": 0.5, "n": 3},
    "all": {"wer": 0.17, "cer": 0.07, "language_accuracy": 0.96, "n": 203},
}
CONFUSION = {"labels": ["de", "en"], "matrix": [[76, 4], [2, 118]]}
WORST = [
    {"origin": "clips/a<1>.wav", "reference": "the <script>alert(1)</script> cat", "hypothesis": "a cat sat",
     "language": "en", "cer": 0.8},
]  # fmt: skip


def _counts(pairs):
    return {op: sum(p[0] == op for p in pairs) for op in ("equal", "substitute", "insert", "delete")}


@pytest.mark.parametrize(
    ("reference", "hypothesis"),
    [
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("the cat sat on mat", "a cat sat on the mat now"),
        ("one two three four five", "one three four six"),
        ("hello world", ""),
        ("", "spurious words"),
        ("ein kleiner Hund  bellt", "ein Hund bellte laut"),
    ],
)
def test_align_words_matches_jiwer_counts(reference, hypothesis):
    pairs = align_words(reference, hypothesis)
    truth = jiwer.process_words(reference, hypothesis)
    counts = _counts(pairs)
    assert (counts["substitute"], counts["insert"], counts["delete"], counts["equal"]) == (
        truth.substitutions, truth.insertions, truth.deletions, truth.hits)  # fmt: skip
    # the alignment reads back as the two word sequences, in order
    assert [r for _, r, _ in pairs if r is not None] == reference.split()
    assert [h for _, _, h in pairs if h is not None] == hypothesis.split()
    for op, r, h in pairs:
        assert (r is None) == (op == "insert") and (h is None) == (op == "delete")
        assert (op == "equal") == (r == h)


def test_align_words_marks_each_kind_of_edit():
    assert align_words("the cat sat on mat", "a cat sat on the mat") == [
        ("substitute", "the", "a"), ("equal", "cat", "cat"), ("equal", "sat", "sat"), ("equal", "on", "on"),
        ("insert", None, "the"), ("equal", "mat", "mat"),
    ]  # fmt: skip
    assert align_words("a b c", "a c") == [("equal", "a", "a"), ("delete", "b", None), ("equal", "c", "c")]


def test_all_sections_in_order():
    baseline = {"model": "pocketsphinx (CMU Sphinx, en-us)", "wer": 0.4, "cer": 0.2, "n": 50, "network_wer": 0.1}
    sections = transcribe_sections(HISTORY, PER_LANGUAGE, WORST, CONFUSION, baseline)
    assert [heading for heading, _ in sections] == [
        "Error rates during training", "Per-language error rates", "Classical baseline (English)",
        "Language identification", "Worst transcripts, aligned",
    ]  # fmt: skip
    body = dict(sections)
    table = body["Per-language error rates"]
    assert "German (de)" in table and "English (en)" in table and "xx (xx)" in table
    assert table.index("German") < table.index("all") and 'class="total"' in table and "12.0%" in table
    assert "40.0%" in body["Classical baseline (English)"] and "10.0%" in body["Classical baseline (English)"]
    assert "30.0 points lower" in body["Classical baseline (English)"]
    assert "97.0% correct" in body["Language identification"]  # (76 + 118) / 200


def test_figures_are_real_png_data_uris():
    sections = dict(transcribe_sections(HISTORY, {}, [], CONFUSION, None))
    for heading in ("Error rates during training", "Language identification"):
        uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', sections[heading])
        assert len(uris) == 1
        assert base64.b64decode(uris[0]).startswith(PNG_SIGNATURE)


def test_user_text_is_escaped_and_edits_marked():
    sections = dict(transcribe_sections([], {}, WORST, None, None))
    assert list(sections) == ["Worst transcripts, aligned"]
    body = sections["Worst transcripts, aligned"]
    assert "<script>" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "clips/a&lt;1&gt;.wav" in body
    truth = jiwer.process_words(WORST[0]["reference"], WORST[0]["hypothesis"])
    assert body.count('class="w sub"') == truth.substitutions
    assert body.count('class="w ins"') == truth.insertions
    assert body.count('class="w del"') == truth.deletions
    assert "substitution" in body and "insertion" in body and "deletion" in body  # the legend


def test_empty_inputs_skip_sections():
    assert transcribe_sections([], {}, [], None, None) == []
    no_rates = [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.9}]
    assert transcribe_sections(no_rates, {}, [], None, None) == []


def test_baseline_without_english_clips_shows_its_note():
    baseline = {"model": "pocketsphinx <en-us>", "wer": None, "note": "no English clips"}
    sections = dict(transcribe_sections([], {}, [], None, baseline))
    assert "no English clips" in sections["Classical baseline (English)"]
    assert "pocketsphinx &lt;en-us&gt;" in sections["Classical baseline (English)"]
