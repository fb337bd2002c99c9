"""`explainer merge`: combine finished `sample --shard i/N` runs into one DB, exactly.

Top-k lists, the hash sketches behind quantile, non-activating and random examples, and the
counts all merge exactly (sampler_state.merge_states), so the merged tables equal those of
one unsharded run. Shard outputs are DB files (state file beside each) or one `--parquet` folder.
"""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import duckdb
import torch

from explainer.errors import ExplainerError
from explainer.sample.runs import done_runs, parse_shard, state_path, summary_counts
from explainer.sample.sampler import SampleResult
from explainer.sample.select import write_results
from explainer.sample.sink import (DICT_FIELDS, copy_used_contexts, is_parquet_folder, parquet_relation,
    read_dictionary, state_files)
from explainer.sample.state import SampleState, load_state, merge_states
from explainer.settings import SampleSettings
from explainer.store import db as store


def _dictionary(src: duckdb.DuckDBPyConnection, path: Path, dict_name: Optional[str], kind: str) -> tuple[int, dict[str, Any]]:
    """(id, row) of the one dictionary (named `dict_name`, if given) of a shard or slice DB."""
    rows = src.execute(f"SELECT id, {', '.join(DICT_FIELDS)} FROM dictionaries"
                       + (" WHERE name = ?" if dict_name else ""), [dict_name] if dict_name else []).fetchall()
    if len(rows) != 1:
        raise ExplainerError(f"{kind} DB {path} holds {len(rows)} matching dictionaries; choose one with --dict-name")
    return rows[0][0], dict(zip(DICT_FIELDS, rows[0][1:]))


def _shard_db(path: Path, dict_name: Optional[str]) -> tuple[dict[str, Any], SampleState]:
    """The dictionary row and final state of a shard DB."""
    src = store.connect(path, read_only=True)
    try:
        src_id, row = _dictionary(src, path, dict_name, "shard")
        finished = [res for _, res in done_runs(src, src_id) if res.get("state_path")]
    finally:
        src.close()
    if not finished:
        raise ExplainerError(f"shard DB {path} has no finished shard run of {row['name']!r}; run its `sample --shard` first")
    if finished[-1].get("parquet"):
        folder = finished[-1]["parquet"]
        raise ExplainerError(f"shard DB {path} wrote its contexts to the Parquet folder {folder}; merge that folder")
    # Found beside the shard's DB, wherever the shard ran: shard folders may have moved.
    spath = state_path(path, row["fingerprint"], parse_shard(finished[-1]["shard"]))
    if not spath.exists():
        raise ExplainerError(f"shard state {spath} of {path} is missing; copy it along with the DB or rerun that shard")
    return row, load_state(spath)


