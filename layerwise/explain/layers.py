"""What each layer learned: linear probes per stage, first-layer filters, top-activating inputs, a feature map.

`analyse_layers(network, frontend, class_names, inputs, labels)` runs the network once over (a
capped, stratified sample of) labelled cached inputs, recording every stage from `named_stages()`
with forward hooks, fits the probes and returns the numbers; `explain.draw` turns them into figures
and HTML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler
from torch import nn

from layerwise.explain.stages import (
    ReceptiveField,
    as_units,
    first_layer_weights,
    pooled,
    position_mask,
    receptive_fields,
    recorded,
    stages_of,
    token_mask,
)

MAX_EXAMPLES = 2000  # examples analysed (half fit the probes, half score them)
FORWARD_BATCH = 256
PROBE_C = 0.1  # inverse L2 strength of the probes: features are standardised, a few hundred to a few thousand dims
PROBE_MAX_ITER = 300
UNITS_SHOWN = 4  # units per stage whose top-activating inputs are shown ...
TOP_INPUTS = 6  # ... and how many inputs each
PROJECTION_POINTS = 1000  # t-SNE cost grows with the points: ~2 s for 1,000 on 2 cores
INPUT_NAME = "input"  # the raw-input reference probe, depth 0


@dataclass(frozen=True)
class Probe:
    """Held-out accuracy of a logistic regression on one stage's frozen, pooled features."""

    name: str
    depth: int  # 0 = raw input reference, 1.. = stages shallow to deep
    accuracy: float
    n_features: int
    shape: tuple[int, ...]  # one example's stage output, e.g. (64, 14, 14) or (32, 128)

    def to_json(self) -> dict:
        return {
            "stage": self.name,
            "depth": self.depth,
            "probe_accuracy": None if np.isnan(self.accuracy) else round(self.accuracy, 4),
            "n_features": self.n_features,
            "output_shape": list(self.shape),
        }


@dataclass(frozen=True)
class TopInputs:
    """For one stage: the units shown and, for each, the examples and positions that excite it most."""

    stage: str
    units: list[int]
    examples: list[list[int]]  # [unit][rank] -> index into LayerAnalysis.inputs
    positions: list[list[int]]  # [unit][rank] -> flat position on the stage grid (or token index)
    values: list[list[float]]
    grid: tuple[int, ...]  # (H', W') of a feature map, or (T,) of a sequence
    field: ReceptiveField | None  # feature maps only


