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
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from explainer.errors import ExplainerError
from explainer.planted.features import (  # noqa: F401  (the benchmark's public names)
    ANIMALS,
    COLOURS,
    KINSHIP,
    NUMBER_WORDS,
    Feature,
    after,
    after_word,
    bigram,
    default_features,
    digit_value,
    graded_bigram,
    inside_quotes,
    per_string,
    position,
    token,
    word_class,
)
from explainer.planted.report import GOOD, Cell, LatentRow, PlantedResult, Separation, separation
from explainer.results import tagged


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
    from explainer.sae.formats import save_dictionary
    from explainer.sae.model import TopKSAE

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


def _ngram_stage(con: Any, dict_id: int, n: int, settings: Any,
                 progress: Progress) -> tuple[list[dict[str, Any]], Separation]:
    from explainer import vocab
    from explainer.explain import ngram, ngram_fit
    from explainer.store import examples

    # The score settings' snippet counts, so the n-gram and an LLM simulator read the same snippets.
    limits = examples.counts_of(settings.score, vocab.SIM_KINDS)
    ngram.explain_all(con, dict_id, latents=list(range(n)), progress=tagged(progress, "n-gram explain"))
    ngram.score_all(con, dict_id, "heldout", explanation_filter=f"explainer = 'ngram' AND template = '{ngram_fit.FORMAT}'",
                    latents=list(range(n)), limits=limits, progress=tagged(progress, "n-gram score"))
    rows = con.execute(f"""
        SELECT e.latent, e.text, e.pattern::VARCHAR, s.score, s.details::VARCHAR, s.ci_low, s.ci_high, s.snippet_set
        FROM explanations e LEFT JOIN scores s ON s.explanation_id = e.id AND s.scorer = 'simulation'
             AND s.mode = 'ngram' AND s.split = 'heldout' AND s.status = 'ok' AND s.setup_hash = ?
        WHERE e.dict_id = ? AND e.explainer = 'ngram' AND e.template = '{ngram_fit.FORMAT}'
        ORDER BY e.latent, e.id, s.id""", [ngram.setup_hash(limits), dict_id]).fetchall()
    found: dict[int, dict[str, Any]] = {}
    for latent, text, pattern, score, details, lo, hi, snippet_set in rows:
        found.setdefault(latent, {"text": text, "pattern": pattern, "score": score, "details": details,
                                  "cell": Cell(score, lo, hi, snippet_set)})
    sets = {i: ngram_fit.PatternSet.from_json(r["pattern"]) for i, r in found.items() if r["pattern"]}
    # Every explanation against every other latent's held-out text: the n-gram costs nothing.
    wrong = {i: [sets[j] for j in sorted(sets) if j != i] for i in range(n)}
    got = ngram.score_pattern_sets(con, dict_id, wrong, "heldout", limits)
    shuffled = [s.score for per in got.values() for s in per]
    shuffled_of = [i for i, per in got.items() for _ in per]
    # A latent the explainer could not explain is a matched pair scoring 0, not a missing one.
    matched = {i: found[i]["score"] if i in found and found[i]["score"] is not None else 0.0 for i in range(n)}
    return [found.get(i, {}) for i in range(n)], separation(
        "ngram", "simulation", "ngram", list(matched.values()), shuffled, matched_latents=list(matched),
        shuffled_latents=shuffled_of)