def merge(con: duckdb.DuckDBPyConnection, shard_outputs: Sequence[Path | str], *,
          dict_name: Optional[str] = None) -> SampleResult:
    """Combine finished shard runs into this DB, exactly.

    Each of `shard_outputs` is a shard's DB file (contexts rows and state beside it) or a
    `sample --parquet` folder (every shard's state and Parquet contexts in one place). From
    Parquet only the contexts the examples use are copied in; the rest stay queryable in place.
    """
    t0 = time.perf_counter()
    states: list[SampleState] = []
    dict_row: Optional[dict[str, Any]] = None
    dbs: list[Path] = []
    folders: list[Path] = []
    for path in map(Path, shard_outputs):
        if is_parquet_folder(path):
            row = read_dictionary(path)
            found = [load_state(p) for p in state_files(path)]
            if not found:
                raise ExplainerError(f"{path} holds no shard state; run `sample --parquet {path}` to the end first")
            unfinished = [p.name for p, st in zip(state_files(path), found) if not st.meta.get("complete")]
            if unfinished:
                raise ExplainerError(f"{path}: shards {unfinished} are unfinished; rerun them (they resume) and merge again")
            states += found
            folders.append(path)
        elif not path.exists():
            raise ExplainerError(f"shard output {path} does not exist; pass shard DB files or a `sample --parquet` folder")
        elif path.is_dir():
            raise ExplainerError(f"{path} is a folder without dictionary.json: not a `sample --parquet` output")
        else:
            row, st = _shard_db(path, dict_name)
            states.append(st)
            dbs.append(path)
        if dict_row is not None and row["fingerprint"] != dict_row["fingerprint"]:
            raise ExplainerError(f"{path} holds another dictionary than {shard_outputs[0]}; merge shards of one run")
        dict_row = row
    if not states or dict_row is None:
        raise ExplainerError("merge needs at least one shard DB or Parquet folder")
    merged = states[0]
    try:
        for st in states[1:]:
            merged = merge_states(merged, st)
    except ValueError as e:
        raise ExplainerError(f"{e}; merge shards of one run") from None
    n = int(merged.meta["n_shards"])
    if merged.meta["shards"] != list(range(n)):
        missing = sorted(set(range(n)) - set(merged.meta["shards"]))
        raise ExplainerError(f"shards {missing} of {n} are missing; pass every shard's output")
    config = dict_row["config"]
    dict_id = store.register_dictionary(con, **{**dict_row, "config": json.loads(config) if isinstance(config, str)
                                                else (config or {})})
    run_id = store.start_run(con, "sample", {"merge": [str(p) for p in shard_outputs]})
    result = {"dict_id": dict_id, "dict_name": dict_row["name"], "config_key": merged.meta["config_key"],
              "config": merged.meta.get("config"), "shard": "merged", "n_contexts": summary_counts(merged),
              "n_tokens": int(merged.n_tokens.sum()),
              "tokens_per_s": 0.0, "parquet": [str(f.resolve()) for f in folders],
              "logit_lens": "not computed by merge (no model here): run `explainer lens`"}
    try:
        with store.transaction(con):
            con.execute("DELETE FROM contexts WHERE dict_id = ?", [dict_id])
            for i, path in enumerate(dbs):
                quoted = str(path).replace("'", "''")
                src_id = store.one_row(con.execute(f"ATTACH '{quoted}' AS shard{i} (READ_ONLY); "
                                                   f"SELECT id FROM shard{i}.dictionaries WHERE fingerprint = ?",
                                                   [dict_row["fingerprint"]]))[0]
                con.execute(f"INSERT INTO contexts SELECT ? AS dict_id, context_id, doc_id, split, token_ids, tokens "
                            f"FROM shard{i}.contexts WHERE dict_id = ?", [dict_id, src_id])
                con.execute(f"DETACH shard{i}")
            relations = [f"(SELECT * FROM contexts WHERE dict_id = {int(dict_id)})"]
            relations += [parquet_relation(f) for f in folders]
            ss = SampleSettings.model_validate(merged.meta["config"]["sample"])
            result.update(write_results(con, dict_id, merged, ss, relations), complete=True)
            copy_used_contexts(con, dict_id, relations[1:])  # from Parquet, only what examples use
            store.finish_run(con, run_id, "done", result)
    except BaseException as e:
        store.finish_run(con, run_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        raise
    return SampleResult.from_record(con, result, dict_id=dict_id, dict_name=dict_row["name"], shard="merged",
                                    already_complete=False, warnings=[], t0=t0)


# --- `sample --latent-shards`: one DB from the latent slices (sample/wide.py) ---------------------


COOC_SKIPPED = "skipped: a latent-sharded sample (--latent-shards) holds no rank with every latent"
LENS_SKIPPED = "not computed in a latent-sharded sample: run `explainer lens`"


def _slice_record(path: Path, dict_name: Optional[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dictionary row and finished complete run record of a slice's DB."""
    src = store.connect(path, read_only=True)
    try:
        src_id, row = _dictionary(src, path, dict_name, "slice")
        finished = [res for _, res in done_runs(src, src_id) if res.get("complete")]
    finally:
        src.close()
    if not finished:
        raise ExplainerError(f"slice DB {path} has no finished run of {row['name']!r}; rerun the torchrun command")
    return row, finished[-1]


def combine_slices(con: duckdb.DuckDBPyConnection, slice_dbs: Sequence[Path], *, dict_name: Optional[str] = None) -> SampleResult:
    """Write the latent slices' tables into this DB as one run's: contexts from the first slice
    (every slice saw the same contexts), latents, examples and histograms from each."""
    t0 = time.perf_counter()
    records = [_slice_record(Path(p), dict_name) for p in slice_dbs]
    row, first = records[0]
    if any(r["fingerprint"] != row["fingerprint"] or res["n_contexts"] != first["n_contexts"] for r, res in records):
        raise ExplainerError(f"the slice DBs {', '.join(map(str, slice_dbs))} hold different runs; rerun the torchrun "
                             "command with --restart")
    config = row["config"]
    dict_id = store.register_dictionary(con, **{**row, "config": json.loads(config) if isinstance(config, str)
                                                else (config or {})})
    run_id = store.start_run(con, "sample", {"latent_shards": [str(p) for p in slice_dbs]})
    try:
        with store.transaction(con):
            for table in ("contexts", "latents", "examples", "latent_histograms", "latent_neighbours", "latent_logits"):
                con.execute(f"DELETE FROM {table} WHERE dict_id = ?", [dict_id])  # fixed names
            for i, path in enumerate(slice_dbs):
                quoted = str(path).replace("'", "''")
                src_id = store.one_row(con.execute(f"ATTACH '{quoted}' AS slice{i} (READ_ONLY); SELECT id FROM "
                                                   f"slice{i}.dictionaries WHERE fingerprint = ?", [row["fingerprint"]]))[0]
                for table in (["contexts"] if i == 0 else []) + ["latents", "examples", "latent_histograms"]:
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * REPLACE (? AS dict_id) FROM slice{i}.{table} "
                                "WHERE dict_id = ?", [dict_id, src_id])
                con.execute(f"DETACH slice{i}")
            freq = torch.tensor([f for (f,) in con.execute("SELECT frequency FROM latents WHERE dict_id = ? "
                                                           "ORDER BY latent", [dict_id]).fetchall()])
            result = {**first, "dict_id": dict_id, "dict_name": row["name"], "shard": "merged", "complete": True,
                      "latent_shards": len(slice_dbs), "dead_latents": int((freq == 0).sum()),
                      "median_frequency": float(freq.median()) if len(freq) else None,
                      "cooccurrence": COOC_SKIPPED, "logit_lens": LENS_SKIPPED, "decoder_neighbours": LENS_SKIPPED}
            store.finish_run(con, run_id, "done", result)
    except BaseException as e:
        store.finish_run(con, run_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        raise
    return SampleResult.from_record(con, result, dict_id=dict_id, dict_name=row["name"], shard="merged",
                                    already_complete=False, warnings=[], t0=t0)
