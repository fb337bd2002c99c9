"""`explainer sample` under torchrun: every rank samples its share of the contexts, rank 0 merges.

Rank r of W runs exactly `sample --shard r/W` (the same streaming state, checkpoints and
resume) into its own DB file beside the target, `NAME.rankRofW.duckdb`, because a DuckDB file
has one writer process. With `--parquet DIR` the contexts rows go to the shared folder instead.
After every rank has finished (a collective: a rank that failed makes all of them stop with
an error, none waits forever), rank 0 merges the shard outputs into the target DB with the
same exact merge as `explainer merge`. The shard files stay: a rerun finds every shard
complete and only merges again; delete them once the merged DB is what you want.

With `--latent-shards R` the world is D data replicas x R latent shards: rank d*R + r samples
context shard d/D against latent slice r only (wide.py), and rank 0 merges each slice over the
replicas, then writes the slices side by side (merge.combine_slices).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from explainer.errors import ExplainerError
from explainer.sae.distributed import Dist, Grid, make_grid, setup
from explainer.sample.merge import combine_slices, merge
from explainer.sample.sampler import Progress, SampleResult
from explainer.sample.sampler import run as sample_run
from explainer.sample.wide import check_settings, is_off_step
from explainer.settings import Settings
from explainer.store import db as store


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0 (or no torchrun): the one process that draws progress and prints results."""
    return os.environ.get("RANK", "0") == "0"


def rank_db(db: Path, rank: int, world: int) -> Path:
    """The DB file rank `rank` of `world` samples into."""
    return db.with_name(f"{db.stem}.rank{rank}of{world}{db.suffix or '.duckdb'}")


def run(settings: Settings, sae_path: Path | str, *, dict_name: Optional[str] = None, resume: bool = True,
        progress: Optional[Progress] = None) -> SampleResult:
    """Sample this rank's share of the contexts; on rank 0, then merge every rank's share into settings.db."""
    if settings.sample.shard != "0/1":
        raise ExplainerError(f"--shard {settings.sample.shard} and torchrun both split the contexts; "
                             "drop --shard when running under torchrun (each rank takes rank/world)")
    dist, device = setup(settings.model.device)
    check_settings(settings.sample, dist.world)
    grid = make_grid(dist, settings.sample.latent_shards)
    s = settings.model_copy(deep=True)
    s.model.device = device
    s.sample.shard = f"{grid.data_rank}/{grid.data_world}"
    if grid.shards > 1:  # both need every latent on one rank: see wide.py
        s.sample.cooccurrence_max_latents, s.sample.lens = 0, False
    target = Path(settings.db)
    mine = rank_db(target, dist.rank, dist.world)
    error: Optional[BaseException] = None
    res: Optional[SampleResult] = None
    try:
        with store.connect(mine) as con:
            res = sample_run(con, s, sae_path, dict_name=dict_name, resume=resume,
                             progress=progress if dist.main else None, grid=grid)
    except Exception as e:  # reported after the collective so the other ranks do not wait forever
        if is_off_step(e):  # the latent group waits in another gather: leave now (wide.off_step)
            raise
        error = e
    _all_ok(dist, error, torch.device(device))
    if not dist.main:
        assert res is not None
        return res
    if grid.shards > 1:
        return _combine_slices(target, grid, dict_name)
    outputs = [Path(s.sample.parquet)] if s.sample.parquet else [rank_db(target, r, dist.world) for r in range(dist.world)]
    with store.connect(target) as con:
        return merge(con, outputs, dict_name=dict_name)


def _combine_slices(target: Path, grid: Grid, dict_name: Optional[str]) -> SampleResult:
    """Rank 0: merge each latent slice over the data replicas (a slice DB), then combine the slices."""
    R, D, world = grid.shards, grid.data_world, grid.dist.world
    if D == 1:
        slices = [rank_db(target, r, world) for r in range(R)]
    else:
        slices = [target.with_name(f"{target.stem}.slice{r}of{R}{target.suffix or '.duckdb'}") for r in range(R)]
        for r, path in enumerate(slices):
            with store.connect(path) as con:
                merge(con, [rank_db(target, d * R + r, world) for d in range(D)], dict_name=dict_name)
    with store.connect(target) as con:
        return combine_slices(con, slices, dict_name=dict_name)


def _all_ok(dist: Dist, error: Optional[BaseException], device: torch.device) -> None:
    """Raise on every rank if any rank failed (its own error where it has one)."""
    # On the rank's own device: NCCL reduces only CUDA tensors, gloo only CPU ones.
    flag = torch.tensor([0 if error is not None else 1], dtype=torch.int64, device=device)
    if dist.active:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    if error is not None:
        raise error
    if int(flag.item()) == 0:
        raise ExplainerError(f"another rank failed to sample its share (this is rank {dist.rank} of {dist.world}); "
                             "see its error above, fix it and rerun: finished shards are kept")
