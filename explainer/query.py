"""Read side of the DB: text search over explanations, one latent's full record, exports.

DuckDB's fts extension is not in the wheel and cannot be installed offline, so search ranks
with BM25 written in plain SQL (tokenize with a regex, then the usual k1/b formula).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import duckdb

from explainer import vocab
from explainer.errors import ExplainerError
from explainer.store import examples as example_store
from explainer.store.db import one_row
from explainer.store.examples import Example
from explainer.ui import score_key

TABLES = ("dictionaries", "contexts", "latents", "examples", "explanations", "scores", "llm_calls", "runs",
          "latent_logits", "latent_neighbours", "latent_histograms")


def rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def search(con: duckdb.DuckDBPyConnection, query: str, *, dict_id: Optional[int] = None, limit: int = 20,
           k1: float = 1.2, b: float = 0.75) -> list[dict[str, Any]]:
    """Explanations ranked by BM25 relevance to `query`, with their latent's scores."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**63 - 1:
        raise ExplainerError(f"search --limit {limit!r} must be a positive whole number of rows, e.g. --limit 20")
    terms = [t for t in re.split(r"[^a-z0-9]+", query.lower()) if t]
    if not terms:
        raise ExplainerError(f"search query {query!r} has no words to match (use letters or digits)")
    sql = f"""
        WITH docs AS (
            SELECT id, dict_id, latent, explainer, model, text FROM explanations
            WHERE status = 'ok' {"AND dict_id = $dict" if dict_id is not None else ""}
        ),
        toks AS (
            SELECT id, unnest(regexp_split_to_array(lower(text), '[^a-z0-9]+')) AS term FROM docs
        ),
        terms AS (SELECT * FROM toks WHERE term <> ''),
        dl AS (SELECT id, count(*) AS len FROM terms GROUP BY id),
        stats AS (SELECT count(*) AS n, avg(len) AS avgdl FROM dl),
        q AS (SELECT DISTINCT unnest($terms::VARCHAR[]) AS term),
        df AS (SELECT term, count(DISTINCT id) AS df FROM terms WHERE term IN (SELECT term FROM q) GROUP BY term),
        tf AS (SELECT id, term, count(*) AS tf FROM terms WHERE term IN (SELECT term FROM q) GROUP BY id, term),
        ranked AS (
            SELECT tf.id,
                   sum(ln(1 + (stats.n - df.df + 0.5) / (df.df + 0.5))
                       * tf.tf * ($k1 + 1) / (tf.tf + $k1 * (1 - $b + $b * dl.len / stats.avgdl))) AS relevance
            FROM tf JOIN df USING (term) JOIN dl USING (id) CROSS JOIN stats
            GROUP BY tf.id
        )
        SELECT d.latent, d.text AS explanation, d.explainer, d.model, round(r.relevance, 3) AS relevance,
               -- the latest held-out simulation score (reported; the best of several would flatter)
               arg_max(s.score, s.id) FILTER (WHERE s.scorer = 'simulation' AND s.split = 'heldout') AS simulation,
               l.frequency, d.dict_id, d.id AS explanation_id
        FROM ranked r JOIN docs d USING (id)
        LEFT JOIN scores s ON s.explanation_id = d.id AND s.status = 'ok'
        LEFT JOIN latents l ON l.dict_id = d.dict_id AND l.latent = d.latent
        GROUP BY ALL
        ORDER BY relevance DESC, simulation DESC NULLS LAST, d.latent
        LIMIT $limit
    """
    params: dict[str, Any] = {"terms": terms, "k1": k1, "b": b, "limit": limit}
    if dict_id is not None:
        params["dict"] = dict_id
    return rows(con.execute(sql, params))


@dataclass
class LatentRecord:
    dict_id: int
    latent: int
    stats: dict[str, Any]
    explanations: list[dict[str, Any]]
    examples: list[Example] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dict_id": self.dict_id,
            "latent": self.latent,
            "stats": self.stats,
            "explanations": self.explanations,
            "examples": [e.__dict__ for e in self.examples],
        }


