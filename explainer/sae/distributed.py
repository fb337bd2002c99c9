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

import torch
from torch import Tensor


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
