"""N-gram patterns: what they match, what they predict, and how they are fitted to a latent.

A pattern is a short token sequence ending at the token it predicts: `[t]`, `[p1, t]`,
`[p2, p1, t]`, `[p2, *, t]` (wildcard) or `[p1, *]` (any token after p1). It matches
either exact token strings (" Paris") or normalized ones ("paris": lower case, leading
spaces stripped, so "Paris", " paris" and " PARIS" are one token). A pattern set is an
ordered list in which the first matching pattern gives a token its predicted activation
(the mean train activation of the tokens it owns); unmatched tokens predict 0.

Fitting is greedy least squares: each step adds the candidate (an n-gram seen at a firing
train token) whose matches most reduce the squared error if it overrides what is there,
then refits every pattern's activation. That objective weighs precision (non-firing
matches cost error) against recall (firing tokens left at 0 cost error) and rewards
getting magnitudes right, which is what the simulation score (a correlation) measures.
An F1-greedy variant is offered among the candidate sets for the agent to choose from.

Token strings arrive as dense integer ids (see ngram.load_split), so candidates are found
with np.unique over int64 n-gram keys and matching is integer comparison of shifted arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from explainer.errors import ExplainerError
from explainer.metrics import classify, pearson, simulation_stats
from explainer.vocab import SIM_KINDS

FORMAT = "ngram-v1"
# (length, wildcard positions); the last element is the predicted token.
SHAPES: tuple[tuple[int, tuple[int, ...]], ...] = ((1, ()), (2, ()), (2, (1,)), (3, ()), (3, (1,)))
MODES = ("exact", "norm")
KEY_BASE = 1 << 20  # ids per key digit; three digits fit in int64


def normalize(token: str) -> str:
    """Case- and leading-space-insensitive form; a whitespace-only token stays itself."""
    s = token.lstrip(" ").lower()
    return s if s else token


# --- patterns ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    seq: tuple[Optional[str], ...]  # None = wildcard; the last element is the predicted token
    mode: str  # exact | norm
    act: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"seq": list(self.seq), "mode": self.mode, "act": round(float(self.act), 6)}

    def describe(self) -> str:
        def q(s: str) -> str:
            s = s.replace("\n", "\\n").replace("\t", "\\t")
            return f'"{s}"' if self.mode == "exact" else f"'{s}' (any case)"

        *ctx, last = self.seq
        target = "any token" if last is None else q(last)
        if not ctx:
            return target
        words = [s for s in ctx if s is not None]
        if len(words) < len(ctx):  # [p2, *, t]
            return f"{target} two tokens after {q(words[0])}"
        joined = "".join(words) if self.mode == "exact" else " ".join(words)
        return f"{target} after {q(joined)}"


@dataclass(frozen=True)
class PatternSet:
    patterns: tuple[Pattern, ...]
    fit: dict[str, Any] = field(default_factory=dict, compare=False)  # train statistics and parameters

    def text(self) -> Optional[str]:
        if not self.patterns:
            return None
        top = max(p.act for p in self.patterns) or 1.0

        def strength(a: float) -> str:
            return "strong" if a >= 0.66 * top else "medium" if a >= 0.33 * top else "weak"

        parts = [f"{p.describe()} ({strength(p.act)})" for p in self.patterns]
        return "fires on " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "normalize": "lower case, leading spaces stripped",
                "patterns": [p.to_json() for p in self.patterns], "fit": self.fit}

    @staticmethod
    def from_json(data: str | Mapping[str, Any]) -> PatternSet:
        d = json.loads(data) if isinstance(data, str) else data
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ExplainerError(f"not an {FORMAT} pattern (got {str(d)[:80]!r}); explain with --explainer ngram")
        pats = tuple(Pattern(tuple(p["seq"]), p["mode"], float(p["act"])) for p in d["patterns"])
        return PatternSet(pats, dict(d.get("fit") or {}))


# --- examples -----------------------------------------------------------------------------------


@dataclass
class LatentExamples:
    latent: int
    kinds: np.ndarray  # [n] str
    context_ids: np.ndarray  # [n]
    exact: np.ndarray  # [n, T] int64 ids of exact strings; -1 past a context's end
    norm: np.ndarray  # [n, T] int64 ids of normalized strings
    acts: np.ndarray  # [n, T] float32


# --- matching -------------------------------------------------------------------------------


def _keys(ids: np.ndarray, length: int, wild: tuple[int, ...]) -> np.ndarray:
    """Per-position int64 key of the n-gram of this shape ending there; -1 where none fits."""
    n, t = ids.shape
    key = np.zeros((n, t), dtype=np.int64)
    ok = np.zeros((n, t), dtype=bool)
    ok[:, length - 1 :] = True
    for k in range(length):
        if k in wild:
            continue
        shift = length - 1 - k
        col = np.full((n, t), -1, dtype=np.int64)
        col[:, shift:] = ids[:, : t - shift]
        ok &= col >= 0
        key = key * KEY_BASE + col
    key[~ok] = -1
    return key


def match(p: Pattern, exact: np.ndarray, norm: np.ndarray, index: tuple[dict[str, int], dict[str, int]]) -> np.ndarray:
    """Boolean [n, T]: where pattern p matches (its last element at that position)."""
    ids, lookup = (exact, index[0]) if p.mode == "exact" else (norm, index[1])
    n, t = ids.shape
    length = len(p.seq)
    out = np.zeros((n, t), dtype=bool)
    out[:, length - 1 :] = ids[:, length - 1 :] >= 0
    for k, s in enumerate(p.seq):
        if s is None:
            continue
        want = lookup.get(s if p.mode == "exact" else normalize(s), -2)  # -2: absent, never matches
        shift = length - 1 - k
        out[:, shift:] &= ids[:, : t - shift] == want
    return out


def simulate(ps: PatternSet, ex: LatentExamples, index: tuple[dict[str, int], dict[str, int]]) -> np.ndarray:
    """Predicted activation per token: the act of the first pattern that matches, else 0."""
    pred = np.zeros(ex.acts.shape, dtype=np.float64)
    for p in reversed(ps.patterns):  # earlier patterns win, so they are written last
        pred[match(p, ex.exact, ex.norm, index)] = p.act
    return pred


@dataclass
class SimScore:
    """The simulation score and its details, with the same keys as the LLM simulator's."""

    score: float  # Pearson over all tokens of all scored snippets; 0 when either side is constant
    per_kind: dict[str, Optional[float]]  # None where the true activations are constant (undefined)
    precision: float  # of "fires" (pred > 0) against act > 0, over the same tokens (Gao et al.'s N2G)
    recall: float
    f1: float
    n_snippets: int
    n_tokens: int
    n_fired: int
    snippets: dict[str, int]
    tokens_per_kind: dict[str, int]
    constant_prediction: bool
    # (pred, acts, valid, kinds) of the scored rows and the bootstrap seed, for `stats`.
    rows: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = field(
        default=None, repr=False, compare=False)

    @cached_property
    def stats(self) -> dict[str, Optional[float]]:
        """metrics.simulation_stats on the same rows, as the LLM simulator's Outcome.stats (all,
        top_random, per kind, bootstrap interval over snippets, constant-predictor baseline).
        Computed when first read: the agent scores many edits and keeps few."""
        if self.rows is None:
            return {}
        pred, acts, valid, kinds, seed = self.rows
        return simulation_stats([p[v] for p, v in zip(pred, valid)], [a[v] for a, v in zip(acts, valid)],
                                [str(k) for k in kinds], seed=seed)

    def details(self) -> dict[str, Any]:
        return {"pearson": self.score, "per_kind": self.per_kind, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "n_tokens": self.n_tokens, "n_fired": self.n_fired, "snippets": self.snippets,
                "tokens_per_kind": self.tokens_per_kind, "constant_prediction": self.constant_prediction,
                "stats": self.stats}


