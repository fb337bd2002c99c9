"""`sample --latent-shards R` under torchrun: the encode split by latent, as latent-sharded training does.

The torchrun world is a grid of D data replicas x R latent shards (sae/distributed.py's Grid).
Every rank of a latent group runs the model over the same contexts (its data replica's share),
encodes them against its n/R latents only, takes the local top-k, gathers the candidate values
over the group and keeps those of its own candidates that are in the global top-k: exactly the
codes of the whole dictionary restricted to its latents, since the global top-k lies within the
union of the local ones. Its sampler state holds only its latents (a LatentMap over its slice,
as a `--latents` subset would), so the state, the largest thing a sample run holds, falls ~1/R.

What a rank's state shares across latents (token and context counts, the random and
non-activating pool's keys) depends only on the contexts and is the same on every rank; the
pool's codes are its own latents', which is all a latent's examples read. The dictionary's input
transform (layer_norm) and outlier rule act on the model's activations, identical on every rank.

Each rank writes its own DB; rank 0 then combines them (merge.combine_slices): the contexts
once, and the latents, examples and histogram rows of every slice (disjoint latents).
Co-occurrence neighbours and the logit lens need every latent on one rank: they are skipped,
with the reason in the run's record (`explainer lens` computes the lens from the dictionary file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.sae.distributed import Grid, check_latent_shards
from explainer.sae.formats import fingerprint, load_dictionary
from explainer.sae.model import TopKSAE, layer_norm
from explainer.sae.slices import read_topk_slice, topk_dims
from explainer.sae.sparse import sparse_forward
from explainer.sample.latent_map import LatentMap
from explainer.settings import SampleSettings


def check_settings(ss: SampleSettings, world: int) -> None:
    """Refuse what a latent-sharded sample cannot run, before anything is loaded."""
    r = ss.latent_shards
    check_latent_shards(r, world, "sample")
    if r == 1:
        return
    if ss.parquet:
        raise ExplainerError("--parquet with --latent-shards: every latent shard would write the same contexts "
                             "into the folder; drop --parquet (the contexts go to each rank's DB)")


def _check_width(d_sae: int, k: int, r: int) -> None:
    if d_sae % r or k >= d_sae // r:
        raise ExplainerError(f"--latent-shards {r} must divide the dictionary's {d_sae} latents into slices "
                             f"wider than its k={k}; choose another --latent-shards")


def load_shard(folder: Path, grid: Grid, max_active: int) -> tuple[ShardEncoder, LatentMap, str]:
    """This rank's slice of the dictionary in `folder`, its LatentMap and the whole dictionary's fingerprint.

    A SAELens TopK folder is read slice by slice (sae/slices.py); other formats load whole first."""
    dims = topk_dims(folder)
    if dims is not None:
        d_sae, k = dims[1], dims[2]
        _check_width(d_sae, k, grid.shards)
        width = d_sae // grid.shards
        got = read_topk_slice(folder, grid.shard * width, width)
        if got is not None:
            part, fp = got
            start = grid.shard * width
            return ShardEncoder(part, grid, start, d_sae), LatentMap(width + 1, range(start, start + width)), fp
    sae = load_dictionary(folder, max_active=max_active)
    fp = fingerprint(sae)
    encoder, latents = shard_encoder(sae, grid)
    return encoder, latents, fp


def keep_subset(sliced: LatentMap, subset: Optional[Tensor]) -> LatentMap:
    """The rows of a slice's state under `--latents`: the subset's ids inside the slice (maybe none:
    the rank still encodes its slice, since the group's top-k needs every latent's candidates)."""
    if subset is None or sliced.ids is None:
        return sliced
    lo, hi = sliced.ids[0], sliced.ids[-1]
    kept = subset[(subset >= lo) & (subset <= hi)]
    return LatentMap(len(kept) + 1, kept.tolist())


def shard_encoder(sae: TopKSAE, grid: Grid) -> tuple[ShardEncoder, LatentMap]:
    """This rank's slice of `sae` (the rest is dropped) and the LatentMap of its state rows."""
    r = grid.shards
    if sae.activation != "topk":
        raise ExplainerError(f"--latent-shards supports TopK dictionaries; this one is {sae.activation}, whose "
                             "latents need no global top-k: sample it without --latent-shards (or with --latents "
                             "subsets, one run per subset)")
    _check_width(sae.d_sae, sae.k, r)
    width = sae.d_sae // r
    start = grid.shard * width
    part = TopKSAE(sae.d_in, width, sae.k, device=sae.device, cfg=sae.cfg, normalize=sae.normalize)
    with torch.no_grad():
        part.W_enc.copy_(sae.W_enc[:, start:start + width])
        part.b_enc.copy_(sae.b_enc[start:start + width])
        part.b_dec.copy_(sae.b_dec)
        part.W_dec.copy_(sae.W_dec[start:start + width])
    part = part.to(sae.W_dec.dtype).eval()
    return ShardEncoder(part, grid, start, sae.d_sae), LatentMap(width + 1, range(start, start + width))


