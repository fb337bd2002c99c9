"""The schema as append-only migrations, in the order they run, and the snippet_set hash.

A migration is a named function that runs once inside a transaction (store.migrate) and is
recorded in `_migrations`. An applied migration's statements never change: change the schema
by appending a new one. View DDL lives in views.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import duckdb

from explainer.store import views


def m001_core(con: duckdb.DuckDBPyConnection) -> None:
    """The tables of the first release, one helper per group of tables."""
    _m001_runs_and_dictionaries(con)
    _m001_samples(con)
    _m001_results(con)
    _m001_llm(con)


def _m001_runs_and_dictionaries(con: duckdb.DuckDBPyConnection) -> None:
    """Runs and the dictionaries a DB holds."""
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
        """
    )


def _m001_samples(con: duckdb.DuckDBPyConnection) -> None:
    """What the sampler writes: contexts, per-latent statistics and examples."""
    con.execute(
        """
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
        """
    )


def _m001_results(con: duckdb.DuckDBPyConnection) -> None:
    """What explainers and scorers write."""
    con.execute(
        """
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
        """
    )


def _m001_llm(con: duckdb.DuckDBPyConnection) -> None:
    """The LLM response cache and the call ledger."""
    con.execute(
        """
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
    for ddl in (views.M002_EXPLANATION_SCORES, views.M002_LABELS, views.COSTS):
        con.execute(ddl)


def m003_llm_batches(con: duckdb.DuckDBPyConnection) -> None:
    """Batch API jobs (`--batch`, explainer/llm/batch.py), and the batch behind each ledger row."""
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
    for ddl in (views.M006_EXPLANATION_SCORES, views.M006_LABELS):
        con.execute(ddl)


def m007_latent_pages(con: duckdb.DuckDBPyConnection) -> None:
    """What a latent page shows beyond its examples (issue 20): the output side and statistics.

    latent_logits: the decoder direction through the model's final norm and unembedding, the
    top and bottom tokens by logit (residual-stream hooks only). latent_neighbours: nearest
    latents by decoder cosine, and by Jaccard of the contexts they fire in. latent_histograms:
    the per-token activation histogram over firing tokens, accumulated by the sampler."""
    con.execute(
        """
        CREATE TABLE latent_logits (
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            sign VARCHAR NOT NULL,        -- top | bottom
            rank INTEGER NOT NULL,        -- 0 = largest (top) or most negative (bottom)
            token_id INTEGER NOT NULL,
            token VARCHAR NOT NULL,       -- as the tokenizer decodes it alone
            value REAL NOT NULL,          -- logit contribution of a unit step along the decoder row
            PRIMARY KEY (dict_id, latent, sign, rank)
        );
        CREATE TABLE latent_neighbours (
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            kind VARCHAR NOT NULL,        -- decoder_cosine | cooccurrence
            rank INTEGER NOT NULL,
            neighbour INTEGER NOT NULL,
            value REAL NOT NULL,          -- cosine of decoder rows, or Jaccard of firing contexts
            PRIMARY KEY (dict_id, latent, kind, rank)
        );
        CREATE TABLE latent_histograms (
            dict_id INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            edges REAL[] NOT NULL,        -- len(counts) + 1 bin edges over activation values
            counts BIGINT[] NOT NULL,     -- firing tokens per bin
            PRIMARY KEY (dict_id, latent)
        );
        """
    )


def m008_labels_any_file_name(con: duckdb.DuckDBPyConnection) -> None:
    """The labels view again, its struct fields read as (alias.h).field: written alias.h.field,
    DuckDB could not bind it in a DB file named after an alias (h.duckdb, bh.duckdb), since the
    file's stem is a catalog name. m006 carries the same text (a fresh DB of any name must get
    through it); this re-creates the view in DBs made before the fix."""
    con.execute(views.M006_LABELS)


MIGRATIONS: list[Callable[[duckdb.DuckDBPyConnection], None]] = [
    m001_core, m002_views, m003_llm_batches, m004_cached_tokens, m005_score_provenance, m006_validation_labels,
    m007_latent_pages, m008_labels_any_file_name]