def latent_record(con: duckdb.DuckDBPyConnection, dict_id: int, latent: int, *,
                  splits: tuple[str, ...] = ("train", "heldout"), per_kind: int = 10) -> LatentRecord:
    stat_rows = rows(con.execute("SELECT * FROM latents WHERE dict_id = ? AND latent = ?", [dict_id, latent]))
    if not stat_rows:
        n = one_row(con.execute("SELECT count(*) FROM latents WHERE dict_id = ?", [dict_id]))[0]
        raise ExplainerError(f"latent {latent} not found: the dictionary has latents 0..{n - 1}" if n else
                             "the database has no sampled latents (run `explainer sample` first)")
    expl = rows(con.execute(
        """SELECT id, explainer, model, template, text, round, parent_id, chosen FROM explanations
           WHERE dict_id = ? AND latent = ? AND status = 'ok' ORDER BY id""", [dict_id, latent]))
    # One explanation can hold many scores (json and logprobs modes, an LLM and the n-gram simulator,
    # two setups, two splits): a list of rows, and a map keyed by everything that tells them apart
    # but the setup, where the latest row of a key wins (keys are unique by construction).
    score_rows = rows(con.execute(
        """SELECT explanation_id, scorer, mode, model, split, score, ci_low, ci_high, baseline, score_top_random,
                  n_snippets, snippet_set, template_hash, setup_hash
           FROM scores WHERE dict_id = ? AND latent = ? AND status = 'ok' AND score IS NOT NULL ORDER BY id""",
        [dict_id, latent]))
    for e in expl:
        mine = [{k: v for k, v in r.items() if k != "explanation_id"} for r in score_rows if r["explanation_id"] == e["id"]]
        e["score_rows"] = mine
        e["scores"] = {score_key(r): round(r["score"], 4) for r in mine}
    # The shared loader: per kind the examples the explainer and the scorers read (quantile spread over bins).
    counts = {k: per_kind for k in vocab.KINDS}
    examples = [x for split in sorted(splits, reverse=True)
                for x in example_store.load(con, dict_id, [latent], split, counts)[latent]]
    return LatentRecord(dict_id, latent, stat_rows[0], expl, examples)


def export(con: duckdb.DuckDBPyConnection, out: Path) -> list[Path]:
    """Every table as Parquet, plus one Neuronpedia-like JSON per dictionary.

    Paths never enter SQL text (a quote in --out would break it, or run a statement of its choosing):
    tables are written through the relation API, and each file appears whole or not at all."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainerError(f"export --out {out}: cannot create that folder ({e.strerror or e}); pass another --out") from None
    written = []
    for table in TABLES:  # fixed names, not user input
        path = out / f"{table}.parquet"
        _write_whole(path, lambda tmp, t=table: con.table(t).write_parquet(str(tmp)))
        written.append(path)
    dicts = con.execute("SELECT id, name FROM dictionaries ORDER BY id").fetchall()
    stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "dictionary" for _, name in dicts]
    for (dict_id, name), stem in zip(dicts, stems):
        latents = []
        for (latent,) in con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent", [dict_id]).fetchall():
            rec = latent_record(con, dict_id, latent, splits=("train",), per_kind=5)
            latents.append({
                "index": latent,
                "frac_nonzero": rec.stats["frequency"],
                "max_act_approx": rec.stats["max_act"],
                "explanations": [{"description": e["text"], "explainer": e["explainer"], "model": e["model"],
                                  "scores": e["scores"]} for e in rec.explanations],
                "activations": [{"tokens": x.tokens, "values": x.acts, "max_value": x.max_act, "kind": x.kind}
                                for x in rec.examples if x.kind in ("top", "quantile")],
            })
        # Names that clean to the same stem would overwrite each other.
        clash = stems.count(stem) > 1
        path = out / f"{stem}_{dict_id}.json" if clash else out / f"{stem}.json"
        text = json.dumps({"dictionary": name, "latents": latents})
        _write_whole(path, lambda tmp, text=text: tmp.write_text(text))
        written.append(path)
    return written


def _write_whole(path: Path, write: Any) -> None:
    """write(tmp) then rename onto `path`: a crash or full disk never leaves a truncated export file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        tmp.replace(path)
    except (OSError, duckdb.IOException, duckdb.PermissionException) as e:
        tmp.unlink(missing_ok=True)
        raise ExplainerError(f"export: cannot write {path} ({str(e).splitlines()[0]}); "
                             "free space or pass another --out") from None


