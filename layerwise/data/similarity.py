"""Split protein chains so that validation measures folding of unseen proteins, not recall.

Two chains with similar sequences have similar structures, so a random split would let a model
score well on validation by remembering a training relative. Chains are clustered by single
linkage at sequence identity > `max_identity`, and whole clusters go to validation.

Identity is local (Smith-Waterman, BLOSUM62, gap open -11 / extend -1 as in BLASTP): identical
aligned residues (X never counts) divided by the length of the SHORTER sequence, so a fragment of
a protein is identical to it. A global alignment was the first choice, but on unrelated random
sequences it reached 0.38 identity to the shorter sequence for 50 against 500 residues (end gaps
free; 0.60 with end gaps paid): the short one slides to wherever it matches best. Local alignment
keeps such pairs at or below 0.26, while relatives score as they do globally. Chains under ~35
residues still reach 0.3 by chance against long ones (7 of 21 residues); the prefilter below does
not link those, which is right, but an exhaustive check at 0.3 would list them.

Aligning all pairs is O(n²) at ~4 ms a pair of 300 residues: 2.5 hours for 3,000 chains. A pair
is aligned only if it passes a 3-mer prefilter: on some band of BAND adjacent alignment diagonals
the two chains share more identical 3-mers than chance explains (a Poisson tail below
PREFILTER_FALSE_RATE for a pair of their lengths, given the data's own 3-mer frequencies).
Relatives share 3-mers in register; chance matches scatter over all diagonals. The prefilter can
only miss pairs with few 3-mers in register: on simulated families (uniform substitutions, 3%
indels) it passed 96% of the pairs at 40-50% identity, 81% at 35-40% and 68% at 30-35%; a chain
that is missed is still clustered through any relative that is found. After a split of 500 such
chains, 2 of the 22,500 training-validation pairs between relatives were above 0.30 (0.37, 0.31).
3,000 chains of 20-500 residues split in ~15 s on one busy core (prefilter 4 s, 4,400 alignments).
"""

from __future__ import annotations

import functools

import numpy as np
from Bio import Align
from Bio.Align import substitution_matrices
from scipy.special import pdtrc

from layerwise.data.structures import AMINO_ACIDS, UNKNOWN
from layerwise.errors import InputError

KMER = 3
BAND = 8  # diagonals per band: indels shift a relative's matches by a few diagonals
PREFILTER_FALSE_RATE = 1e-4  # chance that an unrelated pair passes (nominal; measured ~5e-4)
GAP_OPEN, GAP_EXTEND = -11.0, -1.0  # BLASTP's defaults with BLOSUM62
SPLIT_RULE = (
    "single-linkage clusters at local-alignment identity (to the shorter chain) > {max_identity:.2f}, "
    "pairs found by a 3-mer diagonal prefilter; whole clusters to validation"
)


@functools.cache
def _aligner() -> Align.PairwiseAligner:
    return Align.PairwiseAligner(
        mode="local",
        substitution_matrix=substitution_matrices.load("BLOSUM62"),
        open_gap_score=GAP_OPEN,
        extend_gap_score=GAP_EXTEND,
    )


def aligned_pairs(a: str, b: str) -> np.ndarray:
    """int64 (K, 2): the (index in a, index in b) residue pairs of the best local alignment
    (BLOSUM62, BLASTP gaps); (0, 2) when nothing aligns with a positive score."""
    alignment = next(iter(_aligner().align(a, b)), None) if a and b else None
    if alignment is None:
        return np.zeros((0, 2), dtype=np.int64)
    blocks = zip(*alignment.aligned, strict=True)  # gap-free blocks ((a0, a1), (b0, b1))
    pairs = [np.stack([np.arange(a0, a1), np.arange(b0, b1)], axis=1) for (a0, a1), (b0, b1) in blocks]
    return np.concatenate(pairs).astype(np.int64)


def identity(a: str, b: str) -> float:
    """Identical residues in the best local alignment of `a` and `b` (X never counts), divided by
    the length of the shorter sequence: in [0, 1]."""
    pairs = aligned_pairs(a, b)
    if len(pairs) == 0:
        return 0.0
    x = np.frombuffer(a.encode(), np.uint8)[pairs[:, 0]]
    y = np.frombuffer(b.encode(), np.uint8)[pairs[:, 1]]
    return int(((x == y) & (x != ord(UNKNOWN))).sum()) / min(len(a), len(b))


def split_by_similarity(
    sequences: list[str], val_fraction: float, seed: int, max_identity: float = 0.3
) -> tuple[list[int], list[int], dict]:
    """Indices of training and validation chains, and what was done (`info`).

    No validation chain has identity > max_identity to a training chain among the pairs the
    prefilter lets through (all aligned; `info["max_cross_identity"]` is the highest seen).
    Clusters are taken in a seeded random order while they fit in round(val_fraction · n); if none
    fits, the smallest cluster is taken, unless it is everything.
    """
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    n = len(sequences)
    if n < 2:
        raise InputError(f"a split needs at least 2 chains, got {n}")
    candidates = _prefilter(sequences)
    parent = list(range(n))
    aligned: list[tuple[int, int, float]] = []
    for i, j in candidates:
        root_i, root_j = _root(parent, i), _root(parent, j)
        if root_i == root_j:  # already linked through others: single linkage needs no alignment
            continue
        value = identity(sequences[i], sequences[j])
        aligned.append((i, j, value))
        if value > max_identity:
            parent[root_j] = root_i
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(_root(parent, i), []).append(i)
    val = _choose_validation(list(clusters.values()), round(val_fraction * n), seed)
    in_val = np.zeros(n, dtype=bool)
    in_val[val] = True
    cross = [value for i, j, value in aligned if in_val[i] != in_val[j]]
    info = {
        "rule": SPLIT_RULE.format(max_identity=max_identity),
        "max_identity": max_identity,
        "n_clusters": len(clusters),
        "largest_cluster": max(len(c) for c in clusters.values()),
        "n_train": int(n - in_val.sum()),
        "n_val": int(in_val.sum()),
        "pairs_aligned": len(aligned),
        "max_cross_identity": max(cross, default=0.0),
    }
    return np.flatnonzero(~in_val).tolist(), np.flatnonzero(in_val).tolist(), info


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps the trees flat
        i = parent[i]
    return i


