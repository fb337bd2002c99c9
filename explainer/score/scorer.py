"""`explainer score`: how well each explanation predicts its latent on text the explainer never saw.

One `scores` row per (explanation, scorer, mode, split): status ok with a score, or failed
with the reason and a NULL score. Scorers:
- simulation (Bills et al. 2023; simulate.py): Pearson r of simulated vs true activations
  over held-out top + quantile + random snippets.
- detection (Paulo et al. 2024; judge.py): snippets half on which the latent fires and half
  on which it is 0; the model says which the explanation applies to. Score: balanced accuracy.
- fuzzing (judge.py): firing snippets with highlighted tokens, about half of them moved to
  random non-firing tokens. The model says whether the highlights match. Score: accuracy.
- embedding (embedding.py): no LLM; AUROC of the cosine similarity between the explanation and
  each activating vs silent window in all-MiniLM-L6-v2's embedding, computed in-process.

Only `heldout` or `validation` text is read: the split is checked here and again in the SQL
of the shared example loader (examples.py), so a train-split context cannot reach a prompt.
`--set score.split=both` scores validation (what the `labels` view selects on) and then
heldout (only reported) in one run. Each row records its provenance as columns (model,
template_hash, setup_hash), the snippets it was computed on (snippet_set) and the score's
statistics (ci_low, ci_high, baseline, score_top_random, score_all). The stage is resumable:
a combination already scored ok with the same simulator model, template and setup (snippet
counts, per_call, seed, temperature) is skipped, a failed
one is retried (its failure row replaced in the same transaction), and answers already paid
for come back from the response cache. `evaluate` scores one explanation on one split and
returns every snippet's predictions (the agent uses it on `validation`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import duckdb

from explainer import embed, prompts, vocab
from explainer.errors import ExplainerError
from explainer.llm import pool as llm_pool
from explainer.llm.client import LLMClient
from explainer.llm.wire import resolve_endpoint
from explainer.results import LLMSpend, OnProgress
from explainer.score import embedding, intervention
from explainer.score.judge import detection_items, fuzzing_items, judge
from explainer.score.records import Outcome, ScoreFailed, Snippet, Spend
from explainer.score.setup import load_template, mode_of, parse_scorers, setup_hash, setup_of, splits_of
from explainer.score.simulate import simulate
from explainer.settings import ScoreSettings, Settings
from explainer.store import db as store
from explainer.store import examples
from explainer.store.rows import StageRows, score_row

CHUNK = 256  # latents whose snippets are read in one query


# --- inputs ----------------------------------------------------------------------------------


def load_snippets(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Sequence[int], split: str,
                  s: ScoreSettings) -> dict[int, list[Snippet]]:
    """Each latent's top, quantile (spread over bins), random and non-activating snippets of `split`,
    through the shared loader (every scorer and the agent see the same ones)."""
    vocab.check_split(split)
    return examples.load(con, dict_id, latents, split, examples.counts_of(s), scoring=True)


def scored_set(scorer: str, snippets: Sequence[Snippet], outcome: Optional[Outcome] = None) -> Optional[str]:
    """snippet_set of a score: the snippets its results are on, or those it was to read (failed)."""
    if outcome is not None and outcome.results:
        return examples.snippet_set([r.snippet for r in outcome.results])
    return examples.snippet_set(examples.simulation_snippets(snippets) if scorer == "simulation" else snippets)


def select_explanations(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Sequence[int],
                        where: Optional[str]) -> list[tuple[int, int, str]]:
    """(id, latent, text) of the ok explanations of `latents`, filtered by a user's SQL WHERE."""
    # An agent's unchosen candidates and refinements are steps of a selection made on validation;
    # scoring them on heldout would let heldout pick among them (the labels view takes the best).
    sql = ("SELECT id, latent, text FROM explanations WHERE dict_id = ? AND status = 'ok' "
           "AND text IS NOT NULL AND list_contains(?, latent) AND (explainer <> 'agent' OR chosen)")
    if where and where.strip():
        sql += f" AND ({where})"
    try:
        rows = con.execute(sql + " ORDER BY latent, id", [dict_id, list(latents)]).fetchall()
    except duckdb.Error as e:
        raise ExplainerError(f"--explanations {where!r} is not a valid SQL WHERE over the explanations table: "
                             f"{str(e).splitlines()[0]}") from None
    if not rows:
        extra = f" matching --explanations {where!r}" if where else ""
        raise ExplainerError(f"no ok explanation of the selected latents{extra}; run `explainer explain` first "
                             "or widen --latents / --explanations")
    return [(r[0], r[1], r[2]) for r in rows]


