"""A small decoder-only transformer language model (GPT-style) and `generate`, its sampling loop.

Pre-norm blocks (RMSNorm), causal attention through `scaled_dot_product_attention` with rotary position
embeddings, a 4x GELU MLP, no biases, and an LM head tied to the token embedding.

Generation can keep a KV cache: `GPT.forward_step(ids, cache)` returns the logits and a new cache, a list
with one `(keys, values)` pair per block, each (B, H, L, head_dim) for the L tokens seen so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import InputError
from layerwise.models.registry import register_model

ROPE_BASE = 10_000.0  # rotary frequencies are base^(-2i/head_dim), as in RoFormer
INIT_STD = 0.02  # GPT-2 initialisation; residual projections get INIT_STD / sqrt(2 * depth)

LayerCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values) of one block, each (B, H, L, head_dim)
KVCache = list[LayerCache]  # one entry per block, shallow to deep


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_len: int  # the most tokens the model attends over at once
    dim: int
    depth: int
    heads: int
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise InputError(f"GPTConfig: dim {self.dim} must be a multiple of heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise InputError(f"GPTConfig: head size dim/heads = {self.dim // self.heads} must be even for rotary")
        if self.vocab_size < 1 or self.context_len < 1 or self.depth < 1:
            raise InputError("GPTConfig: vocab_size, context_len and depth must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"GPTConfig: dropout {self.dropout} must be in [0, 1)")


def cache_length(cache: KVCache | None) -> int:
    """How many tokens a cache holds (0 for None)."""
    return 0 if not cache else cache[0][0].shape[2]


def rotary_tables(context_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles: each (context_len, head_dim // 2)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    angles = torch.arange(context_len, dtype=torch.float64)[:, None] * inv_freq  # (context_len, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]) of x (B, H, T, head_dim) by the angles of cos, sin (T, head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, H, T, head_dim/2)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and an optional KV cache."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)  # a residual projection: scaled down at init
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        """x (B, T, D) at positions given by cos, sin (T, head_dim/2) -> (B, T, D), and keys/values incl. past."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, L, hd), L = cached + T
            v = torch.cat([past[1], v], dim=2)
        total = k.shape[2]
        mask = None
        if total == t:  # no cache: the plain causal triangle
            is_causal = True
        elif t == 1:  # one new query after the cache: it may see every key
            is_causal = False
        else:  # a block of T queries after L - T cached keys: query i sees keys up to L - T + i
            is_causal = False
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=total - t)  # (T, L)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, H, T, hd) -> (B, T, D)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    """(B, T, D) -> (B, T, 4D) -> GELU -> (B, T, D)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * dim, dim, bias=False)  # a residual projection: scaled down at init
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = MLP(dim, dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        """x (B, T, D) -> (B, T, D), and this block's keys/values (B, H, L, head_dim) including the past."""
        attended, kv = self.attn(self.attn_norm(x), cos, sin, past)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), each position seeing only itself and earlier ones."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.context_len = config.context_len
        self.num_features = config.dim
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.dropout) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied: one (vocab_size, dim) matrix reads and writes tokens
        cos, sin = rotary_tables(config.context_len, config.dim // config.heads)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)  # (context_len, head_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(config.depth)

    def _init_weights(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
        # Each block adds two residual branches; keep the sum's variance from growing with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=INIT_STD / math.sqrt(2 * depth))

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed)] + [(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]

    def _hidden(self, ids: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """ids (B, T) following the cache's tokens -> normed hidden states (B, T, D), and the extended cache."""
        start = cache_length(cache)
        end = start + ids.shape[1]
        if end > self.context_len:
            raise InputError(
                f"GPT: {end} tokens (cache {start} + {ids.shape[1]} new) exceed context_len {self.context_len}; "
                "pass a shorter window"
            )
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, head_dim/2), offset by the cache
        h = self.dropout(self.embed(ids))  # (B, T, D)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, cos, sin, cache[i] if cache else None)
            new_cache.append(kv)
        return self.norm(h), new_cache

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> hidden states (B, T, D) after the final norm."""
        return self._hidden(ids, None)[0]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features (B, T, D) -> logits (B, T, vocab_size); with pre_logits, the mean over T (B, D) as an embedding."""
        if pre_logits:
            return features.mean(dim=1)
        return self.head(features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(ids))

    def forward_step(self, ids: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """ids (B, T) that follow the cached tokens -> logits (B, T, vocab_size) and a new cache holding both.

        The cache passed in is not modified. Cache plus new tokens must fit in `context_len`.
        """
        features, new_cache = self._hidden(ids, cache)
        return self.forward_head(features), new_cache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) with every token outside the top k, or outside the nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least top_p.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (..., V): probability of the tokens ranked above each one
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from next-token logits (V,). Temperature 0 is greedy and draws nothing from the generator."""
    if temperature == 0:
        return int(logits.argmax())
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)  # a CPU generator then reproduces a run on any device
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_generate_args(
    model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not prompt_ids:
        raise InputError("generate: prompt_ids is empty; give at least one token (e.g. a start-of-text id)")
    vocab = model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise InputError(f"generate: prompt ids must be in [0, {vocab}); got {min(prompt_ids)}..{max(prompt_ids)}")
    if max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"generate: top_p must be in (0, 1] or None, got {top_p}")


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` tokens; returns the new ids only.

    The model sees at most its last `context_len` tokens: a longer prompt is cut from the left, and past
    `context_len` the window slides one token per step. With `use_cache`, each step feeds only the newest
    token while the window still grows; once it slides, every step recomputes the whole window, because the
    cached keys of deeper blocks were computed while tokens now out of the window were still visible. Cached
    and uncached runs therefore give the same tokens. `on_token(id)` is called as soon as each id is chosen.
    """
    _check_generate_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    window_len = model.context_len
    tokens = list(prompt_ids)[-window_len:]
    new_ids: list[int] = []
    cache: KVCache | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                window = torch.tensor([tokens[-window_len:]], device=device)  # (1, T)
                if not use_cache:
                    logits = model(window)
                elif cache is not None and cache_length(cache) < window_len:
                    logits, cache = model.forward_step(window[:, -1:], cache)  # the newest token only
                else:  # the first step, or the window has slid: (re)fill the cache from the whole window
                    logits, cache = model.forward_step(window, None)
                next_id = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
                tokens.append(next_id)
                new_ids.append(next_id)
                if on_token is not None:
                    on_token(next_id)
    finally:
        model.train(was_training)
    return new_ids


def _gpt(vocab_size: int, context_len: int, dim: int, depth: int, heads: int, dropout: float) -> GPT:
    return GPT(GPTConfig(vocab_size, context_len, dim=dim, depth=depth, heads=heads, dropout=dropout))


@register_model("gpt_tiny", modalities=("text",), tasks=("generate",))
def gpt_tiny(vocab_size: int, context_len: int, dropout: float = 0.0) -> GPT:
    return _gpt(vocab_size, context_len, dim=128, depth=4, heads=4, dropout=dropout)


@register_model("gpt_small", modalities=("text",), tasks=("generate",))
def gpt_small(vocab_size: int, context_len: int, dropout: float = 0.0) -> GPT:
    return _gpt(vocab_size, context_len, dim=256, depth=6, heads=8, dropout=dropout)


@register_model("gpt_medium", modalities=("text",), tasks=("generate",))
def gpt_medium(vocab_size: int, context_len: int, dropout: float = 0.0) -> GPT:
    return _gpt(vocab_size, context_len, dim=512, depth=8, heads=8, dropout=dropout)
