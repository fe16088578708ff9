"""Report sections of the transcribe (speech-to-text) task: WER/CER during training, error rates per language,
the classical baseline on English clips, language identification and the worst transcripts aligned word by word.

Rates (WER, CER, language accuracy) are fractions, shown as percentages; a WER above 100% is possible (many
insertions). Word alignment is jiwer's (`jiwer.process_words`), so the marked edits add up to the WER shown.
"""

from __future__ import annotations

import html
import math

import jiwer
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from layerwise.report.html import figure_png, png_data_uri

FIGURE_DPI = 100
MAX_ANNOTATED_LANGUAGES = 20  # above this many languages the confusion cells carry no counts
HISTORY_METRICS = (("val_wer", "WER", "#c0392b"), ("val_cer", "CER", "#0053d6"))  # keys the training loop writes
LANGUAGE_NAMES = {
    "ar": "Arabic", "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "ga": "Irish", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ka": "Georgian", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian",
    "mt": "Maltese", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip
# Edit marks for the aligned transcripts; a <style> inside the fragment, since the page's CSS lives in html.py
ALIGN_CSS = """<style>
.align { display: flex; flex-wrap: wrap; gap: .15rem .35rem; margin: .3rem 0 .9rem;
  font: .85rem ui-monospace, Menlo, Consolas, monospace; }
.align .w { display: inline-flex; flex-direction: column; padding: 0 .15rem; border-radius: 3px; }
.align .w > span { min-height: 1.3em; white-space: pre; }
.align .w.head { color: #5a6470; font-style: italic; }
.align .sub { background: #fcf3d9; } .align .sub .r { text-decoration: line-through; color: #8a6d0b; }
.align .sub .h { color: #7a5c00; font-weight: 600; }
.align .ins { background: #e7f4ea; } .align .ins .h { color: #2e8540; font-weight: 600; }
.align .del { background: #fbe9e7; } .align .del .r { color: #c0392b; font-weight: 600; }
.legend span { padding: 0 .35rem; border-radius: 3px; margin-right: .4rem; }
.legend .sub { background: #fcf3d9; } .legend .ins { background: #e7f4ea; } .legend .del { background: #fbe9e7; }
</style>"""
OP_CLASS = {"equal": "eq", "substitute": "sub", "insert": "ins", "delete": "del"}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object) -> float | None:
    """`value` as a finite float, else None (missing, non-numeric or NaN)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _percent(value: object) -> str:
    number = _number(value)
    return "—" if number is None else f"{100 * number:.1f}%"


def _plot_text(text: str) -> str:
    """`text` made safe for a matplotlib label: '$' would start mathtext."""
    return text.replace("$", r"\$")


def language_name(code: str) -> str:
    """English name of an ISO 639-1 code ("de" -> "German"); the code itself when unknown."""
    return LANGUAGE_NAMES.get(code.lower(), code) if isinstance(code, str) else str(code)


def _figure(png: bytes, alt: str, caption: str) -> str:
    """An inline image with an escaped caption."""
    return (
        f'<figure><img class="figure" src="{png_data_uri(png)}" alt="{_esc(alt)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


# ----------------------------------------------------------------------------- training curves


def error_curves_png(history: list[dict]) -> bytes | None:
    """PNG of validation WER and CER (in %) per epoch; None if no epoch recorded either."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for key, label, colour in HISTORY_METRICS:
        points = [(r.get("epoch", i + 1), _number(r.get(key))) for i, r in enumerate(history)]
        points = [(epoch, value) for epoch, value in points if value is not None]
        if points:
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, [100 * v for v in values], marker="o", markersize=3, color=colour, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error rate")
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig, dpi=FIGURE_DPI)


def _history_html(history: list[dict]) -> str | None:
    png = error_curves_png(history)
    if png is None:
        return None
    last = {key: next((r[key] for r in reversed(history) if _number(r.get(key)) is not None), None)
            for key, _, _ in HISTORY_METRICS}  # fmt: skip
    caption = (
        f"Validation word and character error rates per epoch (lower is better); last recorded: "
        f"WER {_percent(last['val_wer'])}, CER {_percent(last['val_cer'])}."
    )
    return _figure(png, "WER/CER curves", caption)


