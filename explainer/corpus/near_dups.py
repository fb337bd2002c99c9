"""Hashed n-token spans of the train split, to keep near-duplicates out of validation and held-out.

The builtin corpus repeats stdlib docstrings across modules, so ~2% of held-out contexts
shared a 16-token span with a train context: an explanation written from train examples
then scored on the same text. A span is hashed to 64 bits (a fixed random linear hash,
then a mixer); collisions among a few million spans are ~1e-7 likely, and a collision only
drops one extra context. The table is a sorted uint64 array: 8 bytes per train token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)
_COMPACT = 1 << 20  # merge pending hashes into the table every ~1M spans, so duplicates never pile up


def span_hashes(ids: Sequence[int], n: int, boundary: Optional[int] = None) -> np.ndarray:
    """uint64 hash of every window of n consecutive token ids (empty when fewer than n),
    leaving out windows that hold the `boundary` token (the end-of-document separator)."""
    a = np.asarray(ids, dtype=np.uint64)
    if n < 1 or len(a) < n or n > len(_MULT):
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        h = (sliding_window_view(a, n) * _MULT[:n]).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    if boundary is not None:
        h = h[~sliding_window_view(a == np.uint64(boundary), n).any(axis=1)]
    return h


class SpanTable:
    """The set of n-token spans of the contexts added; `shares` asks if a context holds one.

    Spans across a document boundary are left out: a copied passage lies inside one document,
    while the end of one and the start of the next ("_Exeunt_" then "### SCENE II." in the
    plays) repeat by format alone, and matching them would strip held-out of every scene break."""

    def __init__(self, n: int, boundary: Optional[int] = None) -> None:
        self.n, self.boundary = n, boundary
        self.table = np.zeros(0, np.uint64)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, ids: Sequence[int]) -> None:
        h = span_hashes(ids, self.n, self.boundary)
        self._pending.append(h)
        self._n_pending += len(h)
        if self._n_pending >= _COMPACT:
            self._compact()

    def _compact(self) -> None:
        if self._pending:
            self.table = np.unique(np.concatenate([self.table, *self._pending]))
            self._pending, self._n_pending = [], 0

    def shares(self, ids: Sequence[int]) -> bool:
        self._compact()
        h = span_hashes(ids, self.n, self.boundary)
        if not len(h) or not len(self.table):
            return False
        i = np.minimum(np.searchsorted(self.table, h), len(self.table) - 1)
        return bool((self.table[i] == h).any())

    def __len__(self) -> int:
        self._compact()
        return len(self.table)
