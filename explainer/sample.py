"""`explainer sample`: run model + dictionary over the corpus and store per-latent examples.

One pass over the contexts of all three splits (train, validation, heldout) folds each batch
into a streaming state (sampler_state.py), never holding all activations. Every
`checkpoint_every` batches the new contexts rows are committed and then the state is saved
beside the DB, in that order: a kill between the two leaves rows past the saved position,
which a resume deletes before it continues from the state's position, so a resumed run ends
with the same tables as an uninterrupted one. At the end one transaction writes the latents
and examples tables and marks the run done; rerunning with the same settings is a no-op.

Shards (`--shard i/N`) each keep their final state file; sample_merge.py combines them exactly.
Where contexts rows go (DB table or `--parquet` files) is sample_parquet.py's.
sampler_state.py holds the streaming state, sampler_select.py turns it into table rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import duckdb
import torch

from explainer import store
from explainer.corpus import Context, iter_contexts, load_documents
from explainer.errors import ExplainerError
from explainer.outliers import OutlierRule, add_histograms, position_histogram
from explainer.sample_parquet import DICT_FIELDS, DbContexts, ParquetContexts, pending_table, sink
from explainer.sampler_select import write_results
from explainer.sampler_subset import check_fits, latent_subset
from explainer.sampler_state import (
    M31, SampleState, latent_ids, load_state, new_state, one_thread, save_state, update,
)
from explainer.settings import SampleSettings, Settings
from explainer.vocab import SPLITS

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
    n_outlier_tokens: Optional[int] = None  # tokens the dictionary's outlier rule left out (None: it has none)

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


def db_bytes(con: duckdb.DuckDBPyConnection) -> int:
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


def _config(settings: Settings, lm: Any, fingerprint: str, topk: bool,
            rule: Optional[OutlierRule] = None) -> tuple[str, dict[str, Any]]:
    """What determines the results; a saved state or a finished run counts only if it matches."""
    # Where the output goes does not change it; max_active only matters without a fixed k.
    exclude = {"checkpoint_every", "shard", "force_layer", "parquet"} | ({"max_active"} if topk else set())
    cfg = {
        "fingerprint": fingerprint, "model": lm.name, "layer": lm.layer, "dtype": str(lm.dtype),
        "corpus": settings.corpus.model_dump(mode="json"),
        "sample": settings.sample.model_dump(mode="json", exclude=exclude),
        # Only when there is a rule, so dictionaries without one keep their earlier config keys.
        **({"outliers": rule.cfg()} if rule is not None else {}),
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16], cfg


def done_runs(con: duckdb.DuckDBPyConnection, dict_id: int) -> list[tuple[int, dict]]:
    rows = con.execute("SELECT id, result FROM runs WHERE stage = 'sample' AND status = 'done' ORDER BY id").fetchall()
    out = []
    for rid, result in rows:
        res = json.loads(result) if result else {}
        if res.get("dict_id") == dict_id:
            out.append((rid, res))
    return out


# --- contexts rows ----------------------------------------------------------------------


class _Pending:
    """Contexts rows waiting for the next checkpoint, and where they go (DB table or Parquet)."""

    def __init__(self, contexts: DbContexts | ParquetContexts, token_strings: Callable[[list[int]], list[str]]) -> None:
        self.contexts, self.token_strings = contexts, token_strings
        self.rows: list[Context] = []

    def write(self) -> None:
        if self.rows:
            self.contexts.write(pending_table(self.rows, self.token_strings))
        self.rows = []


def summary_counts(state: SampleState) -> dict[str, int]:
    return {split: int(n) for split, n in zip(SPLITS, state.n_contexts.tolist())}


# --- run -------------------------------------------------------------------------------------


def _plan(settings: Settings, tokenizer: Any, docs: Iterable, limit: int, ss: SampleSettings,
          dropped: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Contexts per split among the first `limit`; a split that gets none is an error.
    Fills `dropped` with the near-duplicates of train contexts left out per split."""
    counts = {s: 0 for s in SPLITS}
    for c in iter_contexts(settings.corpus, tokenizer, splits=SPLITS, documents=docs, stop=limit, dropped=dropped):
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


def _previous(con: duckdb.DuckDBPyConnection, dict_id: int, name: str, key: str, shard: str,
              resume: bool) -> Optional[dict]:
    """The result of a finished identical run (a no-op), or None; refuses to mix settings."""
    done = done_runs(con, dict_id)
    if not resume:
        return None
    same = [res for _, res in done if res.get("config_key") == key and res.get("shard") in (shard, "merged")]
    if same:
        return same[-1]
    if any(res.get("config_key") != key for _, res in done):
        raise ExplainerError(
            f"dictionary {name!r} was already sampled into this DB with other settings; pass --restart to replace "
            "its samples, or use another --db"
        )
    return None


