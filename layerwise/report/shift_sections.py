"""Report sections on trust under change: calibration (reliability diagram, ECE) and robustness to corruptions."""

from __future__ import annotations

import html

from layerwise.report.html import figure_png, png_data_uri


def reliability_png(before: dict, after: dict, temperature: float) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for bins, label, style in ((before, f"raw (ECE {before['ece']:.3f})", "o-"),
                               (after, f"T = {temperature:.2f} (ECE {after['ece']:.3f})", "s-")):  # fmt: skip
        points = [(c, a) for c, a in zip(bins["bin_confidence"], bins["bin_accuracy"], strict=True) if c is not None]
        ax.plot([c for c, _ in points], [a for _, a in points], style, markersize=4, label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return figure_png(fig)


def calibration_html(calibration) -> str:
    """`calibration` is a `layerwise.shift.reference.Calibration`."""
    png = reliability_png(calibration.reliability_before, calibration.reliability_after, calibration.temperature)
    return (
        f"<p>Confidences are temperature-scaled (T = {calibration.temperature:.3f}, fitted on the validation "
        f"split): expected calibration error {calibration.ece_before:.4f} before, {calibration.ece_after:.4f} "
        "after (measured on the same split, so slightly optimistic). Every confidence layerwise prints uses T.</p>\n"
        f'<img src="{png_data_uri(png)}" alt="reliability diagram">'
    )


def robustness_html(result: dict, png: bytes, accuracy_model=None) -> str:
    """The robustness table (accuracy, and the label-free estimate when present) and its plot."""
    severities = next(iter(result["corruptions"].values()))["severity"]
    head = "".join(f"<th>severity {s}</th>" for s in severities)
    rows = [f"<tr><th>clean</th><td colspan={len(severities)}>{result['clean']:.1%}</td></tr>"]
    for name, cells in result["corruptions"].items():
        estimates = cells.get("estimated_accuracy") or [None] * len(severities)
        tds = "".join(
            f'<td title="{html.escape(d)}">{a:.1%}'
            + (f" <small>(est. {e:.0%})</small>" if e is not None else "")
            + "</td>"
            for a, e, d in zip(cells["accuracy"], estimates, cells["description"], strict=True)
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{tds}</tr>")
    return (
        f"<p>Validation accuracy on {result['n']} held-out inputs under corruptions of the raw input "
        f"(mean over all corruptions: {result['mean_corrupted']:.1%}; clean: {result['clean']:.1%}). "
        "In brackets: the accuracy <code>layerwise shift</code> would estimate without labels"
        + (
            f" (a model of these very cells, so optimistic here; on corruption types left out of its fit it was off "
            f"by {accuracy_model.held_out_error:.1%} on average). "
            if accuracy_model is not None
            else ". "
        )
        + "Run <code>layerwise robustness RUN DATA</code> for other data.</p>\n"
        f'<table class="summary"><tr><th>corruption</th>{head}</tr>\n' + "\n".join(rows) + "\n</table>\n"
        f'<img src="{png_data_uri(png)}" alt="accuracy under corruption">'
    )
