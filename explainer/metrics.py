"""Scores shared by every scorer: correlation, AUROC, binary classification metrics, and the
bootstrap intervals and trivial baselines reported beside every score.

Conventions chosen so that a score is always a finite number or an explicit None:
a correlation against a constant (either side) is 0.0, because a simulation that
predicts nothing, or a latent that never varies, carries no evidence of a match;
AUROC is None when one class is missing, because then it is undefined, not 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import numpy as np

from explainer.vocab import SIM_KINDS

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


# --- uncertainty --------------------------------------------------------------------------
#
# Scores are bootstrapped over ITEMS (snippets for the simulators, judged snippets for detection
# and fuzzing), not tokens: a snippet's tokens are strongly correlated, so resampling tokens
# would understate the uncertainty by roughly the square root of the tokens per snippet.
# Resamples are drawn from numpy's default generator seeded with the score settings' seed, so
# an interval is reproducible; every resampler below draws the same indices for the same
# (n_items, n, seed), so the vectorized and the generic intervals agree.
# A resample whose score is undefined (e.g. only snippets where the latent never fires: the
# correlation has no truth to follow) is left out; the interval is None when fewer than half
# of the resamples are defined, because then it would describe an unrepresentative minority.


BOOT_N = 1000
BOOT_LEVEL = 0.95


@lru_cache(maxsize=64)
def _resample_indices(n_items: int, n: int, seed: int, stream: int = 0) -> np.ndarray:
    """[n, n_items] item indices drawn with replacement; `stream` > 0 gives an independent draw
    for the same seed (the strata of a stratified bootstrap)."""
    # SeedSequence takes non-negative entropy only; any int seed (score.seed may be negative) maps to one.
    rng = np.random.default_rng([seed % 2**64, stream])
    idx = rng.integers(0, n_items, size=(n, n_items))
    idx.setflags(write=False)  # cached: shared by every caller
    return idx


@lru_cache(maxsize=64)
def _resample_counts(n_items: int, n: int, seed: int, stream: int = 0) -> np.ndarray:
    """[n, n_items] how often each item is drawn in each resample (same draws as the indices)."""
    idx = _resample_indices(n_items, n, seed, stream)
    flat = (idx + n_items * np.arange(n)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n * n_items).reshape(n, n_items).astype(np.float64)
    counts.setflags(write=False)
    return counts


def percentile_interval(values: ArrayLike, level: float = BOOT_LEVEL) -> tuple[Optional[float], Optional[float]]:
    """The (1-level)/2 and (1+level)/2 quantiles of the defined (finite) resample scores;
    (None, None) when fewer than half of them are defined."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    if v.size == 0 or ok.size * 2 < v.size:
        return None, None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(score_fn: Callable[[np.ndarray], Optional[float]], n_items: int, *, n: int = BOOT_N,
                 seed: int = 0, level: float = BOOT_LEVEL) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of `score_fn` over items resampled with replacement.

    `score_fn(indices)` scores the items at `indices` (repeats allowed) and returns None where
    the score is undefined. Deterministic for a seed; (None, None) with no items or when fewer
    than half of the resamples give a score."""
    if n_items <= 0 or n <= 0:
        return None, None
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap level must be in (0, 1), not {level}")
    values = [score_fn(ix) for ix in _resample_indices(n_items, n, seed)]
    return percentile_interval([np.nan if x is None else x for x in values], level)


def pearson_ci(preds: Sequence[ArrayLike], trues: Sequence[ArrayLike], *, n: int = BOOT_N, seed: int = 0,
               level: float = BOOT_LEVEL) -> tuple[Optional[float], Optional[float]]:
    """bootstrap_ci of `pearson` over the concatenated tokens of resampled items (snippets),
    vectorized through per-item sums: the same resamples and conventions as
    `bootstrap_ci(lambda ix: pearson(cat(preds[ix]), cat(trues[ix])) or None-if-truth-constant)`,
    at ~1000x its speed. A resample with constant predictions scores 0.0 (as `pearson`); one
    with constant truth is undefined."""
    k = len(preds)
    if k == 0 or n <= 0:
        return None, None
    if len(trues) != k:
        raise ValueError(f"pearson_ci: {k} prediction items for {len(trues)} truth items")
    ps = [_flat(p) for p in preds]
    ts = [_flat(t) for t in trues]
    sizes = np.array([p.size for p in ps])
    if any(p.size != t.size for p, t in zip(ps, ts)):
        raise ValueError("pearson_ci: an item's predictions and truth differ in length")
    item = np.repeat(np.arange(k), sizes)
    # Centre on the overall means first (Pearson is shift-invariant) so the one-pass sums do
    # not cancel catastrophically.
    p, t = np.concatenate(ps), np.concatenate(ts)
    if p.size:
        p, t = p - p.mean(), t - t.mean()
    mom = np.stack([np.bincount(item, weights=w, minlength=k) for w in (np.ones_like(p), p, t, p * p, t * t, p * t)], 1)
    counts = _resample_counts(k, n, seed)
    s = counts @ mom  # [n, 6]: tokens, sums, squares and cross products of each resample
    with np.errstate(invalid="ignore", divide="ignore"):
        cnt = s[:, 0]
        vp = s[:, 3] - s[:, 1] ** 2 / cnt
        vt = s[:, 4] - s[:, 2] ** 2 / cnt
        cov = s[:, 5] - s[:, 1] * s[:, 2] / cnt
        r = np.clip(cov / np.sqrt(vp * vt), -1.0, 1.0)
    const_t = _constant(counts, item, t, k) | (cnt < 2)
    const_p = _constant(counts, item, p, k)
    r = np.where(const_p, 0.0, r)
    r = np.where(const_t, np.nan, r)
    return percentile_interval(r, level)


def _constant(counts: np.ndarray, item: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """[n] whether each resample's values of x (x[j] belongs to item[j]) are all exactly equal:
    no drawn item varies and the drawn constant items share one value. Tested exactly, not by
    variance, for the reason given in `pearson`."""
    lo, hi = np.full(k, np.inf), np.full(k, -np.inf)
    np.minimum.at(lo, item, x)
    np.maximum.at(hi, item, x)
    varies = counts @ (hi > lo).astype(np.float64) > 0
    flat = np.flatnonzero(hi == lo)  # constant, non-empty items
    values, which = np.unique(lo[flat], return_inverse=True)
    onehot = np.zeros((k, values.size))
    onehot[flat, which] = 1.0
    return ~varies & ((counts @ onehot > 0).sum(1) <= 1)


def balanced_accuracy_ci(pred: ArrayLike, true: ArrayLike, *, n: int = BOOT_N, seed: int = 0,
                         level: float = BOOT_LEVEL) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap of `classify(pred, true).balanced_accuracy`, stratified by label:
    positives are resampled among the positives and negatives among the negatives, because the
    scorers fix the class sizes by design (detection: as many of each; fuzzing: half moved) and an
    unstratified resample with one class missing would score a one-sided judge 1.0."""
    p = np.asarray(pred).ravel().astype(bool)
    t = np.asarray(true).ravel().astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"balanced_accuracy_ci: {p.size} predictions for {t.size} true labels")
    if p.size == 0 or n <= 0:
        return None, None
    recalls = []
    for stream, cls in enumerate((True, False), 1):
        right = (p == t)[t == cls].astype(np.float64)
        if right.size:
            recalls.append(_resample_counts(right.size, n, seed, stream) @ right / right.size)
    return percentile_interval(np.mean(recalls, axis=0), level)