# ----------------------------------------------------------------------------- per language


def _language_row(label: str, metrics: dict, css_class: str = "") -> str:
    n = _number(metrics.get("n"))
    cls = f' class="{css_class}"' if css_class else ""
    return (
        f"<tr{cls}><td>{_esc(label)}</td><td>{'—' if n is None else f'{int(n):,}'}</td>"
        f"<td>{_percent(metrics.get('wer'))}</td><td>{_percent(metrics.get('cer'))}</td>"
        f"<td>{_percent(metrics.get('language_accuracy'))}</td></tr>"
    )


def per_language_html(per_language: dict[str, dict]) -> str:
    """Table of clips, WER, CER and language-ID accuracy per language (by English name), then the "all" row."""
    head = "<tr><th>language</th><th>clips</th><th>WER</th><th>CER</th><th>language ID accuracy</th></tr>"
    languages = sorted((code for code in per_language if code != "all"), key=lambda c: language_name(c).lower())
    rows = [head] + [_language_row(f"{language_name(c)} ({c})", per_language[c]) for c in languages]
    if "all" in per_language:
        rows.append(_language_row("all", per_language["all"], "total"))
    return '<table class="numeric">\n' + "\n".join(rows) + "\n</table>"


# ----------------------------------------------------------------------------- baseline


def baseline_html(baseline: dict) -> str:
    """A paragraph comparing the classical recogniser with the network on English clips, or its note."""
    model = _esc(baseline.get("model", "classical baseline"))
    wer = _number(baseline.get("wer"))
    if wer is None:
        note = baseline.get("note") or "it produced no result"
        return f'<p class="note">{model} was not scored: {_esc(note)}.</p>'
    n = _number(baseline.get("n"))
    clips = f"the {int(n):,} English validation clips" if n is not None else "the English validation clips"
    cer = _number(baseline.get("cer"))
    text = f"On {clips}, {model} reaches WER {_percent(wer)}" + (f" and CER {_percent(cer)}" if cer is not None else "")
    network = _number(baseline.get("network_wer"))
    if network is None:
        return f"<p>{text}.</p>"
    if math.isclose(network, wer, abs_tol=5e-4):
        verdict = "the same"
    else:
        better = "lower" if network < wer else "higher"
        verdict = f"{100 * abs(network - wer):.1f} points {better} than the baseline"
    return f"<p>{text}; the network's WER on the same clips is {_percent(network)}, {verdict}.</p>"


# ----------------------------------------------------------------------------- language identification


def language_confusion_png(labels: list[str], matrix: np.ndarray) -> bytes:
    """PNG heatmap of a (L, L) count matrix (rows true language, columns predicted), coloured by row share."""
    n = len(labels)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)  # (L, L) row-normalised
    side = min(2.5 + 0.45 * n, 12)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= MAX_ANNOTATED_LANGUAGES:
        for i, j in np.ndindex(matrix.shape):
            colour = "white" if share[i, j] > 0.5 else "#1d232a"
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    names = [_plot_text(language_name(label)) for label in labels]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted language")
    ax.set_ylabel("true language")
    fig.colorbar(image, ax=ax, label="share of the true language's clips", shrink=0.8)
    return figure_png(fig, dpi=FIGURE_DPI)


def language_confusion_html(confusion: dict) -> str:
    labels = [str(label) for label in confusion["labels"]]
    matrix = np.asarray(confusion["matrix"], dtype=np.float64).reshape(len(confusion["matrix"]), -1)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(
            f"language confusion: matrix has shape {matrix.shape}, expected {len(labels)}x{len(labels)} "
            f"(one row and column per label)"
        )
    total = matrix.sum()
    accuracy = np.trace(matrix) / total if total > 0 else None
    caption = (
        f"Spoken language identified on {int(total):,} validation clips: {_percent(accuracy)} correct. "
        "Rows are the true language, columns the predicted one; cells count clips, shaded by row share."
    )
    return _figure(language_confusion_png(labels, matrix), "language identification confusion matrix", caption)


# ----------------------------------------------------------------------------- aligned transcripts


