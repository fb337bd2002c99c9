"""What the planted benchmark reports: per latent, per feature class and overall, the held-out
simulation score of each (explanation, simulator) pair with its 95% interval, and whether a
latent's compared scores were computed on one snippet set.

Three pairs are compared: the n-gram explanation on the n-gram simulator, the n-gram
explanation on the LLM simulator, and the LLM explanation on the LLM simulator. The first
costs nothing and runs on every latent; the others only where an endpoint was given.
Separately, each scorer's matched-vs-shuffled AUROC (with an interval over latents): the n-gram
simulator, the embedding scorer (no LLM either) and, with an endpoint, each LLM scorer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from explainer.metrics import auroc, bootstrap_ci
from explainer.results import StageResult

GOOD = 0.7  # simulation score counted as "explained"
# (explanation, simulator) pairs: key -> the LatentRow attribute holding its score.
PAIRS = {"ngram/ngram": "score", "ngram/llm": "ngram_llm_simulation", "llm/llm": "llm_simulation"}
_CLASS_KEYS = {"ngram/ngram": "ngram", "ngram/llm": "ngram, LLM sim", "llm/llm": "llm, LLM sim"}


@dataclass
class Cell:
    """One stored held-out simulation score: Pearson r, its bootstrap interval over the snippets,
    and the hash of the snippets it was computed on."""

    score: Optional[float]
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    snippet_set: Optional[str] = None


@dataclass
class LatentRow:
    latent: int
    feature: str
    category: str
    truth: str
    frequency: Optional[float]
    explanation: Optional[str]
    score: Optional[float]  # n-gram simulation on heldout
    precision: Optional[float]
    recall: Optional[float]
    train_score: Optional[float]
    llm_explanation: Optional[str] = None  # only with --base-url
    llm_simulation: Optional[float] = None  # the LLM simulator's score of llm_explanation (heldout)
    ngram_llm_simulation: Optional[float] = None  # the LLM simulator's score of the n-gram's explanation (heldout)
    cells: dict[str, Cell] = field(default_factory=dict)  # PAIRS key -> the score row behind it
    llm_error: Optional[str] = None  # why the LLM gave no explanation, when it did not

    def same_snippets(self) -> Optional[bool]:
        """True when two or more pairs were scored and all on one snippet set; None with one or none."""
        sets = [c.snippet_set for c in self.cells.values() if c.score is not None]
        return None if len(sets) < 2 else len(set(sets)) == 1 and sets[0] is not None


@dataclass
class Separation:
    """Does a scorer rank matched explanation/latent pairs above shuffled ones? `ci_low`/`ci_high`:
    95% bootstrap interval of the AUROC resampling latents (a latent carries its matched pair and
    the shuffled pairs scored on its snippets), when the pairs' latents were given."""

    explainer: str
    scorer: str
    mode: str
    n_matched: int
    n_shuffled: int
    matched_mean: Optional[float]
    shuffled_mean: Optional[float]
    auroc: Optional[float]
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    latents_per_s: Optional[float] = None  # matched pairs scored per second, where the bench timed it


def separation(explainer: str, scorer: str, mode: str, matched: list[float], shuffled: list[float], *,
               matched_latents: Optional[Sequence[int]] = None, shuffled_latents: Optional[Sequence[int]] = None,
               latents_per_s: Optional[float] = None) -> Separation:
    """AUROC of matched against shuffled scores; with each pair's latent (whose snippets it was
    scored on), also its interval over latents, since pairs of one latent share snippets and are
    not independent."""
    labels = [1] * len(matched) + [0] * len(shuffled)
    lo = hi = None
    if matched_latents is not None and shuffled_latents is not None:
        lo, hi = _auroc_ci_over_latents(matched, shuffled, matched_latents, shuffled_latents)
    return Separation(explainer, scorer, mode, len(matched), len(shuffled),
                      float(np.mean(matched)) if matched else None, float(np.mean(shuffled)) if shuffled else None,
                      auroc(matched + shuffled, labels), lo, hi, latents_per_s)


def _auroc_ci_over_latents(matched: list[float], shuffled: list[float], matched_latents: Sequence[int],
                           shuffled_latents: Sequence[int]) -> tuple[Optional[float], Optional[float]]:
    if len(matched_latents) != len(matched) or len(shuffled_latents) != len(shuffled):
        raise ValueError("separation: one latent per matched and per shuffled score")
    scores = np.asarray(matched + shuffled, dtype=np.float64)
    labels = np.r_[np.ones(len(matched), bool), np.zeros(len(shuffled), bool)]
    ids = sorted(set(matched_latents) | set(shuffled_latents))
    where = {lat: i for i, lat in enumerate(ids)}
    item = np.array([where[x] for x in list(matched_latents) + list(shuffled_latents)], dtype=np.int64)

    def one(ix: np.ndarray) -> Optional[float]:
        weight = np.bincount(ix, minlength=len(ids))[item]  # each pair as often as its latent was drawn
        return auroc(np.repeat(scores, weight), np.repeat(labels, weight))

    return bootstrap_ci(one, len(ids))


def _mean(vals: list[float]) -> Optional[float]:
    return round(float(np.mean(vals)), 4) if vals else None