# --- named scores with their interval and floor -------------------------------------------------


def _pearson_defined(p: np.ndarray, t: np.ndarray) -> Optional[float]:
    """Pearson, but None where the truth is constant or absent (no activation to follow)."""
    return pearson(p, t) if t.size and np.ptp(t) > 0 else None


def simulation_stats(preds: Sequence[ArrayLike], trues: Sequence[ArrayLike], kinds: Sequence[str], *,
                     seed: int = 0, n: int = BOOT_N, level: float = BOOT_LEVEL) -> dict[str, Optional[float]]:
    """Named scores of one simulation over items (snippets) of the given kinds.

    - `all`: Pearson over every token of every item (the headline `simulation` score; 0.0 when
      either side is constant, as `pearson`).
    - `top_random`: Pearson over the top and random snippets only: Bills et al.'s (2023)
      "top-and-random" score, the one their published numbers are comparable to.
    - `top`, `quantile`, `random`: per kind; None where the kind is absent or its truth constant.
    - `ci_low`, `ci_high`: 95% percentile bootstrap of `all` over snippets (`pearson_ci`).
    - `baseline`: a constant predictor on the same snippets. Its correlation is undefined (zero
      variance); by this module's convention it is 0.0, so a score must beat 0 to carry evidence.
    """
    ps = [_flat(p) for p in preds]
    ts = [_flat(t) for t in trues]
    ks = list(kinds)
    if not (len(ps) == len(ts) == len(ks)):
        raise ValueError(f"simulation_stats: {len(ps)} predictions, {len(ts)} truths, {len(ks)} kinds")

    def cat(parts: list[np.ndarray], keep: Sequence[str]) -> np.ndarray:
        chosen = [x for x, k in zip(parts, ks) if k in keep]
        return np.concatenate(chosen) if chosen else np.zeros(0)

    all_p, all_t = (np.concatenate(ps), np.concatenate(ts)) if ps else (np.zeros(0), np.zeros(0))
    stats: dict[str, Optional[float]] = {"all": pearson(all_p, all_t)}
    stats["top_random"] = _pearson_defined(cat(ps, ("top", "random")), cat(ts, ("top", "random")))
    for kind in SIM_KINDS:
        stats[kind] = _pearson_defined(cat(ps, (kind,)), cat(ts, (kind,)))
    stats["ci_low"], stats["ci_high"] = pearson_ci(ps, ts, n=n, seed=seed, level=level)
    stats["baseline"] = 0.0
    return stats


