"""`explainer sample`: run model + dictionary over the corpus and store per-latent examples.

One pass over the contexts of all three splits (train, validation, heldout) folds each batch
into a streaming state (sampler_state.py), never holding all activations. Every
`checkpoint_every` batches the new contexts rows are committed and then the state is saved
beside the DB, in that order: a kill between the two leaves rows past the saved position,
which a resume deletes before it continues from the state's position, so a resumed run ends
with the same tables as an uninterrupted one. At the end one transaction writes the latents
and examples tables and marks the run done; rerunning with the same settings is a no-op.

Shards (`--shard i/N`) each keep their final state file; `merge` combines them exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import duckdb
import pyarrow as pa
import torch

from explainer import store
from explainer.corpus import Context, iter_contexts, load_documents
from explainer.errors import ExplainerError
from explainer.sampler_state import (
    SPLITS, SampleState, TokenTable, example_rows, latent_rows, load_state, merge_states, new_state,
    save_state, sorted_state, update,
)
from explainer.settings import SampleSettings, Settings

Progress = Callable[[dict[str, Any]], None]
FLOAT16_MAX = 65504.0


@dataclass
class SampleResult:
    dict_id: int
    dict_name: str
    shard: str
    complete: bool            # latents and examples written (a lone shard of several is not)
    already_complete: bool    # nothing to do: this dictionary was sampled with these settings
    n_contexts: dict[str, int]
    n_tokens: int
    dead_latents: Optional[int]
    median_frequency: Optional[float]
    db_bytes: int
    tokens_per_s: float
    wall_s: float
    state_path: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ExplainerError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def _db_file(con: duckdb.DuckDBPyConnection) -> Optional[Path]:
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(row[0]) if row and row[0] and row[0] != ":memory:" else None


def _db_bytes(con: duckdb.DuckDBPyConnection) -> int:
    path = _db_file(con)
    if path is None:
        return 0
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".wal")) if p.exists())


def state_path(db_file: Path, fingerprint: str, shard: tuple[int, int]) -> Path:
    return db_file.with_name(db_file.name + ".sample") / f"{fingerprint[:16]}-{shard[0]}of{shard[1]}.pt"


def _hook_layer(cfg: dict) -> Optional[int]:
    layer = cfg.get("hook_layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    m = re.search(r"(?:layers|blocks|h|layer)\.(\d+)", str(cfg.get("hook_name") or ""))
    return int(m.group(1)) if m else None


def check_dictionary(sae: Any, lm: Any, ss: SampleSettings) -> list[str]:
    """Refuse a dictionary that cannot read this model's hook; return warnings for the rest."""
    if sae.d_in != lm.d_model:
        raise ExplainerError(
            f"dictionary width d_in={sae.d_in} does not match {lm.name} (d_model={lm.d_model} at {lm.hook}); "
            "pass the model the dictionary was trained on with --model, or another --sae"
        )
    warnings = []
    layer = _hook_layer(sae.cfg)
    if layer is None:
        warnings.append(f"the dictionary's config names no layer; assuming it reads {lm.hook}")
    elif layer != lm.layer:
        msg = f"the dictionary was trained at layer {layer} but the model is hooked at layer {lm.layer}"
        if not ss.force_layer:
            raise ExplainerError(f"{msg}; pass --layer {layer}, or --force-layer to sample anyway")
        warnings.append(msg + " (--force-layer)")
    trained_on = sae.cfg.get("model_name")
    if trained_on and trained_on != lm.name:
        warnings.append(f"the dictionary's config names model {trained_on!r}; sampling {lm.name!r}")
    return warnings


def _config(settings: Settings, lm: Any, fingerprint: str) -> tuple[str, dict[str, Any]]:
    """What determines the results; a saved state or a finished run counts only if it matches."""
    cfg = {
        "fingerprint": fingerprint, "model": lm.name, "layer": lm.layer, "dtype": str(lm.dtype),
        "corpus": settings.corpus.model_dump(mode="json"),
        "sample": settings.sample.model_dump(mode="json", exclude={"checkpoint_every", "shard", "force_layer"}),
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16], cfg


def _done_runs(con: duckdb.DuckDBPyConnection, dict_id: int) -> list[tuple[int, dict]]:
    rows = con.execute("SELECT id, result FROM runs WHERE stage = 'sample' AND status = 'done' ORDER BY id").fetchall()
    out = []
    for rid, result in rows:
        res = json.loads(result) if result else {}
        if res.get("dict_id") == dict_id:
            out.append((rid, res))
    return out


