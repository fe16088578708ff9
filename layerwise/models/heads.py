"""The classification head shared by every backbone."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Pool features to one vector per example, then a linear layer to class logits.

    pool="avg": (B, C, H, W) -> mean over H, W.  pool="cls": (B, T, D) -> the first token.
    """

    def __init__(self, num_features: int, num_classes: int, pool: str = "avg", dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3)) if self.pool == "avg" else features[:, 0]
        if pre_logits:
            return pooled  # (B, num_features): the embedding used by probes and shift detection
        return self.fc(self.dropout(pooled))
