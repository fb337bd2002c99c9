"""`explainer train`: a TopK SAE trained on the fly on a subject model's residual stream.

The recipe of Gao et al. 2024: inputs scaled to mean norm sqrt(d_in), b_pre initialised at the
geometric median, tied encoder/decoder init, unit-norm decoder rows with the parallel gradient
component removed, Adam (eps 6.25e-10, lr ~ 1/sqrt(latents)), AuxK on dead latents, optional
Multi-TopK. `Trainer` (train_step.py) is the SAE step alone (tested and benchmarked on
synthetic tensors); `run` here streams activations from the LM into it, checkpoints,
evaluates and saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.results import StageResult
from explainer.sae.distributed import Grid, make_grid
from explainer.sae.files import recover_folder
from explainer.sae.formats import log10_frequency, save_dictionary
from explainer.sae.model import TopKSAE, layer_norm
from explainer.sae.outliers import OutlierRule, position_histogram
from explainer.sae.run_files import CHECKPOINT, METRICS, _check_finite, _check_out, _locked, _save_checkpoint
from explainer.sae.sharded import (
    GroupDictionary,
    ShardedTrainer,
    check_shardable,
    init_shard,
    load_shard_state,
    shard_checkpoint,
    write_weights,
)
from explainer.sae.step import Trainer, geometric_median
from explainer.settings import Settings, TrainSettings
from explainer.settings_load import config_changes

Progress = Callable[[dict[str, Any]], None]


# --- data ---------------------------------------------------------------------------------------


class ContextStream:
    """Train-split contexts in corpus order, epoch after epoch, resumable at (epoch, next_id)."""

    def __init__(self, settings: Settings, tokenizer: Any, documents: Iterable[tuple[str, str]], epoch: int = 0,
                 next_id: int = 0):
        self.settings, self.tokenizer, self.documents = settings, tokenizer, documents
        self.epoch, self.next_id = epoch, next_id
        self._it: Optional[Iterator] = None

    def _open(self) -> Iterator:
        from explainer.corpus.contexts import iter_contexts

        return iter_contexts(self.settings.corpus, self.tokenizer, splits=("train",), start=self.next_id,
                             documents=self.documents)

    def take(self, n: int) -> Tensor:
        rows: list[list[int]] = []
        while len(rows) < n:
            if self._it is None:
                self._it = self._open()
            ctx = next(self._it, None)
            if ctx is None:
                if self.next_id == 0:  # a whole pass from the first context found nothing
                    raise ExplainerError(
                        f"corpus {self.settings.corpus.source!r} yields no train-split context of "
                        f"{self.settings.corpus.ctx_len} tokens; pass a larger --corpus or a smaller --ctx-len"
                    )
                self.epoch, self.next_id, self._it = self.epoch + 1, 0, None
                continue
            rows.append(ctx.token_ids)
            self.next_id = ctx.context_id + 1
        return torch.tensor(rows, dtype=torch.long)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_id": self.next_id}


def _activations(lm: Any, ids: Tensor, batch_size: int) -> Tensor:
    parts = [lm.activations(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    return torch.cat(parts).reshape(-1, lm.d_model)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class TrainResult(StageResult):
    out: Path
    metrics: dict[str, Any]
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed: bool

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "out": str(self.out)}

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "steps": self.steps, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 1), **self.metrics}


def _run_identity(settings: Settings) -> dict[str, Any]:
    """Settings a resumed run must share with the checkpoint (token count and eval may change)."""
    train = settings.train.model_dump(mode="json")
    for key in ("out", "tokens", "eval_tokens", "ce_tokens", "checkpoint_every", "auxk_offer"):
        train.pop(key)
    model = settings.model.model_dump(mode="json")
    model.pop("batch_size")
    model.pop("device")
    if not model["hook"]:
        model.pop("hook")  # runs checkpointed before --hook existed resume unchanged
    return {"model": model, "corpus": settings.corpus.model_dump(mode="json"), "train": train}


def run(settings: Settings, progress: Optional[Progress] = None, resume: bool = False) -> TrainResult:
    """Train, evaluate and save a dictionary to settings.train.out; resumable with resume=True."""
    ts = settings.train
    if ts.k >= ts.n_latents:
        raise ExplainerError(f"k={ts.k} must be below the number of latents ({ts.n_latents}); lower --k or raise --n-latents")
    from explainer.sae.distributed import setup

    out = Path(ts.out)
    dist, device = setup(settings.model.device)
    check_shardable(ts, dist.world)
    if dist.active:
        settings = settings.model_copy(deep=True)
        settings.model.device = device
        if not dist.main:
            progress = None  # one progress bar, rank 0's
    with _locked(out) if dist.main else contextlib.nullcontext():
        if dist.main:
            recover_folder(out)  # a save killed between its two renames
        return _run(settings, progress or (lambda _info: None), resume, out, dist)


@dataclass
class _Run:
    """What the training loop carries besides the trainer, all of it saved in the checkpoint."""
    trainer: Trainer
    scale: float
    rule: OutlierRule
    outlier_positions: Tensor  # [ctx_len] outlier tokens left out of training, by position
    grid: Optional[Grid] = None  # latent-sharded runs only

    @property
    def writes_checkpoint(self) -> bool:
        """Rank 0 saves the checkpoint; in a sharded run the first data replica saves one per shard."""
        return self.grid.data_rank == 0 if self.grid is not None else self.trainer.rank == 0

    def save(self, out: Path, identity: dict, position: dict, meta: dict) -> None:
        if self.writes_checkpoint:
            name = shard_checkpoint(CHECKPOINT, self.grid) if self.grid is not None else CHECKPOINT
            _save_checkpoint(out, self.trainer, identity, self.scale, position, meta, _outlier_state(self), name)


def _prepare(x: Tensor, ts: TrainSettings, scale: float) -> Tensor:
    """Raw activations -> what the SAE trains on: optionally LayerNorm'ed, times the norm scale."""
    return (layer_norm(x)[0] if ts.normalize == "layernorm" else x) * scale