async def score_explanation(llm: LLMClient, s: ScoreSettings, scorer: str, tpl: prompts.Template, latent: int,
                            explanation: str, snippets: Sequence[Snippet],
                            steerer: Optional[intervention.Steerer] = None, split: str = "heldout") -> Outcome:
    """One explanation, one scorer, on the given snippets. Raises ScoreFailed (reason + spend)."""
    spend = Spend()
    try:
        if scorer == intervention.MODE:
            if steerer is None:
                raise ExplainerError("the intervention scorer runs in `explainer score` only (it needs the subject model)")
            done = steerer.steered(latent, split, snippets, s)
            return await intervention.judge(llm, s, tpl, explanation, latent, done, spend)
        if scorer == "simulation":
            return await simulate(llm, s, tpl, explanation, examples.simulation_snippets(snippets), latent, spend)
        items = (detection_items if scorer == "detection" else fuzzing_items)(snippets, latent, s.seed)
        return await judge(llm, s, scorer, tpl, explanation, items, latent, spend)
    except ScoreFailed as e:
        e.spend = spend
        raise


def evaluate(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int, latent: int, explanation: str, *,
             scorer: str = "simulation", split: str = "validation", stage: str = "score") -> Outcome:
    """Score one explanation text on `split` without writing a score row (calls go to the
    cache and ledger). `Outcome.results` holds each snippet's tokens, true activations and
    predictions, to find false positives and negatives. Raises ScoreFailed."""
    s = settings.score
    vocab.check_split(split)
    tpl = load_template(s, scorer)
    snippets = load_snippets(con, dict_id, [latent], split, s)[latent]

    async def go() -> Outcome:
        async with LLMClient(settings.llm, con, stage=stage, dict_id=dict_id) as llm:
            return await score_explanation(llm, s, scorer, tpl, latent, explanation, snippets)

    return asyncio.run(go())


def snippet_records(outcome: Outcome) -> list[dict[str, Any]]:
    """Per-snippet answers for the details JSON (true activations stay in `examples`)."""
    out = []
    for r in outcome.results:
        rec: dict[str, Any] = {"context_id": r.snippet.context_id, "kind": r.snippet.kind}
        if r.predicted is not None:
            rec["pred"] = [int(p) if outcome.mode == "json" else round(p, 3) for p in r.predicted]
        if r.label is not None:
            rec["label"], rec["answer"] = r.label, r.answer
        if r.highlights is not None:
            rec["highlights"] = r.highlights
        out.append(rec)
    return out


# --- the stage -------------------------------------------------------------------------------


@dataclass
class ScorerStats:
    ok: int = 0
    failed: int = 0
    score_sum: float = 0.0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latents: set[int] = field(default_factory=set)

    def per_latent(self, n: int) -> Optional[float]:
        return n / len(self.latents) if self.latents else None


@dataclass
class ScoreResult(llm_pool.PassResult):
    run_id: int
    dict_id: int
    model: str
    split: str  # "validation,heldout" with score.split = both
    mode: str
    scorers: list[str]
    requested: int
    skipped: int
    ok: int = 0
    failed: int = 0
    spend: LLMSpend = field(default_factory=LLMSpend)
    wall_s: float = 0.0
    per_scorer: dict[str, ScorerStats] = field(default_factory=dict)  # by stat_key: one split per entry
    errors: dict[str, int] = field(default_factory=dict)
    batch: Optional[dict[str, Any]] = None  # what --batch did (batch.BatchOutcome.as_dict())
    estimate: Optional[dict[str, Any]] = None  # --estimate: what the command would send (llm_pool.estimate)

    def report(self) -> dict[str, Any]:
        """Mean score per scorer, calls and prompt tokens per latent, failures, wall time."""
        out: dict[str, Any] = {"run": self.run_id, "simulator model": self.model, "split": self.split,
                               "scores written": self.ok, "failed": self.failed, "skipped (already scored)": self.skipped}
        for key, st in self.per_scorer.items():
            name, _, split = key.partition(" on ")
            label = f"{name} ({self.mode})" if name == "simulation" else name
            label += f" on {split}" if split else ""
            out[f"{label}: mean score"] = st.score_sum / st.ok if st.ok else None
            out[f"{label}: scored / failed"] = f"{st.ok} / {st.failed}"
            out[f"{label}: calls per latent"] = st.per_latent(st.calls)
            out[f"{label}: prompt tokens per latent"] = st.per_latent(st.prompt_tokens)
        sp = self.spend
        out.update({"calls": sp.calls, "cache hits": sp.cache_hits, "prompt tokens spent": sp.prompt_tokens,
                    "completion tokens spent": sp.completion_tokens, "cost": sp.cost,
                    "wall s": round(self.wall_s, 2)})
        if self.errors:
            out["failures"] = "; ".join(f"{k} ({v})" for k, v in self.errors.items())
        if self.batch is not None:
            out.update({f"batch {k}": v for k, v in self.batch.items()
                        if k in ("status", "batch_ids", "requests", "answered", "errored", "cost", "next")})
        return out

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data["per_scorer"] = {k: {**{f: getattr(v, f) for f in ("ok", "failed", "score_sum", "calls",
                                                                   "prompt_tokens", "completion_tokens")},
                                  "latents": len(v.latents)} for k, v in self.per_scorer.items()}
        return data


