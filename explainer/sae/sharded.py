"""Latent-sharded training: the dictionary split by latent over R ranks (`train.latent_shards`).

Each rank of a latent group holds W_enc[:, o:o+n/R], b_enc, W_dec rows, their Adam state and
dead-latent counters for its n/R latents; b_pre (b_dec) is replicated. A step:
  1. encode the group's rows against the local latents and take the local top-k (and the local
     top-k_aux over local dead latents); the global top-k lies within the union of these;
  2. all-gather the candidate values over the latent group (a candidate's global id is implied by
     its (shard, slot), which every rank knows for its own), take the global top-k: exact, no capacity;
  3. each rank decodes the winners it owns; the partial reconstructions are summed (all-reduce);
  4. the loss, normalised by the global batch variance, is then the same number on every rank of
     the group, so backward gives each shard its own gradients; b_dec's gradient from the encoder
     is spread over the shards and summed over the whole world, its direct one counted on shard 0.
With D data replicas (world = D x R) the shards' gradients are also summed over the data group.
The update equals one process's on the same global batch up to summation order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.sae.distributed import Grid, check_latent_shards
from explainer.sae.model import TopKSAE, init_rows, layer_norm
from explainer.sae.sparse import sparse_decode, sparse_forward
from explainer.sae.step import Trainer, _sum_sq, default_lr
from explainer.settings import TrainSettings


def check_shardable(ts: TrainSettings, world: int) -> None:
    """Refuse a grid the step cannot run, before anything is loaded."""
    r = ts.latent_shards
    check_latent_shards(r, world, "train")
    if r == 1:
        return
    if ts.n_latents % r or ts.k >= ts.n_latents // r:
        raise ExplainerError(f"--latent-shards {r} must divide --n-latents {ts.n_latents} into shards wider than "
                             f"--k {ts.k}; choose another --latent-shards")
    if ts.multi_topk or ts.decoder == "dense":
        raise ExplainerError("--latent-shards runs the sparse TopK step only; drop --multi-topk and --decoder dense")


def init_shard(d_in: int, n_latents: int, k: int, grid: Grid, generator: torch.Generator, device: Any,
               cfg: Optional[dict] = None) -> TopKSAE:
    """This shard's slice of TopKSAE.init_tied's dictionary, drawing only its own rows (model.init_rows)."""
    width = n_latents // grid.shards
    start = grid.shard * width
    sae = TopKSAE(d_in, width, k, device=device, cfg=cfg)
    rows = init_rows(generator, start, start + width, d_in).to(sae.device)
    with torch.no_grad():
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.zero_()
    return sae


class ShardedTrainer(Trainer):
    """Trainer over one latent shard; `grid` says which and carries the two groups' collectives."""

    def __init__(self, sae: TopKSAE, settings: TrainSettings, grid: Grid):
        super().__init__(sae, settings, all_reduce=grid.all_reduce_data, rank=grid.data_rank, world=grid.data_world)
        self.grid = grid
        self.n_latents = sae.d_sae * grid.shards
        self.lr = settings.lr or default_lr(self.n_latents)  # the whole width's rate, not the shard's
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.global_topk = True  # False only in the tests' mutation: each shard keeps its own top k
        self.aux_rows = self.aux_rows_again = 0  # AuxK rows offered first, and those then gathered in full
        self.aux_again = True  # False only in the tests' mutation: rows a shard may hold more winners of stay as offered

    def _decode(self, values: Tensor, indices: Tensor, k: int, offer: int = 0) -> tuple[Tensor, Tensor]:
        """(the group's summed decoding, this shard's winners mask) of the global top-k among the candidates.

        `offer` > 0: each shard offers that many candidates first (Grid.winners_offered; exact)."""
        g = self.grid
        if self.global_topk and offer:
            mine, offered, again = g.winners_offered(values, k, offer, self.aux_again)
            self.aux_rows += offered
            self.aux_rows_again += again
        elif self.global_topk:
            mine = g.winners(values, k)[1]
        else:
            mine = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
            mine[:, :k] = True
        part = sparse_decode(values * mine, indices, self.sae.W_dec)
        # The other shards' decodings as constants: d loss / d part is then the full gradient.
        total = g.all_reduce_latent(part.detach())
        return part + (total - part.detach()), mine

    def step(self, x: Tensor) -> dict[str, float]:
        sae, s, g = self.sae, self.settings, self.grid
        n_global = x.shape[0]
        total_var = _sum_sq(x, x.mean(0))
        if self.world > 1:
            x = x[self.rank :: self.world]
        dead = self.dead_mask().nonzero().flatten() if s.auxk_coef > 0 else None
        # Every shard's dead count: AuxK runs if any latent is dead, and each shard offers only as many
        # candidates as the shard with the most dead latents has (few are dead, most of the time).
        counts = [int(c[0]) for c in g.all_gather_latent(g.counts([len(dead) if dead is not None else 0]))]
        n_dead, width = sum(counts), min(self.k_aux, max(counts))
        f = sparse_forward(x, sae.W_enc, sae.b_enc, None, sae.b_dec, sae.k, dead=dead, k_aux=self.k_aux,
                           mm_dtype=self.mm_dtype, workspace=sae.workspace)
        part, mine = self._decode(f.values, f.indices, sae.k)
        x_hat = part + (sae.b_dec if g.shard == 0 else sae.b_dec.detach())
        fvu = _sum_sq(x_hat, x) / total_var
        loss = fvu
        auxk = torch.zeros((), device=x.device)
        if n_dead > 0 and self.k_aux > 0:
            # Pad to `width` candidates per shard (value -1 never wins: at least min(k_aux, n_dead) real ones are >= 0).
            pad = width - f.aux_values.shape[1]
            aux_v = torch.cat([f.aux_values, f.aux_values.new_full((len(x), pad), -1.0)], dim=1)
            aux_i = torch.cat([f.aux_indices, f.aux_indices.new_zeros(len(x), pad)], dim=1)
            k_aux = min(self.k_aux, n_dead)
            offer = math.ceil(s.auxk_offer * k_aux / g.shards) if s.auxk_offer > 0 else 0
            aux_hat, _ = self._decode(aux_v, aux_i, k_aux, offer)
            if g.shard == 0:
                aux_hat = aux_hat + sae.b_dec - sae.b_dec.detach()  # b_dec on the path, as in Trainer
            resid = (x - x_hat).detach()
            sums = self.all_reduce(torch.cat([resid.sum(0), (resid * resid).sum().view(1)]))
            resid_var = sums[-1] - (sums[:-1] * sums[:-1]).sum() / n_global
            auxk = torch.nan_to_num(_sum_sq(aux_hat, resid) / resid_var, nan=0.0, posinf=0.0)
            loss = loss + s.auxk_coef * auxk
        self.opt.zero_grad(set_to_none=True)
        sae.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in sae.named_parameters():
            if p.grad is not None:
                p.grad = g.all_reduce_world(p.grad) if name == "b_dec" else self.all_reduce(p.grad)
        sae.remove_gradient_parallel_to_decoder_directions()
        if sae.W_enc.grad is not None:
            self._enc_rows.grad = sae.W_enc.grad.t().contiguous()
        self.opt.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = self.all_reduce(torch.bincount(f.indices[mine & (f.values > 0)], minlength=sae.d_sae))
            self.since_fired += n_global
            self.since_fired[fired > 0] = 0
            self.fire_counts += fired
        self.steps += 1
        self.tokens += n_global
        parts = self.all_reduce(torch.stack([loss.detach(), fvu.detach(), auxk.detach()]))
        loss_v, fvu_v, aux_v = parts.tolist()
        dead_v = float(g.all_reduce_latent(self.dead_mask().sum().view(1))[0]) / self.n_latents
        return {"loss": loss_v, "fvu": fvu_v, "auxk": aux_v, "dead": dead_v}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shard": self.grid.shard, "shards": self.grid.shards}

    def gather_latent(self, t: Tensor) -> Tensor:
        """A per-latent vector [n/R] of every shard, concatenated [n] (small: counters, not weights)."""
        return torch.cat(self.grid.all_gather_latent(t))


