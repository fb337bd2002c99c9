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

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import duckdb
import torch

from explainer import embed
from explainer.corpus.contexts import Context, iter_contexts, load_documents
from explainer.errors import ExplainerError
from explainer.results import StageResult
from explainer.sae.distributed import Grid
from explainer.sae.outliers import OutlierRule, add_histograms, position_histogram
from explainer.sample.latent_map import LatentMap
from explainer.sample.runs import (
    db_bytes,
    db_file,
    done_runs,
    parse_shard,
    previous_result,
    run_config,
    state_path,
    summary_counts,
)
from explainer.sample.select import write_results
from explainer.sample.sink import DICT_FIELDS, DbContexts, ParquetContexts, Pending, sink
from explainer.sample.state import M31, SampleState, load_state, new_state, one_thread, save_state, update
from explainer.sample.subset import adopt_hook, check_dictionary, check_fits, latent_subset, plan_contexts
from explainer.sample.wide import check_settings, group_ok, group_peak, in_step, keep_subset, load_shard, off_step, same_start
from explainer.settings import Settings
from explainer.store import db as store
from explainer.vocab import SPLITS

Progress = Callable[[dict[str, Any]], None]
FLOAT16_MAX = 65504.0


@dataclass
class SampleResult(StageResult):
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

    @classmethod
    def from_record(cls, con: duckdb.DuckDBPyConnection, record: dict[str, Any], *, dict_id: int, dict_name: str,
                    shard: str, already_complete: bool, warnings: list[str], t0: float) -> SampleResult:
        """The result of a sample (or merge) run from what its runs row records (`record`)."""
        return cls(dict_id=dict_id, dict_name=dict_name, shard=shard, complete=record["complete"],
                   already_complete=already_complete, n_contexts=record["n_contexts"], n_tokens=record["n_tokens"],
                   dead_latents=record.get("dead_latents"), median_frequency=record.get("median_frequency"),
                   db_bytes=db_bytes(con), tokens_per_s=0.0 if already_complete else record["tokens_per_s"],
                   wall_s=time.perf_counter() - t0, state_path=record.get("state_path"), warnings=warnings,
                   n_outlier_tokens=record.get("n_outlier_tokens"))


# --- run -------------------------------------------------------------------------------------


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
            for table in ("latent_histograms", "latent_neighbours", "latent_logits"):  # fixed names
                con.execute(f"DELETE FROM {table} WHERE dict_id = ?", [dict_id])
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


@dataclass
class _Job:
    """What one sample run works with, fixed before any row is written."""
    settings: Settings
    lm: Any
    sae: Any
    rule: Optional[OutlierRule]       # tokens the dictionary was trained without (outliers.py)
    latents: LatentMap                # dictionary latents <-> state rows (sample.latents)
    dict_id: int
    name: str
    fingerprint: str
    key: str                          # config_key: a state or finished run counts only if it matches
    cfg: dict[str, Any]
    shard: tuple[int, int]
    warnings: list[str]

    @property
    def shard_text(self) -> str:
        return f"{self.shard[0]}/{self.shard[1]}"

    def result(self, con: duckdb.DuckDBPyConnection, res: dict[str, Any], t0: float, already: bool) -> SampleResult:
        """The SampleResult of a run's result row (this run's, or an earlier identical run's)."""
        return SampleResult.from_record(con, res, dict_id=self.dict_id, dict_name=self.name, shard=self.shard_text,
                                        already_complete=already, warnings=self.warnings, t0=t0)


