"""N-gram (N2G-style) explainer: stored explanations and simulation scores, for many latents at once.

The patterns themselves (matching, simulation, greedy fitting) live in ngram_fit.py; this
module moves examples in and results out. Examples of many latents load in two queries
(Arrow -> numpy), token strings become dense integer ids through Arrow's dictionary
encoding, and results are written per chunk of latents in one transaction each, so a
killed run keeps what it finished and a rerun skips it.

Explanations: explainer='ngram', model='ngram', template='ngram-v1', pattern = the JSON
of ngram_fit.PatternSet. Scores: scorer='simulation', mode='ngram', model='ngram', on validation
or heldout only (the SQL refuses train contexts). Fitting reads whole splits in bulk
(`load_split`); scoring reads the shared loader's snippets (examples.py, `snippet_data`), the
very snippets an LLM simulator with the same counts scores (default: score settings' 5/5/5), so
both scores carry the same `snippet_set` and compare like with like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from explainer.errors import ExplainerError
from explainer.explain.ngram_fit import FORMAT, KEY_BASE, LatentExamples, PatternSet, SimScore, fit, normalize, score_examples
from explainer.results import StageResult
from explainer.store import db as store
from explainer.store import examples, schema
from explainer.store.rows import StageRows, explanation_row, score_row
from explainer.vocab import KINDS, SCORE_SPLITS, SIM_KINDS, check_split


@dataclass
class SplitData:
    """Examples of many latents on one split, with the token strings of their contexts."""

    split: str
    exact_index: dict[str, int]
    norm_index: dict[str, int]
    vocab: tuple[list[str], list[str]]  # strings by id: exact, normalized
    ctx_exact: np.ndarray  # [n_ctx, T]
    ctx_norm: np.ndarray
    ex_latent: np.ndarray  # [n_ex], sorted
    ex_kind: np.ndarray
    ex_context: np.ndarray
    ex_row: np.ndarray  # row into ctx_* arrays
    ex_acts: np.ndarray  # [n_ex, T]

    @property
    def index(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.exact_index, self.norm_index

    @property
    def latents(self) -> list[int]:
        return np.unique(self.ex_latent).tolist()

    def latent(self, latent: int) -> LatentExamples:
        lo, hi = np.searchsorted(self.ex_latent, [latent, latent + 1])
        rows = self.ex_row[lo:hi]
        return LatentExamples(latent, self.ex_kind[lo:hi], self.ex_context[lo:hi],
                              self.ctx_exact[rows], self.ctx_norm[rows], self.ex_acts[lo:hi])


def _layout(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, pa.Array, int]:
    """Scatter indices (row, col) of a list column's flat values, the values, and the widest row."""
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy()
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(arr)), lengths)
    cols = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return rows, cols, arr.flatten(), int(lengths.max(initial=0))


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]) -> pa.Table:
    # con.sql() refuses to run while another caller left an execute() result unfetched
    # (DuckDB 2.0.1, e.g. after a fetchone()); execute() does not. It warns of one extra copy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return con.execute(sql, dict(params)).to_arrow_table()


