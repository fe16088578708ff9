"""The statistics behind shift detection: two-sample tests, calibration, label-free accuracy, OOD scores.

Each function is small and takes plain tensors, so it can be checked against a hand computation.
Written here rather than taken from a library: alibi-detect and torchdrift carry these tests but pull
in TensorFlow or pin old PyTorch; scipy covers the one-dimensional KS test, which we use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MMD_PERMUTATIONS = 500


@dataclass(frozen=True)
class TwoSampleResult:
    statistic: float  # MMD: the unbiased squared MMD; KS: the largest per-dimension statistic
    p_value: float


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """Median pairwise distance of the pooled sample: the usual RBF bandwidth for MMD."""
    pooled = torch.cat([x, y])
    distances = torch.cdist(pooled, pooled)
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    return max(float(upper.median()), 1e-6)


def mmd_test(
    reference: torch.Tensor, new: torch.Tensor, permutations: int = MMD_PERMUTATIONS, seed: int = 0
) -> TwoSampleResult:
    """Kernel two-sample test (Gretton et al. 2012): unbiased MMD² with an RBF kernel, permutation p-value.

    reference (n, D), new (m, D). The kernel matrix of the pooled sample is computed once; each
    permutation only re-indexes it. The p-value counts the observed statistic among the permuted
    ones, (1 + #{perm >= observed}) / (1 + permutations), so it is never 0 and the test is exact.
    """
    x, y = reference.double(), new.double()
    n, m = len(x), len(y)
    pooled = torch.cat([x, y])
    bandwidth = median_bandwidth(x, y)
    kernel = torch.exp(-torch.cdist(pooled, pooled).pow(2) / (2 * bandwidth**2))  # (n+m, n+m)
    kernel.fill_diagonal_(0.0)  # unbiased estimator: no i == j terms

    generator = torch.Generator().manual_seed(seed)
    orders = [torch.arange(n + m)] + [torch.randperm(n + m, generator=generator) for _ in range(permutations)]
    in_x = torch.zeros(len(orders), n + m, dtype=torch.float64)  # row p: 1 where permutation p puts a point in X
    for p, order in enumerate(orders):
        in_x[p, order[:n]] = 1.0
    in_y = 1.0 - in_x
    # For each assignment a (a row of in_x / in_y): sum_ij K_ij a_i a_j, in one matrix product per pair.
    kx, ky = in_x @ kernel, in_y @ kernel
    xx = (kx * in_x).sum(1) / (n * (n - 1))
    yy = (ky * in_y).sum(1) / (m * (m - 1))
    xy = (kx * in_y).sum(1) / (n * m)
    statistics = xx + yy - 2 * xy
    observed = statistics[0]
    p_value = (1 + int((statistics[1:] >= observed).sum())) / (1 + permutations)
    return TwoSampleResult(float(observed), p_value)


def ks_test(reference: torch.Tensor, new: torch.Tensor) -> tuple[TwoSampleResult, np.ndarray]:
    """Per-dimension Kolmogorov–Smirnov tests with the Benjamini–Hochberg correction.

    Returns the smallest corrected p-value (the test "some dimension shifted") and the corrected
    p-value of every dimension (D,).
    """
    from scipy.stats import false_discovery_control, ks_2samp

    result = ks_2samp(reference.double().numpy(), new.double().numpy(), axis=0)
    corrected = false_discovery_control(np.clip(result.pvalue, 0.0, 1.0), method="bh")
    return TwoSampleResult(float(np.max(result.statistic)), float(corrected.min())), corrected


# ---------------------------------------------------------------------- calibration


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T).

    Optimised over log T, so T stays positive, with L-BFGS on the held-out logits (N, K).
    """
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def reliability(confidences: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error and the reliability diagram's bins (equal-width in confidence).

    ECE = sum over bins of (fraction of examples in the bin) * |accuracy - mean confidence|.
    """
    confidences, correct = confidences.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidences, edges[1:-1], right=True)  # bin index 0..bins-1
    counts = torch.bincount(which, minlength=bins).double()
    confidence_sum = torch.bincount(which, weights=confidences, minlength=bins)
    correct_sum = torch.bincount(which, weights=correct, minlength=bins)
    filled = counts > 0
    mean_confidence = torch.where(filled, confidence_sum / counts.clamp_min(1), torch.nan)
    accuracy = torch.where(filled, correct_sum / counts.clamp_min(1), torch.nan)
    gaps = (accuracy - mean_confidence).abs().nan_to_num(0.0)
    ece = float((counts / max(len(confidences), 1) * gaps).sum())
    return {
        "ece": ece,
        "bin_edges": edges.tolist(),
        "bin_count": counts.long().tolist(),
        "bin_confidence": [None if not f else float(v) for f, v in zip(filled, mean_confidence, strict=True)],
        "bin_accuracy": [None if not f else float(v) for f, v in zip(filled, accuracy, strict=True)],
    }


# ---------------------------------------------------------------------- accuracy without labels


def atc_threshold(confidences: torch.Tensor, correct: torch.Tensor) -> float:
    """Average Thresholded Confidence (Garg et al. 2022): the threshold t at which the fraction of
    held-out examples with confidence above t equals the held-out accuracy."""
    accuracy = float(correct.double().mean())
    return float(torch.quantile(confidences.double(), 1.0 - accuracy))


def atc_estimate(confidences: torch.Tensor, threshold: float) -> float:
    """The estimated accuracy on new data: the fraction of its confidences above the threshold."""
    return float((confidences.double() > threshold).double().mean())


# ---------------------------------------------------------------------- per-input OOD score


@dataclass(frozen=True)
class Mahalanobis:
    """Class-conditional Gaussians with a shared covariance on the embeddings (Lee et al. 2018).

    The score of an embedding is its smallest squared Mahalanobis distance to a class mean: large
    means unlike every class the model was trained on.
    """

    class_means: torch.Tensor  # (K, D)
    precision: torch.Tensor  # (D, D), inverse of the shared (shrunk) covariance

    @classmethod
    def fit(cls, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Mahalanobis:
        from sklearn.covariance import LedoitWolf

        x = embeddings.double()
        means = torch.stack([
            x[labels == k].mean(0) if (labels == k).any() else x.mean(0) for k in range(num_classes)
        ])  # fmt: skip
        centred = x - means[labels]
        # Ledoit–Wolf shrinkage: a well-conditioned covariance from a few hundred examples in D dims.
        covariance = LedoitWolf(assume_centered=True).fit(centred.numpy()).covariance_
        return cls(means.float(), torch.from_numpy(np.linalg.inv(covariance)).float())

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) smallest squared distance to a class mean."""
        diff = embeddings.float()[:, None, :] - self.class_means[None]  # (N, K, D)
        distances = torch.einsum("nkd,de,nke->nk", diff, self.precision, diff)
        return distances.min(1).values


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy flipped so that larger means more out-of-distribution (Liu et al. 2020)."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def auroc(in_distribution: torch.Tensor, out_of_distribution: torch.Tensor) -> float:
    """How well a score (larger = more OOD) separates the two sets: 1 perfect, 0.5 chance."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_distribution, out_of_distribution]).double().numpy()
    truth = np.r_[np.zeros(len(in_distribution)), np.ones(len(out_of_distribution))]
    return float(roc_auc_score(truth, scores))