class GroupDictionary:
    """The whole dictionary as one latent shard sees it, for held-out evaluation of a sharded run.

    Every rank of the latent group calls `encode_decode` on the same rows together and gets what
    a whole TopKSAE would return: the k winning values with their dictionary ids, and x_hat (each
    shard decodes its own winners; the parts are summed). No rank holds more than its shard."""

    def __init__(self, part: TopKSAE, grid: Grid) -> None:
        self.part, self.grid = part, grid
        self.d_in, self.k, self.d_sae = part.d_in, part.k, part.d_sae * grid.shards
        self.device, self.cfg = part.device, part.cfg

    @property
    def normalize(self) -> str:
        return self.part.normalize

    @normalize.setter
    def normalize(self, value: str) -> None:
        self.part.normalize = value

    @torch.no_grad()
    def encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p, g, k, w = self.part, self.grid, self.k, self.part.d_sae
        flat = x.reshape(-1, self.d_in).to(p.W_dec.dtype)
        z, mu, std = layer_norm(flat) if p.normalize == "layer_norm" else (flat, None, None)
        f = sparse_forward(z, p.W_enc, p.b_enc, None, p.b_dec, k)
        every, mine = g.winners(f.values, k)
        ids = torch.cat(g.all_gather_latent((f.indices + g.shard * w).contiguous()), dim=1)
        top = every.topk(k, dim=1)
        x_hat = g.all_reduce_latent(sparse_decode(f.values * mine, f.indices, p.W_dec)) + p.b_dec
        if mu is not None and std is not None:
            x_hat = x_hat * std + mu
        lead = x.shape[:-1]
        return (top.values.view(*lead, k), ids.gather(1, top.indices).view(*lead, k),
                x_hat.view(*lead, self.d_in).to(x.dtype))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.encode_decode(x)[2]