def load_split(con: duckdb.DuckDBPyConnection, dict_id: int, split: str, latents: Optional[Sequence[int]] = None,
               *, kinds: Sequence[str] = KINDS) -> SplitData:
    """Every example of `latents` (all when None) on `split`, for fitting, in two queries.

    Fitting reads whole splits, so nothing is picked per kind here; scorers read the shared
    loader's picks through `snippet_data` instead (never this, and never train)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ExplainerError(f"unknown example kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    where_latent = "AND list_contains($latents, latent)" if latents is not None else ""
    params: dict[str, Any] = {"d": dict_id, "s": split, "kinds": list(kinds)}
    if latents is not None:
        params["latents"] = [int(x) for x in latents]
    ex = _arrow(con, f"""
        SELECT e.latent, e.kind, e.context_id, e.acts
        FROM examples e JOIN contexts c ON c.dict_id = $d AND c.context_id = e.context_id
        WHERE e.dict_id = $d AND e.split = $s AND list_contains($kinds::VARCHAR[], e.kind) {where_latent}
          AND c.split = $s
        ORDER BY e.latent, e.kind, e.rank""", params)
    ctx = _arrow(con, f"""
        SELECT c.context_id, c.tokens FROM contexts c
        WHERE c.dict_id = $d AND c.split = $s
          AND c.context_id IN (SELECT DISTINCT context_id FROM examples WHERE dict_id = $d AND split = $s
                               AND list_contains($kinds::VARCHAR[], kind) {where_latent})
        ORDER BY c.context_id""", params)
    # Token strings -> dense ids through Arrow's dictionary encoding (no Python loop per token).
    rows, cols, values, width = _layout(ctx.column("tokens"))
    enc = pc.dictionary_encode(values)
    vocab = enc.dictionary.to_pylist() if len(values) else []
    if len(vocab) >= KEY_BASE:
        raise ExplainerError(f"{len(vocab)} distinct token strings exceed the n-gram explainer's limit of {KEY_BASE}")
    tok_mat = np.full((ctx.num_rows, width), -1, dtype=np.int64)
    tok_mat[rows, cols] = enc.indices.to_numpy(zero_copy_only=False)
    norm_index: dict[str, int] = {}
    norm_of = np.array([norm_index.setdefault(normalize(s), len(norm_index)) for s in vocab] + [-1], dtype=np.int64)
    ctx_ids = ctx.column("context_id").to_numpy()
    rows, cols, values, _ = _layout(ex.column("acts"))
    acts = np.zeros((ex.num_rows, width), dtype=np.float32)
    inside = cols < width  # acts longer than their tokens would be corrupt data: ignore the excess
    acts[rows[inside], cols[inside]] = values.to_numpy(zero_copy_only=False)[inside]
    ex_ctx = ex.column("context_id").to_numpy()
    return canonical(SplitData(
        split=split, exact_index={s: i for i, s in enumerate(vocab)}, norm_index=norm_index,
        vocab=(vocab, list(norm_index)),
        ctx_exact=tok_mat, ctx_norm=norm_of[tok_mat], ex_latent=ex.column("latent").to_numpy(),
        ex_kind=np.asarray(ex.column("kind").to_pylist(), dtype=object), ex_context=ex_ctx,
        ex_row=np.searchsorted(ctx_ids, ex_ctx), ex_acts=acts,
    ))


def canonical(split: SplitData) -> SplitData:
    """The same examples with token ids in sorted string order.

    Both loaders number tokens in the order the loaded contexts first show them, so ids would depend
    on which latents were loaded together, and fits break ties by id. Sorted ids keep the relative order
    of any latent's own tokens fixed, so its candidates, choice and scores depend only on it.
    """
    (exact, norm) = split.vocab
    exact_order = sorted(range(len(exact)), key=exact.__getitem__)
    norm_order = sorted(range(len(norm)), key=norm.__getitem__)

    def remap(order: list[int]) -> np.ndarray:
        new = np.empty(len(order) + 1, dtype=np.int64)
        new[np.asarray(order, dtype=np.int64)] = np.arange(len(order), dtype=np.int64)
        new[-1] = -1  # padding (-1) stays padding
        return new

    exact_new, norm_new = [exact[i] for i in exact_order], [norm[i] for i in norm_order]
    return dataclasses.replace(
        split, vocab=(exact_new, norm_new), exact_index={t: i for i, t in enumerate(exact_new)},
        norm_index={t: i for i, t in enumerate(norm_new)},
        ctx_exact=remap(exact_order)[split.ctx_exact], ctx_norm=remap(norm_order)[split.ctx_norm])


def default_limits() -> dict[str, int]:
    """Snippets per kind an n-gram score reads unless told: the LLM scorers' defaults, so both match."""
    from explainer.settings import ScoreSettings

    return examples.counts_of(ScoreSettings.model_validate({}), SIM_KINDS)


def snippet_data(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Sequence[int], split: str,
                 limits: Optional[Mapping[str, int]] = None) -> SplitData:
    """The simulation snippets of `latents` on a scoring split, from the shared loader, as arrays.

    Each context once (top before quantile before random), exactly what an LLM simulator with
    the same counts reads; `limits` per kind, default `default_limits()`."""
    counts = default_limits() if limits is None else dict(limits)
    got = examples.load(con, dict_id, latents, split, counts, scoring=True)
    snips = {lat: examples.simulation_snippets(got[lat]) for lat in sorted(got)}
    exact_index: dict[str, int] = {}
    ctx_row: dict[int, int] = {}
    ctx_tokens: list[list[str]] = []
    for rows in snips.values():
        for x in rows:
            if x.context_id not in ctx_row:
                ctx_row[x.context_id] = len(ctx_tokens)
                ctx_tokens.append(x.tokens)
                for t in x.tokens:
                    exact_index.setdefault(t, len(exact_index))
    if len(exact_index) >= KEY_BASE:
        raise ExplainerError(f"{len(exact_index)} distinct token strings exceed the n-gram explainer's limit of {KEY_BASE}")
    width = max((len(t) for t in ctx_tokens), default=0)
    tok_mat = np.full((len(ctx_tokens), width), -1, dtype=np.int64)
    for i, toks in enumerate(ctx_tokens):
        tok_mat[i, :len(toks)] = [exact_index[t] for t in toks]
    vocab = list(exact_index)
    norm_index: dict[str, int] = {}
    norm_of = np.array([norm_index.setdefault(normalize(t), len(norm_index)) for t in vocab] + [-1], dtype=np.int64)
    flat = [(lat, x) for lat, rows in snips.items() for x in rows]
    acts = np.zeros((len(flat), width), dtype=np.float32)
    for i, (_, x) in enumerate(flat):
        acts[i, :len(x.acts)] = x.acts[:width]
    ex_ctx = np.array([x.context_id for _, x in flat], dtype=np.int64)
    return canonical(SplitData(
        split=split, exact_index=exact_index, norm_index=norm_index, vocab=(vocab, list(norm_index)),
        ctx_exact=tok_mat, ctx_norm=norm_of[tok_mat], ex_latent=np.array([lat for lat, _ in flat], dtype=np.int64),
        ex_kind=np.asarray([x.kind for _, x in flat], dtype=object), ex_context=ex_ctx,
        ex_row=np.array([ctx_row[c] for c in ex_ctx.tolist()], dtype=np.int64), ex_acts=acts,
    ))