def _open(con: duckdb.DuckDBPyConnection, settings: Settings, sae_path: Path | str, lm: Any,
          dict_name: Optional[str], grid: Optional[Grid] = None) -> _Job:
    """Load and check the dictionary against the model and settings, and register it.

    With a latent-sharded `grid` the job keeps only this rank's slice of the encoder (wide.py)."""
    from explainer.lm import load_model
    from explainer.sae.files import hub_id, resolve_dictionary
    from explainer.sae.formats import fingerprint, load_dictionary

    ss = settings.sample
    shard = parse_shard(ss.shard)
    if ss.latent_shards > 1:
        check_settings(ss, grid.dist.world if grid is not None else 1)
    if ss.n_reservoir < ss.n_quantile:
        raise ExplainerError(f"sample.n_reservoir={ss.n_reservoir} is below n_quantile={ss.n_quantile}; raise it")
    hub = hub_id(sae_path)
    sae_path = resolve_dictionary(sae_path)
    sae: Any
    if grid is not None and grid.shards > 1:  # this rank's slice only (wide.py)
        sae, sliced, fp = load_shard(sae_path, grid, ss.max_active)
    else:
        sae, sliced, fp = load_dictionary(sae_path, max_active=ss.max_active), None, None
    adopted: list[str] = []
    if lm is None:
        settings, adopted = adopt_hook(settings, sae.cfg)
        lm = load_model(settings.model)
    warnings = adopted + check_dictionary(sae, lm, ss)
    subset = latent_subset(ss.latents, sae.d_sae)  # bad input fails before any write
    latents = keep_subset(sliced, subset) if sliced is not None else LatentMap.keep(subset, sae.d_sae)
    sae = sae.to(lm.device).eval()
    fp = fp or fingerprint(sae)
    name = dict_name or ("/".join(hub).strip("/") if hub else sae_path.resolve().name)
    dict_id = store.register_dictionary(
        con, name=name, path="/".join(hub).strip("/") if hub else str(sae_path.resolve()), model=lm.name, hook=lm.hook,
        d_in=sae.d_in, d_sae=sae.d_sae, k=sae.k, fingerprint=fp, config=sae.cfg)
    # Tokens the dictionary was trained without (outliers.py) are left out of its statistics and
    # examples: its codes there are extrapolations, often 5-100x the activations it was trained on,
    # which would fill the top examples of the latents that happen to fire on them.
    rule = OutlierRule.from_cfg(sae.cfg)
    key, cfg = run_config(settings, lm, fp, sae.activation == "topk", rule)
    return _Job(settings, lm, sae, rule, latents, dict_id, name, fp, key, cfg, shard, warnings)