# Words of the n-gram explainer's template, and glue words: no use as a search example.
_TEMPLATE_WORDS = ["fires", "after", "before", "strong", "medium", "weak", "any", "case", "two", "three", "token",
                   "tokens", "the", "and", "for", "with", "that", "this", "not", "are", "was"]


def search_example(con: duckdb.DuckDBPyConnection, dict_id: int) -> Optional[str]:
    """A word from the best-scored labels that `search` will find, for the hints `run` prints."""
    row = con.execute("""
        WITH w AS (
            SELECT simulation, unnest(regexp_split_to_array(lower(explanation), '[^a-z]+')) AS word
            FROM labels WHERE dict_id = ?
        )
        SELECT word FROM w WHERE length(word) >= 3 AND NOT list_contains(?, word)
        GROUP BY word ORDER BY max(simulation) DESC NULLS LAST, count(*) DESC, word LIMIT 1""",
                      [dict_id, _TEMPLATE_WORDS]).fetchone()
    return row[0] if row else None


# --- status ------------------------------------------------------------------------------------

_STATUS_SQL = {
    "dictionaries": """
        SELECT d.id, d.name, d.model, d.hook, d.d_sae, d.k,
               (SELECT count(*) FROM latents l WHERE l.dict_id = d.id) AS sampled,
               (SELECT count(*) FROM latents l WHERE l.dict_id = d.id AND l.n_fired = 0) AS dead,
               (SELECT count(*) FROM contexts c WHERE c.dict_id = d.id) AS contexts,
               (SELECT count(DISTINCT e.latent) FROM explanations e WHERE e.dict_id = d.id AND e.status = 'ok') AS explained
        FROM dictionaries d ORDER BY d.id""",
    "explanations": """
        SELECT dict_id, explainer, model, count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'failed') AS failed, count(DISTINCT latent) AS latents
        FROM explanations GROUP BY ALL ORDER BY ALL""",
    "scores": """
        SELECT dict_id, scorer, mode, split, count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'failed') AS failed, round(avg(score), 3) AS mean,
               round(median(score), 3) AS median
        FROM scores GROUP BY ALL ORDER BY ALL""",
    "costs": """
        SELECT stage, model, calls, cache_hits, errors, prompt_tokens, completion_tokens, round(cost, 4) AS cost
        FROM costs ORDER BY ALL""",
    "unfinished": """
        SELECT 'run' AS what, CAST(id AS VARCHAR) AS id, stage, status, CAST(started_at AS VARCHAR) AS since
        FROM runs WHERE status IN ('running', 'failed')
          AND id > coalesce((SELECT max(r2.id) FROM runs r2 WHERE r2.stage = runs.stage AND r2.status = 'done'), -1)
        UNION ALL
        SELECT 'batch', batch_id, stage, status, CAST(created_at AS VARCHAR) FROM llm_batches WHERE ingested_at IS NULL
        ORDER BY since""",
}


def status(con: duckdb.DuckDBPyConnection) -> dict[str, list[dict[str, Any]]]:
    """What the DB holds, stage by stage, and what is unfinished (a rerun of its command continues it)."""
    return {name: rows(con.execute(sql)) for name, sql in _STATUS_SQL.items()}
