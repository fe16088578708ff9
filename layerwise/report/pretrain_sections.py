"""Report sections of a pretraining run: the frozen-feature probes and a t-SNE map of the features."""

from __future__ import annotations

import html

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from layerwise.report.html import figure_png, png_data_uri


def _percent(value: float | None) -> str:
    return "&mdash;" if value is None or np.isnan(value) else f"{100 * value:.1f}%"


def probes_html(rows: list[tuple[str, float, float]], describe: str, history: list[dict]) -> str:
    """A table of (features, kNN accuracy, linear-probe accuracy) rows, and the kNN accuracy per epoch."""
    body = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{_percent(knn)}</td><td>{_percent(linear)}</td></tr>"
        for name, knn, linear in rows
    )
    table = (
        '<table class="numeric">\n<tr><th>features</th><th>kNN (k=20, cosine)</th><th>linear probe</th></tr>\n'
        f"{body}\n</table>"
    )
    note = (
        f'<p class="note">{html.escape(describe)}. The network\'s features are its pooled embedding, frozen; '
        "the linear probe is a logistic regression on standardised features; the raw input is what the classical "
        "baseline of a classification run sees.</p>"
    )
    curve = knn_curve_png(history)
    figure = f'<img class="figure" src="{png_data_uri(curve)}" alt="kNN accuracy per epoch">' if curve else ""
    return table + "\n" + note + "\n" + figure


def knn_curve_png(history: list[dict]) -> bytes | None:
    points = [(row["epoch"], row["val_knn_accuracy"]) for row in history if "val_knn_accuracy" in row]
    if not points:
        return None
    fig = Figure(figsize=(4.8, 3.0))
    ax = fig.subplots()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN accuracy on the probe set")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def projection_html(points: np.ndarray, labels: np.ndarray | None, class_names: list[str], what: str) -> str:
    """A t-SNE scatter of (N, 2) `points`, coloured by class index `labels` when there are any."""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=5, alpha=0.7, color="#2c7fb8")
    else:
        cmap = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
        for k, name in enumerate(class_names):
            chosen = points[labels == k]
            if len(chosen):
                ax.scatter(chosen[:, 0], chosen[:, 1], s=5, alpha=0.8, color=cmap(k % cmap.N), label=name[:24])
        if len(class_names) <= 20:
            ax.legend(frameon=False, fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of the pretrained features: {len(points)} {what}", fontsize=9)
    fig.tight_layout()
    note = (
        '<p class="note">Inputs that the network represents alike lie close together. Colours are the probe set\'s '
        "labels, which pretraining never saw.</p>"
        if labels is not None
        else '<p class="note">No --probe data was given, so the points carry no labels.</p>'
    )
    return f'<img class="figure" src="{png_data_uri(figure_png(fig))}" alt="t-SNE of the features">\n{note}'
