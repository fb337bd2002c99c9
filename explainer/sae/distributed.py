"""Data-parallel training under torchrun: one process per GPU (NCCL) or per CPU worker (gloo).

Every rank reads the same context stream and computes the activations of its share of each
block of contexts; the shares are gathered so all ranks hold the same global block and shuffle
it identically. Each step a rank encodes its rows of the global batch, normalises its loss by
the *global* batch variance and sums gradients with the others, so the update equals the one a
single process would take on the same global batch (up to summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from explainer.errors import ExplainerError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: Tensor) -> Tensor:
        if not self.active:
            return t
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's rows: every world-th row, starting at its rank."""
        return rows[self.rank :: self.world] if self.active else rows

    def gather_rows(self, mine: Tensor, n_total: int) -> Tensor:
        """Undo `shard`: gather every rank's rows [n_r, ...] back into corpus order [n_total, ...]."""
        if not self.active:
            return mine
        per = -(-n_total // self.world)
        padded = torch.zeros((per, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        out = torch.empty((n_total, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        for r, part in enumerate(parts):
            n_r = len(range(r, n_total, self.world))
            out[r :: self.world] = part[:n_r]
        return out


def setup(device_spec: str) -> tuple[Dist, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return the rank's device spec."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device_spec
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    if use_cuda:
        device_spec = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    return Dist(rank, world, local), device_spec if use_cuda else "cpu"


@dataclass
class Grid:
    """The world as data replicas x latent shards (world = D x R); a rank is data * R + shard.

    A latent group (consecutive ranks, one node on GPU machines) holds one copy of the dictionary
    split by latent and sees the same rows; a data group holds the same shard on different rows.
    Without a process group, or with R = 1, every collective over a trivial group is the identity.
    """

    dist: Dist
    shards: int = 1
    latent_group: Any = None
    data_group: Any = None

    @property
    def shard(self) -> int:
        return self.dist.rank % self.shards

    @property
    def data_rank(self) -> int:
        return self.dist.rank // self.shards

    @property
    def data_world(self) -> int:
        return self.dist.world // self.shards

    def all_reduce_data(self, t: Tensor) -> Tensor:
        return _all_reduce(t, self.data_group, self.data_world)

    def all_reduce_latent(self, t: Tensor) -> Tensor:
        return _all_reduce(t, self.latent_group, self.shards)

    def all_reduce_world(self, t: Tensor) -> Tensor:
        return self.dist.all_reduce(t)

    def counts(self, values: list[int]) -> Tensor:
        """Small integers as a tensor the backend can carry (NCCL takes CUDA tensors only)."""
        nccl = self.dist.active and torch.distributed.get_backend() == "nccl"
        return torch.tensor(values, device=f"cuda:{self.dist.local_rank}" if nccl else "cpu")

    def all_gather_latent(self, t: Tensor) -> list[Tensor]:
        """Every shard's tensor of t's shape, in shard order."""
        if self.shards == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.shards)]
        torch.distributed.all_gather(parts, t.contiguous(), group=self.latent_group)
        return parts

    def winners(self, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(every shard's candidate values [N, R*w] in shard order, the mask [N, w] of this shard's
        candidates among the group's top k of them). Exact: the global top k lies within the union
        of the local ones. Only values travel; a candidate's latent is implied by its (shard, slot)."""
        w = values.shape[1]
        every = torch.cat(self.all_gather_latent(values.detach().contiguous()), dim=1)
        won = torch.zeros(every.shape, dtype=torch.bool, device=every.device)
        won.scatter_(1, every.topk(k, dim=1, sorted=False).indices, True)
        return every, won[:, self.shard * w : (self.shard + 1) * w]

    def winners_offered(self, values: Tensor, k: int, offer: int, again: bool = True) -> tuple[Tensor, int, int]:
        """`winners(values, k)[1]` exactly, moving fewer values: each shard first offers only its best
        `offer` candidates per row. The k-th best offered value t bounds the true k-th from below, so
        a shard whose (offer+1)-th candidate beats t may hold more winners: only those rows (agreed
        on by an all-reduce of one flag per row) are then gathered in full.
        Returns (this shard's winners mask [N, w], rows offered first, rows then gathered in full);
        with `offer` too large to save anything, or too small to hold k, all rows go in full at once."""
        n, w = values.shape
        if offer >= w or offer * self.shards < k:
            return self.winners(values, k)[1], 0, 0
        top, order = values.detach().topk(offer + 1, dim=1)  # sorted: best first
        offered = torch.cat(self.all_gather_latent(top[:, :offer].contiguous()), dim=1)  # [N, R * offer]
        best = offered.topk(k, dim=1)
        flags = self.all_reduce_latent((top[:, offer] > best.values[:, -1]).to(torch.int32)) > 0
        won = torch.zeros(offered.shape, dtype=torch.bool, device=values.device)
        won.scatter_(1, best.indices, True)
        mine = torch.zeros(n, w, dtype=torch.bool, device=values.device)
        mine.scatter_(1, order[:, :offer], won[:, self.shard * offer : (self.shard + 1) * offer])
        rows = flags.nonzero().flatten()
        if len(rows) and again:  # `again` is False only in the tests' mutation
            mine[rows] = self.winners(values[rows], k)[1]
        return mine, n, len(rows)


def _all_reduce(t: Tensor, group: Any, size: int) -> Tensor:
    if size == 1:
        return t
    out = t.clone()
    torch.distributed.all_reduce(out, group=group)
    return out


def make_grid(dist: Dist, shards: int) -> Grid:
    """Split the world into latent groups of `shards` consecutive ranks and the matching data groups.

    Every rank creates every group, in the same order, as torch.distributed.new_group requires."""
    if shards == 1 or not dist.active:
        return Grid(dist, shards)
    replicas = dist.world // shards
    latent = data = None
    for d in range(replicas):
        g = torch.distributed.new_group(list(range(d * shards, (d + 1) * shards)))
        latent = g if dist.rank // shards == d else latent
    for r in range(shards):
        g = torch.distributed.new_group(list(range(r, dist.world, shards)))
        data = g if dist.rank % shards == r else data
    return Grid(dist, shards, latent, data)


def check_latent_shards(shards: int, world: int, verb: str) -> None:
    """Refuse `--latent-shards` outside torchrun or with a world it does not divide (train and sample)."""
    if shards == 1:
        return
    if world == 1:
        raise ExplainerError(f"--latent-shards {shards} splits the dictionary's latents over torchrun processes; "
                             f"launch with `torchrun --nproc-per-node {shards} -m explainer {verb} ...` "
                             "or drop --latent-shards")
    if world % shards:
        raise ExplainerError(f"--latent-shards {shards} does not divide the {world} torchrun processes; "
                             f"launch a multiple of {shards} processes (--nproc-per-node)")
