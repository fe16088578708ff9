"""The learning-curve section of report.html: accuracy against the number of labels, deep and classical.

Every function takes the curve dict of `layerwise curve` (curve.json), so a run's report can include the
section later from the same document.
"""

from __future__ import annotations

import html

import numpy as np
from matplotlib.figure import Figure

from layerwise.report.html import CSS, figure_png, png_data_uri

HEADING = "Learning curve"
EXTRAPOLATE = 4  # the fitted lines run to this multiple of the largest n (further when an estimate lies there)
MAX_EXTRAPOLATE = 100  # ... but never past this multiple: further out a five-point fit says little
COLOURS = {"deep": "#1f77b4", "classical": "#c0392b"}
LABELS = {"deep": "deep model", "classical": "classical baseline"}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fitted_accuracy(fit: dict, n: np.ndarray) -> np.ndarray:
    """1 - (a·n^-b + c): the fitted accuracy at n labels."""
    return 1 - (fit["a"] * n ** -fit["b"] + fit["c"])


def curve_png(curve: dict) -> bytes:
    """Validation accuracy against the number of labels (log x): measured points, fitted power laws (dotted beyond
    the measured range), the target line and the estimated crossings."""
    points, estimate = curve["points"], curve["estimate"]
    n = np.array([p["n"] for p in points], dtype=np.float64)
    largest = float(n[-1])
    marks = [estimate.get("deep_overtakes_classical_at"), estimate.get("deep", {}).get("n_for_target")]
    right = max([EXTRAPOLATE * largest] + [min(m * 1.3, MAX_EXTRAPOLATE * largest) for m in marks if m])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, colour in COLOURS.items():
        fit = curve["fit"][name]
        inside = np.geomspace(n[0], largest, 100)
        outside = np.geomspace(largest, right, 100)
        ax.plot(n, [p[name] for p in points], "o" if name == "deep" else "s", color=colour,
                label=f"{LABELS[name]} (measured)")  # fmt: skip
        # A falling log-log fit found no level the error flattens at: its 100% is an assumption, not a finding.
        no_floor = fit["method"] == "log-log" and fit["b"] > 0
        levels = "power law, no floor" if no_floor else f"levels off at {fit['asymptote']:.1%}"
        ax.plot(inside, _fitted_accuracy(fit, inside), "-", color=colour, linewidth=1.2, label=f"fit: {levels}")
        ax.plot(outside, _fitted_accuracy(fit, outside), ":", color=colour, linewidth=1.2)
    target = estimate.get("target")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1%}")
        needed = estimate["deep"].get("n_for_target")
        if needed and needed <= right:
            ax.axvline(needed, color=COLOURS["deep"], linestyle="--", linewidth=0.8, alpha=0.6)
    crossing = estimate.get("deep_overtakes_classical_at")
    if crossing and crossing <= right:
        ax.axvline(crossing, color="#555", linestyle="-.", linewidth=0.8, label=f"deep overtakes at ~{crossing:,}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel(f"validation {curve['metric']}")
    low = min(min(p["deep"] for p in points), min(p["classical"] for p in points), target or 1.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.01)  # 1.01: markers at 100% stay whole
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def curve_html(curve: dict, png: bytes | None = None) -> str:
    """The section's trusted HTML fragment: verdict, figure, points table, fits and how it was measured."""
    png = png if png is not None else curve_png(curve)
    rows = "\n".join(
        f"<tr><td>{p['fraction']:.4g}</td><td>{p['n']:,}</td><td>{p['deep']:.1%}</td><td>{p['classical']:.1%}</td>"
        f"<td>{p['deep_macro_f1']:.3f}</td><td>{p['deep_seconds']:.1f} s</td><td>{p['classical_seconds']:.1f} s</td>"
        f"<td>{p['epochs']}</td></tr>"
        for p in curve["points"]
    )
    head = ("<tr><th>fraction</th><th>labels</th><th>deep accuracy</th><th>classical accuracy</th>"
            "<th>deep macro-F1</th><th>deep time</th><th>classical time</th><th>epochs</th></tr>")  # fmt: skip
    fits = "\n".join(
        f"<tr><th>{LABELS[name]}</th><td>{_esc(fit['formula'])}</td><td>{fit['asymptote']:.1%}</td>"
        f"<td>{_esc(fit['method'])}</td><td>{fit['rmse_log_error']:.3f}</td></tr>"
        for name, fit in curve["fit"].items()
    )
    data = curve["data"]
    note = (
        f"Each point trains a fresh <code>{_esc(curve['model'])}</code> and fits the classical baseline "
        f"({_esc(curve['classical_model'])}) on a nested, stratified subset of the {data['n_train']:,} training "
        f"examples; all are scored on the same {data['n_val']:,} validation examples (also used for early "
        "stopping). The fit is error = a&middot;n<sup>&minus;b</sup> + c on log(error); when five points cannot "
        "pin down the level c the curve flattens at, c = 0 (log-log) and the error is assumed to keep falling. "
        "Dotted lines are extrapolations."
    )
    notes = "".join(f'<p class="note"><b>Note:</b> {_esc(note)}</p>\n' for note in curve.get("notes", []))
    return (
        f'<p class="verdict">{_esc(curve["verdict"])}</p>\n{notes}'
        f'<img class="figure" src="{png_data_uri(png)}" alt="learning curve">\n'
        f'<table class="numeric">\n{head}\n{rows}\n</table>\n'
        "<table><tr><th>fit</th><th>formula</th><th>asymptote</th><th>method</th><th>rms log error</th></tr>\n"
        f"{fits}\n</table>\n"
        f'<p class="note">{note}</p>'
    )


def curve_section(curve: dict) -> tuple[str, str]:
    """(heading, trusted HTML) for `ReportData.extra_sections`."""
    return HEADING, curve_html(curve)


def curve_page(curve: dict, png: bytes | None = None) -> str:
    """A self-contained report.html holding the learning-curve section, for `layerwise curve --out DIR`."""
    data, settings = curve["data"], curve["settings"]
    classes = data["classes"]
    summary = {
        "data": data["source"],
        "modality": data["modality"],
        "classes": f"{len(classes)}: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}",
        "examples": f"{data['n_train']:,} train, {data['n_val']:,} validation, {data['n_skipped']:,} skipped",
        "model": curve["model"],
        "training": f"up to {settings['epochs']} epochs a point, {settings['time_budget']:g} s for the whole curve, "
        f"seed {settings['seed']}",
        "time taken": f"{curve.get('seconds', 0):.0f} s",
        "layerwise": curve["layerwise_version"],
    }  # fmt: skip
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary.items())
    title = f"layerwise learning curve: {data['source']}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<table class="summary">
{rows}
</table>
<section id="curve">
<h2>{HEADING}</h2>
{curve_html(curve, png)}
</section>
</body>
</html>
"""