def scored_rows(ex: LatentExamples, kinds: Sequence[str]) -> np.ndarray:
    """Rows of the given kinds, each context once (first by kind order, then rank), as the LLM simulator
    does: a random context may also be a top one."""
    pri = np.array([kinds.index(k) if k in kinds else len(kinds) for k in ex.kinds], dtype=np.int64)
    order = np.lexsort((np.arange(len(pri)), pri))
    order = order[pri[order] < len(kinds)]
    _, first = np.unique(ex.context_ids[order], return_index=True)
    return order[np.sort(first)]


def score_examples(ps: PatternSet, ex: LatentExamples, index: Optional[tuple[dict[str, int], dict[str, int]]],
                   kinds: Sequence[str] = SIM_KINDS, pred: Optional[np.ndarray] = None, *,
                   seed: int = 0) -> SimScore:
    """Simulation score of a pattern set on one latent's examples of the given kinds (`stats`:
    bootstrap over snippets seeded by `seed`)."""
    kinds = list(kinds)
    if pred is None:
        assert index is not None, "score_examples needs the vocab index unless given the predictions"
        pred = simulate(ps, ex, index)
    rows = scored_rows(ex, kinds)
    valid = ex.exact[rows] >= 0
    pred, acts, row_kinds = pred[rows], ex.acts[rows], ex.kinds[rows]
    per_kind: dict[str, Optional[float]] = {}
    tokens_per_kind: dict[str, int] = {}
    for k in kinds:
        m = valid & (row_kinds == k)[:, None]
        if m.any():
            per_kind[k] = pearson(pred[m], acts[m]) if np.ptp(acts[m]) > 0 else None
            tokens_per_kind[k] = int(m.sum())
    p, a = pred[valid], acts[valid]
    c = classify(p > 0, a > 0)
    return SimScore(pearson(p, a), per_kind, c.precision, c.recall, c.f1, len(rows), int(a.size), int((a > 0).sum()),
                    {k: int((row_kinds == k).sum()) for k in kinds}, tokens_per_kind,
                    bool(p.size == 0 or np.ptp(p) == 0), (pred, acts, valid, row_kinds, seed))


