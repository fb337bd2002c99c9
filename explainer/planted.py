"""Planted-feature benchmark: a dictionary whose latents are known functions of the text.

`PlantedModel` stands in for the subject model: it has the attributes the sampler reads
(tokenizer, name, hook, layer, d_model, device, dtype, activations, token_strings) but needs
only a tokenizer; its "residual stream" is the vector of planted feature values per token.
An identity TopK dictionary (W_enc = W_dec = I) then turns feature i into latent i, so the
ordinary sampler writes a DB in which every latent's true explanation is known, and the
explain-and-score loop can be checked against that ground truth.

TopKSAE requires k < d_sae, so the identity dictionary keeps k = n - 1 of n latents per
token: exact as long as no token fires all n features, which the model checks per batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from explainer.errors import ExplainerError
from explainer.metrics import auroc
from explainer.planted_features import (  # noqa: F401  (the benchmark's public names)
    ANIMALS, COLOURS, KINSHIP, NUMBER_WORDS, Feature, after, after_word, bigram, default_features, digit_value,
    graded_bigram, inside_quotes, per_string, position, token, word_class,
)
from explainer.results import StageResult, tagged


class PlantedModel:
    """Drop-in for explainer.lm.SubjectModel in the sampler: activations = planted feature values."""

    def __init__(self, tokenizer: Any, features: Sequence[Feature], name: str) -> None:
        if len(features) < 2:
            raise ExplainerError("the planted benchmark needs at least 2 features (the identity dictionary keeps k = n - 1)")
        self.tokenizer = tokenizer
        self.features = list(features)
        self.name = name
        self.layer = 0
        self.n_layers = 1
        self.hook = "planted"
        self.d_model = len(features)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._strings: dict[int, str] = {}

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            s = self._strings.get(int(i))
            if s is None:
                s = self._strings[int(i)] = self.tokenizer.decode([int(i)])
            out.append(s)
        return out

    def activations(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [B, T, n_features] for token ids [B, T]."""
        arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        s = np.array([self.token_strings(row) for row in arr.tolist()], dtype=object).reshape(arr.shape)
        acts = np.stack([f.fn(s) for f in self.features], axis=-1).astype(np.float32)
        if (acts > 0).all(axis=-1).any():
            raise ExplainerError("every planted feature fires on one token, which the identity dictionary "
                                 "(k = n - 1) cannot hold; add a feature that cannot fire together with the others")
        return torch.from_numpy(acts)


def save_identity_dictionary(folder: Path, model: PlantedModel) -> Path:
    from explainer.sae import TopKSAE
    from explainer.sae_formats import save_dictionary

    n = model.d_model
    cfg = {"model_name": model.name, "hook_name": model.hook, "hook_layer": model.layer,
           "planted_features": [f.name for f in model.features]}
    sae = TopKSAE(n, n, n - 1, cfg=cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
    return save_dictionary(sae, folder)


def load_tokenizer(model_name: str) -> Any:
    """The tokenizer of a model name as ModelSettings takes it (the weights are never loaded)."""
    from transformers import AutoTokenizer

    from explainer.lm import resolve

    try:
        return AutoTokenizer.from_pretrained(resolve(model_name))
    except OSError as e:
        raise ExplainerError(f"cannot load the tokenizer of {model_name!r}: {str(e).splitlines()[0]}") from None


# --- the benchmark ------------------------------------------------------------------------------

Progress = Optional[Callable[[dict[str, Any]], None]]
GOOD = 0.7  # simulation score counted as "explained"


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


@dataclass
class Separation:
    """Does a scorer rank matched explanation/latent pairs above shuffled ones?"""

    explainer: str
    scorer: str
    mode: str
    n_matched: int
    n_shuffled: int
    matched_mean: Optional[float]
    shuffled_mean: Optional[float]
    auroc: Optional[float]


@dataclass
class PlantedResult(StageResult):
    db: str
    run_id: int
    dict_id: Optional[int] = None  # the rest is filled in as the benchmark goes
    n_tokens: int = 0
    n_contexts: dict[str, int] = field(default_factory=dict)
    rows: list[LatentRow] = field(default_factory=list)
    fraction_good: dict[str, float] = field(default_factory=dict)  # "explainer/scorer(mode)" -> fraction >= GOOD
    separation: list[Separation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {f"planted-feature benchmark ({self.db})": self.table()}

    def by_class(self) -> list[dict[str, Any]]:
        """Per feature class, mean held-out simulation of the n-gram explanation (n-gram simulator;
        an unexplained latent counts 0) beside, with --base-url, the LLM simulator's scores of the
        n-gram's and the LLM's explanations (mean over the latents scored, their count in n)."""
        out = []
        for cat in dict.fromkeys(r.category for r in self.rows):
            rows = [r for r in self.rows if r.category == cat]
            row: dict[str, Any] = {"class": cat, "latents": len(rows),
                                   "ngram": _mean([r.score or 0.0 for r in rows]),
                                   "ngram good": sum((r.score or 0.0) >= GOOD for r in rows)}
            for key, attr in (("ngram, LLM sim", "ngram_llm_simulation"), ("llm, LLM sim", "llm_simulation")):
                vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
                row[key], row[f"{key} n"] = _mean(vals), len(vals)
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"db": self.db, "tokens": self.n_tokens, "planted latents": len(self.rows)}
        for ex, frac in self.fraction_good.items():
            out[f"{ex}: fraction with simulation >= {GOOD}"] = round(frac, 4)
        for s in self.separation:
            out[f"{s.explainer}/{s.scorer}({s.mode}): matched vs shuffled AUROC"] = s.auroc
        for c in self.by_class():
            out[f"ngram mean score, {c['class']} latents"] = c["ngram"]
            for key in ("ngram, LLM sim", "llm, LLM sim"):
                if c[f"{key} n"]:
                    out[f"{key.split(',')[0]} explanation, LLM simulator mean, {c['class']} latents"] = c[key]
        out["notes"] = "; ".join(self.notes) if self.notes else None
        out["seconds"] = round(self.wall_s, 1)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("rows", "separation")},
                "rows": self.table(), "separation": [asdict(s) for s in self.separation], "by_class": self.by_class()}

    def to_json(self) -> dict[str, Any]:
        return self.as_dict()