def setup_hash(limits: Mapping[str, int]) -> str:
    """The n-gram simulator's setup: which snippets it reads (it has no model, template or seed)."""
    return hashlib.sha256(json.dumps({"limits": dict(limits)}, sort_keys=True).encode()).hexdigest()[:16]


def snippet_set_of(ex: Optional[LatentExamples]) -> Optional[str]:
    """The snippet_set of a latent's loaded snippets (None: none), as examples.snippet_set names an LLM's."""
    if ex is None or not len(ex.context_ids):
        return None
    return schema.snippet_hash([(int(c), str(k)) for c, k in zip(ex.context_ids, ex.kinds)])


# --- database entry points -------------------------------------------------------------------

Progress = Optional[Callable[[dict[str, Any]], None]]  # {"done", "total"}, as the CLI progress bar takes


@dataclass
class ExplainResult(StageResult):
    explained: int
    failed: int
    skipped: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"explainer": "ngram", "explained": self.explained, "failed": self.failed,
                "skipped (already explained)": self.skipped, "seconds": round(self.seconds, 2)}


@dataclass
class ScoreResult(StageResult):
    scored: int
    failed: int
    skipped: int
    mean_score: Optional[float]  # over the scores of `split` only
    seconds: float
    split: str = ""

    def summary(self) -> dict[str, Any]:
        return {"scorer": "simulation (ngram)", "scored": self.scored, "failed": self.failed,
                "skipped (already scored)": self.skipped,
                f"mean score ({self.split})": None if self.mean_score is None else round(self.mean_score, 4),
                "seconds": round(self.seconds, 2)}


def _chunks(items: Sequence[int], n: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def explain_all(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Optional[Sequence[int]] = None,
                split: str = "train", progress: Progress = None, *, max_patterns: int = 3,
                run_id: Optional[int] = None, batch: int = 1024) -> ExplainResult:
    """Fit and store an n-gram explanation for every latent that has none from this explainer yet."""
    t0 = time.perf_counter()
    if split == "heldout":
        raise ExplainerError("the n-gram explainer fits on train (or validation), never on heldout: "
                             "held-out text is kept for final scores")
    if latents is None:
        latents = [r[0] for r in con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent",
                                             [dict_id]).fetchall()]
    done = {r[0] for r in con.execute(
        "SELECT DISTINCT latent FROM explanations WHERE dict_id = ? AND explainer = 'ngram' AND template = ?",
        [dict_id, FORMAT]).fetchall()}
    todo = [int(x) for x in latents if x not in done]
    params = {"max_patterns": max_patterns, "split": split}
    thash = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    n_ok = n_failed = 0
    for chunk in _chunks(todo, batch):
        data = load_split(con, dict_id, split, chunk)
        have = set(data.latents)
        out = StageRows()
        now = store.now()
        for latent in chunk:
            ps = fit(data.latent(latent), data.vocab, max_patterns=max_patterns) if latent in have else PatternSet(())
            ps.fit["split"] = split
            text = ps.text()
            reason = "no examples" if latent not in have else "no activating tokens"
            out.add("explanations", explanation_row(
                dict_id=dict_id, latent=latent, explainer="ngram", model="ngram", template=FORMAT, template_hash=thash,
                text=text, pattern=ps.to_json() if text else None, status="ok" if text else "failed",
                error=None if text else f"{reason} in the {split} split", run_id=run_id, cost=0.0, created_at=now))
            n_ok += text is not None
            n_failed += text is None
        out.commit(con)
        if progress:
            progress({"done": n_ok + n_failed, "total": len(todo)})
    return ExplainResult(n_ok, n_failed, len(latents) - len(todo), time.perf_counter() - t0)