# --- fitting ---------------------------------------------------------------------------------


@dataclass
class _Group:
    mode: str
    length: int
    wild: tuple[int, ...]
    inv: np.ndarray  # per flat position: candidate index or -1
    keys: np.ndarray  # candidate keys
    n_cand: int


def _groups(ex: LatentExamples, modes: Sequence[str], min_support: int) -> list[_Group]:
    fire = (ex.acts > 0).ravel()
    out = []
    for mode in modes:
        ids = ex.exact if mode == "exact" else ex.norm
        for length, wild in SHAPES:
            key = _keys(ids, length, wild).ravel()
            cand, counts = np.unique(key[fire & (key >= 0)], return_counts=True)
            cand = cand[counts >= min_support]
            if cand.size == 0:
                continue
            pos = np.searchsorted(cand, key)
            pos_c = np.minimum(pos, cand.size - 1)
            inv = np.where((key >= 0) & (cand[pos_c] == key), pos_c, -1)
            out.append(_Group(mode, length, wild, inv, cand, cand.size))
    return out


def _decode(g: _Group, key: int, vocab: tuple[list[str], list[str]]) -> tuple[Optional[str], ...]:
    names = vocab[0] if g.mode == "exact" else vocab[1]
    digits: list[Optional[str]] = []
    for k in reversed(range(g.length)):
        if k in g.wild:
            digits.append(None)
        else:
            digits.append(names[key % KEY_BASE])
            key //= KEY_BASE
    return tuple(reversed(digits))