def _embedding_stage(con: Any, dict_id: int, n: int, settings: Any,
                     progress: Progress) -> tuple[Optional[Separation], list[str]]:
    """The embedding scorer (no LLM either) on the n-gram's explanations, beside the n-gram simulation.

    Matched pairs are stored score rows (`score.run`, timed with the model already loaded, for
    latents/s); shuffled ones, every explanation against every other latent's held-out windows
    as the n-gram's, are computed in memory. It reads the score settings' snippets: the top,
    quantile and random ones the n-gram simulation reads, plus the non-activating ones (its
    silent class). A latent lacking activating or silent windows cannot be scored: it is left
    out and counted in a note."""
    from explainer import embed
    from explainer.explain import ngram_fit
    from explainer.score import embedding
    from explainer.score import scorer as score
    from explainer.score import setup as score_setup
    from explainer.store import examples

    try:
        model = embed.embedder()
    except ExplainerError as e:
        return None, [f"embedding scorer skipped: {e}"]
    s = settings.model_copy(deep=True)
    s.score.scorers, s.score.split, s.score.latents = "embedding", "heldout", ",".join(map(str, range(n)))
    s.score.explanations = f"explainer = 'ngram' AND template = '{ngram_fit.FORMAT}'"
    t = time.perf_counter()
    res = score.run(con, s, dict_id, progress=tagged(progress, "embedding score"))
    dt = time.perf_counter() - t
    scored = res.ok + res.failed  # 0 on a rerun that found every row stored: nothing was timed
    newest = con.execute(f"""
        SELECT latent, max(id), arg_max(text, id) FROM explanations WHERE dict_id = ? AND explainer = 'ngram'
          AND template = '{ngram_fit.FORMAT}' AND status = 'ok' AND latent < ? GROUP BY latent""",
                         [dict_id, n]).fetchall()
    texts = {lat: text for lat, _, text in newest}
    matched = dict(con.execute("""
        SELECT e.latent, arg_max(sc.score, sc.id) FROM scores sc JOIN explanations e ON e.id = sc.explanation_id
        WHERE sc.dict_id = ? AND sc.scorer = 'embedding' AND sc.split = 'heldout' AND sc.status = 'ok'
          AND sc.setup_hash = ? AND list_contains(?, sc.explanation_id) GROUP BY e.latent""",
                               [dict_id, score_setup.setup_hash(score_setup.setup_of(s, "embedding")),
                                [i for _, i, _ in newest]]).fetchall())
    snippets = examples.load(con, dict_id, sorted(matched), "heldout", examples.counts_of(s.score), scoring=True)
    wrong: list[float] = []
    wrong_of: list[int] = []
    cache: dict[int, Any] = {}  # window embeddings by context id: the random windows are every latent's
    for i in sorted(matched):
        others = [texts[j] for j in sorted(texts) if j != i]
        got = embedding.score_texts(others, snippets[i], seed=s.score.seed, model=model, cache=cache)
        wrong += [r.score for r in got]
        wrong_of += [i] * len(got)
    notes = []
    if len(matched) < n:
        left = sorted(set(range(n)) - set(matched))
        notes.append(f"embedding: latents {left} left out (no n-gram explanation, or no activating or no silent "
                     "held-out window)")
    sep = separation("ngram", "embedding", "embedding", [matched[i] for i in sorted(matched)], wrong,
                     matched_latents=sorted(matched), shuffled_latents=wrong_of,
                     latents_per_s=scored / dt if scored and dt > 0 else None)
    return sep, notes


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _llm_stage(con: Any, dict_id: int, latents: list[int], settings: Any, base_url: str, progress: Progress,
               rows: list[LatentRow], shuffled: bool) -> tuple[dict[str, float], list[Separation], list[str]]:
    """LLM explanations of `latents`, then every LLM scorer on matched and shuffled explanation/latent pairs.

    The LLM scorers judge both the LLM's explanations and the n-gram's (whose quality on
    this benchmark is known), so a scorer can be checked apart from the explainer. Matched
    pairs are scored by `score.run` (stored rows, on the snippets the n-gram read); shuffled
    ones, latent i against the next explained latent's text (a derangement), by
    `score.evaluate` (cache and ledger, no row), unless `shuffled` is off.
    Fills each row's llm_explanation, llm_simulation, ngram_llm_simulation and cells.
    """
    from explainer.explain import llm as explain
    from explainer.explain import ngram_fit
    from explainer.score import scorer as score
    from explainer.score import setup as score_setup

    s = settings.model_copy(deep=True)
    s.llm.base_url = base_url
    s.explain.explainer = "llm"
    s.explain.latents = s.score.latents = ",".join(str(i) for i in latents)
    s.score.split = "heldout"
    model = s.llm.model
    s.score.explanations = (f"(explainer = 'llm' AND model = {_sql_text(model)}) "
                            f"OR (explainer = 'ngram' AND template = '{ngram_fit.FORMAT}')")
    explain.run(con, s, dict_id, progress=tagged(progress, "LLM explain"))
    score.run(con, s, dict_id, progress=tagged(progress, "LLM score"))
    errors = dict(con.execute("""SELECT latent, arg_max(error, id) FROM explanations WHERE dict_id = ?
                                 AND explainer = 'llm' AND model = ? GROUP BY latent HAVING bool_and(status <> 'ok')""",
                              [dict_id, model]).fetchall())
    fractions: dict[str, float] = {}
    seps: list[Separation] = []
    notes: list[str] = [] if shuffled else ["shuffled pairs not scored by the LLM (--no-shuffled)"]
    for scorer in score_setup.parse_scorers(s.score.scorers):
        mode = score_setup.mode_of(s.score, scorer)
        for explainer in ("llm", "ngram"):
            texts = _texts(con, dict_id, explainer, model, latents)
            got = _cells(con, dict_id, explainer, scorer, mode, model, latents)
            have = sorted(texts)
            wrong, wrong_of, failed = _shuffled(con, s, dict_id, texts, scorer) if shuffled else ([], [], 0)
            # An unexplained latent is a matched pair scoring 0; a failed score is left out and counted.
            matched_of = [i for i in have if i in got] + [i for i in latents if i not in texts]
            matched = [got[i].score for i in have if i in got] + [0.0] * (len(latents) - len(have))
            failed += sum(1 for i in have if i not in got)
            if failed:
                notes.append(f"{explainer}/{scorer}: {failed} scores failed and are left out")
            seps.append(separation(explainer, scorer, mode, [x or 0.0 for x in matched], wrong,
                                   matched_latents=matched_of, shuffled_latents=wrong_of))
            if scorer == "simulation":
                fractions[f"{explainer}/{scorer}({mode})"] = float(np.mean([(x or 0.0) >= GOOD for x in matched]))
                pair = "llm/llm" if explainer == "llm" else "ngram/llm"
                for r in rows:
                    cell = got.get(r.latent)
                    if cell is not None:
                        r.cells[pair] = cell
                    if explainer == "llm":
                        r.llm_explanation, r.llm_simulation = texts.get(r.latent), cell.score if cell else None
                        r.llm_error = errors.get(r.latent)
                    else:
                        r.ngram_llm_simulation = cell.score if cell else None
    return fractions, seps, notes


