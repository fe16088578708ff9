"""A pre-norm transformer encoder over token ids, classifying from the [CLS] position."""

from __future__ import annotations

import torch
from torch import nn

from layerwise.data.text import PAD_ID
from layerwise.models.heads import ClassifierHead
from layerwise.models.registry import register_model


class TokenEmbedding(nn.Module):
    """Token + learned position embeddings: ids (B, T) -> (B, T, D)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.positions = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tokens(ids) + self.positions[:, : ids.shape[1]])


class TransformerClassifier(nn.Module):
    def __init__(
        self, vocab_size: int, max_len: int, num_classes: int, dim: int, depth: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, dim, max_len, dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        # Mean over tokens rather than [CLS] alone: it learns far faster from a few hundred texts.
        self.head = ClassifierHead(dim, num_classes, pool="tokens", dropout=dropout)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed)] + [(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == PAD_ID  # (B, T), True where there is no token
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=padding)
        return self.norm(h).masked_fill(padding[..., None], 0.0)  # (B, T, D), zero at padding

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(features, pre_logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(ids))


@register_model("transformer_tiny", modalities=("text",))
def transformer_tiny(vocab_size: int, max_len: int, num_classes: int, dropout: float = 0.1) -> TransformerClassifier:
    return TransformerClassifier(vocab_size, max_len, num_classes, dim=128, depth=2, heads=4, dropout=dropout)


@register_model("transformer_small", modalities=("text",))
def transformer_small(vocab_size: int, max_len: int, num_classes: int, dropout: float = 0.1) -> TransformerClassifier:
    return TransformerClassifier(vocab_size, max_len, num_classes, dim=256, depth=4, heads=8, dropout=dropout)