def fit(ex: LatentExamples, vocab: tuple[list[str], list[str]], *, max_patterns: int = 3,
        modes: Sequence[str] = MODES, objective: str = "sse", min_support: int = 2,
        min_gain: float = 0.02) -> PatternSet:
    """Greedy pattern set for one latent from its examples (usually the train split).

    `vocab` maps ids back to strings: (exact strings by id, normalized strings by id).
    A step must improve the objective by `min_gain` (a fraction of the total) to be taken.
    """
    if objective not in ("sse", "f1"):
        raise ValueError(f"objective must be 'sse' or 'f1', not {objective!r}")
    a = ex.acts.ravel().astype(np.float64)
    fire = a > 0
    params = {"max_patterns": max_patterns, "modes": list(modes), "objective": objective,
              "min_support": min_support, "min_gain": min_gain}
    if not fire.any():
        return PatternSet((), {"params": params})
    groups = _groups(ex, modes, min_support) or _groups(ex, modes, 1)
    owner = np.full(a.size, -1)  # index into `chosen` of the pattern that predicts each token
    chosen: list[tuple[_Group, int]] = []
    total_sq, n_fire = float(a @ a), int(fire.sum())
    best_f1 = 0.0
    pred = np.zeros_like(a)
    for _ in range(max_patterns):
        best: tuple[float, Optional[_Group], int] = (0.0, None, -1)
        for g in groups:
            m = g.inv >= 0
            idx = g.inv[m]
            if objective == "sse":
                # Override gain with other acts fixed: old error on the matches minus the
                # error of predicting their mean there.
                s1 = np.bincount(idx, weights=a[m], minlength=g.n_cand)
                s2 = np.bincount(idx, weights=a[m] ** 2 - (a[m] - pred[m]) ** 2, minlength=g.n_cand)
                cnt = np.bincount(idx, minlength=g.n_cand)
                gain = s1**2 / np.maximum(cnt, 1) - s2
            else:
                # F1 of the union "some pattern matches" against "fires"; only uncovered tokens change it.
                free = owner[m] < 0
                tp0 = int((fire & (owner >= 0)).sum())
                fp0 = int((~fire & (owner >= 0)).sum())
                f = fire[m][free].astype(np.float64)
                tp = tp0 + np.bincount(idx[free], weights=f, minlength=g.n_cand)
                fp = fp0 + np.bincount(idx[free], weights=1.0 - f, minlength=g.n_cand)
                gain = 2 * tp / (tp + fp + n_fire) - best_f1
            j = int(np.argmax(gain))
            if gain[j] > best[0]:
                best = (float(gain[j]), g, j)
        pick = best[1]
        if pick is None or best[0] < min_gain * (total_sq if objective == "sse" else 1.0):
            break
        hit = pick.inv == best[2]
        if objective == "sse":
            owner[hit] = len(chosen)
        else:
            owner[hit & (owner < 0)] = len(chosen)
            best_f1 += best[0]
        chosen.append((pick, best[2]))
        counts = np.bincount(owner[owner >= 0], minlength=len(chosen))
        sums = np.bincount(owner[owner >= 0], weights=a[owner >= 0], minlength=len(chosen))
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        pred = np.where(owner >= 0, means[np.maximum(owner, 0)], 0.0)
    if not chosen:
        return PatternSet((), {"params": params})
    # SSE: later patterns override earlier ones, so priority is reverse order; F1: first wins.
    order = reversed(range(len(chosen))) if objective == "sse" else range(len(chosen))
    pats = []
    for i in order:
        if counts[i] > 0:  # a pattern wholly overridden by later ones predicts nothing
            g, j = chosen[i]
            pats.append(Pattern(_decode(g, int(g.keys[j]), vocab), g.mode, float(means[i])))
    ps = PatternSet(tuple(pats), {"params": params})
    train = score_examples(ps, ex, None, kinds=tuple(np.unique(ex.kinds)), pred=pred.reshape(ex.acts.shape))
    ps.fit.update(train_score=round(train.score, 4), train_precision=round(train.precision, 4),
                  train_recall=round(train.recall, 4))
    return ps


def candidate_sets(ex: LatentExamples, vocab: tuple[list[str], list[str]],
                   max_patterns: Sequence[int] = (1, 2, 3, 5)) -> list[PatternSet]:
    """Distinct pattern sets from several fitting choices, for selection on validation."""
    seen, out = set(), []
    for objective in ("sse", "f1"):
        for modes in (MODES, ("exact",), ("norm",)):
            for k in max_patterns:
                ps = fit(ex, vocab, max_patterns=k, modes=modes, objective=objective)
                sig = tuple(ps.patterns)
                if ps.patterns and sig not in seen:
                    seen.add(sig)
                    out.append(ps)
    return out