def stat_key(scorer: str, split: str, splits: Sequence[str]) -> str:
    """Run statistics are kept per split when a run scores two: a mean never mixes them."""
    return f"{scorer} on {split}" if len(splits) > 1 else scorer


@dataclass
class _Job:
    explanation_id: int
    latent: int
    text: str
    scorer: str
    retry_failed: bool
    split: str = "heldout"


def _scored(con: duckdb.DuckDBPyConnection, dict_id: int, splits: list[str], model: str) -> dict[tuple, set[str]]:
    rows = con.execute(
        """SELECT explanation_id, split, scorer, mode, template_hash, setup_hash, status
           FROM scores WHERE dict_id = ? AND list_contains(?, split) AND model = ?""",
        [dict_id, splits, model],
    ).fetchall()
    out: dict[tuple, set[str]] = {}
    for eid, split, scorer, mode, thash, shash, status in rows:
        out.setdefault((eid, split, scorer, mode, thash, shash), set()).add(status)
    return out


def run(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int,
        progress: Optional[OnProgress] = None) -> ScoreResult:
    """Score the ok explanations of `settings.score.latents` with each scorer in `settings.score.scorers`.

    With `settings.llm.batch` the calls first go through the Batch API (explainer/llm/batch.py;
    `progress` then also receives its status, `stage` "batch ..."); with `batch_wait` off the run may end
    after submitting, writing no score (`result.batch["ready"]` is False)."""
    s = settings.score
    scorers = parse_scorers(s.scorers)
    splits = splits_of(s)
    for split in splits:
        vocab.check_split(split)
    if settings.llm.batch and intervention.MODE in scorers:
        raise ExplainerError("--scorer intervention runs the subject model between its calls; run it without --batch")
    if settings.llm.batch and s.mode == "all_at_once" and "simulation" in scorers:
        raise ExplainerError("--mode all_at_once reads echoed prompt logprobs, which the Batch API does not return; "
                             "run it without --batch (against vLLM or llama.cpp), or use --mode json with --batch")
    llm_scorers = [name for name in scorers if name != embedding.MODE]
    if llm_scorers:
        resolve_endpoint(settings.llm)  # a missing key fails before anything is written
    else:
        embed.model_dir()  # so does a missing embedding model
    templates = {name: load_template(s, name) for name in llm_scorers}
    hashes = {**{name: tpl.sha256 for name, tpl in templates.items()}, embedding.MODE: embedding.RECIPE_HASH}
    setups = {name: setup_of(settings, name) for name in scorers}
    latents = store.select_latents(con, dict_id, s.latents)
    explanations = select_explanations(con, dict_id, latents, s.explanations)
    model = settings.llm.model
    done = {**_scored(con, dict_id, splits, model), **_scored(con, dict_id, splits, embed.MODEL)}
    jobs: list[_Job] = []
    for eid, latent, text in explanations:
        for split in splits:
            for name in scorers:
                key = (eid, split, name, mode_of(s, name), hashes[name], setup_hash(setups[name]))
                status = done.get(key, set())
                if "ok" not in status:
                    jobs.append(_Job(eid, latent, text, name, "failed" in status, split))
    requested = len(explanations) * len(scorers) * len(splits)
    run_id = store.start_run(con, "score", settings.public_dict())
    result = ScoreResult(run_id, dict_id, model, ",".join(splits), s.mode, scorers, requested=requested,
                         skipped=requested - len(jobs),
                         per_scorer={stat_key(name, split, splits): ScorerStats() for name in scorers for split in splits})
    embed_jobs = [j for j in jobs if j.scorer == embedding.MODE]
    t0 = time.perf_counter()
    if embed_jobs or not llm_scorers:
        with store.recorded_run(con, run_id, result, t0):
            setup = setups.get(embedding.MODE, {})
            embedding.run_jobs(con, s, dict_id, embed_jobs, run_id=run_id, setup=setup, setup_hash=setup_hash(setup),
                               on_done=lambda job, score, error: _tally(result, job, score, error), progress=progress)
    if llm_scorers:
        llm_jobs = [j for j in jobs if j.scorer != embedding.MODE]
        llm_pool.run(con, settings.llm, _pass(con, settings, dict_id, templates, setups, llm_jobs, result), result,
                     dict_id=dict_id, progress=progress)
        result.wall_s = time.perf_counter() - t0
    return result


