"""The order in which a run reads its samples, and the samples it holds out.

Both are functions of (seed, sample number) only, so a run resumed at batch b reads exactly
what an uninterrupted run reads there, and every process knows its share without talking to
the others.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .distributed import Dist


class KeyedBatches:
    """Batches of (record index, sample seed) keys for batch number b = start, start+1, ...

    Global sample g = (b * world + rank) * batch_size + i belongs to epoch g // n, position
    g % n of that epoch's permutation (seeded by seed and epoch); its augmentation seed is a
    function of (seed, g). Nothing depends on what ran before: resuming at batch b is exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, start: int = 0):
        self.n, self.batch_size, self.seed, self.d, self.start = n, batch_size, seed, d, start
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=generator)}
        return self._perms[epoch]

    def batch(self, b: int) -> list[tuple[int, int]]:
        first = (b * self.d.world + self.d.rank) * self.batch_size
        keys = []
        for g in range(first, first + self.batch_size):
            epoch, pos = divmod(g, self.n)
            keys.append((int(self._perm(epoch)[pos]), (self.seed * 1_000_003 + g) % (2**63)))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


def holdout_indices(n: int, holdout: int) -> np.ndarray:
    """Indices of `holdout` of n items taken at a fixed stride, so they spread over the inputs;
    at least one item is always left for training."""
    n_hold = min(holdout, n - 1)
    if n_hold <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = n / n_hold
    return np.array([int(i * stride + stride / 2) for i in range(n_hold)], dtype=np.int64)


__all__ = ["KeyedBatches", "holdout_indices"]
