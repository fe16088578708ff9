"""Networks for self-supervised pretraining: a registered classifier's backbone with a pretext head.

The backbone is any registered classifier (its own classification head is never trained here); the
pretext head beside it is what the pretraining loss needs and is not part of a run's model.safetensors,
so `layerwise train --init` copies exactly the backbone. Not registered: these are not classifiers.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTION_DIM = 128  # SimCLR's output size: the loss compares these vectors, the backbone's are kept


class ProjectionHead(nn.Module):
    """SimCLR's 2-layer MLP: pooled features (B, D) -> (B, PROJECTION_DIM)."""

    def __init__(self, num_features: int, out_features: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_features, num_features, bias=False),
            nn.BatchNorm1d(num_features),
            nn.ReLU(inplace=True),
            nn.Linear(num_features, out_features),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


class TokenPredictionHead(nn.Module):
    """BERT's masked-token head: per-token features (B, T, D) -> logits over the vocabulary (B, T, V)."""

    def __init__(self, num_features: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(num_features, num_features), nn.GELU(), nn.LayerNorm(num_features))
        self.decoder = nn.Linear(num_features, vocab_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(features))


class Contrastive(nn.Module):
    """backbone -> pooled embedding (`forward_head(..., pre_logits=True)`) -> projection, for a contrastive loss."""

    def __init__(self, backbone: nn.Module, projector: ProjectionHead) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, D): the representation a fine-tuned classifier starts from."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.embed(x))  # (B, PROJECTION_DIM)


class MaskedTokens(nn.Module):
    """backbone -> per-token features (`forward_features`, (B, T, D)) -> vocabulary logits, for masked-token loss."""

    def __init__(self, backbone: nn.Module, head: TokenPredictionHead) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, head  # `projector`: the pretext head, whatever it predicts

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(ids), pre_logits=True)  # (B, D)

    def forward(self, ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """ids (B, T) and the positions to predict, bool (B, T) -> logits (M, V) of those M positions only
        (all B * T * V logits of a batch would take hundreds of megabytes)."""
        return self.projector(self.backbone.forward_features(ids)[chosen])
