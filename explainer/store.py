"""The DuckDB file: connection, locking message, and the schema as append-only migrations.

Every stage writes here; users query it with SQL. A migration is a named function that
runs once inside a transaction and is recorded in `_migrations`. Applied migrations are
never edited: change the schema by appending a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import duckdb

from explainer import selectors
from explainer.errors import ExplainerError, free_space


def m001_core(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """
        CREATE SEQUENCE run_ids START 1;
        CREATE TABLE runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('run_ids'),
            stage VARCHAR NOT NULL,
            settings JSON,            -- effective settings, API key removed
            status VARCHAR NOT NULL,  -- running | done | failed
            result JSON,
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP
        );
        CREATE SEQUENCE dictionary_ids START 1;
        CREATE TABLE dictionaries (
            id INTEGER PRIMARY KEY DEFAULT nextval('dictionary_ids'),
            name VARCHAR NOT NULL UNIQUE,
            path VARCHAR,
            model VARCHAR NOT NULL,
            hook VARCHAR NOT NULL,
            d_in INTEGER NOT NULL,
            d_sae INTEGER NOT NULL,
            k INTEGER,
            fingerprint VARCHAR NOT NULL,  -- hash of the weights: a DB never mixes two dictionaries under one id
            config JSON,
            created_at TIMESTAMP NOT NULL
        );
        -- One row per context window the sampler ran. Split is decided per document.
        CREATE TABLE contexts (
            dict_id INTEGER NOT NULL,
            context_id BIGINT NOT NULL,   -- global index in corpus order; stable across shards and resumes
            doc_id VARCHAR NOT NULL,
            split VARCHAR NOT NULL,
            token_ids INTEGER[] NOT NULL,
            tokens VARCHAR[] NOT NULL,    -- each token as the tokenizer decodes it alone
            PRIMARY KEY (dict_id, context_id)
        );
        CREATE TABLE latents (
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            frequency DOUBLE NOT NULL,    -- fraction of tokens on which the latent fired
            n_fired BIGINT NOT NULL,      -- tokens fired
            n_tokens BIGINT NOT NULL,     -- tokens seen
            n_contexts BIGINT NOT NULL,   -- contexts with at least one firing token
            max_act REAL,
            mean_act REAL,                -- mean over firing tokens
            quantiles REAL[],             -- of per-context max activation over firing contexts
            PRIMARY KEY (dict_id, latent)
        );
        CREATE TABLE examples (
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            split VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,        -- top | quantile | nonactivating | random
            rank INTEGER NOT NULL,
            context_id BIGINT NOT NULL,
            max_act REAL NOT NULL,
            acts REAL[] NOT NULL,         -- aligned with contexts.tokens
            bin INTEGER,                  -- quantile bin for kind = quantile
            PRIMARY KEY (dict_id, latent, split, kind, rank)
        );
        CREATE SEQUENCE explanation_ids START 1;
        CREATE TABLE explanations (
            id BIGINT PRIMARY KEY DEFAULT nextval('explanation_ids'),
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            explainer VARCHAR NOT NULL,   -- llm | ngram | agent
            model VARCHAR,
            template VARCHAR,
            template_hash VARCHAR,
            text VARCHAR,                 -- NULL when status = failed: never a placeholder
            pattern JSON,                 -- machine-readable form (n-gram patterns)
            status VARCHAR NOT NULL,      -- ok | failed
            error VARCHAR,
            parent_id BIGINT,             -- the explanation this one revised (agent)
            round INTEGER,
            candidate INTEGER,
            chosen BOOLEAN,
            run_id BIGINT,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            cost DOUBLE,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE score_ids START 1;
        CREATE TABLE scores (
            id BIGINT PRIMARY KEY DEFAULT nextval('score_ids'),
            explanation_id BIGINT NOT NULL,
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            scorer VARCHAR NOT NULL,      -- simulation | detection | fuzzing | ngram
            mode VARCHAR,
            split VARCHAR NOT NULL,
            score DOUBLE,                 -- NULL when status = failed
            details JSON,
            n_snippets INTEGER,
            status VARCHAR NOT NULL,
            error VARCHAR,
            run_id BIGINT,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            cost DOUBLE,
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE llm_cache (
            key VARCHAR PRIMARY KEY,      -- sha256 of (model, messages, parameters)
            model VARCHAR,
            response JSON NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE call_ids START 1;
        CREATE TABLE llm_calls (
            id BIGINT PRIMARY KEY DEFAULT nextval('call_ids'),
            run_id BIGINT,
            stage VARCHAR,
            model VARCHAR,
            dict_id INTEGER,
            latent INTEGER,
            cache_key VARCHAR,
            cache_hit BOOLEAN NOT NULL,
            attempts INTEGER,
            prompt_tokens BIGINT,         -- NULL when the server reported no usage
            completion_tokens BIGINT,
            latency_s DOUBLE,
            cost DOUBLE,
            error VARCHAR,
            created_at TIMESTAMP NOT NULL
        );
        """
    )


def m002_views(con: duckdb.DuckDBPyConnection) -> None:
    """The documented views users query (README 'Schema'). Failed rows never appear in them."""
    con.execute(
        """
        CREATE VIEW explanation_scores AS
        SELECT e.id AS explanation_id, e.dict_id, e.latent, e.explainer, e.model, e.template,
               e.text, e.round, e.parent_id, e.chosen, s.scorer, s.mode, s.split, s.score,
               s.n_snippets, s.details, s.created_at AS scored_at,
               rank() OVER (PARTITION BY e.dict_id, e.latent, s.scorer, s.split
                            ORDER BY s.score DESC NULLS LAST) AS rank_for_latent
        FROM explanations e
        LEFT JOIN scores s ON s.explanation_id = e.id AND s.status = 'ok'
        WHERE e.status = 'ok';

        CREATE VIEW labels AS
        WITH per_expl AS (
            SELECT e.id, e.dict_id, e.latent, e.explainer, e.model, e.text, e.created_at,
                   max(s.score) FILTER (WHERE s.scorer = 'simulation' AND s.split = 'heldout') AS simulation,
                   max(s.score) FILTER (WHERE s.scorer = 'detection' AND s.split = 'heldout') AS detection,
                   max(s.score) FILTER (WHERE s.scorer = 'fuzzing' AND s.split = 'heldout') AS fuzzing
            FROM explanations e
            LEFT JOIN scores s ON s.explanation_id = e.id AND s.status = 'ok'
            WHERE e.status = 'ok'
            GROUP BY ALL
        ),
        best AS (
            SELECT * FROM per_expl
            QUALIFY row_number() OVER (
                PARTITION BY dict_id, latent
                ORDER BY simulation DESC NULLS LAST, detection DESC NULLS LAST,
                         (explainer = 'ngram') ASC, created_at DESC) = 1
        ),
        ngram AS (
            SELECT dict_id, latent, max(simulation) AS ngram_simulation
            FROM per_expl WHERE explainer = 'ngram' GROUP BY ALL
        )
        SELECT l.dict_id, l.latent, l.frequency, l.max_act, l.n_contexts,
               b.text AS explanation, b.explainer, b.model AS explainer_model, b.id AS explanation_id,
               b.simulation, b.detection, b.fuzzing, n.ngram_simulation
        FROM latents l
        LEFT JOIN best b USING (dict_id, latent)
        LEFT JOIN ngram n USING (dict_id, latent);

        CREATE VIEW costs AS
        SELECT stage, model, count(*) AS calls,
               count(*) FILTER (WHERE cache_hit) AS cache_hits,
               count(*) FILTER (WHERE error IS NOT NULL) AS errors,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(cost) AS cost, count(DISTINCT latent) AS latents,
               sum(cost) / nullif(count(DISTINCT latent), 0) AS cost_per_latent
        FROM llm_calls GROUP BY ALL;
        """
    )


def m003_llm_batches(con: duckdb.DuckDBPyConnection) -> None:
    """Batch API jobs (`--batch`, explainer/batch.py), and the batch behind each ledger row."""
    con.execute(
        """
        CREATE TABLE llm_batches (
            batch_id VARCHAR PRIMARY KEY,  -- the endpoint's id; a rerun polls it instead of creating another
            stage VARCHAR NOT NULL,        -- explain | score
            endpoint VARCHAR NOT NULL,     -- /v1/chat/completions | /v1/completions
            base_url VARCHAR NOT NULL,
            model VARCHAR,
            dict_id INTEGER,
            run_id BIGINT,                 -- the run that created it
            input_file_id VARCHAR NOT NULL,
            output_file_id VARCHAR,
            error_file_id VARCHAR,
            status VARCHAR NOT NULL,       -- the endpoint's last status: validating, in_progress, finalizing,
                                           -- completed, failed, expired, cancelling, cancelled; or lost
            n_requests INTEGER NOT NULL,
            n_completed INTEGER,
            n_failed INTEGER,
            ingested_lines BIGINT NOT NULL DEFAULT 0,  -- result lines already in llm_cache/llm_calls
            errors JSON,                   -- why the whole batch failed
            created_at TIMESTAMP NOT NULL,
            completed_at TIMESTAMP,        -- when the endpoint reported a final status
            ingested_at TIMESTAMP          -- NULL while the batch is open
        );
        ALTER TABLE llm_calls ADD COLUMN batch_id VARCHAR;  -- set on rows ingested from a batch
        """
    )


def m004_cached_tokens(con: duckdb.DuckDBPyConnection) -> None:
    """Prompt tokens the endpoint served from its prompt cache (priced at llm.price_cached_in)."""
    con.execute("ALTER TABLE llm_calls ADD COLUMN cached_tokens BIGINT")


def snippet_hash(pairs: list[tuple[int, str]]) -> str:
    """Short name of a set of scored snippets: sha256 over its sorted (context_id, kind) pairs.

    Sorted, so the order a scorer presents snippets in (shuffled per call) does not change it."""
    text = ",".join(f"{cid}:{kind}" for cid, kind in sorted(pairs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def m005_score_provenance(con: duckdb.DuckDBPyConnection) -> None:
    """Score provenance and statistics as columns (they were only JSON inside `details`).

    model / template_hash / setup_hash: the simulator or judge and its settings (n-gram: 'ngram');
    snippet_set: snippet_hash of the snippets scored, so SQL compares only scores on equal text;
    ci_low / ci_high: 95% bootstrap interval over snippets; baseline: the trivial predictor's score
    on the same snippets; score_top_random / score_all: Bills et al.'s top-and-random and the
    all-kinds correlation (simulation; `score` is score_all). Existing rows are filled from details:
    snippet sets where details list the snippets (LLM scorers), the baselines that are constants
    (simulation 0.0: a constant predictor; detection 0.5: always-yes balanced accuracy)."""
    con.execute(
        """
        ALTER TABLE scores ADD COLUMN model VARCHAR;
        ALTER TABLE scores ADD COLUMN template_hash VARCHAR;
        ALTER TABLE scores ADD COLUMN setup_hash VARCHAR;
        ALTER TABLE scores ADD COLUMN snippet_set VARCHAR;
        ALTER TABLE scores ADD COLUMN ci_low DOUBLE;
        ALTER TABLE scores ADD COLUMN ci_high DOUBLE;
        ALTER TABLE scores ADD COLUMN baseline DOUBLE;
        ALTER TABLE scores ADD COLUMN score_top_random DOUBLE;
        ALTER TABLE scores ADD COLUMN score_all DOUBLE;
        UPDATE scores SET
            model = CASE WHEN mode = 'ngram' THEN 'ngram' ELSE details->>'model' END,
            template_hash = details->>'template_hash',
            setup_hash = details->>'setup_hash',
            ci_low = TRY_CAST(details->'stats'->>'ci_low' AS DOUBLE),
            ci_high = TRY_CAST(details->'stats'->>'ci_high' AS DOUBLE),
            baseline = coalesce(TRY_CAST(details->'stats'->>'baseline' AS DOUBLE),
                                CASE WHEN status = 'ok' AND scorer = 'simulation' THEN 0.0
                                     WHEN status = 'ok' AND scorer = 'detection' THEN 0.5 END),
            score_top_random = TRY_CAST(details->'stats'->>'top_random' AS DOUBLE),
            score_all = CASE WHEN scorer = 'simulation' THEN score END;
        """
    )
    rows = con.execute(
        "SELECT id, details->'snippets' FROM scores WHERE json_type(details->'snippets') = 'ARRAY'").fetchall()
    sets = []
    for sid, snippets in rows:
        pairs = [(int(x["context_id"]), str(x["kind"])) for x in json.loads(snippets)
                 if isinstance(x, dict) and "context_id" in x and "kind" in x]
        if pairs:
            sets.append((sid, snippet_hash(pairs)))
    if sets:
        con.execute("CREATE TEMP TABLE _sets (id BIGINT, snippet_set VARCHAR)")
        con.executemany("INSERT INTO _sets VALUES (?, ?)", sets)
        con.execute("UPDATE scores SET snippet_set = _sets.snippet_set FROM _sets WHERE scores.id = _sets.id")
        con.execute("DROP TABLE _sets")


def m006_validation_labels(con: duckdb.DuckDBPyConnection) -> None:
    """Views that select on validation and compare only like with like (README 'Schema').

    explanation_scores: every ok score with its provenance columns, the same explanation's
    validation score under the same scorer setup, and rank_for_latent = the rank of that
    validation score among the latent's explanations (same setup, same validation snippet set).
    labels: per latent, the explanation with the best VALIDATION simulation score under the
    simulator setup that scored the most competing explanations on one snippet set (an LLM
    simulator before the n-gram's on ties); held-out scores are only reported beside it, with
    their interval and baseline, and the n-gram explanation's held-out score on the same
    snippet set by the same simulator (NULL when there is none). Without any validation score
    nothing is selected by score: an LLM or agent explanation before the n-gram's, newest first."""
    con.execute(
        """
        CREATE OR REPLACE VIEW explanation_scores AS
        WITH ok AS (SELECT * FROM scores WHERE status = 'ok'),
        val AS (
            SELECT explanation_id, scorer, mode, model, template_hash, setup_hash,
                   arg_max({'score': score, 'snippet_set': snippet_set}, id) AS v
            FROM ok WHERE split = 'validation' GROUP BY ALL
        )
        SELECT e.id AS explanation_id, e.dict_id, e.latent, e.explainer, e.model, e.template,
               e.text, e.round, e.parent_id, e.chosen, s.scorer, s.mode, s.model AS scorer_model, s.split, s.score,
               s.ci_low, s.ci_high, s.baseline, s.score_top_random, s.score_all, s.n_snippets, s.snippet_set,
               s.template_hash AS scorer_template_hash, s.setup_hash, s.details, s.created_at AS scored_at,
               v.v.score AS validation_score, v.v.snippet_set AS validation_snippet_set,
               CASE WHEN v.v.score IS NOT NULL AND v.v.snippet_set IS NOT NULL THEN
                   rank() OVER (PARTITION BY e.dict_id, e.latent, s.scorer, s.mode, s.model, s.template_hash,
                                s.setup_hash, s.split, v.v.snippet_set, v.v.score IS NULL
                                ORDER BY v.v.score DESC) END AS rank_for_latent
        FROM explanations e
        LEFT JOIN ok s ON s.explanation_id = e.id
        LEFT JOIN val v ON v.explanation_id = e.id AND v.scorer = s.scorer AND v.mode IS NOT DISTINCT FROM s.mode
             AND v.model IS NOT DISTINCT FROM s.model AND v.template_hash IS NOT DISTINCT FROM s.template_hash
             AND v.setup_hash IS NOT DISTINCT FROM s.setup_hash
        WHERE e.status = 'ok';

        CREATE OR REPLACE VIEW labels AS
        WITH cand AS (  -- what competes for a latent's label: an agent's unchosen steps do not
            SELECT * FROM explanations WHERE status = 'ok' AND (explainer <> 'agent' OR chosen)
        ),
        sim AS (SELECT * FROM scores WHERE status = 'ok' AND score IS NOT NULL AND scorer = 'simulation'),
        val AS (
            SELECT s.dict_id, s.latent, s.explanation_id, s.mode, s.model, s.template_hash, s.setup_hash,
                   s.snippet_set, arg_max(s.score, s.id) AS score, max(s.id) AS last_id
            FROM sim s JOIN cand c ON c.id = s.explanation_id
            WHERE s.split = 'validation' AND s.snippet_set IS NOT NULL
            GROUP BY ALL
        ),
        sel AS (  -- the simulator setup and snippet set that scored the most candidates of the latent
            SELECT * FROM (
                SELECT dict_id, latent, mode, model, template_hash, setup_hash, snippet_set,
                       count(*) AS n, max(last_id) AS last_id
                FROM val GROUP BY ALL
            )
            QUALIFY row_number() OVER (PARTITION BY dict_id, latent
                ORDER BY n DESC, (mode = 'ngram') ASC, last_id DESC) = 1
        ),
        ranked AS (
            SELECT c.id, c.dict_id, c.latent, c.explainer, c.model, c.text, c.created_at,
                   k.mode AS sel_mode, k.model AS sel_model, k.template_hash AS sel_thash,
                   k.setup_hash AS sel_shash, v.score AS validation
            FROM cand c
            LEFT JOIN sel k ON k.dict_id = c.dict_id AND k.latent = c.latent
            LEFT JOIN val v ON v.explanation_id = c.id AND v.mode = k.mode AND v.model IS NOT DISTINCT FROM k.model
                 AND v.template_hash IS NOT DISTINCT FROM k.template_hash
                 AND v.setup_hash IS NOT DISTINCT FROM k.setup_hash AND v.snippet_set = k.snippet_set
        ),
        best AS (  -- held-out is never read here
            SELECT * FROM ranked
            QUALIFY row_number() OVER (PARTITION BY dict_id, latent
                ORDER BY validation DESC NULLS LAST, (explainer = 'ngram') ASC, created_at DESC, id DESC) = 1
        ),
        held AS (  -- the latest held-out simulation score per explanation and simulator setup
            SELECT explanation_id, mode, model, template_hash, setup_hash,
                   arg_max({'score': score, 'ci_low': ci_low, 'ci_high': ci_high, 'baseline': baseline,
                            'top_random': score_top_random, 'snippet_set': snippet_set, 'id': id}, id) AS h
            FROM sim WHERE split = 'heldout' GROUP BY ALL
        ),
        best_held AS (  -- under the selecting setup; without one, the explanation's latest held-out score
            SELECT b.*, h.mode AS h_mode, h.model AS h_model, h.template_hash AS h_thash, h.setup_hash AS h_shash, h.h
            FROM best b LEFT JOIN held h ON h.explanation_id = b.id
                 AND (b.sel_mode IS NULL OR (h.mode = b.sel_mode AND h.model IS NOT DISTINCT FROM b.sel_model
                      AND h.template_hash IS NOT DISTINCT FROM b.sel_thash
                      AND h.setup_hash IS NOT DISTINCT FROM b.sel_shash))
            QUALIFY row_number() OVER (PARTITION BY b.id ORDER BY h.h.id DESC NULLS LAST) = 1
        ),
        ngram AS (  -- the n-gram explanation's held-out score by the same simulator on the same snippets
            SELECT bh.id, arg_max(h.h.score, h.h.id) AS score
            FROM best_held bh
            JOIN cand c ON c.dict_id = bh.dict_id AND c.latent = bh.latent AND c.explainer = 'ngram'
            JOIN held h ON h.explanation_id = c.id AND h.mode = bh.h_mode AND h.model IS NOT DISTINCT FROM bh.h_model
                 AND h.template_hash IS NOT DISTINCT FROM bh.h_thash AND h.setup_hash IS NOT DISTINCT FROM bh.h_shash
                 AND h.h.snippet_set = bh.h.snippet_set
            GROUP BY bh.id
        ),
        judged AS (  -- detection and fuzzing on held-out, reported: the latest of each
            SELECT explanation_id, arg_max(score, id) FILTER (WHERE scorer = 'detection') AS detection,
                   arg_max(score, id) FILTER (WHERE scorer = 'fuzzing') AS fuzzing
            FROM scores WHERE status = 'ok' AND split = 'heldout' AND scorer IN ('detection', 'fuzzing')
            GROUP BY explanation_id
        )
        SELECT l.dict_id, l.latent, l.frequency, l.max_act, l.n_contexts,
               b.text AS explanation, b.explainer, b.model AS explainer_model, b.id AS explanation_id,
               CASE WHEN b.validation IS NOT NULL THEN 'simulation/' || b.sel_mode || '/' || coalesce(b.sel_model, '?')
                    END AS selected_by,
               b.validation,
               b.h.score AS simulation, b.h.ci_low AS ci_low, b.h.ci_high AS ci_high, b.h.baseline AS baseline,
               b.h.top_random AS simulation_top_random, b.h_mode AS simulation_mode, b.h_model AS simulation_model,
               b.h.snippet_set AS snippet_set, n.score AS ngram_simulation, j.detection, j.fuzzing
        FROM latents l
        LEFT JOIN best_held b USING (dict_id, latent)
        LEFT JOIN ngram n ON n.id = b.id
        LEFT JOIN judged j ON j.explanation_id = b.id;
        """
    )


MIGRATIONS: list[Callable[[duckdb.DuckDBPyConnection], None]] = [
    m001_core, m002_views, m003_llm_batches, m004_cached_tokens, m005_score_provenance, m006_validation_labels]


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _lock_message(path: Path, err: Exception) -> str:
    pid = re.search(r"PID (\d+)", str(err))
    who = f"process {pid.group(1)}" if pid else "another process"
    return f"database {path} is in use by {who}; wait for it to finish or use another --db file"


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)")
    done = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        con.execute("BEGIN")
        try:
            fn(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [fn.__name__, now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(fn.__name__)
    return applied


def connect(path: Path | str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) and migrate the DB; a lock held elsewhere is a user error.

    Refused before anything is written: a DuckDB file of another program, one from a newer
    explainer, a truncated one. A file this call created is removed again if opening fails
    (a full disk), so no empty file blocks the next run.
    """
    path = Path(path)
    if not read_only and path.is_file() and path.stat().st_size == 0 and not _wal(path).exists():
        path.unlink()  # zero bytes hold nothing: what a creation on a full disk used to leave behind
    existed = path.exists()
    if read_only and not existed:
        raise ExplainerError(f"database {path} does not exist (run `explainer sample` first, or pass --db)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainerError(f"cannot create the folder {path.parent} for database {path}: {e.strerror}; "
                             "pass a --db in a writable folder") from None
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        _remove_created(path, existed)
        raise ExplainerError(_open_message(path, e, existed)) from None
    try:
        _check_ours(con, path, read_only)
        if not read_only:
            migrate(con)
    except BaseException as e:
        con.close()
        _remove_created(path, existed)
        if isinstance(e, duckdb.Error):
            raise ExplainerError(_open_message(path, e, existed)) from None
        raise
    return con


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _remove_created(path: Path, existed: bool) -> None:
    if existed:
        return
    for p in (path, _wal(path)):
        try:
            p.unlink()
        except OSError:
            pass


def _open_message(path: Path, err: Exception, existed: bool) -> str:
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    if "Could not set lock" in text:
        return _lock_message(path, err)
    if "No space left on device" in text:
        if not existed:
            return (f"disk full: creating database {path} needs about {_NEW_DB_BYTES // 1024} KiB on its device "
                    f"({free_space(str(path))} free); nothing was left behind: free space or pass a --db on another disk")
        return f"disk full while opening database {path} ({free_space(str(path))} free); free space and rerun"
    for reason in ("Permission denied", "Read-only file system"):
        if reason in text:
            where = f"the folder {path.parent}" if not existed else f"database {path}"
            return f"cannot write {where} ({reason.lower()}); pass a --db in a writable folder, or copy the file there"
    if existed and ("not a valid DuckDB database" in text or "Could not read enough bytes" in text
                    or "Corrupt database file" in text or "checksum" in text):
        return f"database {path} is damaged or not a DuckDB file ({first}); restore it from a copy or pass another --db"
    return f"cannot open database {path}: {first}"


def _check_ours(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    """Refuse a file that is shorter than its blocks, is not an explainer DB, or is from a newer explainer."""
    if not _wal(path).exists():  # with a WAL the blocks' final place is decided at the next checkpoint
        # Used blocks, not total: DuckDB cuts free blocks off the end of the file, so only a file
        # shorter than its used blocks is surely truncated.
        row = con.execute("SELECT block_size, used_blocks FROM pragma_database_size() "
                          "WHERE database_name = current_database()").fetchone()
        want = _HEADER_BYTES + int(row[0]) * int(row[1]) if row is not None else 0
        have = path.stat().st_size
        if have < want:
            raise ExplainerError(f"database {path} is truncated ({have:,} bytes, and its used blocks need at "
                                 f"least {want:,}: a copy cut short or a full disk); restore it from a copy or "
                                 "pass another --db")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1").fetchall()]
    known = {fn.__name__ for fn in MIGRATIONS}
    if tables and "_migrations" not in tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise ExplainerError(f"{path} is a DuckDB file of another program (tables: {shown}), not an explainer "
                             "database; explainer adds no tables to it: pass another --db")
    if "_migrations" in tables:
        try:
            names = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
        except duckdb.Error:
            names = {"?"}  # no `name` column: someone else's table
        if names and not names & known:
            raise ExplainerError(f"{path} has a _migrations table that is not explainer's, so it is not an "
                                 "explainer database; pass another --db")
        newer = sorted(names - known)
        if newer:
            raise ExplainerError(f"database {path} was written by a newer explainer (schema steps this version "
                                 f"does not know: {', '.join(newer)}); upgrade explainer to use it")
    elif read_only:
        raise ExplainerError(f"database {path} holds no explainer tables yet (run `explainer sample` first, "
                             "or pass another --db)")


_HEADER_BYTES = 3 * 4096  # DuckDB's file header and two database headers, before the first block
_NEW_DB_BYTES = _HEADER_BYTES + 3 * 262144  # a freshly migrated explainer DB (measured: 798,720 bytes)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All-or-nothing: a crash inside leaves no partial rows (DuckDB commits are durable)."""
    con.execute("BEGIN")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


_CONFLICT = {"": "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: Any, conflict: str = "") -> None:
    """Bulk insert a pyarrow Table (or anything DuckDB can scan) by column name.

    conflict: "" (a duplicate key is an error), "ignore" (the row already there stays) or
    "replace" (the new row wins)."""
    con.register("_bulk", data)
    try:
        cols = ", ".join(f'"{c}"' for c in data.column_names)
        con.execute(f"{_CONFLICT[conflict]} INTO {table} ({cols}) SELECT {cols} FROM _bulk")
    finally:
        con.unregister("_bulk")


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]],
                conflict: str = "") -> None:
    """Bulk insert row dicts through Arrow (~400x faster than executemany). The columns are every
    key of every row, not the first row's; a key a row lacks is NULL there."""
    if not rows:
        return
    import pyarrow as pa  # ~0.5 s to import: commands that only read never pay it

    names = list(dict.fromkeys(k for r in rows for k in r))
    insert_arrow(con, table, pa.table({n: [r.get(n) for r in rows] for n in names}), conflict)


# --- runs -------------------------------------------------------------------------------


def start_run(con: duckdb.DuckDBPyConnection, stage: str, settings: dict[str, Any]) -> int:
    return con.execute(
        "INSERT INTO runs (stage, settings, status, started_at) VALUES (?, ?, 'running', ?) RETURNING id",
        [stage, json.dumps(settings), now()],
    ).fetchone()[0]


@contextmanager
def recorded_run(con: duckdb.DuckDBPyConnection, run_id: int, result: Any, t0: float) -> Iterator[None]:
    """Finish the run row as done or failed with the result's wall time, however the body ends."""
    try:
        yield
    except BaseException:
        result.wall_s = time.perf_counter() - t0
        finish_run(con, run_id, "failed", result.as_dict())
        raise
    result.wall_s = time.perf_counter() - t0
    finish_run(con, run_id, "done", result.as_dict())


def finish_run(con: duckdb.DuckDBPyConnection, run_id: int, status: str, result: Optional[dict] = None) -> None:
    con.execute(
        "UPDATE runs SET status = ?, result = ?, finished_at = ? WHERE id = ?",
        [status, json.dumps(result) if result is not None else None, now(), run_id],
    )


# --- dictionaries -------------------------------------------------------------------------


def dictionary_id(con: duckdb.DuckDBPyConnection, name: Optional[str] = None) -> int:
    """The dictionary a command works on: the only one, or the one named with --dict."""
    rows = con.execute("SELECT id, name FROM dictionaries ORDER BY id").fetchall()
    if not rows:
        raise ExplainerError("the database holds no dictionary yet (run `explainer sample` first)")
    if name is None:
        if len(rows) > 1:
            names = ", ".join(r[1] for r in rows)
            raise ExplainerError(f"the database holds several dictionaries ({names}); choose one with --dict NAME")
        return rows[0][0]
    for rid, rname in rows:
        if rname == name or str(rid) == name:
            return rid
    names = ", ".join(r[1] for r in rows)
    raise ExplainerError(f"no dictionary named {name!r} in the database (it holds: {names})")


def register_dictionary(con: duckdb.DuckDBPyConnection, *, name: str, path: str, model: str, hook: str,
                        d_in: int, d_sae: int, k: Optional[int], fingerprint: str, config: dict) -> int:
    """Return the id for this dictionary, adding it if new; refuse a different one under the same name."""
    row = con.execute("SELECT id, fingerprint FROM dictionaries WHERE name = ?", [name]).fetchone()
    if row is not None:
        if row[1] != fingerprint:
            raise ExplainerError(
                f"the database already holds a different dictionary named {name!r}; "
                "pass another --db, or --dict-name to keep both apart"
            )
        return row[0]
    row = con.execute("SELECT id, name FROM dictionaries WHERE fingerprint = ?", [fingerprint]).fetchone()
    if row is not None:
        return row[0]
    return con.execute(
        """INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
        [name, path, model, hook, d_in, d_sae, k, fingerprint, json.dumps(config), now()],
    ).fetchone()[0]


# --- latent selectors ---------------------------------------------------------------------

def select_latents(con: duckdb.DuckDBPyConnection, dict_id: int, selector: str) -> list[int]:
    """`all`, `7`, `0-99`, `1,5,10-19`, or a SQL condition over the latents table's columns."""
    sel = selector.strip()
    if sel == "all":
        rows = con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent", [dict_id]).fetchall()
    elif (ranges := selectors.parse_ids(sel)) is not None:
        top = 2**31  # latent is an INTEGER: larger ids are simply absent, never a bind error
        # A range join over the merged (disjoint) ranges: each latent appears once.
        rows = con.execute(
            """SELECT l.latent FROM latents l
               JOIN (SELECT unnest(?::BIGINT[]) AS lo, unnest(?::BIGINT[]) AS hi) r ON l.latent BETWEEN r.lo AND r.hi
               WHERE l.dict_id = ? ORDER BY l.latent""",
            [[min(lo, top) for lo, _ in ranges], [min(hi, top) for _, hi in ranges], dict_id]).fetchall()
    else:
        rows = _select_where(con, dict_id, selector, sel)
    latents = [r[0] for r in rows]
    if not latents:
        raise ExplainerError(
            f"--latents {selector!r} matches no latent (columns: latent, frequency, max_act, mean_act, n_contexts)"
        )
    return latents


def _select_where(con: duckdb.DuckDBPyConnection, dict_id: int, selector: str, sel: str) -> list[tuple]:
    """A SQL condition, accepted only when it is one boolean expression that reads a latents column:
    `-5`, `1.5` or `true` are valid SQL that would select everything, so they are refused."""
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'latents' AND schema_name = 'main' "
        "ORDER BY column_index").fetchall()]
    grammar = (f"expected {selectors.IDS_GRAMMAR}, or a SQL condition over the latents columns "
               f"({', '.join(c for c in cols if c != 'dict_id')}), e.g. \"frequency > 1e-4\"")
    query = f"SELECT latent FROM latents WHERE dict_id = ? AND ({sel}) ORDER BY latent"
    describe = f"DESCRIBE SELECT ({sel}) AS v FROM latents"
    try:
        # `1); DROP TABLE x; SELECT (1` would run three statements: refuse before executing any.
        if any(len(con.extract_statements(text)) != 1 for text in (query, describe)):
            raise ExplainerError(f"--latents {selector!r} is not one condition: {grammar}")
        kind = (con.execute(describe).fetchone() or ("", ""))[1]  # binds the columns: an unknown one is named here
        if kind != "BOOLEAN":
            raise ExplainerError(f"--latents {selector!r} is a value of type {kind}, not a true/false condition: {grammar}")
        tree = json.loads((con.execute("SELECT json_serialize_sql(?)",
                                       [f"SELECT ({sel}) FROM latents"]).fetchone() or ("{}",))[0])
        if tree.get("error") or not _column_refs(tree) & set(cols):
            raise ExplainerError(f"--latents {selector!r} does not read any latents column: {grammar}")
        return con.execute(query, [dict_id]).fetchall()
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise ExplainerError(
            f"--latents {selector!r} is not a range, a list, 'all' or a valid SQL WHERE over latents: {msg}"
        ) from None


def _column_refs(node: Any) -> set[str]:
    """Column names referenced anywhere in a json_serialize_sql tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        if node.get("class") == "COLUMN_REF" and node.get("column_names"):
            found.add(str(node["column_names"][-1]).lower())
        for value in node.values():
            found |= _column_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _column_refs(value)
    return found