def score_pattern_sets(con: duckdb.DuckDBPyConnection, dict_id: int, sets: Mapping[int, Sequence[PatternSet]],
                       split: str = "validation", limits: Optional[Mapping[str, int]] = None) -> dict[int, list[SimScore]]:
    """Score any pattern sets per latent on validation or heldout (the agent's selection step),
    on the shared loader's snippets (`snippet_data`). A latent without examples on the split gets no entry.
    """
    out: dict[int, list[SimScore]] = {}
    latents = sorted(sets)
    for chunk in _chunks(latents, 1024):
        data = snippet_data(con, dict_id, chunk, split, limits)
        have = set(data.latents)
        for latent in chunk:
            if latent in have:
                ex = data.latent(latent)
                out[latent] = [score_examples(ps, ex, data.index) for ps in sets[latent]]
    return out


def score_all(con: duckdb.DuckDBPyConnection, dict_id: int, split: str = "heldout",
              explanation_filter: Optional[str] = None, progress: Progress = None, *,
              latents: Optional[Sequence[int]] = None, limits: Optional[Mapping[str, int]] = None,
              run_id: Optional[int] = None) -> ScoreResult:
    """Simulate every explanation that carries an n-gram pattern and store its score.

    `limits` caps the snippets per kind ({"top": 5, ...}) as the shared loader does for an LLM
    scorer with those counts; default `default_limits()` (the score settings' defaults).
    split = "both" scores validation (what selects labels) and then heldout. Explanations
    already scored by this simulator with these limits on a split are skipped.
    """
    if split == "both":
        parts = [score_all(con, dict_id, sp, explanation_filter, progress, latents=latents, limits=limits,
                           run_id=run_id) for sp in SCORE_SPLITS]
        # Counts add up; the mean is heldout's (a mean over both splits would mix them).
        return ScoreResult(sum(p.scored for p in parts), sum(p.failed for p in parts), sum(p.skipped for p in parts),
                           parts[1].mean_score, sum(p.seconds for p in parts), "heldout")
    t0 = time.perf_counter()
    check_split(split)
    counts = default_limits() if limits is None else dict(limits)
    extra = f"AND ({explanation_filter})" if explanation_filter else ""
    lat_sql = "AND list_contains($latents, latent)" if latents is not None else ""
    params: dict[str, Any] = {"d": dict_id, "s": split, "sh": setup_hash(counts)}
    if latents is not None:
        params["latents"] = [int(x) for x in latents]
    try:
        rows = con.execute(f"""
            SELECT id, latent, pattern::VARCHAR, id IN (SELECT explanation_id FROM scores WHERE dict_id = $d
                   AND scorer = 'simulation' AND mode = 'ngram' AND split = $s AND setup_hash = $sh) AS done
            FROM explanations WHERE dict_id = $d AND status = 'ok' AND pattern IS NOT NULL
                 AND (explainer <> 'agent' OR chosen)  -- an agent's unchosen steps: see score.select_explanations
                 AND json_extract_string(pattern, '$.format') = '{FORMAT}' {lat_sql} {extra}
            ORDER BY latent, id""", params).fetchall()
    except duckdb.Error as e:
        if not explanation_filter:
            raise
        raise ExplainerError(f"--explanations {explanation_filter!r} is not a valid SQL WHERE over explanations: "
                             f"{str(e).splitlines()[0]}") from None
    todo = [r for r in rows if not r[3]]
    by_latent: dict[int, list[tuple[int, PatternSet]]] = {}
    for eid, latent, pat, _ in todo:
        by_latent.setdefault(latent, []).append((eid, PatternSet.from_json(pat)))
    scored = failed = 0
    total = 0.0
    for chunk in _chunks(sorted(by_latent), 1024):
        data = snippet_data(con, dict_id, chunk, split, counts)
        have = set(data.latents)
        out = StageRows()
        now = store.now()
        for latent in chunk:
            ex = data.latent(latent) if latent in have else None
            for eid, ps in by_latent[latent]:
                s = score_examples(ps, ex, data.index) if ex is not None else None
                stats = getattr(s, "stats", None) or {}
                details = None if s is None else {**s.details(), "limits": counts, **({"stats": stats} if stats else {})}
                out.add("scores", score_row(
                    explanation_id=eid, dict_id=dict_id, latent=latent, scorer="simulation", mode="ngram", split=split,
                    status="failed" if s is None else "ok", score=None if s is None else s.score, details=details,
                    n_snippets=0 if s is None else s.n_snippets,
                    error=f"latent {latent} has no {split} examples" if s is None else None, run_id=run_id,
                    model="ngram", template_hash=FORMAT, setup_hash=setup_hash(counts), snippet_set=snippet_set_of(ex),
                    stats=stats, cost=0.0, created_at=now))
                if s is None:
                    failed += 1
                else:
                    scored += 1
                    total += s.score
        out.commit(con)
        if progress:
            progress({"done": scored + failed, "total": len(todo)})
    return ScoreResult(scored, failed, len(rows) - len(todo), total / scored if scored else None,
                       time.perf_counter() - t0, split)