def _mean(vals: list[float]) -> Optional[float]:
    return round(float(np.mean(vals)), 4) if vals else None


def _separation(explainer: str, scorer: str, mode: str, matched: list[float], shuffled: list[float]) -> Separation:
    labels = [1] * len(matched) + [0] * len(shuffled)
    return Separation(explainer, scorer, mode, len(matched), len(shuffled),
                      float(np.mean(matched)) if matched else None, float(np.mean(shuffled)) if shuffled else None,
                      auroc(matched + shuffled, labels))


def _ngram_stage(con: Any, dict_id: int, n: int, progress: Progress) -> tuple[list[dict[str, Any]], Separation]:
    from explainer import ngram

    ngram.explain_all(con, dict_id, latents=list(range(n)), progress=tagged(progress, "n-gram explain"))
    ngram.score_all(con, dict_id, "heldout", explanation_filter=f"explainer = 'ngram' AND template = '{ngram.FORMAT}'",
                    latents=list(range(n)), progress=tagged(progress, "n-gram score"))
    rows = con.execute(f"""
        SELECT e.latent, e.text, e.pattern::VARCHAR, s.score, s.details::VARCHAR
        FROM explanations e LEFT JOIN scores s ON s.explanation_id = e.id AND s.scorer = 'simulation'
             AND s.mode = 'ngram' AND s.split = 'heldout' AND s.status = 'ok'
        WHERE e.dict_id = ? AND e.explainer = 'ngram' AND e.template = '{ngram.FORMAT}'
        ORDER BY e.latent, e.id, s.id""", [dict_id]).fetchall()
    found: dict[int, dict[str, Any]] = {}
    for latent, text, pattern, score, details in rows:
        found.setdefault(latent, {"text": text, "pattern": pattern, "score": score, "details": details})
    sets = {i: ngram.PatternSet.from_json(r["pattern"]) for i, r in found.items() if r["pattern"]}
    # Every explanation against every other latent's held-out text: the n-gram costs nothing.
    wrong = {i: [sets[j] for j in sorted(sets) if j != i] for i in range(n)}
    shuffled = [s.score for per in ngram.score_pattern_sets(con, dict_id, wrong, "heldout").values() for s in per]
    matched = [found[i]["score"] for i in sorted(found) if found[i]["score"] is not None]
    # A latent the explainer could not explain is a matched pair scoring 0, not a missing one.
    matched += [0.0] * (n - len(matched))
    return [found.get(i, {}) for i in range(n)], _separation("ngram", "simulation", "ngram", matched, shuffled)


