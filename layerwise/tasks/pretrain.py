"""Self-supervised pretraining: features learned from inputs without labels, to start a classifier from.

A pretrain run is not trained by `layerwise train` (there are no targets to read): `layerwise pretrain`
writes it, and `layerwise train DATA --init RUN` fine-tunes it, reusing its front end (preprocessing,
statistics, tokenizer) and every backbone tensor. Its network is a registered classifier with a
placeholder one-class head, which no classifier can match, so the fine-tuned run always gets a new head.

Objectives, by modality: images and audio learn by contrast (SimCLR: two augmented views of an input
must be each other's nearest projection among the batch, NT-Xent loss); text by predicting masked
tokens (BERT). Both are monitored by their loss on a held-out part of the unlabelled inputs, and, when
a labelled probe set is given, report the kNN accuracy of the frozen features every epoch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.data.frontend import FrontEnd, frontend_from_json
from layerwise.data.views import IGNORE
from layerwise.errors import InputError
from layerwise.runtime import channels_last_for, model_device, to_device

CONTRASTIVE, MASKED_TOKENS = "contrastive", "masked_tokens"
TEMPERATURE = 0.2  # NT-Xent temperature: sharper than SimCLR's 0.5 suits batches of ~100 pairs
PLACEHOLDER_CLASSES = 1  # the backbone's own head: never trained, never transferred (a classifier has >= 2)


def objective_name(modality: str) -> str:
    return MASKED_TOKENS if modality == "text" else CONTRASTIVE


class PretrainTask:
    """A fitted pretraining run: its front end and the objective it was trained with."""

    name = "pretrain"
    commands: frozenset[str] = frozenset()  # nothing answers for it: it is the start of another run (--init)
    starts_any_task = True  # `train --init` accepts it for every task of its modality
    transfer_kind = "pretrained without labels"  # how the approach of a run it started is named
    monitor = "loss"
    higher_is_better = False

    def __init__(self, frontend: FrontEnd, objective: str) -> None:
        self.frontend = frontend
        self.objective = objective

    @property
    def modality(self) -> str:
        return self.frontend.modality

    def to_json(self) -> dict:
        return {"modality": self.modality, "preprocessing": self.frontend.to_json(), "objective": self.objective}

    @classmethod
    def from_config(cls, config: dict) -> PretrainTask:
        return cls(frontend_from_json(config["preprocessing"]), config["objective"])

    @classmethod
    def prepare(cls, data: Path, options, saved: dict | None = None, donor=None, log=print):
        raise InputError(
            "`layerwise train` does not pretrain (there are no labels to learn from): run "
            f"`layerwise pretrain {data} --out RUN`, then `layerwise train LABELLED --init RUN`"
        )


# ---------------------------------------------------------------------- objectives


def nt_xent(projections: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's loss over (2B, P) projections whose rows i and B + i are two views of one input.

    Each row must pick its partner out of the other 2B - 2 rows (cross-entropy over cosine similarities /
    temperature). Returns the mean loss and, per row, whether the partner was the most similar (2B,).
    """
    z = F.normalize(projections.float(), dim=1)
    n = len(z) // 2
    similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # a view is not its own partner
    partner = torch.arange(2 * n, device=z.device).roll(n)  # i -> i + B, i + B -> i
    return F.cross_entropy(similarity, partner), similarity.argmax(1) == partner


class ContrastiveObjective:
    """NT-Xent on two augmented views (batches from `ViewBatches` with `image_views` / `spectrogram_views`)."""

    monitor = "loss"
    higher_is_better = False

    def __init__(self, to_model_input, probe=None, temperature: float = TEMPERATURE) -> None:
        self.to_model_input, self.probe, self.temperature = to_model_input, probe, temperature

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, found = nt_xent(model(inputs), self.temperature)
        return loss, {"pair_accuracy": float(found.float().mean())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Held-out loss and pair accuracy (views fixed by the batches' seed), and the probe's kNN accuracy."""
        device, was_training = model_device(model), model.training
        model.eval()
        total, found, n = 0.0, 0.0, 0
        for x, _ in batches.epoch(0):
            loss, hits = nt_xent(model(to_device(x, device, channels_last_for(model, device))), self.temperature)
            total, found, n = total + float(loss) * len(hits), found + float(hits.sum()), n + len(hits)
        model.train(was_training)
        return {"loss": total / max(n, 1), "pair_accuracy": found / max(n, 1)} | probe_metrics(self, model)


class MaskedTokenObjective:
    """Cross-entropy of the masked tokens (batches from `ViewBatches` with `mask_tokens`)."""

    monitor = "loss"
    higher_is_better = False

    def __init__(self, to_model_input, probe=None) -> None:
        self.to_model_input, self.probe = to_model_input, probe

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        chosen = targets != IGNORE  # (B, T)
        logits = model(inputs, chosen).float()  # (M, V): only the M predicted positions
        wanted = targets[chosen]
        loss = F.cross_entropy(logits, wanted)
        return loss, {"masked_accuracy": float((logits.argmax(1) == wanted).float().mean())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        device, was_training = model_device(model), model.training
        model.eval()
        total, correct, n = 0.0, 0.0, 0
        for ids, targets in batches.epoch(0):
            ids, targets = to_device(ids, device), to_device(targets, device)
            chosen = targets != IGNORE
            logits = model(ids, chosen).float()
            wanted = targets[chosen]
            total += float(F.cross_entropy(logits, wanted, reduction="sum"))
            correct, n = correct + float((logits.argmax(1) == wanted).sum()), n + len(wanted)
        model.train(was_training)
        return {"loss": total / max(n, 1), "masked_accuracy": correct / max(n, 1)} | probe_metrics(self, model)


def probe_metrics(objective, model: nn.Module) -> dict[str, float]:
    """{"knn_accuracy"} of the frozen backbone on the probe set (a `ProbeSet`), or {} without one."""
    if objective.probe is None:
        return {}
    from layerwise.tasks.probe import embed

    features = embed(model.backbone, objective.probe.inputs, objective.to_model_input)
    return {"knn_accuracy": objective.probe.knn(features)}