class ShardEncoder:
    """Encodes against one slice of the latents; the codes are the whole dictionary's exact TopK
    codes restricted to the slice (the other slots hold value 0). Every rank of the latent group
    must call `encode` on the same rows: the candidates are gathered over the group."""

    activation = "topk"

    def __init__(self, part: TopKSAE, grid: Grid, start: int, d_sae: int) -> None:
        self.part, self.grid, self.start = part, grid, start
        self.d_in, self.d_sae, self.k = part.d_in, d_sae, part.k
        self.cfg, self.normalize = part.cfg, part.normalize
        self.global_topk = True  # False only in the tests' mutation: each slice keeps its own top k

    def to(self, device: Any) -> ShardEncoder:
        self.part = self.part.to(device)
        return self

    def eval(self) -> ShardEncoder:
        self.part.eval()
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [..., k], dictionary ids [..., k]) of this slice's latents among x's global top k."""
        p = self.part
        flat = x.reshape(-1, self.d_in).to(p.W_dec.dtype)
        if p.normalize == "layer_norm":
            flat = layer_norm(flat)[0]
        out = sparse_forward(flat, p.W_enc, p.b_enc, None, p.b_dec, self.k)
        values = global_topk(out.values, self.grid) if self.global_topk else out.values
        ids = out.indices + self.start
        return values.view(*x.shape[:-1], self.k), ids.view(*x.shape[:-1], self.k)


def group_peak(encoder: Any, peak: float) -> float:
    """The largest of the latent group's peaks (a ShardEncoder's; anything else's own), so a check
    on it fails on every rank of the group together rather than leaving the others in a gather."""
    if not isinstance(encoder, ShardEncoder):
        return peak
    mine = torch.tensor([peak], dtype=torch.float32, device=encoder.part.W_dec.device)
    return float(torch.cat(encoder.grid.all_gather_latent(mine)).max())


def global_topk(values: Tensor, grid: Grid) -> Tensor:
    """This shard's candidate values [N, k] with those outside the group's global top k zeroed.

    A candidate's identity is implied by its (shard, slot), so only the values travel."""
    return values * grid.winners(values, values.shape[1])[1]


def same_start(grid: Grid, error: Optional[BaseException], position: int) -> None:
    """Check that every latent shard starts at one context (-1: already done), before the first gather.

    A rank that failed to start, or a state saved at another position (a kill between the
    shards' checkpoints), would otherwise leave the others waiting in a gather, or pair its
    candidates with another batch's. Raises on every rank alike (the failed one raises its own)."""
    mine = grid.counts([0 if error is not None else 1, position])
    every = [t.tolist() for t in grid.all_gather_latent(mine)]
    if error is not None:
        return
    if any(ok == 0 for ok, _ in every):
        raise ExplainerError(f"another latent shard failed to start (this is shard {grid.shard} of {grid.shards}); "
                             "see its error")
    if len({pos for _, pos in every}) > 1:
        raise ExplainerError(f"the latent shards of this run stopped at different contexts ({[p for _, p in every]}; "
                             "-1 is finished): a kill between their checkpoints; rerun with --restart")


_IN_STEP = "_explainer_in_step"  # set on an error every rank of the latent group meets at the same collective
_OFF_STEP = "_explainer_off_step"  # set on an error one rank met alone mid-pass


def in_step(error: BaseException) -> BaseException:
    """Mark `error` as raised where the whole latent group agreed to stop (after a shared gather)."""
    setattr(error, _IN_STEP, True)
    return error


def off_step(encoder: Any, error: BaseException) -> None:
    """Mark an error raised on this rank alone during the pass (an out-of-memory, a dead peer's gather).

    The other ranks of its latent group are then waiting in the next gather, so this rank must
    leave without entering any other collective (sample/ranks.py checks `is_off_step`): its exit
    closes its connections and the others' gather fails at once ("connection closed by peer",
    one line through errors.py), where a mismatched collective would hang until the timeout."""
    if isinstance(encoder, ShardEncoder) and not getattr(error, _IN_STEP, False):
        setattr(error, _OFF_STEP, True)


def is_off_step(error: Optional[BaseException]) -> bool:
    return error is not None and getattr(error, _OFF_STEP, False)


def group_ok(encoder: Any, error: Optional[BaseException]) -> None:
    """After a step only some ranks can fail (a checkpoint writes each rank's own files): tell the
    latent group, so all raise (the failed rank its own error) instead of the others waiting in
    the next gather until the process group's timeout. A whole-dictionary encoder just re-raises."""
    if isinstance(encoder, ShardEncoder):
        grid = encoder.grid
        every = [int(t.tolist()[0]) for t in grid.all_gather_latent(grid.counts([0 if error is not None else 1]))]
        if error is None and 0 in every:
            raise in_step(ExplainerError(f"another latent shard failed at a checkpoint (this is shard {grid.shard} "
                                         f"of {grid.shards}); see its error, fix it and rerun: the shards resume "
                                         "together"))
        if error is not None:
            raise in_step(error)
    if error is not None:
        raise error
