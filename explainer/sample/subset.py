"""Checks before a sampler run starts, so bad input fails before hours of work: the
dictionary reads this model's hook, the corpus yields every split, which latents it keeps
(sample.latents), and whether their state fits the memory of the device it will live on."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from explainer import selectors
from explainer.corpus.contexts import iter_contexts
from explainer.errors import ExplainerError
from explainer.hooks import dictionary_hook
from explainer.sae.sizing import available_bytes
from explainer.sample.latent_map import LatentMap
from explainer.sample.state import state_bytes
from explainer.settings import SampleSettings, Settings
from explainer.vocab import SPLITS


def adopt_hook(settings: Settings, cfg: dict) -> tuple[Settings, list[str]]:
    """Settings reading the dictionary's own hook when the user named none (neither --hook nor
    --layer, in flags or config), so a Gemma Scope or SAELens dictionary needs no --layer."""
    theirs = dictionary_hook(cfg)
    if theirs is None or {"hook", "layer"} & settings.model.model_fields_set:
        return settings, []
    model = settings.model.model_copy(update={"hook": str(theirs), "layer": theirs.layer})
    note = f"hooked at {theirs}, the hook the dictionary's config names (pass --hook or --layer to choose another)"
    return settings.model_copy(update={"model": model}), [note]


def check_dictionary(sae: Any, lm: Any, ss: SampleSettings) -> list[str]:
    """Refuse a dictionary that cannot read this model's hook; return warnings for the rest."""
    if sae.d_in != lm.d_model:
        raise ExplainerError(
            f"dictionary width d_in={sae.d_in} does not match {lm.name} (d_model={lm.d_model} at {lm.hook}); "
            "pass the model the dictionary was trained on with --model, or another --sae"
        )
    warnings = []
    point = getattr(lm, "hook_point", None)  # the planted benchmark's stand-in model has no hook point
    theirs = dictionary_hook(sae.cfg)
    if point is not None and theirs is None:
        named = sae.cfg.get("hook_name")
        what = f"hook {named!r}, which explainer cannot map" if named else "no layer"
        warnings.append(f"the dictionary's config names {what}; assuming it reads {lm.hook}")
    elif point is not None and theirs is not None and theirs != point:
        msg = (f"the dictionary was trained at layer {theirs.layer} (hook {theirs}) but the model is hooked at "
               f"layer {lm.layer} (hook {lm.hook})")
        fix = f"--layer {theirs.layer} (or --hook {theirs})" if theirs.is_residual else f"--hook {theirs}"
        if not ss.force_layer:
            raise ExplainerError(f"{msg}; pass {fix}, or --force-layer to sample anyway")
        warnings.append(msg + " (--force-layer)")
    trained_on = sae.cfg.get("model_name")
    if trained_on and trained_on != lm.name:
        warnings.append(f"the dictionary's config names model {trained_on!r}; sampling {lm.name!r}")
    return warnings


def plan_contexts(settings: Settings, tokenizer: Any, docs: Iterable, limit: int, ss: SampleSettings,
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


def latent_subset(text: str, d_sae: int) -> Optional[torch.Tensor]:
    """Sorted dictionary ids for sample.latents (all, random:N, or ids and ranges: 0-999,1500), or None for all."""
    sel = selectors.parse(text, "sample.latents")
    if sel.kind == "all":
        return None
    bad = (f"sample.latents={text!r}: expected all, random:N, or ids and ranges: "
           "an id (7), a range (0-99) or a comma list (1,5,10-19)")
    if sel.kind == "random":
        if sel.n is None or not 0 < sel.n <= d_sae:
            raise ExplainerError(f"{bad}, with 0 < N <= {d_sae}")
        # A fixed generator: every shard and every rerun draws the same latents.
        return torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[: sel.n].sort().values
    ranges = sel.ranges
    if ranges is None:
        raise ExplainerError(bad)
    # Checked before any tensor is made: a range like 0-10**12 must not allocate first.
    if ranges[-1][1] >= d_sae:
        raise ExplainerError(f"sample.latents={text!r} names latents outside 0-{d_sae - 1} of this dictionary")
    return torch.cat([torch.arange(lo, hi + 1) for lo, hi in ranges])


def check_fits(sae: Any, ss: SampleSettings, T: int, latents: LatentMap, device: torch.device) -> None:
    """Refuse a state that cannot fit before hours of work, not with an out-of-memory kill during them."""
    need = state_bytes(d_sae=latents.n_rows, ctx_len=T, k=sae.k, n_top=ss.n_top,
                       n_reservoir=ss.n_reservoir, n_pool=max(ss.nonactivating_pool, ss.n_random),
                       n_zero=ss.n_nonactivating, acts_bytes=2 if ss.acts_dtype == "float16" else 4,
                       cooc_cap=ss.cooccurrence_max_latents)
    free = available_bytes(device)
    if free is not None and need > 0.8 * free:
        raise ExplainerError(
            f"the sampler state needs {need / 2**30:.1f} GiB for {latents.n_latents:,} "
            f"latents, and {device.type} has {free / 2**30:.1f} GiB free; keep a subset (--latents random:N), "
            "lower --n-top/--n-reservoir, or use a larger machine"
        )