# --- contexts rows ----------------------------------------------------------------------


class _Pending:
    """Contexts rows waiting for the next commit."""

    def __init__(self, dict_id: int, token_strings: Callable[[list[int]], list[str]]) -> None:
        self.dict_id, self.token_strings = dict_id, token_strings
        self.rows: list[Context] = []

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        if not self.rows:
            return
        table = pa.table({
            "dict_id": pa.array([self.dict_id] * len(self.rows), pa.int32()),
            "context_id": pa.array([c.context_id for c in self.rows], pa.int64()),
            "doc_id": [c.doc_id for c in self.rows],
            "split": [c.split for c in self.rows],
            "token_ids": pa.array([c.token_ids for c in self.rows], pa.list_(pa.int32())),
            "tokens": pa.array([self.token_strings(c.token_ids) for c in self.rows], pa.list_(pa.string())),
        })
        store.insert_arrow(con, "contexts", table)
        self.rows = []


def _delete_contexts(con: duckdb.DuckDBPyConnection, dict_id: int, start: int, shard: tuple[int, int]) -> None:
    con.execute("DELETE FROM contexts WHERE dict_id = ? AND context_id >= ? AND context_id % ? = ?",
                [dict_id, start, shard[1], shard[0]])


def _count_contexts(con: duckdb.DuckDBPyConnection, dict_id: int, below: int, shard: tuple[int, int]) -> int:
    return con.execute("SELECT count(*) FROM contexts WHERE dict_id = ? AND context_id < ? AND context_id % ? = ?",
                       [dict_id, below, shard[1], shard[0]]).fetchone()[0]


# --- finalize ------------------------------------------------------------------------------


def _token_table(con: duckdb.DuckDBPyConnection, dict_id: int, ctx_len: int) -> TokenTable:
    t = con.sql("SELECT context_id, token_ids FROM contexts WHERE dict_id = ?", params=[dict_id]).to_arrow_table()
    cids = torch.from_numpy(t.column("context_id").to_numpy().copy())
    flat = t.column("token_ids").combine_chunks().flatten().to_numpy().astype("int64")
    return TokenTable(cids, torch.from_numpy(flat).view(-1, ctx_len))


def _examples_table(dict_id: int, split: str, kind: str, rows: dict[str, Any]) -> pa.Table:
    n, T = rows["acts"].shape
    offsets = pa.array(range(0, n * T + 1, T), pa.int32())
    return pa.table({
        "dict_id": pa.array([dict_id] * n, pa.int32()),
        "latent": rows["latent"].numpy(),
        "split": pa.array([split] * n, pa.string()),
        "kind": pa.array([kind] * n, pa.string()),
        "rank": rows["rank"].numpy(),
        "context_id": rows["context_id"].numpy(),
        "max_act": rows["max_act"].numpy(),
        "acts": pa.ListArray.from_arrays(offsets, pa.array(rows["acts"].reshape(-1).numpy())),
        "bin": pa.array(rows["bin"].int().numpy(), pa.int32()) if rows["bin"] is not None else pa.nulls(n, pa.int32()),
    })


def write_results(con: duckdb.DuckDBPyConnection, dict_id: int, state: SampleState, ss: SampleSettings) -> dict[str, Any]:
    """Replace this dictionary's latents and examples from a final state (inside the caller's transaction)."""
    state = sorted_state(state.to("cpu"))
    con.execute("DELETE FROM examples WHERE dict_id = ?", [dict_id])
    con.execute("DELETE FROM latents WHERE dict_id = ?", [dict_id])
    lat = latent_rows(state)
    store.insert_arrow(con, "latents", pa.table({
        "dict_id": pa.array([dict_id] * len(lat["latent"]), pa.int32()),
        **{k: v for k, v in lat.items() if k != "quantiles"},
        "quantiles": pa.array(lat["quantiles"], pa.list_(pa.float32())),
    }))
    tokens = _token_table(con, dict_id, int(state.meta["ctx_len"]))
    for s, split in enumerate(SPLITS):
        kinds = example_rows(state, s, n_quantile=ss.n_quantile, n_bins=ss.n_quantile_bins,
                             n_nonactivating=ss.n_nonactivating, n_random=ss.n_random, tokens=tokens)
        for kind, rows in kinds.items():
            if len(rows["latent"]):
                store.insert_arrow(con, "examples", _examples_table(dict_id, split, kind, rows))
    freq = torch.from_numpy(lat["frequency"])
    return {"dead_latents": int((freq == 0).sum()), "median_frequency": float(freq.median())}