@dataclass
class _Stream:
    """The pass over this shard's contexts: folds each batch into the state and checkpoints."""
    con: duckdb.DuckDBPyConnection
    job: _Job
    docs: Any
    limit: int                        # contexts of all shards together
    total: int                        # tokens of this shard (for progress)
    dropped: dict[str, int]           # near-duplicates of train contexts left out, per split
    contexts: DbContexts | ParquetContexts
    spath: Optional[Path]             # the state file (None: an in-memory DB keeps none)
    state: SampleState
    pending: Pending
    ids: torch.Tensor                 # the global latent id of each state row, on the model's device
    done_before: int = 0              # contexts a resumed state had already counted
    t_loop: float = 0.0

    def checkpoint(self) -> None:
        error: Optional[BaseException] = None
        try:
            with store.transaction(self.con):
                self.pending.write()
            if self.spath is not None:  # after the commit: see the module docstring
                save_state(self.state, self.spath)
        except Exception as e:  # e.g. a full disk on one rank: every latent shard must hear of it
            error = e
        group_ok(self.job.sae, error)

    def run(self, progress: Optional[Progress]) -> None:
        """Every batch from the state's position on; the state is complete afterwards."""
        settings, ss = self.job.settings, self.job.settings.sample
        self.done_before, self.t_loop = int(self.state.n_contexts.sum()), time.perf_counter()
        batch: list[Context] = []
        n_batches = 0
        for c in iter_contexts(settings.corpus, self.job.lm.tokenizer, splits=SPLITS,
                               start=self.state.meta["next_context"], shard=self.job.shard, documents=self.docs,
                               stop=self.limit):
            if c.context_id >= self.limit:
                break
            batch.append(c)
            if len(batch) == settings.model.batch_size:
                self.process(batch, progress)
                batch = []
                n_batches += 1
                if n_batches % ss.checkpoint_every == 0:
                    self.checkpoint()
        if batch:
            self.process(batch, progress)
        self.state.meta["complete"] = True

    def codes(self, batch: list[Context]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's dictionary codes as (values, state rows); outlier tokens and the sink row are zero."""
        job, state = self.job, self.state
        acts = job.lm.activations(torch.tensor([c.token_ids for c in batch], dtype=torch.long))
        vals, idx = job.sae.encode(acts)
        if job.rule is not None:
            outlier = job.rule.mask(acts)
            vals = vals.masked_fill(outlier[..., None].to(vals.device), 0)
            state.meta["n_outlier_tokens"] = state.meta.get("n_outlier_tokens", 0) + int(outlier.sum())
            state.meta["outlier_positions"] = add_histograms(state.meta.get("outlier_positions", {}),
                                                             position_histogram(outlier))
        return job.latents.to_rows(vals, idx)

    def process(self, batch: list[Context], progress: Optional[Progress]) -> None:
        state, T = self.state, self.job.settings.corpus.ctx_len
        vals, idx = self.codes(batch)
        split = torch.tensor([SPLITS.index(c.split) for c in batch], device=vals.device)
        cids = torch.tensor([c.context_id for c in batch], device=vals.device)
        with one_thread(vals.device):
            peak = float(update(state, split, cids, vals.float(), idx, self.ids).max())
        if self.job.settings.sample.acts_dtype == "float16" and group_peak(self.job.sae, peak) > FLOAT16_MAX:
            raise in_step(ExplainerError(f"latent activations reach {peak:.4g}, beyond float16; "
                                         "rerun with --acts-dtype float32 --restart"))
        state.meta["next_context"] = batch[-1].context_id + 1
        self.pending.rows.extend(batch)
        if progress is not None:
            done = int(state.n_contexts.sum()) - self.done_before
            progress({"tokens": (done + self.done_before) * T, "total": self.total,
                      "tok_s": round(done * T / max(time.perf_counter() - self.t_loop, 1e-9))})


def _prepare(con: duckdb.DuckDBPyConnection, job: _Job, resume: bool) -> _Stream:
    """Plan the contexts, open where their rows go and the state to continue (or a new one).

    Bad input fails here before any delete; then rows past a saved state are deleted."""
    settings, ss, T, lm = job.settings, job.settings.sample, job.settings.corpus.ctx_len, job.lm
    limit = math.ceil(ss.tokens / T)
    if limit > M31:  # context ids share an int64 with a 31-bit hash in the sketches
        raise ExplainerError(f"sample.tokens={ss.tokens:,} is over 2^31 contexts of {T} tokens; lower --tokens")
    check_fits(job.sae, ss, T, job.latents, lm.device)
    docs = load_documents(settings.corpus)
    dropped: dict[str, int] = {}
    counts, notes = plan_contexts(settings, lm.tokenizer, docs, limit, ss, dropped)
    job.warnings += notes
    db_path = db_file(con)
    dict_row = store.one_row(con.execute(f"SELECT {', '.join(DICT_FIELDS)} FROM dictionaries WHERE id = ?", [job.dict_id]))
    contexts = sink(con, job.dict_id, job.shard, ss.parquet, dict(zip(DICT_FIELDS, dict_row)))
    if isinstance(contexts, ParquetContexts):
        spath: Optional[Path] = contexts.state_path
    else:
        spath = state_path(db_path, job.fingerprint, job.shard) if db_path is not None else None
    state = _saved_state(con, spath, job.dict_id, job.name, job.key, contexts, resume, lm.device)
    if state is None:
        state = _new_state(job)
    total = len(range(job.shard[0], min(limit, sum(counts.values())), job.shard[1])) * T
    return _Stream(con, job, docs, limit, total, dropped, contexts, spath, state, Pending(contexts, lm.token_strings),
                   job.latents.hash_ids(lm.device))


def _new_state(job: _Job) -> SampleState:
    ss = job.settings.sample
    meta = {"config_key": job.key, "config": job.cfg, "n_shards": job.shard[1], "shards": [job.shard[0]],
            "next_context": 0, "complete": False, **job.latents.meta()}
    return new_state(d_sae=job.latents.n_rows, ctx_len=job.settings.corpus.ctx_len,
                     k=job.sae.k, n_top=ss.n_top, n_reservoir=ss.n_reservoir,
                     n_pool=max(ss.nonactivating_pool, ss.n_random), n_zero=ss.n_nonactivating,
                     acts_dtype=getattr(torch, ss.acts_dtype), device=job.lm.device, meta=meta,
                     cooc_cap=ss.cooccurrence_max_latents)


def _finish(con: duckdb.DuckDBPyConnection, stream: _Stream, run_id: int) -> dict[str, Any]:
    """Record the finished pass: latents and examples for a whole run, the final state for a lone shard."""
    job, state, ss, T = stream.job, stream.state, stream.job.settings.sample, stream.job.settings.corpus.ctx_len
    result = {"dict_id": job.dict_id, "dict_name": job.name, "config_key": job.key, "config": job.cfg,
              "shard": job.shard_text,
              "n_contexts": summary_counts(state), "n_tokens": int(state.n_tokens.sum()),
              **({"n_outlier_tokens": state.meta.get("n_outlier_tokens", 0),
                  "outlier_positions": state.meta.get("outlier_positions", {})} if job.rule is not None else {}),
              "near_duplicates_dropped": stream.dropped,
              "tokens_per_s": (int(state.n_contexts.sum()) - stream.done_before) * T / (time.perf_counter() - stream.t_loop)}
    if job.shard[1] == 1:
        result.update(_lens(con, job))
        with store.transaction(con):
            stream.pending.write()
            result.update(write_results(con, job.dict_id, state, ss, [stream.contexts.relation()]), complete=True)
            stream.contexts.finish()
            store.finish_run(con, run_id, "done", result)
        if stream.spath is not None and stream.spath.exists():
            stream.spath.unlink()
    else:  # a lone shard: `merge` writes latents and examples from all shards' states
        stream.checkpoint()
        result.update(complete=False, state_path=str(stream.spath), dead_latents=None, median_frequency=None,
                      parquet=str(Path(ss.parquet).resolve()) if ss.parquet else None)
        store.finish_run(con, run_id, "done", result)
    return result


def _lens(con: duckdb.DuckDBPyConnection, job: _Job) -> dict[str, Any]:
    """Logit lens and decoder neighbours of the kept latents, unless turned off. A model the lens
    cannot read is a warning here, not a failed run: the samples are worth keeping."""
    from explainer.sample.outputs import write_lens

    if not job.settings.sample.lens:
        return {"logit_lens": "off (sample.lens)", "decoder_neighbours": "off (sample.lens)"}
    try:
        return write_lens(con, job.dict_id, hook=job.lm.hook, model=getattr(job.lm, "model", None),
                          W_dec=job.sae.W_dec.detach(),
                          latent_ids=None if job.latents.ids is None else job.latents.latents(),
                          token_strings=job.lm.token_strings)
    except ExplainerError as e:
        job.warnings.append(f"logit lens and neighbours not written: {e}")
        return {"logit_lens": f"failed: {e}", "decoder_neighbours": f"failed: {e}"}


def run(con: duckdb.DuckDBPyConnection, settings: Settings, sae_path: Path | str, *, lm: Any = None,
        dict_name: Optional[str] = None, resume: bool = True, progress: Optional[Progress] = None,
        grid: Optional[Grid] = None) -> SampleResult:
    """Sample this dictionary's examples into the DB; resumes a killed run, no-op when done.

    resume=False (--restart) discards this dictionary's earlier samples and any checkpoint.
    `grid`: under torchrun with sample.latent_shards > 1, which latent slice this rank keeps.
    """
    t0 = time.perf_counter()
    stream, error, prev = None, None, None
    try:  # a latent shard that fails to start must still meet the others in same_start
        job = _open(con, settings, sae_path, lm, dict_name, grid)
        prev = previous_result(con, job.dict_id, job.name, job.key, job.shard_text, resume, job.cfg)
        if prev is None:
            if settings.sample.hard_negatives == "embedding":
                embed.model_dir()  # a missing encoder fails now, not after the whole corpus went through
            stream = _prepare(con, job, resume)
    except Exception as e:
        error = e
    if grid is not None and grid.shards > 1:  # the latent group must encode the same batches together
        same_start(grid, error, -1 if stream is None else int(stream.state.meta["next_context"]))
    if error is not None:
        raise error
    if prev is not None:
        return job.result(con, prev, t0, already=True)
    assert stream is not None  # _prepare ran, or its error was raised above
    run_id = store.start_run(con, "sample", settings.public_dict())
    try:
        with torch.inference_mode():
            try:
                stream.run(progress)
            except Exception as e:
                off_step(job.sae, e)
                raise
            result = _finish(con, stream, run_id)
    except BaseException as e:
        try:
            store.finish_run(con, run_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        except duckdb.Error:
            pass
        raise
    return job.result(con, result, t0, already=False)