def _texts(con: Any, dict_id: int, explainer: str, model: str, latents: list[int]) -> dict[int, str]:
    return dict(con.execute("""
        SELECT latent, arg_max(text, id) FROM explanations WHERE dict_id = ? AND explainer = ? AND status = 'ok'
          AND (explainer = 'ngram' OR model = ?) AND list_contains(?, latent) GROUP BY latent""",
                            [dict_id, explainer, model, latents]).fetchall())


def _cells(con: Any, dict_id: int, explainer: str, scorer: str, mode: Optional[str], model: str,
           latents: list[int]) -> dict[int, Cell]:
    """The latest stored held-out score of each latent's explanation by this LLM scorer."""
    got = con.execute("""
        SELECT e.latent, arg_max(sc.score, sc.id), arg_max(sc.ci_low, sc.id), arg_max(sc.ci_high, sc.id),
               arg_max(sc.snippet_set, sc.id)
        FROM scores sc JOIN explanations e ON e.id = sc.explanation_id
        WHERE sc.dict_id = ? AND e.explainer = ? AND sc.scorer = ? AND sc.mode IS NOT DISTINCT FROM ?
          AND sc.model = ? AND (e.explainer = 'ngram' OR e.model = ?)
          AND sc.split = 'heldout' AND sc.status = 'ok' AND list_contains(?, e.latent) GROUP BY e.latent""",
                      [dict_id, explainer, scorer, mode, model, model, latents]).fetchall()
    return {lat: Cell(sc, lo, hi, ss) for lat, sc, lo, hi, ss in got}


