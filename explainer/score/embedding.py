"""The embedding scorer (as delphi's): does the explanation sit nearer, in a sentence embedding,
to the windows where the latent fires than to those where it is silent?

The explanation is embedded as the query and every window as a passage by all-MiniLM-L6-v2
(explainer/embed.py: mean pooling over the attention mask, L2 normalisation). Activating windows
are the top and quantile examples, silent ones the non-activating and random examples whose
max_act is 0. The score is the AUROC of cosine similarity for activating against silent windows, with the
stratified bootstrap interval of `metrics.auroc_ci` and a 0.5 baseline. No LLM is called: the
model runs in-process, batched, on CUDA when there is one, and each window is embedded once
per chunk of latents however many explanations read it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import duckdb
import numpy as np

from explainer import embed, metrics
from explainer.embed import MODEL, Embedder, embedder
from explainer.results import OnProgress, Progress
from explainer.score.records import ScoreFailed, Snippet
from explainer.settings import ScoreSettings
from explainer.store import examples
from explainer.store.rows import StageRows, score_row

MODE = "embedding"
ACTIVE_KINDS = ("top", "quantile")
SILENT_KINDS = ("nonactivating", "random")
# What decides a score besides the snippets: stored as the rows' template_hash, so a change here rescores.
RECIPE = (f"{MODEL}; query: explanation text; passage: window tokens joined; mean pooling over the attention "
          f"mask, L2 norm, cosine; truncation {embed.MAX_TOKENS}; AUROC of {'+'.join(ACTIVE_KINDS)} against "
          f"{'+'.join(SILENT_KINDS)} with max_act 0")
RECIPE_HASH = hashlib.sha256(RECIPE.encode()).hexdigest()
CHUNK = 256  # latents whose snippets are read and embedded together


def windows(snippets: Sequence[Snippet]) -> tuple[list[Snippet], np.ndarray]:
    """The windows a score reads and their labels (True: the latent fires), each context once."""
    active = examples.unique([x for x in snippets if x.kind in ACTIVE_KINDS])
    seen = {x.context_id for x in active}
    silent = examples.unique([x for x in snippets if x.kind in SILENT_KINDS and x.max_act == 0
                              and x.context_id not in seen])
    return active + silent, np.array([True] * len(active) + [False] * len(silent))


def window_text(x: Snippet) -> str:
    return embed.text_of(x.tokens)


@dataclass
class EmbeddingScore:
    score: float
    stats: dict[str, Optional[float]]
    windows: list[Snippet]
    labels: np.ndarray
    sims: np.ndarray


def score_texts(texts: Sequence[str], snippets: Sequence[Snippet], *, seed: int = 0,
                model: Optional[Embedder] = None, cache: Optional[dict[int, np.ndarray]] = None
                ) -> list[EmbeddingScore]:
    """Each text scored against one latent's windows. Raises ScoreFailed when a class is empty.
    `cache` maps context_id to a window's embedding (shared across calls over the same contexts)."""
    wins, labels = windows(snippets)
    if not labels.any() or labels.all():
        raise ScoreFailed(f"needs both kinds: {int(labels.sum())} activating and {int((~labels).sum())} silent windows")
    m = model or embedder()
    cache = {} if cache is None else cache
    todo = [x for x in wins if x.context_id not in cache]
    for x, vec in zip(todo, m.encode([window_text(x) for x in todo])):
        cache[x.context_id] = vec
    passages = np.stack([cache[x.context_id] for x in wins])
    out = []
    for q in m.encode(list(texts)):
        sims = passages @ q
        auc = metrics.auroc(sims, labels)
        assert auc is not None  # both classes are present (checked above)
        out.append(EmbeddingScore(auc, metrics.auroc_stats(sims, labels, seed=seed), wins, labels, sims))
    return out


class Job(Protocol):
    explanation_id: int
    latent: int
    text: str
    split: str
    retry_failed: bool


# on_done(job, score or None, error or None): the caller's tally of each written row.
OnDone = Callable[[Job, Optional[float], Optional[str]], None]


def run_jobs(con: duckdb.DuckDBPyConnection, s: ScoreSettings, dict_id: int, jobs: Sequence[Job], *,
             run_id: int, setup: dict[str, Any], setup_hash: str, on_done: OnDone,
             progress: Optional[OnProgress] = None) -> None:
    """Score `jobs` (sorted by latent), writing one `scores` row each; a chunk of latents commits at once."""
    m = embedder() if jobs else None
    done = ok = 0
    for split in dict.fromkeys(j.split for j in jobs):
        mine = [j for j in jobs if j.split == split]
        latents = list(dict.fromkeys(j.latent for j in mine))
        for lo in range(0, len(latents), CHUNK):
            chunk = set(latents[lo:lo + CHUNK])
            snippets = examples.load(con, dict_id, sorted(chunk), split, examples.counts_of(s), scoring=True)
            cache: dict[int, np.ndarray] = {}
            stage = StageRows()
            for job in (j for j in mine if j.latent in chunk):
                row, score, error = _score_job(job, snippets[job.latent], s.seed, m, cache, dict_id=dict_id,
                                               run_id=run_id, setup=setup, setup_hash=setup_hash)
                if job.retry_failed:
                    stage.replace_failed_score(job.explanation_id, MODE, MODE, job.split, MODEL, RECIPE_HASH,
                                               setup_hash)
                stage.add("scores", row)
                on_done(job, score, error)
                done += 1
                ok += error is None
            stage.commit(con)
            if progress:
                progress(Progress(done=done, total=len(jobs), ok=ok, failed=done - ok))


def _score_job(job: Job, snippets: list[Snippet], seed: int, m: Optional[Embedder], cache: dict[int, np.ndarray],
               *, dict_id: int, run_id: int, setup: dict[str, Any], setup_hash: str
               ) -> tuple[dict[str, Any], Optional[float], Optional[str]]:
    details: dict[str, Any] = {"model": MODEL, "template": "embedding", "template_hash": RECIPE_HASH,
                               "recipe": RECIPE, "setup": setup, "setup_hash": setup_hash,
                               "calls": 0, "failed_calls": 0, "cache_hits": 0}
    wins, _ = windows(snippets)
    try:
        res = score_texts([job.text], snippets, seed=seed, model=m, cache=cache)[0]
    except ScoreFailed as e:
        row = score_row(explanation_id=job.explanation_id, dict_id=dict_id, latent=job.latent, scorer=MODE,
                        mode=MODE, split=job.split, status="failed", details=details, error=e.reason, run_id=run_id,
                        model=MODEL, template_hash=RECIPE_HASH, setup_hash=setup_hash,
                        snippet_set=examples.snippet_set(wins))
        return row, None, e.reason
    details["stats"] = res.stats
    details["snippets"] = [{"context_id": x.context_id, "kind": x.kind, "label": bool(y), "sim": round(float(c), 4)}
                           for x, y, c in zip(res.windows, res.labels, res.sims)]
    row = score_row(explanation_id=job.explanation_id, dict_id=dict_id, latent=job.latent, scorer=MODE, mode=MODE,
                    split=job.split, status="ok", score=res.score, details=details, n_snippets=len(res.windows),
                    run_id=run_id, model=MODEL, template_hash=RECIPE_HASH, setup_hash=setup_hash,
                    snippet_set=examples.snippet_set(res.windows), stats=res.stats, prompt_tokens=0,
                    completion_tokens=0, cost=0.0)
    return row, res.score, None
