"""`layerwise shift`: has the data changed since training, and what does it cost?

New embeddings are compared with the run's reference sample by two tests — MMD with a permutation
p-value (sensitive to any change of the joint distribution) and per-dimension Kolmogorov–Smirnov
with the Benjamini–Hochberg correction (says which dimensions moved) — and the accuracy on the new
data is estimated without labels (see `shift.estimate`; confidence alone, ATC, is reported beside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerwise.errors import InputError
from layerwise.shift.reference import ShiftReference
from layerwise.shift.stats import atc_estimate, ks_test, mmd_test

ALPHA = 0.01  # each test's level; with two tests at most ~2% false alarms on unchanged data
MIN_NEW = 30  # fewer new examples give the tests too little power to be worth running
MAX_NEW_FOR_MMD = 1000  # MMD's cost grows with the square of the pooled sample; KS uses every example


@dataclass(frozen=True)
class ShiftResult:
    shift_detected: bool
    p_value: float  # the smaller of the two tests' p-values
    mmd_p_value: float
    mmd_squared: float
    effect_size: float  # MMD = sqrt(MMD²) with the RBF kernel: 0 unchanged, at most sqrt(2)
    ks_p_value: float  # smallest BH-corrected per-dimension p-value
    dimensions_shifted: int
    dimensions: int
    estimated_accuracy: float
    estimate_error: float | None  # the estimate's typical error on corruption types it was not fitted on
    atc_estimate: float  # confidence alone (Average Thresholded Confidence), for comparison
    reference_accuracy: float
    mean_confidence: float
    ood_fraction: float  # new inputs over the per-input OOD threshold (about 5% on unchanged data)
    n: int
    accuracy: float | None = None  # the true accuracy, when the new data has labels

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def detect_shift(
    reference: ShiftReference,
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> ShiftResult:
    """Compare new embeddings (N, D) and logits (N, K) with the run's reference."""
    if len(embeddings) < MIN_NEW:
        raise InputError(
            f"{len(embeddings)} usable inputs are too few to test for shift; give at least {MIN_NEW} "
            "(200 or more detect small shifts reliably)"
        )
    generator = torch.Generator().manual_seed(seed)
    sample = embeddings[torch.randperm(len(embeddings), generator=generator)[:MAX_NEW_FOR_MMD]]
    mmd = mmd_test(reference.embeddings, sample, seed=seed)
    ks, corrected = ks_test(reference.embeddings, embeddings)
    confidences = torch.softmax(logits.float() / temperature, 1).max(1).values
    p_value = min(mmd.p_value, ks.p_value)
    return ShiftResult(
        shift_detected=p_value < ALPHA,
        p_value=p_value,
        mmd_p_value=mmd.p_value,
        mmd_squared=mmd.statistic,
        effect_size=max(mmd.statistic, 0.0) ** 0.5,
        ks_p_value=ks.p_value,
        dimensions_shifted=int((corrected < ALPHA).sum()),
        dimensions=int(embeddings.shape[1]),
        estimated_accuracy=reference.estimate_accuracy(torch.softmax(logits.float() / temperature, 1), embeddings),
        estimate_error=None if reference.accuracy_model is None else reference.accuracy_model.held_out_error,
        atc_estimate=atc_estimate(confidences, reference.atc_threshold),
        reference_accuracy=reference.accuracy,
        mean_confidence=float(confidences.mean()),
        ood_fraction=float((reference.ood.score(embeddings) > reference.ood_threshold).float().mean()),
        n=len(embeddings),
        accuracy=None if labels is None else float((logits.argmax(1) == labels).float().mean()),
    )