def mean_with_interval(vals: list[float]) -> dict[str, Any]:
    """Mean over latents with a 95% percentile bootstrap interval over the latents (a class of
    one latent gets that latent's score as both ends: no spread to resample)."""
    v = np.asarray(vals, dtype=np.float64)
    lo, hi = bootstrap_ci(lambda ix: float(v[ix].mean()), len(v))
    return {"mean": _mean(vals), "ci": [None if x is None else round(x, 4) for x in (lo, hi)], "n": len(vals)}


def _pair_values(rows: list[LatentRow], pair: str) -> list[float]:
    attr = PAIRS[pair]
    if pair == "ngram/ngram":  # every latent gets an n-gram score; an unexplained one counts 0
        return [getattr(r, attr) or 0.0 for r in rows]
    return [getattr(r, attr) for r in rows if getattr(r, attr) is not None]


@dataclass
class PlantedResult(StageResult):
    db: str
    run_id: int
    dict_id: Optional[int] = None  # the rest is filled in as the benchmark goes
    n_tokens: int = 0
    n_contexts: dict[str, int] = field(default_factory=dict)
    rows: list[LatentRow] = field(default_factory=list)
    # "explainer/scorer(mode)" -> fraction of planted latents scoring >= GOOD
    fraction_good: dict[str, float] = field(default_factory=dict)
    separation: list[Separation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """One flat row per latent (the same columns in every row): each pair's interval beside its score."""
        out = []
        for r in self.rows:
            row = {k: v for k, v in asdict(r).items() if k != "cells"}
            for pair in PAIRS:
                c = r.cells.get(pair)
                row[f"{pair} 95% CI"] = None if c is None or c.ci_low is None else [round(c.ci_low, 4),
                                                                                     round(c.ci_high or 0.0, 4)]
            row["same snippets"] = r.same_snippets()
            out.append(row)
        return out

    def by_class(self) -> list[dict[str, Any]]:
        """Per feature class, mean held-out simulation of the n-gram explanation (n-gram simulator;
        an unexplained latent counts 0) beside, with --base-url, the LLM simulator's scores of the
        n-gram's and the LLM's explanations (mean over the latents scored, their count in n),
        each with its 95% interval over the class's latents."""
        out = []
        for cat in dict.fromkeys(r.category for r in self.rows):
            rows = [r for r in self.rows if r.category == cat]
            row: dict[str, Any] = {"class": cat, "latents": len(rows),
                                   "ngram good": sum((r.score or 0.0) >= GOOD for r in rows)}
            row.update(self._pairs(rows))
            out.append(row)
        return out

    def overall(self) -> dict[str, Any]:
        """The same over every planted latent."""
        return {"class": "all", "latents": len(self.rows), "ngram good": sum((r.score or 0.0) >= GOOD for r in self.rows),
                **self._pairs(self.rows)}

    @staticmethod
    def _pairs(rows: list[LatentRow]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pair, key in _CLASS_KEYS.items():
            m = mean_with_interval(_pair_values(rows, pair))
            out[key], out[f"{key} ci"] = m["mean"], m["ci"]
            if pair != "ngram/ngram":
                out[f"{key} n"] = m["n"]
        out["same snippets"] = sum(bool(r.same_snippets()) for r in rows)
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"db": self.db, "tokens": self.n_tokens, "planted latents": len(self.rows)}
        for ex, frac in self.fraction_good.items():
            out[f"{ex}: fraction with simulation >= {GOOD}"] = round(frac, 4)
        for s in self.separation:
            name = f"{s.explainer}/{s.scorer}({s.mode}): matched vs shuffled AUROC"
            out[name] = s.auroc
            if s.ci_low is not None:
                out[f"{name} 95% CI over latents"] = [round(s.ci_low, 4), round(s.ci_high or 0.0, 4)]
            if s.latents_per_s is not None:
                out[f"{s.explainer}/{s.scorer}({s.mode}): latents/s"] = round(s.latents_per_s, 1)
        for c in self.by_class() + [self.overall()]:
            out[f"ngram mean score, {c['class']} latents"] = c["ngram"]
            out[f"ngram mean score 95% CI, {c['class']} latents"] = c["ngram ci"]
            for key in ("ngram, LLM sim", "llm, LLM sim"):
                if c[f"{key} n"]:
                    name = f"{key.split(',')[0]} explanation, LLM simulator mean"
                    out[f"{name}, {c['class']} latents"] = c[key]
                    out[f"{name} 95% CI, {c['class']} latents"] = c[f"{key} ci"]
        compared = [r for r in self.rows if r.same_snippets() is not None]
        if compared:
            out["latents whose compared scores share one snippet_set"] = (
                f"{sum(bool(r.same_snippets()) for r in compared)} of {len(compared)}")
        out["notes"] = "; ".join(self.notes) if self.notes else None
        out["seconds"] = round(self.wall_s, 1)
        return out

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {f"planted-feature benchmark ({self.db})": self.table()}

    def as_dict(self) -> dict[str, Any]:
        return self.to_json()

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("rows", "separation")},
                "rows": [{**asdict(r), "same_snippets": r.same_snippets()} for r in self.rows],
                "separation": [asdict(s) for s in self.separation], "by_class": self.by_class(),
                "overall": self.overall()}
