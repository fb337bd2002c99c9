"""Rows of a latent's page beyond its examples: latent_histograms, latent_neighbours, latent_logits.

Histograms and co-occurrence neighbours come from the sampler's final state (select.py writes
them with the latents table, so a merge of shards writes them too). The logit lens and the
decoder-cosine neighbours need only the dictionary and the model (lens.py): `explainer sample`
writes them at its end and `explainer lens` (re)computes them for a DB's dictionary.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import duckdb
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.sample import lens
from explainer.sample.latent_map import LatentMap
from explainer.sample.state import HIST_EDGES, N_BINS, S, SampleState, flush_pairs
from explainer.store import db as store


def histogram_rows(dict_id: int, state: SampleState) -> pa.Table:
    """One row per latent that fired: the bins from its first to its last nonzero count.

    The last bin also holds activations past HIST_EDGES' end; its upper edge becomes the
    latent's max activation there, so the edges always cover every counted token. Built
    with masks over [latents, bins], no Python loop per latent (1M latents)."""
    latents = LatentMap.of_state(state)
    L = latents.n_latents
    hist = state.hist[:L].cpu()
    nz = hist > 0
    alive = nz.any(1)
    hist, nz = hist[alive], nz[alive]
    max_act = state.max_act.view(S, -1).amax(0)[:L].cpu()[alive]
    cols = torch.arange(N_BINS)
    lo = nz.int().argmax(1)                                    # first nonzero bin
    hi = N_BINS - 1 - nz.flip(1).int().argmax(1)               # last nonzero bin
    in_counts = (cols >= lo[:, None]) & (cols <= hi[:, None])
    cols_e = torch.arange(N_BINS + 1)
    in_edges = (cols_e >= lo[:, None]) & (cols_e <= (hi + 1)[:, None])
    n_counts = hi - lo + 1
    c_off = torch.cat([torch.zeros(1, dtype=torch.long), n_counts.cumsum(0)])
    e_off = c_off + torch.arange(len(c_off))
    edges = HIST_EDGES.float().expand(len(hist), -1)[in_edges]
    last = e_off[1:] - 1
    top = hi == N_BINS - 1
    edges[last[top]] = torch.maximum(edges[last[top]], max_act[top].float())
    return pa.table({
        "dict_id": pa.array(np.full(len(hist), dict_id, np.int32)),
        "latent": pa.array(latents.latents()[alive.numpy()]),
        "edges": pa.ListArray.from_arrays(pa.array(e_off.numpy().astype(np.int32)), pa.array(edges.numpy())),
        "counts": pa.ListArray.from_arrays(pa.array(c_off.numpy().astype(np.int32)), pa.array(hist[in_counts].numpy())),
    })


def jaccard_neighbours(state: SampleState, k: int = lens.N_NEIGHBOURS, block: int = 1024) -> tuple[Tensor, Tensor]:
    """(Jaccard, state rows) [L, k] of each latent's most co-occurring latents over the sampled
    contexts: |A & B| / |A | B| of the sets of contexts each fires in. Zero where fewer share any.
    `block` rows at a time, so the float64 temporaries stay [block, L] at the cap of 8,192+."""
    flush_pairs(state)
    C = state.cooc.shape[0]
    n = state.n_ctx_fired.view(S, -1).sum(0)[:C].double().cpu()
    k = min(k, max(C - 1, 0))
    vals, ids = [], []
    for lo in range(0, C, block):
        inter = state.cooc[lo:lo + block].cpu().double()
        jac = inter / (n[lo:lo + block, None] + n[None, :] - inter).clamp(min=1)
        r = torch.arange(inter.shape[0])
        jac[r, r + lo] = -1.0  # a latent is not its own neighbour
        top = jac.topk(k, dim=1)
        vals.append(top.values.clamp(min=0).float())
        ids.append(top.indices)
    if not vals:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(ids)


def neighbour_rows(dict_id: int, kind: str, latent: np.ndarray, values: Tensor, ids: np.ndarray) -> pa.Table:
    """latent [n]; values, ids [n, k] best first; entries with value <= 0 are left out (no neighbour)."""
    n, k = values.shape
    keep = (values > 0).numpy() if kind == "cooccurrence" else np.ones((n, k), dtype=bool)
    rows = np.repeat(latent, k).reshape(n, k)[keep]
    ranks = np.tile(np.arange(k, dtype=np.int32), n).reshape(n, k)
    # Ranks count the kept neighbours only, so they stay 0..m-1 when a latent has fewer than k.
    ranks = (np.cumsum(keep, 1) - 1)[keep].astype(np.int32) if kind == "cooccurrence" else ranks[keep]
    return pa.table({"dict_id": pa.array(np.full(len(rows), dict_id, np.int32)), "latent": pa.array(rows.astype(np.int32)),
                     "kind": pa.array([kind] * len(rows), pa.string()), "rank": pa.array(ranks),
                     "neighbour": pa.array(ids[keep].astype(np.int32)), "value": pa.array(values.numpy()[keep], pa.float32())})


def write_sampled(con: duckdb.DuckDBPyConnection, dict_id: int, state: SampleState) -> dict[str, Any]:
    """Replace this dictionary's histograms and co-occurrence neighbours (inside the caller's transaction)."""
    con.execute("DELETE FROM latent_histograms WHERE dict_id = ?", [dict_id])
    con.execute("DELETE FROM latent_neighbours WHERE dict_id = ? AND kind = 'cooccurrence'", [dict_id])
    store.insert_arrow(con, "latent_histograms", histogram_rows(dict_id, state))
    latents = LatentMap.of_state(state)
    if state.cooc.shape[0] == 0:
        return {"cooccurrence": f"skipped: {state.d_sae:,} latents are over sample.cooccurrence_max_latents"}
    vals, rows = jaccard_neighbours(state)
    L = latents.n_latents
    ids = latents.latents()
    real = rows[:L] < L  # the sink row (a subset's other latents) is no neighbour
    vals = vals[:L].where(real, torch.zeros(()))
    mapped = np.where(real.numpy(), ids[rows[:L].clamp(max=L - 1).numpy()], -1)
    store.insert_arrow(con, "latent_neighbours", neighbour_rows(dict_id, "cooccurrence", ids, vals, mapped))
    return {"cooccurrence": "written"}


def write_lens(con: duckdb.DuckDBPyConnection, dict_id: int, *, hook: str, model: Any, W_dec: Tensor,
               latent_ids: Optional[np.ndarray], token_strings: Callable[[list[int]], list[str]],
               block: Optional[int] = None) -> dict[str, Any]:
    """Replace this dictionary's logit-lens and decoder-cosine rows for `latent_ids` (None: all).

    One transaction; returns what was written or why the lens was skipped. Raises
    ExplainerError when the model has no final norm or unembedding to read."""
    ids = np.arange(W_dec.shape[0], dtype=np.int32) if latent_ids is None else np.asarray(latent_ids, np.int32)
    sel = torch.from_numpy(ids.astype(np.int64))
    out: dict[str, Any] = {}
    lens_table = None
    if lens.is_residual_hook(hook):
        W_U = lens.unembedding(model)
        if W_U.shape[1] != W_dec.shape[1]:
            raise ExplainerError(f"the dictionary's rows have {W_dec.shape[1]} dims and the unembedding {W_U.shape[1]}; "
                                 "is this the model the dictionary was trained on?")
        res = lens.logit_lens(W_dec[sel.to(W_dec.device)], W_U, lens.norm_map(lens.final_norm(model), W_U.shape[1]), block=block)
        lens_table = _lens_rows(dict_id, ids, res, token_strings)
        out["logit_lens"] = f"written for {len(ids):,} latents"
    else:
        out["logit_lens"] = (f"skipped: hook {hook!r} is not the residual stream (layers.N), "
                             "so a decoder row does not reach the unembedding directly")
    vals, nbr = lens.decoder_neighbours(W_dec, rows=sel, block=block)
    which = "" if latent_ids is None else " AND list_contains(?, latent)"
    params = [dict_id] + ([] if latent_ids is None else [ids.tolist()])
    with store.transaction(con):
        con.execute(f"DELETE FROM latent_logits WHERE dict_id = ?{which}", params)
        con.execute(f"DELETE FROM latent_neighbours WHERE dict_id = ? AND kind = 'decoder_cosine'{which}", params)
        if lens_table is not None:
            store.insert_arrow(con, "latent_logits", lens_table)
        store.insert_arrow(con, "latent_neighbours", neighbour_rows(dict_id, "decoder_cosine", ids, vals, nbr.numpy()))
    out["decoder_neighbours"] = f"written for {len(ids):,} latents"
    return out


def _lens_rows(dict_id: int, ids: np.ndarray, res: Any, token_strings: Callable[[list[int]], list[str]]) -> pa.Table:
    n, k = res.top_ids.shape
    token_ids = torch.cat([res.top_ids, res.bottom_ids], 1).numpy().astype(np.int32)       # [n, 2k]
    values = torch.cat([res.top_values, res.bottom_values], 1).numpy().astype(np.float32)
    uniq = np.unique(token_ids)
    text = dict(zip(uniq.tolist(), token_strings(uniq.tolist())))
    flat_ids = token_ids.reshape(-1)
    return pa.table({
        "dict_id": pa.array(np.full(n * 2 * k, dict_id, np.int32)),
        "latent": pa.array(np.repeat(ids, 2 * k).astype(np.int32)),
        "sign": pa.array(np.tile(np.array(["top"] * k + ["bottom"] * k), n)),
        "rank": pa.array(np.tile(np.concatenate([np.arange(k), np.arange(k)]).astype(np.int32), n)),
        "token_id": pa.array(flat_ids),
        "token": pa.array([text[i] for i in flat_ids.tolist()], pa.string()),
        "value": pa.array(values.reshape(-1)),
    })


def recompute(con: duckdb.DuckDBPyConnection, settings: Any, *, dict_name: Optional[str] = None,
              sae_path: Optional[str] = None) -> dict[str, Any]:
    """`explainer lens`: (re)write the logit lens and decoder neighbours of a DB's dictionary, read
    from the path the DB records (or `sae_path`), through the model it records (the model
    section's device and dtype apply). Latents: those sampled, or all when none were."""
    import re

    from explainer.lm import load_model
    from explainer.sae.formats import fingerprint, load_dictionary

    dict_id = store.dictionary_id(con, dict_name)
    name, path, model, hook, fp = store.one_row(con.execute(
        "SELECT name, path, model, hook, fingerprint FROM dictionaries WHERE id = ?", [dict_id]))
    sae = load_dictionary(sae_path or path)
    if fingerprint(sae) != fp:
        raise ExplainerError(f"the dictionary at {sae_path or path} is not the one sampled as {name!r} (its weights "
                             "differ); pass the sampled dictionary with --sae")
    sampled = np.array([r[0] for r in con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent",
                                                  [dict_id]).fetchall()], dtype=np.int32)
    ids = sampled if len(sampled) else None
    layer = re.match(r"layers\.(\d+)", hook)
    if not lens.is_residual_hook(hook) or layer is None:
        lm_model, strings = None, None
    else:
        lm = load_model(settings.model.model_copy(update={"name": model, "layer": int(layer.group(1))}))
        lm_model, strings = lm.model, lm.token_strings
        sae = sae.to(lm.device)
    with torch.inference_mode():
        out = write_lens(con, dict_id, hook=hook, model=lm_model, W_dec=sae.W_dec.detach(), latent_ids=ids,
                         token_strings=strings or (lambda ids: [str(i) for i in ids]))
    return {"dictionary": name, "latents": len(ids) if ids is not None else sae.d_sae, **out}