def _start(settings: Settings, lm: Any, documents: Iterable[tuple[str, str]], meta: dict, dist: Any,
           state: Optional[dict]) -> tuple[_Run, dict]:
    """A fresh run (b_pre init on a sample) or the checkpoint's; returns it and the stream position."""
    ts, ctx_len = settings.train, settings.corpus.ctx_len
    grid = make_grid(dist, ts.latent_shards) if ts.latent_shards > 1 else None
    init = torch.Generator().manual_seed(ts.seed)
    if grid is not None:  # the shard alone is ever built
        sae = init_shard(lm.d_model, ts.n_latents, ts.k, grid, init, lm.device, meta)
    else:
        sae = TopKSAE(lm.d_model, ts.n_latents, ts.k, device=lm.device, cfg=meta)
    if state is not None:
        if grid is not None:
            state = load_shard_state(Path(ts.out) / CHECKPOINT, grid, state)
        trainer = _trainer(sae, ts, dist, grid)
        trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["rng"])
        o = state["outliers"]
        rule = OutlierRule(float(o["factor"]), float(o["median_norm"]))
        return _Run(trainer, float(state["scale"]), rule, o["positions"].clone(), grid), dict(state["position"])
    sample_stream = ContextStream(settings, lm.tokenizer, documents)
    ids = sample_stream.take(math.ceil(ts.median_samples / ctx_len))
    sample = _activations(lm, ids, settings.model.batch_size)[: ts.median_samples]
    rule = OutlierRule.measure(ts.outlier_factor, sample.cpu())
    sample = _prepare(sample[~rule.mask(sample)], ts, 1.0)  # the init describes the tokens trained on
    scale = math.sqrt(lm.d_model) / float(sample.norm(dim=1).mean().clamp_min(1e-12))
    if grid is None:
        sae.init_tied(init)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    trainer = _trainer(sae, ts, dist, grid)
    return _Run(trainer, scale, rule, torch.zeros(ctx_len, dtype=torch.long), grid), {"epoch": 0, "next_id": 0}


def _trainer(sae: TopKSAE, ts: TrainSettings, dist: Any, grid: Optional[Grid]) -> Trainer:
    if grid is not None:
        return ShardedTrainer(sae, ts, grid)
    return Trainer(sae, ts, all_reduce=dist.all_reduce, rank=dist.rank, world=dist.world)


def _block(settings: Settings, lm: Any, ids: Tensor, dist: Any, r: _Run, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """A shuffle block's training inputs, their outlier flags and their positions in their contexts."""
    ts, ctx_len = settings.train, settings.corpus.ctx_len
    if dist.active:
        mine = _activations(lm, dist.shard(ids), settings.model.batch_size).reshape(-1, ctx_len, lm.d_model)
        acts = dist.gather_rows(mine, len(ids)).reshape(-1, lm.d_model)
    else:
        acts = _activations(lm, ids, settings.model.batch_size)
    outlier = r.rule.mask(acts)
    acts = _prepare(acts, ts, r.scale)
    perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed((ts.seed % 2**31) * 2**32 + block))
    return acts[perm.to(acts.device)], outlier[perm.to(outlier.device)].cpu(), perm % ctx_len


def _outlier_state(r: _Run) -> dict[str, Any]:
    return {"factor": r.rule.factor, "median_norm": r.rule.median_norm, "positions": r.outlier_positions}