def _shuffled(con: Any, s: Any, dict_id: int, texts: dict[int, str], scorer: str
              ) -> tuple[list[float], list[int], int]:
    """Each latent scored against the next explained latent's text; (scores, their latents, failures)."""
    from explainer.score import scorer as score

    have = sorted(texts)
    out, of, failed = [], [], 0
    for k, i in enumerate(have):
        j = have[(k + 1) % len(have)]
        if j == i:
            continue
        try:
            out.append(score.evaluate(con, s, dict_id, i, texts[j], scorer=scorer, split="heldout",
                                      stage="bench-planted").score)
            of.append(i)
        except score.ScoreFailed:
            failed += 1
    return out, of, failed


def run_planted(db_path: Path | str, settings: Any, base_url: Optional[str] = None, progress: Progress = None, *,
                features: Optional[Sequence[Feature]] = None, tokenizer: Any = None,
                llm_latents: Optional[Sequence[int]] = None, shuffled: bool = True,
                embedding: bool = True) -> PlantedResult:
    """Sample the planted dictionary over settings.corpus into db_path, explain, score, report.

    Uses settings.model.name only for its tokenizer, settings.corpus, settings.sample (tokens
    budget, examples per kind) and settings.score (snippet counts, for the n-gram too; the LLM
    scorers). With base_url, the LLM explains and scores `llm_latents` (default: all), and,
    unless `shuffled` is off, also scores shuffled pairs. With `embedding` (and its model
    installed; otherwise a note), the embedding scorer's separation of the n-gram's matched and
    shuffled pairs joins the n-gram simulation's. Rerunning on the same file reuses what is there.
    """
    from explainer.sample import sampler as sample
    from explainer.store import db as store

    t0 = time.perf_counter()
    features = list(features) if features is not None else default_features()
    n = len(features)
    subset = list(range(n)) if llm_latents is None else sorted({int(i) for i in llm_latents})
    if not subset or not all(0 <= i < n for i in subset):
        raise ExplainerError(f"--llm-latents {llm_latents}: give planted latents from 0 to {n - 1}")
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
            found, sep = _ngram_stage(con, res.dict_id, n, settings, progress)
            out.rows = _rows(con, res.dict_id, features, found)
            out.fraction_good["ngram/simulation(ngram)"] = float(np.mean([(r.score or 0.0) >= GOOD for r in out.rows]))
            out.separation.append(sep)
            if embedding:
                emb, emb_notes = _embedding_stage(con, res.dict_id, n, settings, progress)
                out.separation += [emb] if emb else []
                out.notes += emb_notes
            if base_url:
                llm_frac, llm_seps, llm_notes = _llm_stage(con, res.dict_id, subset, settings, base_url, progress,
                                                           out.rows, shuffled)
                out.fraction_good.update(llm_frac)
                out.separation += llm_seps
                out.notes += llm_notes
            out.notes += res.warnings
        return out
    finally:
        con.close()


def _rows(con: Any, dict_id: int, features: list[Feature], found: list[dict[str, Any]]) -> list[LatentRow]:
    freq = dict(con.execute("SELECT latent, frequency FROM latents WHERE dict_id = ?", [dict_id]).fetchall())
    rows = []
    for i, (f, r) in enumerate(zip(features, found)):
        det = json.loads(r["details"]) if r.get("details") else {}
        fit = json.loads(r["pattern"]).get("fit", {}) if r.get("pattern") else {}
        rows.append(LatentRow(i, f.name, f.category, f.truth, freq.get(i), r.get("text"), r.get("score"),
                              det.get("precision"), det.get("recall"), fit.get("train_score"),
                              cells={"ngram/ngram": r["cell"]} if r.get("cell") else {}))
    return rows