# --- checkpoints and the exported dictionary, shard by shard ------------------------------------


def shard_checkpoint(path: Path, grid: Grid) -> Path:
    """Shard 0 keeps the usual checkpoint name (what `_check_out` looks for); shard r > 0 its own."""
    return path if grid.shard == 0 else path.with_name(f"{path.stem}.shard{grid.shard}of{grid.shards}{path.suffix}")


def load_shard_state(path: Path, grid: Grid, state0: dict[str, Any]) -> dict[str, Any]:
    """This shard's checkpoint; refuses shards that stopped at different steps (a kill between their writes)."""
    state = state0 if grid.shard == 0 else _load(shard_checkpoint(path, grid))
    steps = grid.counts([int(state["trainer"]["steps"])])
    every = [int(t[0]) for t in grid.all_gather_latent(steps)]
    if len(set(every)) > 1 or state["trainer"].get("shards", grid.shards) != grid.shards:
        raise ExplainerError(f"the checkpoint shards in {path.parent} stopped at steps {every} (a kill between "
                             "their writes); delete that folder to start over")
    return state


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a missing, truncated or garbled file
        raise ExplainerError(f"checkpoint shard {path} is unreadable ({type(e).__name__}); delete {path.parent} "
                             "to start over") from None


def _layout(d_in: int, n: int) -> tuple[dict[str, Any], int]:
    """The safetensors header of the whole dictionary (SAELens names and shapes) and its data start."""
    shapes = {"W_dec": [n, d_in], "W_enc": [d_in, n], "b_dec": [d_in], "b_enc": [n]}
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return {"text": text, "tensors": header, "size": offset}, 8 + len(text)


def write_weights(path: Path, sae: TopKSAE, grid: Grid) -> None:
    """One sae_weights.safetensors of the whole dictionary, each shard writing only its own bytes.

    Rank 0 writes the header and sizes the file; then the ranks of the first data replica each
    write their slice: W_dec rows and b_enc as one run, W_enc's columns as one run per input row.
    `sae` is this shard, already folded. The ranks must share the file system (one node, or NFS)."""
    d_in, width = sae.d_in, sae.d_sae
    layout, start = _layout(d_in, width * grid.shards)
    if grid.dist.main:
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(layout["text"])) + layout["text"])
            fh.truncate(start + layout["size"])
    grid.dist.barrier()
    if grid.data_rank == 0:
        o, n = grid.shard * width, width * grid.shards
        at = {name: start + t["data_offsets"][0] for name, t in layout["tensors"].items()}
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, _bytes(sae.W_dec), at["W_dec"] + 4 * o * d_in)
            os.pwrite(fd, _bytes(sae.b_enc), at["b_enc"] + 4 * o)
            if grid.shard == 0:
                os.pwrite(fd, _bytes(sae.b_dec), at["b_dec"])
            enc = sae.W_enc.detach().float().cpu().contiguous()  # [d_in, width], row-major
            for i in range(d_in):
                os.pwrite(fd, enc[i].numpy().tobytes(), at["W_enc"] + 4 * (i * n + o))
            os.fsync(fd)
        finally:
            os.close(fd)
    grid.dist.barrier()


def _bytes(t: Tensor) -> bytes:
    return t.detach().float().cpu().contiguous().numpy().tobytes()
