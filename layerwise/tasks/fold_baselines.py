"""Honest baselines for structure prediction: what a model must beat to have learned anything.

`ideal_helix` knows nothing about the sequence: every chain becomes one straight α-helix.
`TemplateBaseline` is homology modelling at its simplest: copy the Cα trace of the most similar
training chain. On a split without leakage (data/similarity.py) the best template is a distant
relative at most, so this measures how much of validation is solvable by lookup.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from layerwise.data.similarity import KMER, aligned_pairs, identity, kmer_codes
from layerwise.data.structures import AMINO_ACIDS, ProteinChain

HELIX_RADIUS = 2.3  # Å, Cα distance from the helix axis
HELIX_RISE = 1.5  # Å along the axis per residue
HELIX_TURN = 100.0  # degrees per residue (3.6 residues a turn); consecutive Cα come out 3.8 Å apart
CA_STEP = 3.8  # Å between consecutive Cα, for extending a chain past its template's ends
CANDIDATES = 8  # training chains aligned per query: those sharing the most 3-mers with it


def ideal_helix(length: int) -> np.ndarray:
    """float32 (L, 3): Cα of an ideal α-helix along z, starting at the origin."""
    angle = np.radians(HELIX_TURN) * np.arange(length)
    helix = [HELIX_RADIUS * np.cos(angle), HELIX_RADIUS * np.sin(angle), HELIX_RISE * np.arange(length)]
    return np.stack(helix, axis=1).astype(np.float32)


class TemplateBaseline:
    """Predict a chain by copying the Cα of its best-matching training chain.

    The match: the CANDIDATES training chains sharing the most distinct 3-mers with the query are
    aligned to it (local alignment, as in `identity`) and the highest identity wins. Each query
    residue aligned to a template residue with a Cα takes that Cα. The others are filled along the
    chain: linearly between the nearest filled residues on either side, and past the first or last
    filled residue in CA_STEP steps continuing the direction of the two nearest filled ones. A
    query with no template residue to copy (nothing shares a 3-mer, or nothing aligns) is an ideal
    helix.
    """

    def __init__(self, train_chains: list[ProteinChain]) -> None:
        self.chains = list(train_chains)
        present = [np.unique(kmer_codes(chain.sequence)[0]) for chain in self.chains]
        rows = np.repeat(np.arange(len(present)), [len(codes) for codes in present])
        columns = np.concatenate(present) if present else np.zeros(0, dtype=np.int64)
        # (chains, 8000) presence of each 3-mer: one sparse product scores a query against all.
        self._kmers = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(len(self.chains), len(AMINO_ACIDS) ** KMER)
        )

    def best_template(self, sequence: str) -> tuple[ProteinChain | None, float]:
        """The training chain the prediction copies and its identity to `sequence` (None, 0.0 if none)."""
        codes = np.unique(kmer_codes(sequence)[0])
        if len(codes) == 0 or not self.chains:
            return None, 0.0
        shared = np.asarray(self._kmers[:, codes].sum(axis=1)).ravel()
        order = np.argsort(-shared, kind="stable")[:CANDIDATES]
        scored = [(identity(sequence, self.chains[i].sequence), i) for i in order if shared[i] > 0]
        if not scored:
            return None, 0.0
        value, index = max(scored, key=lambda item: (item[0], -item[1]))  # ties: the earlier chain
        return self.chains[index], value

    def predict(self, sequence: str) -> np.ndarray:
        """float32 (L, 3): the predicted Cα trace of `sequence`, in the template's frame."""
        template, _ = self.best_template(sequence)
        if template is None:
            return ideal_helix(len(sequence))
        pairs = aligned_pairs(sequence, template.sequence)
        pairs = pairs[template.mask[pairs[:, 1]]] if len(pairs) else pairs
        if len(pairs) == 0:
            return ideal_helix(len(sequence))
        ca = np.zeros((len(sequence), 3), dtype=np.float64)
        ca[pairs[:, 0]] = template.ca[pairs[:, 1]]
        filled = np.zeros(len(sequence), dtype=bool)
        filled[pairs[:, 0]] = True
        return _fill_gaps(ca, filled).astype(np.float32)


def _fill_gaps(ca: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Positions not `filled`: linear between filled neighbours, CA_STEP steps past the ends."""
    known = np.flatnonzero(filled)
    index = np.arange(len(ca))
    inside = (index > known[0]) & (index < known[-1]) & ~filled
    for axis in range(3):
        ca[inside, axis] = np.interp(index[inside], known, ca[known, axis])
    ca[: known[0]] = _extend(ca, known[0], known[1] if len(known) > 1 else None, known[0])
    ca[known[-1] + 1 :] = _extend(ca, known[-1], known[-2] if len(known) > 1 else None, len(ca) - 1 - known[-1])[::-1]
    return ca


def _extend(ca: np.ndarray, end: int, inner: int | None, steps: int) -> np.ndarray:
    """(steps, 3): points CA_STEP apart leading away from `end`, farthest first (the caller reverses
    them past the C-terminal end); the direction runs from `inner` to `end`, or along x."""
    direction = ca[end] - ca[inner] if inner is not None else np.array([1.0, 0.0, 0.0])
    norm = np.linalg.norm(direction)
    direction = direction / norm if norm > 0 else np.array([1.0, 0.0, 0.0])
    distance = CA_STEP * np.arange(steps, 0, -1)[:, None]  # farthest first
    return ca[end] + distance * direction
