"""Batches of token windows for language modelling, read from a memory-mapped token stream."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch

from layerwise.data.batches import seeded_generator
from layerwise.runtime import host_to

# An "epoch" is an evaluation interval: one pass over the training tokens, but at least 50 steps (a tiny
# corpus would otherwise spend most of its time evaluating) and at most 250 (a large one is checked often).
MIN_STEPS_PER_EPOCH, MAX_STEPS_PER_EPOCH = 50, 250


class RandomWindows:
    """Training batches: `batch_size` windows at random offsets; (ids (B, T), next ids (B, T)).

    Batch `i` of epoch `e` depends only on (seed, e, i), so a resumed run reads exactly the same windows.
    """

    def __init__(self, tokens: np.ndarray, context_len: int, batch_size: int, seed: int = 0) -> None:
        if len(tokens) < context_len + 2:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {context_len + 1}")
        self.tokens, self.context_len, self.batch_size, self.seed = tokens, context_len, batch_size, seed

    def __len__(self) -> int:
        one_pass = len(self.tokens) // (self.batch_size * self.context_len)
        return int(min(MAX_STEPS_PER_EPOCH, max(MIN_STEPS_PER_EPOCH, one_pass)))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        last_start = len(self.tokens) - self.context_len - 1
        for i in range(start, len(self)):
            starts = torch.randint(
                0, last_start + 1, (self.batch_size,), generator=seeded_generator(self.seed, epoch, i)
            )
            if isinstance(self.tokens, torch.Tensor):  # held on a device: the windows are gathered there
                offsets = host_to(starts, self.tokens.device)[:, None]
                windows = self.tokens[offsets + torch.arange(self.context_len + 1, device=self.tokens.device)]
            else:
                windows = np.stack([self.tokens[s : s + self.context_len + 1] for s in starts.tolist()])
                windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
            yield windows[:, :-1], windows[:, 1:]

    def nbytes(self) -> int:
        return len(self.tokens) * 8  # as int64 on the device

    def on_device(self, device: torch.device) -> RandomWindows:
        """The same windows (the offsets still drawn on the CPU's seeded generator), gathered from a copy of the
        token stream on `device`."""
        held = copy.copy(self)
        held.tokens = torch.from_numpy(np.asarray(self.tokens, dtype=np.int64)).to(device)
        return held


class SequentialWindows:
    """Evaluation batches: consecutive windows that together predict every token after the first once."""

    def __init__(self, tokens: np.ndarray, context_len: int, batch_size: int = 16, max_windows: int | None = None):
        self.tokens, self.context_len, self.batch_size = tokens, context_len, batch_size
        self.starts = list(range(0, max(len(tokens) - 1, 0), context_len))
        if max_windows is not None and len(self.starts) > max_windows:  # evenly spread over the whole stream
            self.starts = [self.starts[i] for i in np.linspace(0, len(self.starts) - 1, max_windows).astype(int)]

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids (B, T), next ids (B, T)); the last window is padded with -1 targets, which the loss ignores."""
        for i in range(start, len(self)):
            xs, ys = [], []
            for s in self.starts[i * self.batch_size : (i + 1) * self.batch_size]:
                chunk = np.asarray(self.tokens[s : s + self.context_len + 1], dtype=np.int64)
                x, y = np.zeros(self.context_len, np.int64), np.full(self.context_len, -1, np.int64)
                x[: len(chunk) - 1], y[: len(chunk) - 1] = chunk[:-1], chunk[1:]
                xs.append(x)
                ys.append(y)
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
