"""Sizing a sampler run before it starts: which latents it keeps (sample.latents) and
whether their state fits the memory of the device it will live on."""

from __future__ import annotations

from typing import Any, Optional

import torch

from explainer.errors import ExplainerError
from explainer.sampler_state import available_bytes, state_bytes
from explainer.selectors import parse_ids
from explainer.settings import SampleSettings


def latent_subset(text: str, d_sae: int) -> Optional[torch.Tensor]:
    """Sorted dictionary ids for sample.latents (all, random:N, or ids and ranges: 0-999,1500), or None for all."""
    sel = text.strip()
    if sel == "all":
        return None
    bad = f"sample.latents={text!r}: expected all, random:N, or ids and ranges: an id (7), a range (0-99) or a comma list (1,5,10-19)"
    if sel.startswith("random:"):
        n = sel.split(":", 1)[1].strip()
        if not n.isdigit() or not 0 < int(n) <= d_sae:
            raise ExplainerError(f"{bad}, with 0 < N <= {d_sae}")
        # A fixed generator: every shard and every rerun draws the same latents.
        return torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[: int(n)].sort().values
    ranges = parse_ids(sel, "sample.latents")
    if ranges is None:
        raise ExplainerError(bad)
    # Checked before any tensor is made: a range like 0-10**12 must not allocate first.
    if ranges[-1][1] >= d_sae:
        raise ExplainerError(f"sample.latents={text!r} names latents outside 0-{d_sae - 1} of this dictionary")
    return torch.cat([torch.arange(lo, hi + 1) for lo, hi in ranges])


def check_fits(sae: Any, ss: SampleSettings, T: int, subset: Optional[torch.Tensor], device: torch.device) -> None:
    """Refuse a state that cannot fit before hours of work, not with an out-of-memory kill during them."""
    need = state_bytes(d_sae=sae.d_sae if subset is None else len(subset) + 1, ctx_len=T, k=sae.k, n_top=ss.n_top,
                       n_reservoir=ss.n_reservoir, n_pool=max(ss.nonactivating_pool, ss.n_random),
                       n_zero=ss.n_nonactivating, acts_bytes=2 if ss.acts_dtype == "float16" else 4)
    free = available_bytes(device)
    if free is not None and need > 0.8 * free:
        raise ExplainerError(
            f"the sampler state needs {need / 2**30:.1f} GiB for {sae.d_sae if subset is None else len(subset):,} "
            f"latents, and {device.type} has {free / 2**30:.1f} GiB free; keep a subset (--latents random:N), "
            "lower --n-top/--n-reservoir, or use a larger machine"
        )