@dataclass
class LayerAnalysis:
    probes: list[Probe]
    chance: float  # accuracy of always predicting the most common class of the scoring half
    n_fit: int
    n_score: int
    inputs: torch.Tensor  # the analysed cached inputs (N, ...), for drawing
    labels: np.ndarray  # (N,) class indices
    class_names: list[str]
    modality: str
    top_inputs: list[TopInputs]
    embedding_2d: np.ndarray  # (M, 2) t-SNE of the final features
    embedding_labels: np.ndarray  # (M,)
    first_layer: tuple[str, torch.Tensor] | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "probes": [p.to_json() for p in self.probes],
            "chance_accuracy": None if np.isnan(self.chance) else round(self.chance, 4),
            "n_fit": self.n_fit,
            "n_score": self.n_score,
            "probe": f"logistic regression (C={PROBE_C}) on standardised mean+max pooled stage outputs",
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def stratified_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to `limit` indices, the same share of every class, in a seeded random order."""
    rng = np.random.default_rng(seed)
    if len(labels) <= limit:
        return rng.permutation(len(labels))
    keep = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = max(1, round(limit * len(members) / len(labels)))
        keep.append(rng.choice(members, size=min(n, len(members)), replace=False))
    return rng.permutation(np.concatenate(keep))[:limit]


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into a probe-fitting half and a scoring half, stratified by class.

    A class with a single example goes to the fitting and scoring halves in turn.
    """
    rng = np.random.default_rng(seed + 1)
    fit, score = [], []
    singletons = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) == 1:
            (fit if singletons % 2 == 0 else score).append(members)
            singletons += 1
            continue
        fit.append(members[: len(members) // 2])
        score.append(members[len(members) // 2 :])
    return np.concatenate(fit or [[]]).astype(int), np.concatenate(score or [[]]).astype(int)


def probe_accuracy(features, labels: np.ndarray, fit: np.ndarray, score: np.ndarray, seed: int) -> float:
    """Fit a logistic regression on standardised features[fit]; its accuracy on features[score].

    Only examples of classes the probe saw are scored (a class with one example cannot be both learned and
    tested: with one example per class every answer would be wrong). NaN when nothing is left to score or
    fewer than two classes to fit.
    """
    score = score[np.isin(labels[score], labels[fit])]
    if len(score) == 0 or len(np.unique(labels[fit])) < 2:
        return float("nan")
    scaler = StandardScaler(with_mean=not sparse.issparse(features))
    x_fit = scaler.fit_transform(features[fit])
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    probe.fit(x_fit, labels[fit])
    return float((probe.predict(scaler.transform(features[score])) == labels[score]).mean())


@torch.no_grad()
def record_stages(network: nn.Module, frontend, inputs: torch.Tensor) -> dict:
    """One pass over cached inputs: per stage the pooled vectors (N, F), per-unit peak values and
    positions (N, U); the final features (N, num_features); and one example's stage output shape."""
    network.eval()
    device = next(network.parameters()).device
    stages = stages_of(network)
    pooled_parts: dict[str, list] = {name: [] for name, _ in stages}
    peak_parts: dict[str, list] = {name: [] for name, _ in stages}
    where_parts: dict[str, list] = {name: [] for name, _ in stages}
    shapes: dict[str, tuple[int, ...]] = {}
    final = []
    with recorded(stages) as outputs:
        for start in range(0, len(inputs), FORWARD_BATCH):
            x = frontend.model_input(inputs[start : start + FORWARD_BATCH]).to(device)
            tokens = token_mask(x, getattr(frontend, "token_roles", None))
            final.append(network.forward_head(network.forward_features(x), pre_logits=True).float().cpu())
            for name, _ in stages:
                out = outputs[name].float()
                mask = position_mask(out, tokens)
                pooled_parts[name].append(pooled(out, mask).cpu())
                units = as_units(out).masked_fill(~mask[:, None, :], float("-inf"))  # (B, U, P)
                peak, where = units.max(2)
                peak_parts[name].append(peak.cpu())
                where_parts[name].append(where.cpu())
                shapes[name] = tuple(out.shape[1:])
    return {
        "pooled": {k: torch.cat(v).numpy() for k, v in pooled_parts.items()},
        "peak": {k: torch.cat(v) for k, v in peak_parts.items()},
        "where": {k: torch.cat(v) for k, v in where_parts.items()},
        "shapes": shapes,
        "final": torch.cat(final).numpy(),
    }


def top_activating(
    peak: torch.Tensor, where: torch.Tensor, units_shown: int, top: int
) -> tuple[list, list, list, list]:
    """Pick the units whose peak activation varies most across examples; for each, its top examples."""
    spread = torch.nan_to_num(peak, neginf=0.0).var(0)  # (U,)
    units = spread.argsort(descending=True)[:units_shown].tolist()
    examples, positions, values = [], [], []
    for unit in units:
        order = peak[:, unit].argsort(descending=True)[:top]
        examples.append(order.tolist())
        positions.append(where[order, unit].tolist())
        values.append(peak[order, unit].tolist())
    return units, examples, positions, values


def project_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE of standardised features to (N, 2); plain PCA when there are too few points for t-SNE."""
    x = StandardScaler().fit_transform(features)
    if len(x) < 10:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        out = centred @ vt[:2].T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(2, init="pca", perplexity=perplexity, max_iter=500, random_state=seed).fit_transform(x)


def analyse_layers(
    network: nn.Module,
    frontend,
    class_names: list[str],
    inputs: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    max_examples: int = MAX_EXAMPLES,
    seed: int = 0,
) -> LayerAnalysis:
    """Probe every stage of `network` on labelled cached inputs (N, ...) with class indices (N,)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    labels = np.asarray(labels)
    keep = stratified_sample(labels, max_examples, seed)
    inputs, labels = inputs[torch.from_numpy(keep)], labels[keep]
    if len(np.unique(labels)) < 2:
        raise ValueError("layer probes need labelled examples of at least two classes")
    recorded_stages = record_stages(network, frontend, inputs)
    seconds["forward"] = time.perf_counter() - started

    started = time.perf_counter()
    fit, score = halves(labels, seed)
    raw = frontend.baseline_features(inputs)  # the input, downsampled (the classical baseline's features)
    probes = [
        Probe(INPUT_NAME, 0, probe_accuracy(raw, labels, fit, score, seed), raw.shape[1], tuple(inputs.shape[1:]))
    ]
    for depth, (name, features) in enumerate(recorded_stages["pooled"].items(), start=1):
        accuracy = probe_accuracy(features, labels, fit, score, seed)
        probes.append(Probe(name, depth, accuracy, features.shape[1], recorded_stages["shapes"][name]))
    scored = score[np.isin(labels[score], labels[fit])]  # what probe_accuracy scores
    chance = float(np.bincount(labels[scored]).max() / len(scored)) if len(scored) else float("nan")
    seconds["probes"] = time.perf_counter() - started

    started = time.perf_counter()
    fields = receptive_fields(network, tuple(inputs.shape[1:])) if inputs.ndim == 4 else {}
    top_inputs = []
    for name, shape in recorded_stages["shapes"].items():
        units, examples, positions, values = top_activating(
            recorded_stages["peak"][name], recorded_stages["where"][name], UNITS_SHOWN, TOP_INPUTS
        )
        grid = tuple(shape[1:]) if len(shape) == 3 else (shape[0],) if len(shape) == 2 else (1,)
        top_inputs.append(TopInputs(name, units, examples, positions, values, grid, fields.get(name)))
    seconds["top_inputs"] = time.perf_counter() - started

    started = time.perf_counter()
    shown = np.arange(min(len(labels), PROJECTION_POINTS))  # the sample is already in random order
    embedding_2d = project_2d(recorded_stages["final"][shown], seed)
    seconds["projection"] = time.perf_counter() - started
    return LayerAnalysis(
        probes=probes,
        chance=chance,
        n_fit=len(fit),
        n_score=len(scored),
        inputs=inputs,
        labels=labels,
        class_names=class_names,
        modality=frontend.modality,
        top_inputs=top_inputs,
        embedding_2d=embedding_2d,
        embedding_labels=labels[shown],
        first_layer=first_layer_weights(network),
        seconds=seconds,
    )
