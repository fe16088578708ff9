"""Accuracy on new data without labels, learned from the run's own corruption suite.

Confidence alone (ATC, Garg et al. 2022) overestimates accuracy under strong shift: a network can be
confidently wrong on a dark image. How far inputs sit from the training features says what confidence
misses. At training time the corruption suite gives ~30 labelled "shifted datasets" from the validation
split (each corruption at 5 severities); a small linear model maps four label-free statistics of a
dataset to its accuracy there (the meta-dataset idea of Deng & Zheng 2021, "Are labels always
necessary for classifier accuracy evaluation?"). Its error on a corruption type left out of the fit
is stored, so the estimate comes with an honest error bar.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from layerwise.shift.stats import atc_estimate

FEATURES = ("atc_estimate", "mean_confidence", "ood_fraction", "mean_log_ood_ratio", "prediction_shift")
RIDGE_ALPHA = 1e-3  # the features are correlated; a whisper of L2 keeps the coefficients sane


def label_free_features(
    probabilities: torch.Tensor,
    ood_scores: torch.Tensor,
    atc_threshold: float,
    ood_threshold: float,
    class_frequencies: torch.Tensor,
) -> list[float]:
    """The statistics of a set of inputs the estimate is made from, in FEATURES order.

    probabilities: calibrated (N, K); ood_scores (N,); class_frequencies (K,): how often each class was
    predicted on the validation split. "prediction_shift" is the total-variation distance between that
    and the predicted-class frequencies here: a network that collapses onto a few classes under noise
    can stay confident, but not keep its class balance.
    """
    confidences, predicted = probabilities.max(1)
    ratio = ood_scores.double().clamp_min(1e-12) / max(ood_threshold, 1e-12)
    frequencies = torch.bincount(predicted, minlength=len(class_frequencies)).double() / max(len(predicted), 1)
    return [
        atc_estimate(confidences, atc_threshold),
        float(confidences.double().mean()),
        float((ratio > 1).double().mean()),
        float(torch.log(ratio).mean()),
        float(0.5 * (frequencies - class_frequencies.double()).abs().sum()),
    ]


@dataclass(frozen=True)
class AccuracyModel:
    coefficients: tuple[float, ...]  # one per FEATURES entry
    intercept: float
    held_out_error: float  # mean absolute error on corruption types left out of the fit
    cells: int  # labelled shifted datasets it was fitted on

    def predict(self, features: list[float]) -> float:
        value = self.intercept + float(np.dot(self.coefficients, features))
        return float(min(1.0, max(0.0, value)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict) -> AccuracyModel:
        return cls(
            tuple(document["coefficients"]), document["intercept"], document["held_out_error"], document["cells"]
        )


def fit_accuracy_model(features: list[list[float]], accuracies: list[float], groups: list[str]) -> AccuracyModel:
    """Ridge regression of accuracy on the features; `groups` names each cell's corruption (or "clean").

    The held-out error refits without each corruption type in turn and scores that type's cells.
    """
    from sklearn.linear_model import Ridge

    x, y, groups_array = np.asarray(features), np.asarray(accuracies), np.asarray(groups)
    errors = []
    for group in sorted(set(groups) - {"clean"}):
        train = groups_array != group
        model = Ridge(alpha=RIDGE_ALPHA).fit(x[train], y[train])
        errors += list(np.abs(np.clip(model.predict(x[~train]), 0, 1) - y[~train]))
    model = Ridge(alpha=RIDGE_ALPHA).fit(x, y)
    return AccuracyModel(
        coefficients=tuple(float(c) for c in model.coef_),
        intercept=float(model.intercept_),
        held_out_error=float(np.mean(errors)) if errors else float("nan"),
        cells=len(y),
    )
