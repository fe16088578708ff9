"""Self-contained HTML report for a finished run (`RUN/report.html`).

The page has no external resources: CSS sits in a `<style>` tag and every figure is an inline
`data:image/png;base64,...` URI, so the file can be mailed, archived or opened offline.
Every user-provided string (class names, paths, texts, summary values) goes through
`html.escape`; only `ReportData.extra_sections` fragments are trusted HTML.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from layerwise.files import write_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_SNIPPET_CHARS = 300  # longer example texts are cut to this many characters
MAX_PROBLEM_ROWS = 200  # skipped-input rows shown; the rest are counted, not listed
MAX_ANNOTATED_CLASSES = 20  # above this many classes the confusion cells carry no numbers
MAX_LABELLED_CLASSES = 50  # above this many classes the confusion axes carry no class names
PLOT_LABEL_CHARS = 18  # class names are cut to this length on plot axes
FIGURE_DPI = 110


@dataclass(frozen=True)
class Example:
    """One held-out example shown in the report (e.g. a misclassified one).

    `confidence` is the model's probability for `predicted_label`, in [0, 1].
    `preview_png` is the input (image, spectrogram) rendered as PNG bytes; `text` is the raw
    input for text tasks, shown as a snippet of at most `TEXT_SNIPPET_CHARS` characters.
    """

    path: str
    true_label: str
    predicted_label: str
    confidence: float
    preview_png: bytes | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.preview_png is not None and not self.preview_png.startswith(PNG_SIGNATURE):
            raise ValueError(
                f"Example {self.path!r}: preview_png must be PNG bytes (render the preview "
                "with PIL `img.save(buf, format='PNG')` or `figure_png(fig)`)"
            )


@dataclass(frozen=True)
class ReportData:
    """Everything `render_report` shows, in page order.

    `history` holds one dict per epoch with any of "epoch", "train_loss", "val_loss",
    "val_accuracy", "lr", "seconds"; a missing key just drops that curve.
    `confusion[i][j]` counts held-out examples of true class i predicted as class j.
    `baseline` is {} when no classical baseline ran, else e.g.
    {"model": "logistic regression on 14x14 pixels", "accuracy": 0.84}.
    `extra_sections` are (heading, trusted HTML fragment) pairs appended at the end.
    """

    title: str
    summary: dict[str, str]
    history: list[dict]
    class_names: list[str]
    confusion: list[list[int]]
    metrics: dict[str, float]
    baseline: dict
    verdict: str
    examples: list[Example]
    problems: list[dict]
    extra_sections: Sequence[tuple[str, str]] = ()
    monitor: str = "accuracy"  # the headline metric, a key of `metrics` and `baseline`
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(self.confusion) != n or any(len(row) != n for row in self.confusion):
            shape = f"{len(self.confusion)}x{len(self.confusion[0]) if self.confusion else 0}"
            raise ValueError(
                f"confusion must be a square {n}x{n} matrix (one row and column per class name), got {shape}"
            )


# ----------------------------------------------------------------------------- helpers


def figure_png(fig: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """Render a matplotlib Figure to PNG bytes (Agg rasteriser; no pyplot state involved)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """PNG bytes -> `data:image/png;base64,...` URI for an inline `<img src=...>`."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def per_class_metrics(confusion: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a (C, C) confusion matrix.

    Rows are true classes, columns predictions. A ratio with a zero denominator (a class never
    predicted, or absent from the split) is reported as 0.0, as scikit-learn does.
    Returns arrays of shape (C,) under "precision", "recall", "f1", "support".
    """
    cm = np.asarray(confusion, dtype=np.float64).reshape(len(confusion), -1)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)  # (C,) how often each class was predicted
    support = cm.sum(axis=1)  # (C,) how many examples truly belong to each class
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object) -> float | None:
    """`value` as a finite float, or None for missing/non-numeric/NaN entries."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: object) -> str:
    number = _number(value)
    if number is None:
        return _esc(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    return f"{number:.4g}"  # 4 significant digits keeps learning rates like 1e-05 readable


def _percent(value: float | None) -> str:
    return "&mdash;" if value is None else f"{100 * value:.1f}%"


def _plot_label(name: str) -> str:
    """Class name made safe for a matplotlib label: '$' would start mathtext."""
    if len(name) > PLOT_LABEL_CHARS:
        # cut the middle: long names often share a prefix and differ at the end
        head = (PLOT_LABEL_CHARS - 1) // 2
        name = name[:head] + "…" + name[-(PLOT_LABEL_CHARS - 1 - head) :]
    return name.replace("$", r"\$")


def _img(png: bytes, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} src="{png_data_uri(png)}" alt="{_esc(alt)}">'


def _section(heading: str, body: str, section_id: str = "") -> str:
    sid = f' id="{section_id}"' if section_id else ""
    return f"<section{sid}>\n<h2>{heading}</h2>\n{body}\n</section>"


# ----------------------------------------------------------------------------- figures


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for the epochs where `key` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(history):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get("epoch"))
        xs.append(i + 1 if x is None else x)
        ys.append(y)
    return xs, ys


def training_curves_png(history: list[dict], baseline: dict | None = None) -> bytes | None:
    """Loss (train/val), accuracy, bits-per-byte and learning-rate panels side by side; None if nothing to plot.

    A panel whose metric the classical `baseline` also has (e.g. "bits_per_byte") draws it as a dashed line.
    """
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "val")], 2.0),
        ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "val")], 2.0),
        ("bits per byte", [("val_bits_per_byte", "val")], 2.0),
        ("learning rate", [("lr", "lr")], 1.2),
    ]
    panels = [
        (title, curves, width) for title, curves, width in panels if any(_series(history, key)[1] for key, _ in curves)
    ]
    if not panels:
        return None
    fig = Figure(figsize=(sum(w for *_, w in panels) * 2.4, 3.2))
    axes = fig.subplots(1, len(panels), width_ratios=[w for *_, w in panels], squeeze=False)[0]
    for ax, (title, curves, _) in zip(axes, panels, strict=True):
        drawn = [label for key, label in curves if _series(history, key)[1]]
        epochs = set()
        for key, label in curves:
            xs, ys = _series(history, key)
            epochs.update(xs)
            # markers keep a single-epoch run visible (a one-point line draws nothing)
            ax.plot(xs, ys, marker="o", markersize=3 if len(xs) > 1 else 6, label=label)
            reference = _number((baseline or {}).get(key.removeprefix("val_"))) if key.startswith("val_") else None
            if reference is not None and title != "accuracy":  # accuracy keeps its look; its baseline is above
                ax.axhline(reference, color="#c0392b", linestyle="--", linewidth=1, label="classical")
                drawn.append("classical")
        if len(epochs) == 1:
            ax.set_xticks(sorted(epochs))  # else the locator invents ticks like 0.96, 0.98
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title == "learning rate":
            lrs = [y for y in _series(history, "lr")[1] if y > 0]
            if lrs and max(lrs) / min(lrs) > 20:
                ax.set_yscale("log")
        elif len(drawn) > 1:
            ax.legend(frameon=False)
        elif len(curves) > 1:
            title = f"{drawn[0]} {title}"  # one curve, no legend: say which in the title
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(class_names: list[str], confusion: list[list[int]]) -> bytes:
    """Heatmap of the confusion matrix; colour is the share of each true class (row).

    Counts are written in the cells up to `MAX_ANNOTATED_CLASSES` classes and class names on the
    axes up to `MAX_LABELLED_CLASSES`; beyond that the cells are too small to read.
    """
    cm = np.asarray(confusion, dtype=np.int64)  # (C, C) rows = true, cols = predicted
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = min(12.0, max(3.5, 0.45 * n + 1.8))  # inches; ~0.45 in per cell up to 20 classes
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= MAX_LABELLED_CLASSES:
        labels = [_plot_label(name) for name in class_names]
        fontsize = 9 if n <= 20 else 7 if n <= 35 else 5
        ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), labels, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= MAX_ANNOTATED_CLASSES:
        fontsize = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                color = "white" if share[i, j] > 0.5 else "#222"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return figure_png(fig)


# ----------------------------------------------------------------------------- sections


def _summary_html(summary: dict[str, str]) -> str:
    if not summary:
        return ""
    rows = "\n".join(f"<tr><th>{_esc(key)}</th><td>{_esc(value)}</td></tr>" for key, value in summary.items())
    return f'<table class="summary">\n{rows}\n</table>'


def _deep_score(data: ReportData) -> float | None:
    value = _number(data.metrics.get(data.monitor))
    if value is not None or data.monitor != "accuracy":
        return value
    cm = np.asarray(data.confusion, dtype=np.int64)
    return float(np.trace(cm) / cm.sum()) if cm.size and cm.sum() > 0 else None


def _outcome(deep: float | None, classical: float | None, monitor: str = "accuracy", higher: bool = True):
    """(CSS class, badge text) for the headline box."""
    if classical is None:
        return "no-baseline", "No classical baseline was run"
    if deep is None:
        return "no-baseline", f"Deep model {monitor.replace('_', ' ')} unavailable"
    if monitor != "accuracy":  # e.g. bits per byte: say the relative difference
        gain = (deep - classical) / abs(classical) if classical else 0.0
        gain = gain if higher else -gain
        if abs(gain) < 0.0005:
            return "tie", "Deep model and classical baseline tie"
        winner = "deep-wins" if gain > 0 else "classical-wins"
        who = "Deep model" if gain > 0 else "Classical baseline"
        return winner, f"{who} wins by {abs(gain):.1%} in {monitor.replace('_', ' ')}"
    points = 100 * (deep - classical)
    if abs(points) < 0.05:
        return "tie", "Deep model and classical baseline tie"
    if points > 0:
        return "deep-wins", f"Deep model wins by {points:.1f} points"
    return "classical-wins", f"Classical baseline wins by {-points:.1f} points"


def _metrics_table(metrics: dict[str, float], baseline: dict) -> str:
    keys = list(metrics) + [k for k in baseline if k not in metrics and _number(baseline[k]) is not None]
    if not keys:
        return ""
    rows = []
    for key in keys:
        deep = _fmt(metrics[key]) if key in metrics else "&mdash;"
        classical = _fmt(baseline[key]) if key in baseline else "&mdash;"
        rows.append(f"<tr><th>{_esc(key)}</th><td>{deep}</td><td>{classical}</td></tr>")
    head = "<tr><th>metric</th><th>deep</th><th>classical</th></tr>"
    return '<table class="metrics">\n' + head + "\n" + "\n".join(rows) + "\n</table>"


def _headline_html(data: ReportData) -> str:
    deep = _deep_score(data)
    classical = _number(data.baseline.get(data.monitor)) if data.baseline else None
    outcome, badge = _outcome(deep, classical, data.monitor, data.higher_is_better)
    shown = _percent if data.monitor == "accuracy" else (lambda v: "&mdash;" if v is None else f"{v:.3f}")
    deep_cls = "stat winner" if outcome == "deep-wins" else "stat"
    classical_cls = "stat winner" if outcome == "classical-wins" else "stat"
    baseline_model = data.baseline.get("model", "classical baseline") if data.baseline else "none"
    return f"""<div class="headline {outcome}">
