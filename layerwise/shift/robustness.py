"""`layerwise robustness`: the metric under each corruption of the input's modality, at each severity.

The corruptions act on the raw signal (pixels, waveforms, strings) before the front end, so they
reach the network the way a darker camera or a phone line would. Beside the true accuracy each cell
carries the label-free estimate, so a user sees how far to trust `layerwise shift`'s estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerwise.shift.corruptions import CORRUPTIONS, SEVERITIES, corrupt, describe
from layerwise.shift.stats import atc_estimate


def measure_robustness(
    modality: str,
    raw: Any,
    labels: torch.Tensor,
    encode: Callable[[Any], torch.Tensor],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    temperature: float = 1.0,
    atc_threshold: float | None = None,
    severities: tuple[int, ...] = SEVERITIES,
    sample_rate: int = 16000,
    seed: int = 0,
) -> dict:
    """Accuracy (and its label-free estimate) on clean and corrupted copies of `raw`.

    `encode` turns raw inputs into the front end's cached tensors, `logits_of` those into logits (N, K).
    """

    def score(logits: torch.Tensor) -> dict:
        confidences = torch.softmax(logits.float() / temperature, 1).max(1).values
        cell = {"accuracy": float((logits.argmax(1) == labels).float().mean())}
        if atc_threshold is not None:
            cell["estimated_accuracy"] = atc_estimate(confidences, atc_threshold)
        return cell

    clean = score(logits_of(encode(raw)))
    corruptions = {}
    for name in CORRUPTIONS[modality]:
        cells = [
            score(logits_of(encode(corrupt(modality, raw, name, s, seed=seed, sample_rate=sample_rate))))
            for s in severities
        ]
        corruptions[name] = {
            "severity": list(severities),
            "description": [describe(modality, name, s) for s in severities],
            **{key: [cell[key] for cell in cells] for key in cells[0]},
        }
    all_cells = [a for c in corruptions.values() for a in c["accuracy"]]
    return {
        "metric": "accuracy",
        "clean": clean["accuracy"],
        "clean_estimated": clean.get("estimated_accuracy"),
        "mean_corrupted": sum(all_cells) / len(all_cells),
        "n": len(labels),
        "corruptions": corruptions,
    }


def robustness_png(result: dict) -> bytes:
    """Accuracy against severity, one line per corruption, the clean accuracy dashed."""
    from matplotlib.figure import Figure

    from layerwise.report.html import figure_png

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, cells in result["corruptions"].items():
        ax.plot([0, *cells["severity"]], [result["clean"], *cells["accuracy"]], marker="o", label=name)
    ax.axhline(result["clean"], color="black", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel(result["metric"])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return figure_png(fig)


def robustness_table(result: dict) -> list[list[str]]:
    """Rows: corruption, then the metric at each severity, as percentages."""
    header = ["corruption", *[f"sev. {s}" for s in SEVERITIES]]
    rows = [["clean", f"{result['clean']:.1%}", "", "", "", ""]]
    for name, cells in result["corruptions"].items():
        rows.append([name, *[f"{a:.1%}" for a in cells["accuracy"]]])
    return [header, *rows]