def _run(settings: Settings, report: Progress, resume: bool, out: Path, dist: Any) -> TrainResult:
    ts = settings.train
    state = _check_out(out, resume)
    dist.barrier()  # every rank has looked at --out before rank 0 writes into it
    identity = _run_identity(settings)
    ctx_len = settings.corpus.ctx_len
    ctx_per_step = max(1, round(ts.batch_tokens / ctx_len))
    step_tokens = ctx_per_step * ctx_len
    total_steps = max(1, ts.tokens // step_tokens)
    if state is not None:
        if state.get("identity") != json.dumps(identity, sort_keys=True):
            diff = config_changes(json.loads(state.get("identity") or "{}"), identity)
            raise ExplainerError(f"{out} holds a run with other settings ({'; '.join(diff) or 'unknown'}); "
                                 "resume with the same settings or choose another --out")
        done = int(state["trainer"]["steps"])
        if done >= total_steps and (out / METRICS).is_file() and (out / "cfg.json").is_file():
            metrics = json.loads((out / METRICS).read_text())
            return TrainResult(out, metrics, done, int(state["trainer"]["tokens"]), 0.0,
                               float(metrics.get("tokens_per_s", 0.0)), True)

    from explainer.corpus.contexts import load_documents
    from explainer.lm import load_model
    from explainer.sae.sizing import check_train_fits

    report({"stage": "loading model"})
    lm = load_model(settings.model)
    check_train_fits(ts, ctx_len, lm.d_model, torch.device(lm.device))  # before any dictionary tensor exists
    documents = load_documents(settings.corpus)
    # hook_name in SAELens' (TransformerLens) naming where it has one, so SAELens hooks the same
    # point; `hook` in ours (hooks.py), which is what explainer reads back.
    point = lm.hook_point
    meta = {"model_name": settings.model.name, "hook_name": point.saelens_name or lm.hook, "hook": lm.hook,
            "hook_layer": lm.layer, "context_size": ctx_len}
    if state is None:
        report({"stage": "b_pre init"})
    r, position = _start(settings, lm, documents, meta, dist, state)
    trainer = r.trainer
    if state is None:
        r.save(out, identity, position, meta)

    stream = ContextStream(settings, lm.tokenizer, documents, **position)
    spb = ts.shuffle_steps
    started, tokens_before, stats = time.perf_counter(), trainer.tokens, {}
    while trainer.steps < total_steps:
        block = trainer.steps // spb
        # The last block is cut to the steps left, so no activations are computed in vain.
        block_steps = min(spb, total_steps - block * spb)
        block_start = stream.position
        acts, outlier, where = _block(settings, lm, stream.take(ctx_per_step * block_steps), dist, r, block)
        for j in range(trainer.steps - block * spb, block_steps):
            rows = slice(j * step_tokens, (j + 1) * step_tokens)
            keep = ~outlier[rows]
            # Outliers leave the batch before the step, so they weigh neither the loss nor its variance normaliser.
            r.outlier_positions += torch.bincount(where[rows][~keep], minlength=ctx_len)
            if bool(keep.any()):
                stats = trainer.step(acts[rows][keep.to(acts.device)])
                if not math.isfinite(stats["loss"]):
                    _check_finite(trainer, stats["loss"])
            else:
                trainer.steps += 1
            if trainer.steps % ts.checkpoint_every == 0 or trainer.steps == total_steps:
                # Mid-block checkpoints point at the block's start: resuming recomputes the block and skips ahead.
                r.save(out, identity, stream.position if trainer.steps % spb == 0 else block_start, meta)
            elapsed = time.perf_counter() - started
            report({"stage": "train", "tokens": trainer.steps * step_tokens, "total": total_steps * step_tokens,
                    **stats, "tok_s": (trainer.tokens - tokens_before) / max(elapsed, 1e-9)})
    seconds = time.perf_counter() - started
    tok_s = (trainer.tokens - tokens_before) / max(seconds, 1e-9)
    _check_finite(trainer)
    shards = _write_shards(out, r) if r.grid is not None else None
    if dist.main:
        metrics = _finish(settings, lm, documents, r, out, seconds, tok_s, stats, dist.world, report, shards)
    else:
        if shards is not None and r.grid is not None and r.grid.data_rank == 0:
            _evaluate(settings, lm, documents, r, shards)  # rank 0's latent group evaluates together
        metrics = {"rank": dist.rank, "tokens_per_s": round(tok_s, 1)}
    dist.barrier()  # rank 0 evaluates and writes; the others wait for it
    return TrainResult(out, metrics, trainer.steps, trainer.tokens, seconds, tok_s, state is not None)


def _finish(settings: Settings, lm: Any, documents: Iterable[tuple[str, str]], r: _Run, out: Path, seconds: float, tok_s: float,
            stats: dict, world: int, report: Progress, shards: Optional[_Shards] = None) -> dict[str, Any]:
    """Evaluate the folded dictionary on held-out tokens and save it with its metrics, in one rename.

    A sharded run's weights are already in the file `shards` names, with the fire counts of every
    latent; rank 0's latent group evaluates it shard by shard, and `raw` only describes it."""
    ts, trainer = settings.train, r.trainer
    if shards is None:
        raw = r.trainer.sae.folded(r.scale)
    else:
        raw = TopKSAE(shards.part.d_in, ts.n_latents, ts.k, device="meta", cfg=shards.part.cfg)
    raw.normalize = "layer_norm" if ts.normalize == "layernorm" else "none"
    raw.cfg.update(r.rule.cfg())
    report({"stage": "eval"})
    metrics, eval_counts, eval_tokens = _evaluate(settings, lm, documents, r, shards, raw)
    train_outliers = position_histogram(r.outlier_positions[None])
    metrics.update({
        "dead_fraction": float(trainer.dead_mask().float().mean()), "train_tokens": trainer.tokens,
        "train_outlier_tokens": int(r.outlier_positions.sum()), "train_outlier_positions": train_outliers,
        "steps": trainer.steps, "final_train_fvu": stats.get("fvu"), "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tok_s, 1), "activation_scale": r.scale, "lr": trainer.lr, "world_size": world,
        "normalize": ts.normalize, "outlier_rule": r.rule.cfg(), "latent_shards": ts.latent_shards,
    })
    metrics.setdefault("computed_on", {})["train_tokens, final_train_fvu, dead_fraction"] = (
        "train split, ordinary tokens only (outlier tokens are left out of every training batch)")
    if isinstance(trainer, ShardedTrainer) and trainer.aux_rows:
        metrics["auxk_rows_regathered"] = trainer.aux_rows_again / trainer.aux_rows
        metrics["computed_on"]["auxk_rows_regathered"] = (
            f"rank 0's AuxK rows since this process started ({trainer.aux_rows} offered first, train.auxk_offer "
            f"{ts.auxk_offer:g}): the fraction some shard could hold more winners of, gathered again in full")
    counts, n = (eval_counts, eval_tokens) if eval_tokens else (
        trainer.fire_counts if shards is None else shards.fire_counts, trainer.tokens)
    cfg = {"activation_scale_folded": r.scale, "trained_tokens": trainer.tokens, "corpus": settings.corpus.source,
           "sparsity_source": "heldout" if eval_tokens else "train", "seed": ts.seed,
           "train_outlier_tokens": int(r.outlier_positions.sum()), "train_outlier_positions": train_outliers,
           "eval_outlier_tokens": metrics.get("n_outlier_tokens"),
           "eval_outlier_positions": metrics.get("outlier_positions", {})}
    save_dictionary(raw, out, sparsity=log10_frequency(counts.cpu(), n), cfg=cfg,
                    extra={METRICS: json.dumps(metrics, indent=2) + "\n"}, weights_from=shards and shards.path)
    return metrics


class _Shards(NamedTuple):
    """A sharded run's end: the whole dictionary's weights file, every latent's fire count, this folded shard."""
    path: Path
    fire_counts: Tensor
    part: TopKSAE


def _write_shards(out: Path, r: _Run) -> _Shards:
    """Every rank: the whole folded dictionary's weights file, written shard by shard, and all fire counts."""
    assert r.grid is not None and isinstance(r.trainer, ShardedTrainer)
    path = out.parent / f".{out.name}.sharded-weights"
    part = r.trainer.sae.folded(r.scale)
    write_weights(path, part, r.grid)
    return _Shards(path, r.trainer.gather_latent(r.trainer.fire_counts), part)


def _evaluate(settings: Settings, lm: Any, documents: Iterable[tuple[str, str]], r: _Run, shards: Optional[_Shards],
              raw: Optional[TopKSAE] = None) -> tuple[dict[str, Any], Tensor, int]:
    """Held-out metrics of the folded dictionary `raw`, or of a sharded run's shards: then every
    rank of rank 0's latent group calls this on the same contexts (GroupDictionary), no rank
    holding more than its shard; rank 0 keeps the result."""
    from explainer.sae.evaluate import evaluate

    sae: Any = raw
    if shards is not None:
        assert r.grid is not None
        sae = GroupDictionary(shards.part, r.grid)
        sae.normalize = "layer_norm" if settings.train.normalize == "layernorm" else "none"
    return evaluate(lm, sae, settings, documents, r.rule)