def _llm_stage(con: Any, dict_id: int, n: int, settings: Any, base_url: str, progress: Progress,
               rows: list[LatentRow]) -> tuple[dict[str, float], list[Separation], list[str]]:
    """LLM explanations, then every LLM scorer on matched and shuffled explanation/latent pairs.

    The LLM scorers judge both the LLM's explanations and the n-gram's (whose quality on
    this benchmark is known), so a scorer can be checked apart from the explainer. Matched
    pairs are scored by `score.run` (stored rows); shuffled ones, latent i against the next
    explained latent's text (a derangement), by `score.evaluate` (cache and ledger, no row).
    Fills each row's llm_explanation and llm_simulation.
    """
    from explainer import explain, ngram, score

    s = settings.model_copy(deep=True)
    s.llm.base_url = base_url
    s.explain.explainer = "llm"
    s.explain.latents = s.score.latents = f"0-{n - 1}"
    s.score.split = "heldout"
    s.score.explanations = f"explainer = 'llm' OR (explainer = 'ngram' AND template = '{ngram.FORMAT}')"
    explain.run(con, s, dict_id, progress=tagged(progress, "LLM explain"))
    score.run(con, s, dict_id, progress=tagged(progress, "LLM score"))
    fractions: dict[str, float] = {}
    seps: list[Separation] = []
    notes: list[str] = []
    for scorer in score.parse_scorers(s.score.scorers):
        mode = score.mode_of(s.score, scorer)
        for explainer in ("llm", "ngram"):
            texts = dict(con.execute("""
                SELECT latent, arg_max(text, id) FROM explanations WHERE dict_id = ? AND explainer = ?
                  AND status = 'ok' AND latent < ? GROUP BY latent""", [dict_id, explainer, n]).fetchall())
            got = dict(con.execute("""
                SELECT e.latent, arg_max(sc.score, sc.id) FROM scores sc JOIN explanations e ON e.id = sc.explanation_id
                WHERE sc.dict_id = ? AND e.explainer = ? AND sc.scorer = ? AND sc.mode IS NOT DISTINCT FROM ?
                  AND sc.split = 'heldout' AND sc.status = 'ok' AND e.latent < ? GROUP BY e.latent""",
                [dict_id, explainer, scorer, mode, n]).fetchall())
            have = sorted(texts)
            shuffled, failed = [], 0
            for k, i in enumerate(have):
                j = have[(k + 1) % len(have)]
                if j == i:
                    continue
                try:
                    shuffled.append(score.evaluate(con, s, dict_id, i, texts[j], scorer=scorer, split="heldout",
                                                   stage="bench-planted").score)
                except score.ScoreFailed:
                    failed += 1
            # An unexplained latent is a matched pair scoring 0; a failed score is left out and counted.
            matched = [got[i] for i in have if i in got] + [0.0] * (n - len(have))
            failed += sum(1 for i in have if i not in got)
            if failed:
                notes.append(f"{explainer}/{scorer}: {failed} scores failed and are left out")
            seps.append(_separation(explainer, scorer, mode, matched, shuffled))
            if scorer == "simulation":
                fractions[f"{explainer}/{scorer}({mode})"] = float(np.mean([x >= GOOD for x in matched]))
                for r in rows:
                    if explainer == "llm":
                        r.llm_explanation, r.llm_simulation = texts.get(r.latent), got.get(r.latent)
                    else:
                        r.ngram_llm_simulation = got.get(r.latent)
    return fractions, seps, notes


def run_planted(db_path: Path | str, settings: Any, base_url: Optional[str] = None, progress: Progress = None, *,
                features: Optional[Sequence[Feature]] = None, tokenizer: Any = None) -> PlantedResult:
    """Sample the planted dictionary over settings.corpus into db_path, explain, score, report.

    Uses settings.model.name only for its tokenizer, settings.corpus and settings.sample
    (tokens budget, examples per kind). Rerunning on the same file reuses what is there.
    """
    from explainer import sample, store

    t0 = time.perf_counter()
    features = list(features) if features is not None else default_features()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(settings.model.name)
    model = PlantedModel(tokenizer, features, f"planted:{settings.model.name}")
    db_path = Path(db_path)
    sae_dir = save_identity_dictionary(db_path.with_name(db_path.name + ".planted-sae"), model)
    con = store.connect(db_path)
    try:
        out = PlantedResult(str(db_path), store.start_run(con, "bench-planted", settings.public_dict()))
        with store.recorded_run(con, out.run_id, out, t0):
            res = sample.run(con, settings, sae_dir, lm=model, dict_name="planted", progress=tagged(progress, "sample"))
            out.dict_id, out.n_tokens, out.n_contexts = res.dict_id, res.n_tokens, res.n_contexts
            n = len(features)
            found, sep = _ngram_stage(con, res.dict_id, n, progress)
            freq = dict(con.execute("SELECT latent, frequency FROM latents WHERE dict_id = ?", [res.dict_id]).fetchall())
            for i, (f, r) in enumerate(zip(features, found)):
                det = json.loads(r["details"]) if r.get("details") else {}
                fit = json.loads(r["pattern"]).get("fit", {}) if r.get("pattern") else {}
                out.rows.append(LatentRow(i, f.name, f.category, f.truth, freq.get(i), r.get("text"), r.get("score"),
                                          det.get("precision"), det.get("recall"), fit.get("train_score")))
            out.fraction_good["ngram/simulation(ngram)"] = float(np.mean([(r.score or 0.0) >= GOOD for r in out.rows]))
            out.separation.append(sep)
            if base_url:
                llm_frac, llm_seps, llm_notes = _llm_stage(con, res.dict_id, n, settings, base_url, progress, out.rows)
                out.fraction_good.update(llm_frac)
                out.separation += llm_seps
                out.notes += llm_notes
            out.notes += res.warnings
        return out
    finally:
        con.close()