def _saved_state(con: duckdb.DuckDBPyConnection, path: Optional[Path], dict_id: int, name: str, key: str,
                 contexts: DbContexts | ParquetContexts, resume: bool, device: torch.device) -> Optional[SampleState]:
    """The checkpoint to continue from, if any, after deleting contexts rows written past it.

    Without resume, first retires this dictionary's earlier samples (--restart).
    """
    state = None
    if not resume:
        with store.transaction(con):
            con.execute("UPDATE runs SET status = 'replaced' WHERE list_contains(?, id)",
                        [[rid for rid, _ in done_runs(con, dict_id)]])
            con.execute("DELETE FROM examples WHERE dict_id = ?", [dict_id])
            con.execute("DELETE FROM latents WHERE dict_id = ?", [dict_id])
    if path is not None and path.exists() and resume:
        state = load_state(path, device)
        if state.meta.get("config_key") != key:
            raise ExplainerError(
                f"an unfinished sample run of dictionary {name!r} used other settings (state {path}); rerun with "
                "the same settings to continue it, or pass --restart to start over"
            )
        if contexts.count_below(state.meta["next_context"]) != int(state.n_contexts.sum()):
            state = None  # the DB lost rows the state counts (e.g. the DB file was replaced): start over
    # Rows past the checkpoint were committed after it, by the run that was killed.
    contexts.delete_from(state.meta["next_context"] if state is not None else 0)
    return state