def _choose_validation(clusters: list[list[int]], target: int, seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(len(clusters))
    chosen: list[int] = []
    for index in order:
        if len(chosen) + len(clusters[index]) <= target:
            chosen += clusters[index]
    if not chosen:
        smallest = min(clusters, key=len)
        if len(clusters) == 1:
            raise InputError(
                f"all {len(smallest)} chains are one family (identity chains above the threshold link "
                "them all): no validation set can be held out without leakage"
            )
        chosen = smallest
    return sorted(chosen)


def kmer_codes(sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0 .. 20^3 - 1) and start positions of the 3-mers without X or other letters."""
    table = np.full(256, -1, dtype=np.int64)
    table[np.frombuffer(AMINO_ACIDS.encode(), np.uint8)] = np.arange(len(AMINO_ACIDS))
    letters = table[np.frombuffer(sequence.encode(), np.uint8)]
    if len(letters) < KMER:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(letters, KMER)
    valid = (windows >= 0).all(1)
    codes = windows @ (len(AMINO_ACIDS) ** np.arange(KMER - 1, -1, -1))
    return codes[valid], np.flatnonzero(valid)


def similar_pairs(queries: list[str], targets: list[str]) -> list[tuple[int, int]]:
    """(query index, target index) pairs that pass the 3-mer prefilter, most 3-mers in register
    first: the only pairs worth aligning with `identity` (see the module notes for what it misses)."""
    return _prefilter(queries, targets)


def _prefilter(queries: list[str], targets: list[str] | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j) that share more 3-mers in register than chance explains, most shared first.
    Without `targets`, pairs within `queries` with i < j."""
    within = targets is None
    targets = queries if targets is None else targets
    n = len(targets)
    lengths = np.array([len(s) for s in targets])
    query_kmers = [kmer_codes(s) for s in queries]
    kmers = query_kmers if within else [kmer_codes(s) for s in targets]
    codes = np.concatenate([c for c, _ in kmers] + [np.zeros(0, np.int64)])
    positions = np.concatenate([p for _, p in kmers] + [np.zeros(0, np.int64)])
    owners = np.repeat(np.arange(n), [len(c) for c, _ in kmers])
    n_codes = len(AMINO_ACIDS) ** KMER
    everything = np.concatenate([codes] + ([] if within else [c for c, _ in query_kmers]))
    if not queries or len(codes) == 0:
        return []
    # Chance that two 3-mers match, from the data's own composition (low complexity raises it).
    match_chance = float(((np.bincount(everything, minlength=n_codes) / len(everything)) ** 2).sum())
    # An inverted index sorted by (3-mer, chain): the chains from j on holding a 3-mer are one slice.
    order = np.argsort(codes * n + owners, kind="stable")
    keys, positions, owners = (codes * n + owners)[order], positions[order], owners[order]
    ends = np.searchsorted(keys, (np.arange(n_codes) + 1) * n)
    offset = int(max(lengths.max(), max(len(q) for q in queries)))  # diagonal i - j + offset >= 0
    n_bins = (2 * offset) // BAND + 2
    found: list[tuple[int, int, int]] = []
    for i, (query, query_positions) in enumerate(query_kmers):
        first = i + 1 if within else 0  # the targets this query is compared with: first .. n - 1
        begins = np.searchsorted(keys, query * n + first)
        per_kmer = ends[query] - begins
        total = int(per_kmer.sum())
        if total == 0:
            continue
        hit = np.repeat(begins - np.cumsum(per_kmer) + per_kmer, per_kmer) + np.arange(total)
        other = owners[hit] - first
        diagonal = np.repeat(query_positions, per_kmer) - positions[hit] + offset
        compared = n - first
        best = np.zeros(compared, dtype=np.int64)
        for shift in (0, BAND // 2):  # two staggered binnings, so a relative's band is never cut in two
            counts = np.bincount(other * n_bins + (diagonal + shift) // BAND, minlength=compared * n_bins)
            best = np.maximum(best, counts.reshape(compared, n_bins).max(1))
        rest = lengths[first:]
        expected = BAND * np.minimum(len(queries[i]), rest) * match_chance  # chance hits in one band
        bands = 2 * (len(queries[i]) + rest) / BAND
        chance = pdtrc(best - 1, expected) * bands  # P(some band holds >= best hits by chance)
        for j in np.flatnonzero((best > 0) & (chance < PREFILTER_FALSE_RATE)):
            found.append((int(best[j]), i, first + int(j)))
    found.sort(key=lambda item: -item[0])  # most likely relatives first: later pairs are often already linked
    return [(i, j) for _, i, j in found]
