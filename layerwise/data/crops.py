"""Batches of protein chains: padded residue tokens, Cα coordinates and masks, cropped to a window.

Training crops a random window of each long chain per epoch (AlphaFold's cropping), so every epoch
sees other parts of a chain and memory stays bounded by the crop; validation takes each chain's first
window, so its scores are the same every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from layerwise.data.structures import ProteinChain, encode_sequence

PAD = 21  # the padding token: amino acids are 0..19, X is 20


class ChainBatches:
    """Seeded batches of chains; epoch `e`, batch `i` depend only on (seed, e, i).

    Yields ((tokens int64 (B, L), residue_mask bool (B, L)), (coords float32 (B, L, 3), coord_mask bool (B, L)))
    with L the longest (cropped) chain of the batch.
    """

    def __init__(
        self, chains: list[ProteinChain], batch_size: int, crop: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        self.chains, self.batch_size, self.crop = chains, batch_size, crop
        self.shuffle, self.seed = shuffle, seed
        self.tokens = [torch.from_numpy(encode_sequence(chain.sequence)) for chain in chains]

    def __len__(self) -> int:
        return math.ceil(len(self.chains) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[tuple, tuple]]:
        n = len(self.chains)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        # One window start per chain per epoch, drawn up front so batch i does not depend on batches < i.
        offsets = torch.rand(n, generator=generator)
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            windows = [self.window(j, float(offsets[j])) for j in index]
            yield collate([self.chains[j] for j in index], [self.tokens[j] for j in index], windows)

    def window(self, j: int, offset: float) -> slice:
        length = len(self.chains[j].sequence)
        if length <= self.crop:
            return slice(0, length)
        first = int(offset * (length - self.crop + 1)) if self.shuffle else 0
        return slice(first, first + self.crop)


def collate(chains: list[ProteinChain], tokens: list[torch.Tensor], windows: list[slice]) -> tuple[tuple, tuple]:
    """Pad the windows of several chains to one length."""
    length = max(w.stop - w.start for w in windows)
    batch = len(chains)
    padded = torch.full((batch, length), PAD, dtype=torch.int64)
    residue_mask = torch.zeros((batch, length), dtype=torch.bool)
    coords = torch.zeros((batch, length, 3), dtype=torch.float32)
    coord_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, (chain, chain_tokens, window) in enumerate(zip(chains, tokens, windows, strict=True)):
        n = window.stop - window.start
        padded[row, :n] = chain_tokens[window]
        residue_mask[row, :n] = True
        coords[row, :n] = torch.from_numpy(np.ascontiguousarray(chain.ca[window]))
        coord_mask[row, :n] = torch.from_numpy(np.ascontiguousarray(chain.mask[window]))
    return (padded, residue_mask), (coords, coord_mask)


def sequence_batch(sequences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and residue mask for sequences to fold, padded to the longest."""
    length = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), length), PAD, dtype=torch.int64)
    residue_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.from_numpy(encode_sequence(sequence))
        residue_mask[row, : len(sequence)] = True
    return padded, residue_mask
