"""Scores shared by every scorer: correlation, AUROC and binary classification metrics.

Conventions chosen so that a score is always a finite number or an explicit None:
a correlation against a constant (either side) is 0.0, because a simulation that
predicts nothing, or a latent that never varies, carries no evidence of a match;
AUROC is None when one class is missing, because then it is undefined, not 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _flat(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def pearson(pred: ArrayLike, true: ArrayLike) -> float:
    """Pearson correlation of two equally long sequences; 0.0 when either is constant or empty."""
    p, t = _flat(pred), _flat(true)
    if p.shape != t.shape:
        raise ValueError(f"pearson: {p.size} predictions for {t.size} true values")
    # Constant means exactly equal values: centering such a vector in floating point can
    # leave ulp-sized noise whose "correlation" is arbitrary, so test before centering.
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return 0.0
    p = p - p.mean()
    t = t - t.mean()
    denom = np.sqrt(np.dot(p, p) * np.dot(t, t))
    if denom == 0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip(np.dot(p, t) / denom, -1.0, 1.0))


def average_ranks(x: ArrayLike) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    v = _flat(x)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> Optional[float]:
    """Probability that a random positive scores above a random negative (ties count half).

    Computed from average ranks (Mann-Whitney U), so tied scores are handled exactly.
    None when there are no positives or no negatives.
    """
    s = _flat(scores)
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores for {y.size} labels")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class Classification:
    """Binary prediction quality. Ratios with an empty denominator are 0.0 (nothing to credit)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else 0.0

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 0.0

    @property
    def balanced_accuracy(self) -> float:
        """Mean of the recalls of the classes present (one class alone: its recall)."""
        parts = []
        if self.tp + self.fn:
            parts.append(self.recall)
        if self.tn + self.fp:
            parts.append(self.specificity)
        return float(np.mean(parts)) if parts else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        for name in ("accuracy", "precision", "recall", "f1", "balanced_accuracy"):
            out[name] = getattr(self, name)
        return out


def classify(pred: ArrayLike, true: ArrayLike) -> Classification:
    """Confusion counts of boolean predictions against boolean truth."""
    p = np.asarray(pred).ravel().astype(bool)
    t = np.asarray(true).ravel().astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"classify: {p.size} predictions for {t.size} true labels")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return Classification(tp=tp, fp=fp, tn=int(p.size - tp - fp - fn), fn=fn)