def run(con: duckdb.DuckDBPyConnection, settings: Settings, sae_path: Path | str, *, lm: Any = None,
        dict_name: Optional[str] = None, resume: bool = True, progress: Optional[Progress] = None) -> SampleResult:
    """Sample this dictionary's examples into the DB; resumes a killed run, no-op when done.

    resume=False (--restart) discards this dictionary's earlier samples and any checkpoint.
    """
    from explainer.lm import load_model
    from explainer.sae import fingerprint, hub_id, load_dictionary, resolve_dictionary

    t0 = time.perf_counter()
    ss, T = settings.sample, settings.corpus.ctx_len
    shard = parse_shard(ss.shard)
    shard_text = f"{shard[0]}/{shard[1]}"
    if ss.n_reservoir < ss.n_quantile:
        raise ExplainerError(f"sample.n_reservoir={ss.n_reservoir} is below n_quantile={ss.n_quantile}; raise it")
    hub = hub_id(sae_path)
    sae_path = resolve_dictionary(sae_path)
    sae = load_dictionary(sae_path, max_active=ss.max_active)
    lm = lm if lm is not None else load_model(settings.model)
    warnings = check_dictionary(sae, lm, ss)
    subset = latent_subset(ss.latents, sae.d_sae)  # bad input fails before anything is written
    sae = sae.to(lm.device).eval()
    fp = fingerprint(sae)
    name = dict_name or ("/".join(hub).strip("/") if hub else sae_path.resolve().name)
    dict_id = store.register_dictionary(
        con, name=name, path="/".join(hub).strip("/") if hub else str(sae_path.resolve()), model=lm.name, hook=lm.hook, d_in=sae.d_in,
        d_sae=sae.d_sae, k=sae.k, fingerprint=fp, config=sae.cfg)
    # Tokens the dictionary was trained without (outliers.py) are left out of its statistics and
    # examples: its codes there are extrapolations, often 5-100x the activations it was trained on,
    # which would fill the top examples of the latents that happen to fire on them.
    rule = OutlierRule.from_cfg(sae.cfg)
    key, cfg = _config(settings, lm, fp, sae.activation == "topk", rule)

    prev = _previous(con, dict_id, name, key, shard_text, resume)
    if prev is not None:
        return SampleResult(dict_id, name, shard_text, prev["complete"], True, prev["n_contexts"], prev["n_tokens"],
                            prev.get("dead_latents"), prev.get("median_frequency"), db_bytes(con), 0.0,
                            time.perf_counter() - t0, prev.get("state_path"), warnings, prev.get("n_outlier_tokens"))
    limit = math.ceil(ss.tokens / T)
    if limit > M31:  # context ids share an int64 with a 31-bit hash in the sketches
        raise ExplainerError(f"sample.tokens={ss.tokens:,} is over 2^31 contexts of {T} tokens; lower --tokens")
    check_fits(sae, ss, T, subset, lm.device)
    docs = load_documents(settings.corpus)
    dropped: dict[str, int] = {}
    counts, notes = _plan(settings, lm.tokenizer, docs, limit, ss, dropped)  # bad input fails before any delete
    warnings += notes
    db_file = _db_file(con)
    dict_row = con.execute(f"SELECT {', '.join(DICT_FIELDS)} FROM dictionaries WHERE id = ?", [dict_id]).fetchone()
    contexts = sink(con, dict_id, shard, ss.parquet, dict(zip(DICT_FIELDS, dict_row)))
    if isinstance(contexts, ParquetContexts):
        spath: Optional[Path] = contexts.state_path
    else:
        spath = state_path(db_file, fp, shard) if db_file is not None else None
    state = _saved_state(con, spath, dict_id, name, key, contexts, resume, lm.device)
    total = len(range(shard[0], min(limit, sum(counts.values())), shard[1])) * T
    if state is None:
        meta = {"config_key": key, "config": cfg, "n_shards": shard[1], "shards": [shard[0]], "next_context": 0,
                "complete": False, **({"latents": subset.tolist()} if subset is not None else {})}
        state = new_state(d_sae=sae.d_sae if subset is None else len(subset) + 1, ctx_len=T, k=sae.k,
                          n_top=ss.n_top, n_reservoir=ss.n_reservoir, n_pool=max(ss.nonactivating_pool, ss.n_random),
                          n_zero=ss.n_nonactivating, acts_dtype=getattr(torch, ss.acts_dtype), device=lm.device,
                          meta=meta)
    ids = latent_ids(state, lm.device)
    # Dictionary latent -> state row; latents outside the subset go to the sink row with value 0.
    row_of = None
    if subset is not None:
        row_of = torch.full((sae.d_sae,), len(subset), dtype=torch.long, device=lm.device)
        row_of[subset.to(lm.device)] = torch.arange(len(subset), device=lm.device)
    run_id = store.start_run(con, "sample", settings.public_dict())
    pending = _Pending(contexts, lm.token_strings)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    start = state.meta["next_context"]
    done_before = int(state.n_contexts.sum())
    t_loop = time.perf_counter()

    def checkpoint() -> None:
        with store.transaction(con):
            pending.write()
        if spath is not None:  # after the commit: see the module docstring
            save_state(state, spath)

    def process(batch: list[Context]) -> None:
        acts = lm.activations(torch.tensor([c.token_ids for c in batch], dtype=torch.long))
        vals, idx = sae.encode(acts)
        if rule is not None:
            outlier = rule.mask(acts)
            vals = vals.masked_fill(outlier[..., None].to(vals.device), 0)
            state.meta["n_outlier_tokens"] = state.meta.get("n_outlier_tokens", 0) + int(outlier.sum())
            state.meta["outlier_positions"] = add_histograms(state.meta.get("outlier_positions", {}),
                                                             position_histogram(outlier))
        split = torch.tensor([split_index[c.split] for c in batch], device=vals.device)
        cids = torch.tensor([c.context_id for c in batch], device=vals.device)
        idx = idx.long()
        if row_of is not None:
            idx = row_of[idx]
            vals = vals.masked_fill(idx == state.d_sae - 1, 0)
        with one_thread(vals.device):
            peak = float(update(state, split, cids, vals.float(), idx, ids).max())
        if ss.acts_dtype == "float16" and peak > FLOAT16_MAX:
            raise ExplainerError(f"latent activations reach {peak:.4g}, beyond float16; "
                                 "rerun with --acts-dtype float32 --restart")
        state.meta["next_context"] = batch[-1].context_id + 1
        pending.rows.extend(batch)
        if progress is not None:
            done = int(state.n_contexts.sum()) - done_before
            progress({"tokens": (done + done_before) * T, "total": total,
                      "tok_s": round(done * T / max(time.perf_counter() - t_loop, 1e-9))})

    try:
        with torch.inference_mode():
            batch: list[Context] = []
            n_batches = 0
            for c in iter_contexts(settings.corpus, lm.tokenizer, splits=SPLITS, start=start, shard=shard, documents=docs,
                                   stop=limit):
                if c.context_id >= limit:
                    break
                batch.append(c)
                if len(batch) == settings.model.batch_size:
                    process(batch)
                    batch = []
                    n_batches += 1
                    if n_batches % ss.checkpoint_every == 0:
                        checkpoint()
            if batch:
                process(batch)
            state.meta["complete"] = True
            result = {"dict_id": dict_id, "dict_name": name, "config_key": key, "shard": shard_text,
                      "n_contexts": summary_counts(state), "n_tokens": int(state.n_tokens.sum()),
                      **({"n_outlier_tokens": state.meta.get("n_outlier_tokens", 0),
                          "outlier_positions": state.meta.get("outlier_positions", {})} if rule is not None else {}),
                      "near_duplicates_dropped": dropped,
                      "tokens_per_s": (int(state.n_contexts.sum()) - done_before) * T / (time.perf_counter() - t_loop)}
            if shard[1] == 1:
                with store.transaction(con):
                    pending.write()
                    result.update(write_results(con, dict_id, state, ss, [contexts.relation()]), complete=True)
                    contexts.finish()
                    store.finish_run(con, run_id, "done", result)
                if spath is not None and spath.exists():
                    spath.unlink()
            else:  # a lone shard: `merge` writes latents and examples from all shards' states
                checkpoint()
                result.update(complete=False, state_path=str(spath), dead_latents=None, median_frequency=None,
                              parquet=str(Path(ss.parquet).resolve()) if ss.parquet else None)
                store.finish_run(con, run_id, "done", result)
    except BaseException as e:
        try:
            store.finish_run(con, run_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        except duckdb.Error:
            pass
        raise
    return SampleResult(dict_id, name, shard_text, result["complete"], False, result["n_contexts"],
                        result["n_tokens"], result["dead_latents"], result["median_frequency"], db_bytes(con),
                        result["tokens_per_s"], time.perf_counter() - t0, result.get("state_path"), warnings,
                        result.get("n_outlier_tokens"))
