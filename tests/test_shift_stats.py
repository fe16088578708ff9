"""The statistics of shift detection against hand computations and known behaviour (seeded, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from layerwise.shift.stats import (
    Mahalanobis,
    atc_estimate,
    atc_threshold,
    auroc,
    energy_score,
    fit_temperature,
    ks_test,
    median_bandwidth,
    mmd_test,
    reliability,
)


def gaussian(n: int, d: int, mean: float, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + mean


def test_mmd_statistic_matches_the_unbiased_estimator_by_hand():
    x, y = gaussian(7, 3, 0.0, 1), gaussian(5, 3, 0.5, 2)
    result = mmd_test(x, y, permutations=0)
    sigma = median_bandwidth(x, y)

    def k(a, b):
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))

    xs, ys = x.double().numpy(), y.double().numpy()
    xx = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j) / (7 * 6)
    yy = sum(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j) / (5 * 4)
    xy = sum(k(a, b) for a in xs for b in ys) / (7 * 5)
    assert result.statistic == pytest.approx(xx + yy - 2 * xy, rel=1e-6)  # bandwidth here in float32
    assert result.p_value == 1.0  # no permutations: (1 + 0) / (1 + 0)


def test_mmd_detects_a_mean_shift_and_rarely_alarms_without_one():
    shifted = mmd_test(gaussian(200, 8, 0.0, 0), gaussian(100, 8, 0.5, 1), permutations=200)
    assert shifted.p_value < 0.01
    false_alarms = sum(
        mmd_test(gaussian(200, 8, 0.0, 2 * i), gaussian(100, 8, 0.0, 2 * i + 1), permutations=100, seed=i).p_value
        < 0.05
        for i in range(20)
    )
    assert false_alarms <= 4  # expected 1 of 20 at the 5% level


def test_ks_uses_scipy_per_dimension_with_benjamini_hochberg():
    x, y = gaussian(60, 4, 0.0, 3), gaussian(40, 4, 0.0, 4)
    y[:, 2] += 2.0  # only dimension 2 moves
    result, corrected = ks_test(x, y)
    raw = np.array([ks_2samp(x[:, d].numpy(), y[:, d].numpy()).pvalue for d in range(4)])
    order = np.argsort(raw)
    by_hand = np.empty(4)
    by_hand[order] = np.minimum.accumulate((raw[order] * 4 / np.arange(1, 5))[::-1])[::-1]
    np.testing.assert_allclose(corrected, np.minimum(by_hand, 1), rtol=1e-9)
    assert int(np.argmin(corrected)) == 2 and result.p_value == pytest.approx(corrected[2])


def test_temperature_scaling_recovers_an_overconfident_scale():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_reliability_bins_and_ece_by_hand():
    confidences = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([1, 0, 1, 1])
    result = reliability(confidences, correct, bins=10)
    # bin (0.9, 1.0]: confidence 0.95, accuracy 0.5; bin (0.5, 0.6]: 0.55 vs 1.0; each holds half the points
    assert result["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert result["bin_count"][9] == 2 and result["bin_count"][5] == 2 and sum(result["bin_count"]) == 4
    assert result["bin_accuracy"][9] == pytest.approx(0.5) and result["bin_confidence"][0] is None


def test_atc_reproduces_the_accuracy_it_was_fitted_at_and_falls_with_confidence():
    generator = torch.Generator().manual_seed(1)
    confidences = torch.rand(1000, generator=generator)
    correct = torch.rand(1000, generator=generator) < confidences  # confident predictions are right more often
    threshold = atc_threshold(confidences, correct)
    assert atc_estimate(confidences, threshold) == pytest.approx(float(correct.float().mean()), abs=0.002)
    assert atc_estimate(confidences * 0.5, threshold) < atc_estimate(confidences, threshold)


def test_mahalanobis_scores_far_points_higher_than_class_members():
    a, b = gaussian(300, 6, 0.0, 5), gaussian(300, 6, 4.0, 6)
    ood = Mahalanobis.fit(torch.cat([a, b]), torch.tensor([0] * 300 + [1] * 300), num_classes=2)
    near = ood.score(torch.cat([gaussian(50, 6, 0.0, 7), gaussian(50, 6, 4.0, 8)]))
    far = ood.score(gaussian(100, 6, -6.0, 9))
    assert auroc(near, far) > 0.99
    assert near.mean() == pytest.approx(6, rel=0.35)  # chi-squared with 6 degrees of freedom


def test_energy_is_lower_for_confident_logits_and_auroc_is_symmetric():
    confident, flat = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])
    assert energy_score(confident) < energy_score(flat)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9])) == 1.0
    assert auroc(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