def judge_stats(answers: ArrayLike, labels: ArrayLike, *, seed: int = 0, n: int = BOOT_N,
                level: float = BOOT_LEVEL) -> dict[str, Optional[float]]:
    """Interval and floor of a yes/no judge scored by balanced accuracy (detection, fuzzing):
    `ci_low`/`ci_high` bootstrap over the judged items; `baseline` is the always-yes judge's
    balanced accuracy on the same items (0.5 when both labels occur; 1.0 with positives only)."""
    y = np.asarray(labels).ravel().astype(bool)
    lo, hi = balanced_accuracy_ci(answers, y, n=n, seed=seed, level=level)
    return {"ci_low": lo, "ci_high": hi, "baseline": classify(np.ones_like(y), y).balanced_accuracy}


def auroc_ci(scores: ArrayLike, labels: ArrayLike, *, n: int = BOOT_N, seed: int = 0,
             level: float = BOOT_LEVEL) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap of `auroc`, stratified by label as `balanced_accuracy_ci` (the scorer
    fixes how many windows of each class it reads), computed from the pairwise win matrix so each
    resample costs two matrix products."""
    s = _flat(scores)
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"auroc_ci: {s.size} scores for {y.size} labels")
    pos, neg = s[y], s[~y]
    if not pos.size or not neg.size or n <= 0:
        return None, None
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    cp = _resample_counts(pos.size, n, seed, 1)
    cn = _resample_counts(neg.size, n, seed, 2)
    return percentile_interval(((cp @ wins) * cn).sum(1) / (pos.size * neg.size), level)


def auroc_stats(scores: ArrayLike, labels: ArrayLike, *, seed: int = 0, n: int = BOOT_N,
                level: float = BOOT_LEVEL) -> dict[str, Optional[float]]:
    """Interval and floor of a ranking scored by AUROC (the embedding scorer): `ci_low`/`ci_high`
    from `auroc_ci`; `baseline` 0.5, the AUROC of any constant score (every pair tied)."""
    lo, hi = auroc_ci(scores, labels, n=n, seed=seed, level=level)
    return {"ci_low": lo, "ci_high": hi, "baseline": 0.5}