<div class="badge">{_esc(badge)}</div>
<div class="stats">
<div class="{deep_cls}"><div class="label">deep model</div>
<div class="value">{shown(deep)}</div></div>
<div class="vs">vs</div>
<div class="{classical_cls}"><div class="label">classical: {_esc(baseline_model)}</div>
<div class="value">{shown(classical)}</div></div>
</div>
<p class="verdict">{_esc(data.verdict)}</p>
{_metrics_table(data.metrics, data.baseline)}
</div>"""


def _history_html(history: list[dict], baseline: dict | None = None) -> str:
    png = training_curves_png(history, baseline)
    if png is None:
        return '<p class="empty">No training history was recorded.</p>'
    keys = list(dict.fromkeys(key for row in history for key in row))
    head = "".join(f"<th>{_esc(key)}</th>" for key in keys)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(key, ''))}</td>" for key in keys) + "</tr>" for row in history
    )
    table = f"<table>\n<tr>{head}</tr>\n{rows}\n</table>"
    return (
        _img(png, "training curves", "figure")
        + f"\n<details><summary>per-epoch numbers ({len(history)} epochs)</summary>\n"
        + table
        + "\n</details>"
    )


def _confusion_html(class_names: list[str], confusion: list[list[int]]) -> str:
    if not class_names:
        return '<p class="empty">No held-out predictions.</p>'
    note = "Rows are true classes, columns predictions; colour is the share of the true class."
    if len(class_names) > MAX_LABELLED_CLASSES:
        note += " Classes are in the order of the per-class table below."
    elif len(class_names) > MAX_ANNOTATED_CLASSES:
        note += " Counts are in the per-class table below."
    png = confusion_png(class_names, confusion)
    return _img(png, "confusion matrix", "figure confusion") + f'\n<p class="note">{note}</p>'


def _per_class_html(class_names: list[str], confusion: list[list[int]]) -> str:
    if not class_names:
        return '<p class="empty">No classes.</p>'
    m = per_class_metrics(confusion)
    rows = [
        f"<tr><td>{_esc(name)}</td><td>{m['precision'][i]:.3f}</td><td>{m['recall'][i]:.3f}</td>"
        f"<td>{m['f1'][i]:.3f}</td><td>{m['support'][i]:,}</td></tr>"
        for i, name in enumerate(class_names)
    ]
    rows.append(
        f'<tr class="total"><td>macro average</td><td>{m["precision"].mean():.3f}</td>'
        f"<td>{m['recall'].mean():.3f}</td><td>{m['f1'].mean():.3f}</td>"
        f"<td>{m['support'].sum():,}</td></tr>"
    )
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    return '<table id="per-class" class="numeric">\n' + head + "\n" + "\n".join(rows) + "\n</table>"


def _example_card(example: Example) -> str:
    if example.preview_png is not None:
        preview = _img(example.preview_png, f"input {example.path}", "preview")
    elif example.text is not None:
        snippet = example.text
        if len(snippet) > TEXT_SNIPPET_CHARS:
            snippet = snippet[:TEXT_SNIPPET_CHARS].rstrip() + "…"
        preview = f'<pre class="snippet">{_esc(snippet)}</pre>'
    else:
        preview = '<div class="empty">no preview</div>'
    return f"""<div class="card">
{preview}
<div class="labels"><span class="true">{_esc(example.true_label)}</span> &rarr; \
<span class="pred">{_esc(example.predicted_label)}</span></div>
<div class="conf">confidence {_percent(example.confidence)}</div>
<div class="path" title="{_esc(example.path)}">{_esc(example.path)}</div>
</div>"""


def _examples_html(examples: list[Example]) -> str:
    if not examples:
        return '<p class="empty">None.</p>'
    return '<div class="grid">\n' + "\n".join(_example_card(e) for e in examples) + "\n</div>"


def _problems_html(problems: list[dict]) -> str:
    if not problems:
        return '<p class="empty">None: every input was read.</p>'
    rows = "\n".join(
        f'<tr><td class="path">{_esc(p.get("path", ""))}</td><td>{_esc(p.get("reason", ""))}</td></tr>'
        for p in problems[:MAX_PROBLEM_ROWS]
    )
    table = f"<table>\n<tr><th>path</th><th>reason</th></tr>\n{rows}\n</table>"
    hidden = len(problems) - MAX_PROBLEM_ROWS
    if hidden > 0:
        table += (
            f'\n<p class="note">Showing the first {MAX_PROBLEM_ROWS} of {len(problems):,} '
            f"skipped inputs; {hidden:,} more not shown.</p>"
        )
    return table


# ----------------------------------------------------------------------------- page

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a;
  max-width: 1100px; margin: 2rem auto; padding: 0 1rem; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 1rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; padding-bottom: .2rem;
  border-bottom: 1px solid #e3e6ea; }
table { border-collapse: collapse; margin: .4rem 0; }
th, td { padding: .25rem .7rem; border-bottom: 1px solid #eef0f2; text-align: left;
  vertical-align: top; }
table.summary th { color: #5a6470; font-weight: 500; }
table.numeric td + td, table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #d5d9de; }
.headline { border: 1px solid #d5d9de; border-left: 6px solid #8a939c; border-radius: 6px;
  padding: 1rem 1.2rem; margin: 1.2rem 0; background: #f7f8f9; }
.headline.deep-wins { border-left-color: #2e8540; background: #f1f8f3; }
.headline.classical-wins { border-left-color: #c0392b; border-color: #e3b2ac; background: #fdf1ef; }
.headline.tie { border-left-color: #b7950b; background: #fcf8ea; }
.badge { display: inline-block; font-weight: 600; font-size: .8rem; text-transform: uppercase;
  letter-spacing: .04em; padding: .15rem .5rem; border-radius: 4px; background: #8a939c;
  color: #fff; }
.deep-wins .badge { background: #2e8540; }
.classical-wins .badge { background: #c0392b; }
.tie .badge { background: #b7950b; }
.stats { display: flex; align-items: center; gap: 1.5rem; margin: .8rem 0; flex-wrap: wrap; }
.stat { padding: .4rem .9rem; border-radius: 6px; border: 2px solid transparent; }
.stat.winner { border-color: currentColor; }
.deep-wins .stat.winner { color: #2e8540; }
.classical-wins .stat.winner { color: #c0392b; }
.stat .label { font-size: .8rem; color: #5a6470; }
.stat .value { font-size: 2rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.vs { color: #8a939c; }
.verdict { font-size: 1.05rem; margin: .4rem 0; }
img.figure { max-width: 100%; height: auto; display: block; }
img.confusion { max-width: min(100%, 900px); }
.note, .empty { color: #5a6470; }
details { margin: .5rem 0; } summary { cursor: pointer; color: #5a6470; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .8rem; }
.card { border: 1px solid #e3e6ea; border-radius: 6px; padding: .6rem; overflow: hidden; }
.card img.preview { width: 100%; height: auto; image-rendering: pixelated; background: #f2f3f5; }
.snippet { white-space: pre-wrap; word-break: break-word; font-size: .8rem; background: #f5f6f7;
  padding: .4rem; margin: 0; max-height: 12rem; overflow: auto; }
.labels { margin-top: .4rem; font-weight: 600; } .true { color: #2e8540; } .pred { color: #c0392b; }
.conf { font-size: .85rem; color: #5a6470; }
.path { font: .75rem ui-monospace, Menlo, Consolas, monospace; color: #5a6470;
  overflow-wrap: anywhere; }
"""


def render_report(data: ReportData) -> str:
    """The full report page as an HTML string (self-contained: inline CSS and PNG figures)."""
    sections = [
        _section("Result", _headline_html(data), "result"),
        _section("Training curves", _history_html(data.history, data.baseline), "training"),
    ]
    if data.class_names:  # classification
        sections += [
            _section("Confusion matrix", _confusion_html(data.class_names, data.confusion), "confusion"),
            _section("Per-class metrics", _per_class_html(data.class_names, data.confusion), "classes"),
            _section("Misclassified examples", _examples_html(data.examples), "examples"),
        ]
    sections.append(_section("Skipped inputs", _problems_html(data.problems), "problems"))
    sections += [_section(_esc(heading), fragment) for heading, fragment in data.extra_sections]
    body = "\n".join(sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(data.title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_esc(data.title)}</h1>
{_summary_html(data.summary)}
{body}
</body>
</html>
"""


def write_report(path: Path, data: ReportData) -> Path:
    """Render `data` and write it to `path` atomically; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, render_report(data))