def _tally(result: ScoreResult, job: Any, score: Optional[float], error: Optional[str]) -> None:
    """Count one embedding row in the run's result (the LLM pass counts its own)."""
    st = result.per_scorer[stat_key(job.scorer, job.split, result.split.split(","))]
    st.latents.add(job.latent)
    if error is None:
        result.ok += 1
        st.ok += 1
        st.score_sum += float(score or 0.0)
    else:
        result.failed += 1
        st.failed += 1
        kind = llm_pool.reason_kind(error, "needs both kinds")
        result.errors[kind] = result.errors.get(kind, 0) + 1


def _pass(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int,
          templates: dict[str, prompts.Template], setups: dict[str, dict[str, Any]], jobs: list[_Job],
          result: ScoreResult) -> llm_pool.Pass[tuple[_Job, list[Snippet]]]:
    s = settings.score
    model = settings.llm.model
    splits = splits_of(s)
    steerer = intervention.Steerer(con, settings, dict_id) if any(j.scorer == intervention.MODE for j in jobs) else None

    async def score_one(llm: LLMClient, item: tuple[_Job, list[Snippet]]) -> Optional[str]:
        job, snippets = item
        tpl = templates[job.scorer]
        mode = mode_of(s, job.scorer)
        setup = setups[job.scorer]
        details: dict[str, Any] = {"model": model, "template": tpl.name, "template_hash": tpl.sha256,
                                   "setup": setup, "setup_hash": setup_hash(setup)}
        outcome: Optional[Outcome] = None
        try:
            outcome = await score_explanation(llm, s, job.scorer, tpl, job.latent, job.text, snippets, steerer, job.split)
            spend, score, status, error = outcome.spend, outcome.score, "ok", None
            details.update(outcome.details)
            stats = getattr(outcome, "stats", None) or {}
            if stats:
                details["stats"] = stats
            details["snippets"] = snippet_records(outcome)
            n = len(outcome.results)
        except ScoreFailed as e:
            spend, score, status, error, n, stats = e.spend, None, "failed", e.reason, None, {}
        details.update(calls=spend.calls, failed_calls=spend.failed_calls, cache_hits=spend.cache_hits)
        stage = StageRows()
        if job.retry_failed:
            stage.replace_failed_score(job.explanation_id, job.scorer, mode, job.split, model, tpl.sha256,
                                       details["setup_hash"])
        stage.add("scores", score_row(
            explanation_id=job.explanation_id, dict_id=dict_id, latent=job.latent, scorer=job.scorer, mode=mode,
            split=job.split, status=status, score=score, details=details, n_snippets=n, error=error,
            run_id=result.run_id, prompt_tokens=spend.prompt_tokens, completion_tokens=spend.completion_tokens,
            cost=spend.cost, model=model, template_hash=tpl.sha256, setup_hash=details["setup_hash"],
            snippet_set=scored_set(job.scorer, snippets, outcome), stats=stats))
        llm.writer.commit_with(stage)
        st = result.per_scorer[stat_key(job.scorer, job.split, splits)]
        st.calls += spend.calls
        st.prompt_tokens += spend.prompt_tokens or 0
        st.completion_tokens += spend.completion_tokens or 0
        st.latents.add(job.latent)
        if status == "ok":
            st.ok += 1
            st.score_sum += float(score)  # type: ignore[arg-type]
        else:
            st.failed += 1
        return error if status != "ok" else None

    return llm_pool.Pass("score", lambda _llm: _with_snippets(con, dict_id, s, jobs), score_one, total=len(jobs),
                         known_errors="fires on none|needs both kinds|needs snippets|no snippets")


def _with_snippets(con: duckdb.DuckDBPyConnection, dict_id: int, s: ScoreSettings,
                   jobs: list[_Job]) -> Iterator[tuple[_Job, list[Snippet]]]:
    """Each job with its snippets, read CHUNK latents at a time and dropped once their last job is out."""
    pending = deque(jobs)
    left: dict[tuple[int, str], int] = {}
    for job in jobs:
        left[job.latent, job.split] = left.get((job.latent, job.split), 0) + 1
    loaded: dict[tuple[int, str], list[Snippet]] = {}
    while pending:
        job = pending.popleft()
        key = (job.latent, job.split)
        if key not in loaded:
            chunk = list(dict.fromkeys([job.latent] + [j.latent for j in pending
                                                       if j.split == job.split and (j.latent, j.split) not in loaded]))
            got = load_snippets(con, dict_id, chunk[:CHUNK], job.split, s)
            loaded.update({(lat, job.split): snips for lat, snips in got.items()})
        snippets = loaded[key]
        left[key] -= 1
        if left[key] == 0:
            del loaded[key]  # jobs come sorted by latent: hold only the latents in progress
        yield job, snippets
