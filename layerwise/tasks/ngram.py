"""The classical baseline for text generation: an interpolated Kneser–Ney n-gram model over bytes.

A small GPT trained on a user's text is only worth its cost if it beats this, so the comparison
is scored the same way: bits per byte of held-out text.

For an n-gram ``h w`` (context ``h``, next byte ``w``) of length k the model is (Chen & Goodman,
"An empirical study of smoothing techniques", 1998, interpolated Kneser–Ney)::

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .)  +  D_k * N_k(h .) / c_k(h .) * P_{k-1}(w | h')

where ``h'`` is ``h`` without its first byte, ``c_k(h .)`` sums ``c_k(h w)`` over all next bytes,
``N_k(h .)`` counts the next bytes with ``c_k(h w) > 0``, and ``P_0`` is uniform over 256 bytes,
so no byte ever has probability zero. A context never seen in training backs off entirely:
``P_k(w | h) = P_{k-1}(w | h')``. ``c_k`` is the raw count at the highest order and the
continuation count (how many distinct bytes precede ``h w`` in training) below it; the n-gram
at the very start of the training data counts one "start of text" predecessor, so every seen
n-gram has a positive count. ``D_k = n1 / (n1 + 2 n2)`` from the count-of-counts of ``c_k``.

Everything is numpy: n-grams are packed into uint64 keys (one byte per 8 bits, oldest byte
highest), counted with ``np.unique`` and looked up with ``np.searchsorted``, one vectorised pass
per order over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB_SIZE = 256  # bytes
BITS_PER_SYMBOL = 8
MAX_ORDER = 8  # an n-gram of 8 bytes fills a uint64 key
DEFAULT_ORDER = 5
# Used when no n-gram of an order occurs exactly once (n1 = 0), where n1 / (n1 + 2 n2) would be 0
# and leave no probability for unseen bytes.
FALLBACK_DISCOUNT = 0.5


@dataclass(frozen=True)
class _OrderCounts:
    """Counts of the n-grams of one length k, sorted by key so look-ups are binary searches."""

    grams: np.ndarray  # (T,) uint64 keys of the k-grams seen in training, ascending
    counts: np.ndarray  # (T,) int64 c_k(h w): raw counts at the top order, continuation counts below
    contexts: np.ndarray  # (C,) uint64 keys of their (k-1)-byte contexts, ascending
    context_totals: np.ndarray  # (C,) int64 c_k(h .)
    context_types: np.ndarray  # (C,) int64 N_k(h .)
    discount: float  # D_k


@dataclass(frozen=True)
class KneserNey:
    """An interpolated Kneser–Ney byte n-gram model; build it with ``KneserNey.fit``.

    ``levels[k - 1]`` holds the counts of the k-grams, k = 1..order.
    """

    order: int
    levels: tuple[_OrderCounts, ...]

    @classmethod
    def fit(cls, data: bytes, order: int = DEFAULT_ORDER) -> KneserNey:
        """Count the 1..``order``-grams of ``data`` (training bytes)."""
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be between 1 and {MAX_ORDER} bytes, got {order}")
        if len(data) == 0:
            raise ValueError("cannot fit an n-gram model on empty data")
        symbols = np.frombuffer(data, dtype=np.uint8)
        levels: list[_OrderCounts] = []
        longer: np.ndarray | None = None  # the distinct (k+1)-grams, once some have been counted
        for k in range(order, 0, -1):
            if longer is None:  # the top order (or data shorter than the order above): raw counts
                grams, counts = np.unique(_gram_keys(symbols, k), return_counts=True)
            else:
                # Continuation counts: one per distinct byte before the k-gram, i.e. the k-byte suffixes
                # of the distinct (k+1)-grams, plus one for the k-gram at the start, which has no byte
                # before it. Every other occurrence is such a suffix, so these are all the k-grams.
                suffixes = longer & np.uint64((1 << (BITS_PER_SYMBOL * k)) - 1)
                start = np.array([_pack(symbols[:k])], dtype=np.uint64)
                grams, counts = np.unique(np.concatenate([suffixes, start]), return_counts=True)
            levels.append(_order_counts(grams, counts.astype(np.int64)))
            longer = grams if len(grams) else None
        return cls(order=order, levels=tuple(reversed(levels)))

    @property
    def description(self) -> str:
        return f"interpolated Kneser–Ney {self.order}-gram over bytes"

    def log2_probs(self, data: bytes) -> np.ndarray:
        """(len(data),) float64 log2 P(byte i | up to order-1 bytes of ``data`` before it).

        The first bytes have shorter contexts: byte i is scored from order min(i + 1, order).
        """
        symbols = np.frombuffer(data, dtype=np.uint8)
        # The k-gram keys of ``data`` end at positions k-1..n-1: the tail of the positions.
        grams_by_order = [_gram_keys(symbols, k) for k in range(1, self.order + 1)]
        return np.log2(self._probabilities(grams_by_order, len(symbols)))

    def bits_per_byte(self, data: bytes) -> float:
        """Mean negative log2-likelihood of ``data`` per byte (8.0 is a uniform guess)."""
        if len(data) == 0:
            raise ValueError("cannot score empty data")
        return float(-self.log2_probs(data).mean())

    def next_byte_probs(self, context: bytes) -> np.ndarray:
        """(256,) float64 P(w | context) for every byte w; only the last order-1 bytes are used."""
        history = np.frombuffer(context, dtype=np.uint8)[len(context) - min(len(context), self.order - 1) :]
        candidates = np.arange(VOCAB_SIZE, dtype=np.uint64)
        grams_by_order = []
        for k in range(1, len(history) + 2):
            prefix = _pack(history[len(history) - (k - 1) :])  # the last k-1 bytes of the context
            grams_by_order.append((np.uint64(prefix) << np.uint64(BITS_PER_SYMBOL)) | candidates)
        return self._probabilities(grams_by_order, VOCAB_SIZE)

    def sample(self, prefix: bytes, n: int, rng: np.random.Generator) -> bytes:
        """``n`` bytes drawn one at a time after ``prefix`` (the prefix is not returned)."""
        text = bytearray(prefix)
        for _ in range(n):
            probabilities = self.next_byte_probs(bytes(text[max(0, len(text) - self.order + 1) :]))
            text.append(int(rng.choice(VOCAB_SIZE, p=probabilities / probabilities.sum())))
        return bytes(text[len(prefix) :])

    def _probabilities(self, grams_by_order: list[np.ndarray], n_queries: int) -> np.ndarray:
        """(n_queries,) interpolated probabilities.

        ``grams_by_order[k - 1]`` holds the k-gram keys of the last ``len(...)`` queries; the
        queries before them have too little history for order k and keep order k-1's value.
        """
        p = np.full(n_queries, 1.0 / VOCAB_SIZE)  # P_0: uniform over bytes
        for level, grams in zip(self.levels, grams_by_order, strict=False):
            if len(grams) == 0:
                break  # no query has k-1 bytes of history
            if len(level.grams) == 0:
                continue  # training data shorter than k bytes: nothing to add at this order
            tail = p[n_queries - len(grams) :]  # view: updated in place
            count = _lookup(level.grams, grams, level.counts)
            context = _lookup(level.contexts, grams >> np.uint64(BITS_PER_SYMBOL))  # index into contexts, -1 if unseen
            total = np.where(context >= 0, level.context_totals[context], 0)
            types = np.where(context >= 0, level.context_types[context], 0)
            seen = total > 0  # an unseen context backs off entirely to the lower order
            safe_total = np.where(seen, total, 1)
            interpolated = (np.maximum(count - level.discount, 0.0) + level.discount * types * tail) / safe_total
            tail[:] = np.where(seen, interpolated, tail)
        return p


def _gram_keys(symbols: np.ndarray, k: int) -> np.ndarray:
    """(len(symbols) - k + 1,) uint64 keys of every k-gram, oldest byte in the highest bits."""
    n = len(symbols) - k + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    keys = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        keys = (keys << np.uint64(BITS_PER_SYMBOL)) | symbols[j : j + n].astype(np.uint64)
    return keys


def _pack(symbols: np.ndarray) -> int:
    key = 0
    for symbol in symbols.tolist():
        key = (key << BITS_PER_SYMBOL) | symbol
    return key


def _order_counts(grams: np.ndarray, counts: np.ndarray) -> _OrderCounts:
    # Keys are sorted and the context is the high part of the key, so the grams of one context
    # are contiguous: reduceat over the group starts gives its totals.
    contexts, starts, types = np.unique(grams >> np.uint64(BITS_PER_SYMBOL), return_index=True, return_counts=True)
    totals = np.add.reduceat(counts, starts) if len(counts) else np.zeros(0, dtype=np.int64)
    n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
    discount = n1 / (n1 + 2 * n2) if n1 > 0 else FALLBACK_DISCOUNT
    return _OrderCounts(grams, counts, contexts, totals, types.astype(np.int64), discount)


def _lookup(keys: np.ndarray, queries: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Where each query sits in sorted ``keys`` (-1 if absent), or ``values`` there (0 if absent)."""
    if len(keys) == 0:
        return np.zeros(len(queries), dtype=np.int64) if values is not None else np.full(len(queries), -1)
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    found = keys[index] == queries
    if values is None:
        return np.where(found, index, -1)
    return np.where(found, values[index], 0)
