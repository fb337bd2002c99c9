"""Latent-sharded training on CPU (gloo): per-rank memory, step time and communication per step.

    PYTHONPATH=$PWD python bench/shard.py                       # d=576, n = 65k and 262k, R = 1, 2, 4
    PYTHONPATH=$PWD python bench/shard.py --latents 1048576     # only if it fits (skips with a reason)

R = 1 is the ordinary single-process Trainer (what `explainer train` runs without torchrun);
R > 1 runs R fresh processes (spawned, so each one's peak RSS is its own) joined by gloo, each
holding n/R latents. Per rank it prints: the bytes of its dictionary state (weights, gradients,
Adam m and v: 16 bytes per parameter in fp32), its peak RSS (ru_maxrss, which also counts torch
itself, ~0.3 GB), the fastest step of `--steps` after one warm-up, and the bytes its collectives
moved per step (after the warm-up), counted on the tensors handed to them (the all-gather counts what this rank
receives). The machine has 2 cores that other processes share: R ranks split 2 cores, so the
step time of R > 1 shows the work per rank plus communication, not the speed-up R devices give.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from explainer.sae.distributed import Dist, Grid, make_grid
from explainer.sae.model import TopKSAE
from explainer.sae.sharded import ShardedTrainer, init_shard
from explainer.sae.step import Trainer
from explainer.settings import TrainSettings

GB = 1e9


class Counted(Grid):
    """A Grid that adds up the bytes each collective moves."""

    moved: dict[str, int]

    def all_gather_latent(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.moved["all_gather"] += t.numel() * t.element_size() * (self.shards - 1)
        return super().all_gather_latent(t)

    def all_reduce_latent(self, t: torch.Tensor) -> torch.Tensor:
        self.moved["all_reduce"] += t.numel() * t.element_size() if self.shards > 1 else 0
        return super().all_reduce_latent(t)


def _settings(n: int, k: int, offer: float) -> TrainSettings:
    # dead_tokens below one batch: every latent not fired in a step is dead, so AuxK (and its gather) runs every step.
    return TrainSettings(n_latents=n, k=k, dead_tokens=1, auxk_offer=offer)


def _batch(batch: int, d: int) -> torch.Tensor:
    return torch.randn(batch, d, generator=torch.Generator().manual_seed(1)) + 1.0


def _time(trainer: Trainer, x: torch.Tensor, steps: int, moved: dict[str, int]) -> float:
    trainer.step(x)  # warm-up: allocations, the workspace (and no dead latent yet, so no AuxK)
    moved.update(dict.fromkeys(moved, 0))  # count the steady state only
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(x)
        best = min(best, time.perf_counter() - start)
    return best


def _rank(rank: int, world: int, a: dict[str, Any], out: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    d, n, k = a["d"], a["n"], a["k"]
    x = _batch(a["batch"], d)
    if world == 1:
        sae = TopKSAE(d, n, k)
        sae.init_tied(torch.Generator().manual_seed(0))
        trainer: Trainer = Trainer(sae, _settings(n, k, a["offer"]))
        moved: dict[str, int] = {}
    else:
        g = make_grid(Dist(rank, world), world)
        grid = Counted(g.dist, g.shards, g.latent_group, g.data_group)
        grid.moved = moved = {"all_gather": 0, "all_reduce": 0}
        sae = init_shard(d, n, k, grid, torch.Generator().manual_seed(0), "cpu")
        trainer = ShardedTrainer(sae, _settings(n, k, a["offer"]), grid)
    seconds = _time(trainer, x, a["steps"], moved)
    steps = a["steps"]
    params = sum(p.numel() for p in sae.parameters())
    row = {"rank": rank, "R": world, "n": n, "latents_here": sae.d_sae, "state_gb": 16 * params / GB,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, "step_s": seconds,
           **{f"{key}_mb_per_step": v / steps / 1e6 for key, v in moved.items()},
           "aux_again": getattr(trainer, "aux_rows_again", 0) / max(getattr(trainer, "aux_rows", 0), 1)}
    Path(f"{out}.rank{rank}").write_text(json.dumps(row))
    if world > 1:
        torch.distributed.destroy_process_group()


def _estimate_gb(d: int, n: int, batch: int) -> float:
    """The whole grid's peak, roughly: 16 B/param of state + 2 buffers of pre-activations + 0.4 GB per process."""
    return (16 * 2 * d * n + 2 * 4 * batch * n) / GB + 0.4


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--latents", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=256, help="tokens per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--margin", type=float, default=0.8,
                   help="run a row only if its estimated memory is below this fraction of what is available")
    p.add_argument("--auxk-offer", type=float, default=2.0, help="train.auxk_offer (0: every shard sends all k_aux)")
    a = p.parse_args()
    print(f"d={a.d} k={a.k} k_aux={a.d // 2} batch={a.batch} tokens, fp32, gloo on {os.cpu_count()} CPU cores; "
          f"step = fastest of {a.steps}; auxk_offer {a.auxk_offer:g}")
    print("   n    R  latents/rank  state GB/rank  peak RSS GB/rank  step s  all-gather MB/step  all-reduce MB/step"
          "  AuxK rows regathered")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.latents:
            for r in a.shards:
                need, free = _estimate_gb(a.d, n, a.batch) + 0.4 * (r - 1), _available_gb()
                if need > a.margin * free:
                    print(f"{n:>8} {r:>2}  skipped: needs ~{need:.1f} GB, {free:.1f} GB available")
                    continue
                out = f"{tmp}/n{n}r{r}"
                cfg = {"d": a.d, "n": n, "k": a.k, "batch": a.batch, "steps": a.steps, "offer": a.auxk_offer}
                mp.start_processes(_rank, args=(r, cfg, out), nprocs=r, join=True, start_method="spawn")
                rows = [json.loads(Path(f"{out}.rank{i}").read_text()) for i in range(r)]
                worst = max(rows, key=lambda row: row["peak_rss_gb"])
                print(f"{n:>8} {r:>2}  {worst['latents_here']:>12,}  {worst['state_gb']:>13.3f}  "
                      f"{worst['peak_rss_gb']:>16.2f}  {max(row['step_s'] for row in rows):>6.2f}  "
                      f"{worst.get('all_gather_mb_per_step', 0):>18.3f}  {worst.get('all_reduce_mb_per_step', 0):>18.3f}"
                      f"  {worst['aux_again']:>19.1%}")


if __name__ == "__main__":
    main()
