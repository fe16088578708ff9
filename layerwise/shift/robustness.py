"""`layerwise robustness`: the metric under each corruption of the input's modality, at each severity.

The corruptions act on the raw signal (pixels, waveforms, strings) before the front end, so they
reach the network the way a darker camera or a phone line would. Beside the true accuracy each cell
carries the label-free estimate, so a user sees how far to trust `layerwise shift`'s estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.shift.corruptions import CORRUPTIONS, SEVERITIES, corrupt, describe
from layerwise.shift.reference import ShiftReference


@dataclass(frozen=True)
class Cell:
    """One labelled shifted dataset: a corruption at a severity (or the clean inputs)."""

    corruption: str
    severity: int
    accuracy: float
    features: list[float] | None  # label-free statistics, when the run has a shift reference


def measure_robustness(
    modality: str,
    raw: Any,
    labels: torch.Tensor,
    encode: Callable[[Any], torch.Tensor],
    outputs_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 1.0,
    reference: ShiftReference | None = None,
    severities: tuple[int, ...] = SEVERITIES,
    sample_rate: int = 16000,
    seed: int = 0,
) -> tuple[dict, list[Cell]]:
    """Accuracy (and its label-free estimate, with a reference) on clean and corrupted copies of `raw`.

    `encode` turns raw inputs into the front end's cached tensors, `outputs_of` those into embeddings
    (N, D) and logits (N, K). Returns the result document and every cell (to fit the estimate on).
    """

    def cell(name: str, severity: int, inputs: Any) -> Cell:
        embeddings, logits = outputs_of(encode(inputs))
        accuracy = float((logits.argmax(1) == labels).float().mean())
        probabilities = torch.softmax(logits.float() / temperature, 1)
        features = None if reference is None else reference.features(probabilities, embeddings)
        return Cell(name, severity, accuracy, features)

    cells = [cell("clean", 0, raw)]
    for name in CORRUPTIONS[modality]:
        cells += [
            cell(name, s, corrupt(modality, raw, name, s, seed=seed, sample_rate=sample_rate)) for s in severities
        ]
    return summarise(modality, cells, reference, len(labels)), cells


def summarise(modality: str, cells: list[Cell], reference: ShiftReference | None, n: int) -> dict:
    """The result document of `layerwise robustness` from its cells, estimates by `reference` when given."""

    def estimate(c: Cell) -> float | None:
        if reference is None:
            return None
        if reference.accuracy_model is None:
            return c.features[0]  # ATC
        return reference.accuracy_model.predict(c.features)

    corruptions = {}
    for name in CORRUPTIONS[modality]:
        mine = [c for c in cells if c.corruption == name]
        corruptions[name] = {
            "severity": [c.severity for c in mine],
            "description": [describe(modality, name, c.severity) for c in mine],
            "accuracy": [c.accuracy for c in mine],
        }
        if reference is not None:
            corruptions[name]["estimated_accuracy"] = [estimate(c) for c in mine]
    corrupted = [c.accuracy for c in cells[1:]]
    return {
        "metric": "accuracy",
        "clean": cells[0].accuracy,
        "clean_estimated": estimate(cells[0]),
        "mean_corrupted": sum(corrupted) / len(corrupted),
        "n": n,
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
