"""The classification head shared by every backbone."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Pool features to one vector per example, then a linear layer to class logits.

    pool="avg": (B, C, H, W) -> mean over H, W.  pool="tokens": (B, T, D) -> mean over the real tokens,
    which are the positions whose features are not exactly zero (encoders zero their padding).
    """

    def __init__(self, num_features: int, num_classes: int, pool: str = "avg", dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool == "avg":
            pooled = features.mean(dim=(2, 3))
        else:
            real = (features != 0).any(dim=2, keepdim=True).to(features.dtype)  # (B, T, 1)
            pooled = (features * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        if pre_logits:
            return pooled  # (B, num_features): the embedding used by probes and shift detection
        return self.fc(self.dropout(pooled))