def _summary_counts(state: SampleState) -> dict[str, int]:
    return {split: int(n) for split, n in zip(SPLITS, state.n_contexts.tolist())}


# --- run -------------------------------------------------------------------------------------


def _update_single_threaded(state: SampleState, *args: torch.Tensor) -> torch.Tensor:
    """The bookkeeping is many small ops: on CPU, OpenMP fork/join costs more than it saves,
    and on a busy machine a 2-thread reduction over [4096, 20] took 20x the 1-thread time."""
    if args[0].device.type != "cpu" or torch.get_num_threads() == 1:
        return update(state, *args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return update(state, *args)
    finally:
        torch.set_num_threads(threads)


def _plan(settings: Settings, tokenizer: Any, docs: list, limit: int, ss: SampleSettings) -> tuple[dict[str, int], list[str]]:
    """Contexts per split among the first `limit`; a split that gets none is an error."""
    counts = {s: 0 for s in SPLITS}
    for c in iter_contexts(settings.corpus, tokenizer, splits=SPLITS, documents=docs):
        if c.context_id >= limit:
            break
        counts[c.split] += 1
    cs = settings.corpus
    wanted = {"train": 1 - cs.validation_fraction - cs.heldout_fraction,
              "validation": cs.validation_fraction, "heldout": cs.heldout_fraction}
    if sum(counts.values()) == 0:
        raise ExplainerError(
            f"corpus {cs.source} yields no context of {cs.ctx_len} tokens; use a larger corpus or a smaller --ctx-len"
        )
    for split, n in counts.items():
        if n == 0 and wanted[split] > 0:
            also = f", or set corpus.{split}_fraction=0" if split != "train" else ""
            raise ExplainerError(
                f"split {split!r} got no contexts from the first {limit * cs.ctx_len:,} tokens of corpus {cs.source}; "
                f"raise --tokens or use a larger corpus{also}"
            )
    notes = []
    need = max(ss.n_top, ss.n_quantile, ss.n_nonactivating, ss.n_random)
    for split, n in counts.items():
        if 0 < n < need:
            notes.append(f"split {split!r} has only {n} contexts, fewer than the {need} examples per latent requested")
    return counts, notes


def run(con: duckdb.DuckDBPyConnection, settings: Settings, sae_path: Path | str, *, lm: Any = None,
        dict_name: Optional[str] = None, resume: bool = True, progress: Optional[Progress] = None) -> SampleResult:
    """Sample this dictionary's examples into the DB; resumes a killed run, no-op when done.

    resume=False discards this dictionary's earlier samples (and any unfinished state) first.
    """
    from explainer.lm import load_model
    from explainer.sae import fingerprint, load_dictionary

    t0 = time.perf_counter()
    ss = settings.sample
    shard = parse_shard(ss.shard)
    if ss.n_reservoir < ss.n_quantile:
        raise ExplainerError(f"sample.n_reservoir={ss.n_reservoir} is below n_quantile={ss.n_quantile}; raise it")
    sae_path = Path(sae_path)
    sae = load_dictionary(sae_path)
    lm = lm if lm is not None else load_model(settings.model)
    warnings = check_dictionary(sae, lm, ss)
    sae = sae.to(lm.device).eval()
    fp = fingerprint(sae)
    name = dict_name or sae_path.resolve().name
    dict_id = store.register_dictionary(
        con, name=name, path=str(sae_path.resolve()), model=lm.name, hook=lm.hook, d_in=sae.d_in,
        d_sae=sae.d_sae, k=sae.k, fingerprint=fp, config=sae.cfg)
    key, cfg = _config(settings, lm, fp)
    shard_text = f"{shard[0]}/{shard[1]}"
    db_file = _db_file(con)
    spath = state_path(db_file, fp, shard) if db_file is not None else None

    done = _done_runs(con, dict_id)
    same = [res for _, res in done if res.get("config_key") == key and res.get("shard") in (shard_text, "merged")]
    other = [rid for rid, res in done if res.get("config_key") != key]
    if resume and same:
        res = same[-1]
        return SampleResult(dict_id, name, shard_text, res["complete"], True, res["n_contexts"], res["n_tokens"],
                            res.get("dead_latents"), res.get("median_frequency"), _db_bytes(con), 0.0,
                            time.perf_counter() - t0, res.get("state_path"), warnings)
    if resume and other:
        raise ExplainerError(
            f"dictionary {name!r} was already sampled into this DB with other settings; pass --restart to replace "
            "its samples, or use another --db"
        )
    state = None
    if spath is not None and spath.exists():
        state = load_state(spath, lm.device)
        if state.meta.get("config_key") != key and resume:
            raise ExplainerError(
                f"an unfinished sample run of dictionary {name!r} used other settings (state {spath}); rerun with "
                "the same settings to continue it, or pass --restart to start over"
            )
        if not resume or state.meta.get("config_key") != key:
            state = None
    if not resume:
        with store.transaction(con):
            con.execute("UPDATE runs SET status = 'replaced' WHERE list_contains(?, id)", [[rid for rid, _ in done]])
            con.execute("DELETE FROM examples WHERE dict_id = ?", [dict_id])
            con.execute("DELETE FROM latents WHERE dict_id = ?", [dict_id])
    # Rows the saved state does not cover were written after it (or by a discarded run).
    if state is not None and _count_contexts(con, dict_id, state.meta["next_context"], shard) != int(state.n_contexts.sum()):
        state = None  # the DB lost rows the state counts (e.g. the DB file was replaced): start over
    start = state.meta["next_context"] if state is not None else 0
    _delete_contexts(con, dict_id, start, shard)

    T = settings.corpus.ctx_len
    limit = math.ceil(ss.tokens / T)
    docs = load_documents(settings.corpus)
    counts, notes = _plan(settings, lm.tokenizer, docs, limit, ss)
    warnings += notes
    n_total = len(range(shard[0], min(limit, sum(counts.values())), shard[1]))
    if state is None:
        state = new_state(d_sae=sae.d_sae, ctx_len=T, k=sae.k, n_top=ss.n_top, n_reservoir=ss.n_reservoir,
                          n_pool=max(ss.nonactivating_pool, ss.n_random),
                          acts_dtype=getattr(torch, ss.acts_dtype), device=lm.device,
                          meta={"config_key": key, "config": cfg, "n_shards": shard[1], "shards": [shard[0]],
                                "next_context": 0, "complete": False, "fingerprint": fp})

    run_id = store.start_run(con, "sample", settings.public_dict())
    pending = _Pending(dict_id, lm.token_strings)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    done_before = int(state.n_contexts.sum())
    t_loop = time.perf_counter()

    def checkpoint() -> None:
        with store.transaction(con):
            pending.write(con)
        if spath is not None:  # after the commit: see the module docstring
            save_state(state, spath)

    def process(batch: list[Context]) -> None:
        ids = torch.tensor([c.token_ids for c in batch], dtype=torch.long)
        acts = lm.activations(ids)
        vals, idx = sae.encode(acts)
        dev = vals.device
        split = torch.tensor([split_index[c.split] for c in batch], device=dev)
        cids = torch.tensor([c.context_id for c in batch], device=dev)
        ctx_max = _update_single_threaded(state, split, cids, vals.float(), idx.long())
        if ss.acts_dtype == "float16" and float(ctx_max.max()) > FLOAT16_MAX:
            raise ExplainerError(
                f"latent activations reach {float(ctx_max.max()):.4g}, beyond float16; "
                "rerun with --acts-dtype float32 --restart"
            )
        state.meta["next_context"] = batch[-1].context_id + 1
        pending.rows.extend(batch)

    try:
        with torch.inference_mode():
            batch: list[Context] = []
            n_batches = 0
            for c in iter_contexts(settings.corpus, lm.tokenizer, splits=SPLITS, start=start, shard=shard, documents=docs):
                if c.context_id >= limit:
                    break
                batch.append(c)
                if len(batch) < settings.model.batch_size:
                    continue
                process(batch)
                batch = []
                n_batches += 1
                if n_batches % ss.checkpoint_every == 0:
                    checkpoint()
                if progress is not None:
                    done_ctx = int(state.n_contexts.sum())
                    elapsed = time.perf_counter() - t_loop
                    progress({"tokens": done_ctx * T, "total": n_total * T,
                              "tok_s": round((done_ctx - done_before) * T / max(elapsed, 1e-9))})
            if batch:
                process(batch)
            state.meta["complete"] = True
            loop_s = time.perf_counter() - t_loop
            new_tokens = (int(state.n_contexts.sum()) - done_before) * T
            result = {"dict_id": dict_id, "dict_name": name, "config_key": key, "shard": shard_text,
                      "n_contexts": _summary_counts(state), "n_tokens": int(state.n_tokens.sum()),
                      "tokens_per_s": new_tokens / max(loop_s, 1e-9)}
            if shard[1] == 1:
                with store.transaction(con):
                    pending.write(con)
                    result.update(write_results(con, dict_id, state, ss), complete=True)
                    store.finish_run(con, run_id, "done", result)
                if spath is not None and spath.exists():
                    spath.unlink()
            else:
                checkpoint()
                result.update(complete=False, state_path=str(spath), dead_latents=None, median_frequency=None)
                store.finish_run(con, run_id, "done", result)
    except BaseException as e:
        try:
            store.finish_run(con, run_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        except duckdb.Error:
            pass
        raise
    return SampleResult(dict_id, name, shard_text, result["complete"], False, result["n_contexts"],
                        result["n_tokens"], result.get("dead_latents"), result.get("median_frequency"),
                        _db_bytes(con), result["tokens_per_s"], time.perf_counter() - t0,
                        result.get("state_path"), warnings)


# --- merge -----------------------------------------------------------------------------------


def merge(con: duckdb.DuckDBPyConnection, shard_dbs: Sequence[Path | str], *,
          dict_name: Optional[str] = None) -> SampleResult:
    """Combine the finished shard runs in `shard_dbs` (one DB file each) into this DB, exactly."""
    t0 = time.perf_counter()
    states: list[SampleState] = []
    dict_row = None
    sources = []
    for path in map(Path, shard_dbs):
        src = store.connect(path, read_only=True)
        try:
            rows = src.execute("SELECT id, name, path, model, hook, d_in, d_sae, k, fingerprint, config FROM dictionaries"
                               + (" WHERE name = ?" if dict_name else ""), [dict_name] if dict_name else []).fetchall()
            if len(rows) != 1:
                raise ExplainerError(f"shard DB {path} holds {len(rows)} matching dictionaries; choose one with --dict-name")
            row = rows[0]
            if dict_row is not None and row[8] != dict_row[8]:
                raise ExplainerError(f"shard DB {path} holds another dictionary than {shard_dbs[0]}; merge shards of one run")
            dict_row = row
            finished = [res for _, res in _done_runs(src, row[0]) if res.get("state_path")]
            if not finished:
                raise ExplainerError(f"shard DB {path} has no finished shard run of {row[1]!r}; run its `sample --shard` first")
            res = finished[-1]
            if not Path(res["state_path"]).exists():
                raise ExplainerError(f"shard state {res['state_path']} of {path} is missing; rerun that shard")
            states.append(load_state(Path(res["state_path"])))
            sources.append((path, row[0]))
        finally:
            src.close()
    if not states:
        raise ExplainerError("merge needs at least one shard DB")
    merged = states[0]
    try:
        for st in states[1:]:
            merged = merge_states(merged, st)
    except ValueError as e:
        raise ExplainerError(f"{e}; merge shards of one run") from None
    n = int(merged.meta["n_shards"])
    if merged.meta["shards"] != list(range(n)):
        missing = sorted(set(range(n)) - set(merged.meta["shards"]))
        raise ExplainerError(f"shards {missing} of {n} are missing; pass every shard's DB")
    _, name, path, model, hook, d_in, d_sae, k, fp, config = dict_row
    dict_id = store.register_dictionary(con, name=name, path=path, model=model, hook=hook, d_in=d_in, d_sae=d_sae,
                                        k=k, fingerprint=fp, config=json.loads(config) if config else {})
    run_id = store.start_run(con, "sample", {"merge": [str(p) for p, _ in sources]})
    result = {"dict_id": dict_id, "dict_name": name, "config_key": merged.meta["config_key"], "shard": "merged",
              "n_contexts": _summary_counts(merged), "n_tokens": int(merged.n_tokens.sum()), "tokens_per_s": 0.0}
    with store.transaction(con):
        con.execute("DELETE FROM contexts WHERE dict_id = ?", [dict_id])
        for i, (path, src_id) in enumerate(sources):
            quoted = str(path).replace("'", "''")
            con.execute(f"ATTACH '{quoted}' AS shard{i} (READ_ONLY)")
            con.execute(f"INSERT INTO contexts SELECT ? AS dict_id, context_id, doc_id, split, token_ids, tokens "
                        f"FROM shard{i}.contexts WHERE dict_id = ?", [dict_id, src_id])
            con.execute(f"DETACH shard{i}")
        ss = SampleSettings.model_validate(merged.meta["config"]["sample"])
        result.update(write_results(con, dict_id, merged, ss), complete=True)
        store.finish_run(con, run_id, "done", result)
    return SampleResult(dict_id, name, "merged", True, False, result["n_contexts"], result["n_tokens"],
                        result["dead_latents"], result["median_frequency"], _db_bytes(con), 0.0,
                        time.perf_counter() - t0, None, [])
