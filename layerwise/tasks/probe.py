"""How good are frozen features? A k-nearest-neighbour and a linear probe on a small labelled set.

The labelled set is split once, stratified by class, into a half the probes are fitted on and a half
they are scored on; the same split scores the learned features, a randomly initialised network's and
the raw input's, so the three numbers compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch import nn
from torch.nn import functional as F

from layerwise.data.batches import TensorBatches
from layerwise.explain.layers import halves, probe_accuracy, stratified_sample
from layerwise.runtime import predict_embeddings

KNN_K = 20
KNN_TEMPERATURE = 0.07  # neighbours vote with weight exp(cosine / T), as in InstDisc's and DINO's kNN evaluation
MAX_PROBE_EXAMPLES = 2000  # a stratified sample of the labelled set: half fit, half scored
EMBED_BATCH = 256


@dataclass(frozen=True)
class ProbeSet:
    """Cached labelled inputs (N, ...) with class indices (N,) and the fit / score halves (index arrays)."""

    source: str
    inputs: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    fit: np.ndarray
    score: np.ndarray

    @classmethod
    def split(cls, source: str, inputs: torch.Tensor, labels: torch.Tensor, class_names: list[str], seed: int):
        """A stratified sample of at most MAX_PROBE_EXAMPLES, halved into fit and score parts."""
        keep = torch.from_numpy(np.sort(stratified_sample(labels.numpy(), MAX_PROBE_EXAMPLES, seed)))
        inputs, labels = inputs[keep], labels[keep]
        fit, score = halves(labels.numpy(), seed)
        return cls(source, inputs, labels, class_names, fit, score)

    def describe(self) -> str:
        return (
            f"{len(self.fit)} labelled examples of {self.source} fit the probes and {len(self.score)} others score "
            f"them (a stratified half each, {len(self.class_names)} classes)"
        )

    def knn(self, features: torch.Tensor) -> float:
        """Accuracy of the cosine kNN (k=20, similarity-weighted votes) of the scored half among the fitted half."""
        return knn_accuracy(features, self.labels, self.fit, self.score, len(self.class_names))

    def linear(self, features: torch.Tensor | np.ndarray | sparse.spmatrix, seed: int = 0) -> float:
        """Accuracy of a logistic regression on standardised features, fitted on one half, scored on the other."""
        x = features.numpy() if isinstance(features, torch.Tensor) else features
        return probe_accuracy(x, self.labels.numpy(), self.fit, self.score, seed)


def knn_accuracy(
    features: torch.Tensor, labels: torch.Tensor, fit: np.ndarray, score: np.ndarray, num_classes: int, k: int = KNN_K
) -> float:
    """features (N, D), labels (N,): accuracy on `score` of a weighted cosine kNN over `fit`."""
    if len(score) == 0 or len(fit) == 0:
        return float("nan")
    unit = F.normalize(features.float(), dim=1)
    fit_t, score_t = torch.from_numpy(fit), torch.from_numpy(score)
    similarity = unit[score_t] @ unit[fit_t].T  # (S, F)
    top = similarity.topk(min(k, len(fit)), dim=1)
    neighbour_labels = labels[fit_t][top.indices]  # (S, k)
    votes = torch.zeros(len(score), num_classes).scatter_add_(1, neighbour_labels, (top.values / KNN_TEMPERATURE).exp())
    return float((votes.argmax(1) == labels[score_t]).float().mean())


def embed(backbone: nn.Module, inputs: torch.Tensor, to_model_input) -> torch.Tensor:
    """Pooled features (N, D) of any registered classifier (`forward_head(..., pre_logits=True)`), in eval mode."""
    batches = TensorBatches(inputs, torch.zeros(len(inputs), dtype=torch.int64), EMBED_BATCH, to_model_input)
    return predict_embeddings(backbone, batches)[0]


def dense(features) -> np.ndarray:
    """Raw-input features as a dense float array (the text front end gives sparse token counts)."""
    return features.toarray() if sparse.issparse(features) else np.asarray(features)