def align_words(reference: str, hypothesis: str) -> list[tuple[str, str | None, str | None]]:
    """Word-level alignment of `hypothesis` to `reference` from jiwer's edit-distance chunks.

    Returns (op, ref_word, hyp_word) per aligned position, op in {"equal", "substitute", "insert", "delete"};
    ref_word is None for an insertion, hyp_word None for a deletion.
    """
    result = jiwer.process_words(reference, hypothesis)
    ref, hyp = result.references[0], result.hypotheses[0]
    pairs: list[tuple[str, str | None, str | None]] = []
    for chunk in result.alignments[0]:
        ref_words = ref[chunk.ref_start_idx : chunk.ref_end_idx]
        hyp_words = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        if chunk.type == "insert":
            pairs += [("insert", None, word) for word in hyp_words]
        elif chunk.type == "delete":
            pairs += [("delete", word, None) for word in ref_words]
        else:  # "equal" or "substitute": the chunk covers as many reference as hypothesis words
            pairs += [(chunk.type, r, h) for r, h in zip(ref_words, hyp_words, strict=True)]
    return pairs


def _aligned_pair(op: str, ref_word: str | None, hyp_word: str | None) -> str:
    ref_text = "−" + _esc(ref_word) if op == "delete" else _esc(ref_word or "")
    hyp_text = "+" + _esc(hyp_word) if op == "insert" else _esc(hyp_word or "")
    return f'<span class="w {OP_CLASS[op]}"><span class="r">{ref_text}</span><span class="h">{hyp_text}</span></span>'


def aligned_transcript_html(pairs: list[tuple[str, str | None, str | None]]) -> str:
    """`align_words` output drawn as reference (top) over hypothesis (bottom), one column per aligned word,
    edits marked by CSS class."""
    head = '<span class="w head"><span>reference</span><span>hypothesis</span></span>'
    return '<div class="align">' + head + "".join(_aligned_pair(*pair) for pair in pairs) + "</div>"


def worst_html(worst: list[dict]) -> str:
    legend = (
        '<p class="note legend">Top row: reference; bottom row: the network\'s transcript. '
        '<span class="sub">substitution</span><span class="ins">+insertion</span>'
        '<span class="del">−deletion</span></p>'
    )
    items = []
    for item in worst:
        counts = {"substitute": 0, "insert": 0, "delete": 0}
        aligned = align_words(item.get("reference", ""), item.get("hypothesis", ""))
        for op, _, _ in aligned:
            counts[op] = counts.get(op, 0) + 1
        language = item.get("language")
        where = f" · {_esc(language_name(language))}" if language else ""
        items.append(
            f'<div class="path">{_esc(item.get("origin", ""))}{where} · CER {_percent(item.get("cer"))} · '
            f"{counts['substitute']} substituted, {counts['insert']} inserted, {counts['delete']} deleted</div>"
            + aligned_transcript_html(aligned)
        )
    return ALIGN_CSS + legend + "\n".join(items)


# ----------------------------------------------------------------------------- all sections


def transcribe_sections(
    history: list[dict],
    per_language: dict[str, dict],
    worst: list[dict],
    language_confusion: dict | None,
    baseline: dict | None,
) -> list[tuple[str, str]]:
    """(heading, trusted HTML) pairs for report.html; a section whose input is empty or None is left out.

    `history`: the training loop's per-epoch records ("epoch", "val_wer", "val_cer", ...).
    `per_language`: {code: {"wer", "cer", "language_accuracy", "n"}}, plus optionally "all".
    `worst`: [{"origin", "reference", "hypothesis", "language", "cer"}], already the worst, in display order.
    `language_confusion`: {"labels": [code, ...], "matrix": (L, L) counts, rows true, columns predicted}.
    `baseline`: {"model", "wer", "cer", "n", "network_wer"} or {"model", "wer": None, "note"}.
    """
    sections = []
    curves = _history_html(history) if history else None
    if curves:
        sections.append(("Error rates during training", curves))
    if per_language:
        sections.append(("Per-language error rates", per_language_html(per_language)))
    if baseline:
        sections.append(("Classical baseline (English)", baseline_html(baseline)))
    if language_confusion and language_confusion.get("labels"):
        sections.append(("Language identification", language_confusion_html(language_confusion)))
    if worst:
        sections.append(("Worst transcripts, aligned", worst_html(worst)))
    return sections
