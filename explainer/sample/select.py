"""From a finished sampler state to the rows of the latents and examples tables.

- top: the kept top-k, best first.
- quantile: equal-count bins over the reservoir (a uniform sample of the activating
  contexts) minus the top examples; n_quantile evenly spaced order statistics, with bin.
- nonactivating: pool contexts where the latent is zero on every token, alternating hard
  ones (so scorers test specificity) and plain ones in the latent's own hash order; ranks 0,
  2, 4... are hard where the pool has them. sample.hard_negatives picks the rule: "tokens"
  (default) holds a token the top examples peak on; "embedding" is most similar, in
  all-MiniLM-L6-v2 cosine, to the mean embedding of the latent's top examples (delphi's
  FAISS negatives, by exact search).
- random: the first n_random pool contexts, the same for every latent.
- latents.quantiles: per-context max activation at QUANTILE_LEVELS, from the reservoirs.
"""

from __future__ import annotations

import time
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from explainer import embed
from explainer.sample.latent_map import LatentMap
from explainer.sample.outputs import write_sampled
from explainer.sample.state import EMPTY, M31, S, SampleState, hash31, one_thread, sketch_cid, sort_slots, top_cid, top_max
from explainer.settings import SampleSettings
from explainer.store import db as store
from explainer.vocab import SPLITS

QUANTILE_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
HARD_TOKENS = 3  # distinct top-example tokens a hard negative may share
EMBED_TOP = 10  # best top examples per latent whose mean embedding the embedding rule compares with
EMBED_BLOCK = 4096  # latents whose top-example vectors ([block, EMBED_TOP, 384] floats) are held at once


class TokenTable:
    """Token ids of the sampled contexts, looked up by context id."""

    def __init__(self, cids: Tensor, tokens: Tensor) -> None:
        order = cids.argsort()
        self.cids, self.tokens = cids[order], tokens[order].long()

    def of(self, cids: Tensor) -> Tensor:
        """Token ids [len(cids), T]."""
        pos = torch.searchsorted(self.cids, cids).clamp(max=max(len(self.cids) - 1, 0))
        if cids.numel() and not bool((self.cids[pos] == cids).all()):
            raise KeyError("a kept context has no row in the contexts table")
        return self.tokens[pos]


class ContextVectors(TokenTable):
    """Unit sentence embeddings of contexts, looked up by context id; each context embedded once."""

    def __init__(self, cids: Tensor, vecs: Tensor) -> None:
        order = cids.argsort()
        self.cids, self.tokens = cids[order], vecs[order].float()


def context_vectors(con: duckdb.DuckDBPyConnection, relations: list[str], state: SampleState) -> ContextVectors:
    """all-MiniLM-L6-v2 embeddings of every pool context and each latent's best EMBED_TOP top
    examples, in every split: the most the embedding rule reads, so the work is bounded by the
    contexts sampled, not by latents x pool."""
    tk, pk = state.top_key[:, :EMBED_TOP].cpu(), state.pool_key.cpu()
    ids = torch.cat([top_cid(tk[tk >= 0]), sketch_cid(pk[pk < EMPTY])]).unique()
    # In id order: the encoder's batches (and so its padding) are then the same on every run.
    t = _contexts_by_id(con, relations, ids.numpy(), "tokens", ordered=True)
    vecs = embed.embedder().encode([embed.text_of(tokens) for tokens in t.column("tokens").to_pylist()])
    return ContextVectors(torch.tensor(t.column("context_id").to_pylist(), dtype=torch.int64), torch.from_numpy(vecs))


def _contexts_by_id(con: duckdb.DuckDBPyConnection, relations: list[str], ids: np.ndarray, column: str,
                    ordered: bool = False) -> pa.Table:
    """context_id and `column` of the contexts `ids`, read from the given relations (DB table or Parquet)."""
    con.register("_ids", pa.table({"context_id": pa.array(ids, pa.int64())}))
    try:
        union = " UNION ALL ".join(f"SELECT context_id, {column} FROM {r}" for r in relations)
        return con.sql(f"SELECT u.context_id, u.{column} FROM ({union}) u SEMI JOIN _ids k USING (context_id)"
                       + (" ORDER BY u.context_id" if ordered else "")).to_arrow_table()
    finally:
        con.unregister("_ids")


def latent_rows(state: SampleState) -> dict[str, Any]:
    """Per-latent statistics pooled over splits; NULL (None) where a latent never fired."""
    L = state.d_sae
    n_fired = state.n_fired.view(S, L).sum(0)
    n_tokens = int(state.n_tokens.sum())
    alive = n_fired > 0
    mean = state.sum_act.view(S, L).sum(0) / n_fired.clamp(min=1)
    max_act = state.max_act.view(S, L).amax(0)
    # Each split's reservoir is a uniform sample of its firing contexts; weight its entries
    # by firing contexts per kept entry so a small split does not skew the pooled quantiles.
    keys = state.res_key.view(S, L, -1)
    valid = keys < EMPTY
    weight = state.n_ctx_fired.view(S, L, 1) / valid.sum(-1, keepdim=True).clamp(min=1) * valid
    vals = torch.where(valid, state.res_max.view(S, L, -1), torch.inf).permute(1, 0, 2).reshape(L, -1)
    weight = weight.permute(1, 0, 2).reshape(L, -1).double()
    has_q = valid.any(-1).any(0)
    quantiles = torch.zeros(L, len(QUANTILE_LEVELS))
    if vals.shape[1]:
        vals, order = vals.sort(1)
        cum = weight.gather(1, order).cumsum(1)
        levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64).view(1, -1) * cum[:, -1:]
        at = torch.searchsorted(cum.contiguous(), levels.contiguous()).clamp(max=vals.shape[1] - 1)
        quantiles = vals.gather(1, at)
    return {
        "latent": torch.arange(L, dtype=torch.int32).numpy(),
        "frequency": (n_fired.double() / max(n_tokens, 1)).numpy(),
        "n_fired": n_fired.numpy(),
        "n_tokens": torch.full((L,), n_tokens, dtype=torch.int64).numpy(),
        "n_contexts": state.n_ctx_fired.view(S, L).sum(0).numpy(),
        "max_act": [float(m) if a else None for m, a in zip(max_act.tolist(), alive.tolist())],
        "mean_act": [float(m) if a else None for m, a in zip(mean.tolist(), alive.tolist())],
        "quantiles": [q if h else None for q, h in zip(quantiles.tolist(), has_q.tolist())],
    }


def _rows(lat: Tensor, rank: Tensor, cid: Tensor, max_act: Tensor, acts: Tensor, bin_: Tensor | None = None) -> dict[str, Any]:
    return {"latent": lat.int(), "rank": rank.int(), "context_id": cid.long(), "max_act": max_act.float(),
            "acts": acts.float(), "bin": bin_}


def example_rows(state: SampleState, s: int, *, n_quantile: int, n_bins: int, n_nonactivating: int,
                 n_random: int, tokens: TokenTable, vectors: ContextVectors | None = None) -> dict[str, dict[str, Any]]:
    """Rows of each example kind for split index s (per-kind dicts of tensors); `state` went through
    sort_slots(). With `vectors`, hard negatives are chosen by embedding similarity, else by tokens."""
    L = state.d_sae
    sl = slice(s * L, (s + 1) * L)
    tk = state.top_key[sl]
    t_valid, t_cid = tk >= 0, top_cid(tk)
    lat, rank = t_valid.nonzero(as_tuple=True)
    top = _rows(lat, rank, t_cid[lat, rank], top_max(tk)[lat, rank], state.top_acts[sl][lat, rank])
    return {"top": top, "quantile": _quantile(state, sl, t_valid, t_cid, n_quantile, n_bins),
            "nonactivating": _nonactivating(state, s, t_valid, t_cid, n_nonactivating, tokens, vectors),
            "random": _random(state, s, n_random)}


def _quantile(state: SampleState, sl: slice, t_valid: Tensor, t_cid: Tensor, n_quantile: int,
              n_bins: int) -> dict[str, Any]:
    """Equal-count bins over the reservoir minus the top examples, n_quantile evenly spaced
    order statistics (the reservoir is already a uniform sample)."""
    rk = state.res_key[sl]
    r_cid = sketch_cid(rk)
    in_top = ((r_cid.unsqueeze(2) == t_cid.unsqueeze(1)) & t_valid.unsqueeze(1)).any(2)
    elig = (rk < EMPTY) & ~in_top
    m = elig.sum(1, keepdim=True)
    order = torch.where(elig, state.res_max[sl], torch.inf).argsort(dim=1, stable=True)
    j = torch.arange(n_quantile).view(1, -1)
    pos = torch.where(m >= n_quantile, (2 * j + 1) * m // max(2 * n_quantile, 1), j)
    ok = j < m
    pick = order.gather(1, pos.clamp(max=max(rk.shape[1] - 1, 0))) if rk.shape[1] else pos
    lat, rank = ok.nonzero(as_tuple=True)
    slot = pick[lat, rank]
    bins = (pos * n_bins // m.clamp(min=1))[lat, rank]
    return _rows(lat, rank, r_cid[lat, slot], state.res_max[sl][lat, slot], state.res_acts[sl][lat, slot], bins)


def _hard_tokens(top_acts: Tensor, t_valid: Tensor, t_cid: Tensor, tokens: TokenTable) -> tuple[Tensor, Tensor]:
    """Per latent, up to HARD_TOKENS tokens its top examples peak on, most often first, and how
    often ([L, n_h] each; token -1 and count 0 where there are fewer)."""
    n_top = t_valid.shape[1]
    peak_tok = torch.full(t_valid.shape, -1, dtype=torch.int64)
    if t_valid.any():
        peak_pos = top_acts[t_valid].float().argmax(-1, keepdim=True)
        peak_tok[t_valid] = tokens.of(t_cid[t_valid]).gather(1, peak_pos).squeeze(1)
    same = peak_tok.unsqueeze(2) == peak_tok.unsqueeze(1)
    count = (same & t_valid.unsqueeze(1)).sum(2) * t_valid
    first = ~(same & torch.ones(same.shape[1:], dtype=torch.bool).tril(-1)).any(2)
    score = torch.where(t_valid & first, count * (n_top + 1) - torch.arange(n_top), -1)
    best, j = score.topk(min(HARD_TOKENS, n_top), dim=1)
    return torch.where(best > 0, peak_tok.gather(1, j), -1), torch.where(best > 0, count.gather(1, j), 0)


def _nonactivating(state: SampleState, s: int, t_valid: Tensor, t_cid: Tensor, n_nonactivating: int,
                   tokens: TokenTable, vectors: ContextVectors | None = None) -> dict[str, Any]:
    """Pool contexts where the latent is zero everywhere, alternating hard ones (holding a token
    the top examples peak on, so scorers test specificity; with `vectors`, the most similar to
    the top examples' mean embedding) and plain ones in the latent's own hash order; topped up
    from the zero sketch."""
    L, T = state.d_sae, int(state.meta["ctx_len"])
    sl = slice(s * L, (s + 1) * L)
    hard_tok, hard_cnt = _hard_tokens(state.top_acts[sl], t_valid, t_cid, tokens)
    n_h = hard_tok.shape[1]
    ids = LatentMap.of_state(state).hash_ids()
    pk = state.pool_key[s]
    nq = int((pk < EMPTY).sum())
    q_cid = sketch_cid(pk[:nq])
    k = state.pool_vals.shape[-1]
    q_vals, q_idx = state.pool_vals[s, :nq].reshape(nq, T * k), state.pool_idx[s, :nq].reshape(nq, T * k).long()
    fired_q = torch.zeros(nq, L).scatter_add_(1, q_idx, (q_vals > 0).float()) > 0
    q_tok = tokens.of(q_cid).sort(1).values  # [nq, T]
    lats, ranks, cids = [], [], []
    step = max(1, (1 << 20) // max(nq * max(n_h, 1), 1))
    if vectors is not None:
        step = min(step, EMBED_BLOCK)
        q_vec = vectors.of(q_cid)  # [nq, d]
    for lo in range(0, L if nq and n_nonactivating else 0, step):
        ls = slice(lo, min(lo + step, L))
        n_l = ls.stop - lo
        want = hard_tok[ls].reshape(1, -1).expand(nq, -1).contiguous()
        at = torch.searchsorted(q_tok, want).clamp(max=T - 1)
        share = ((q_tok.gather(1, at) == want) & (want >= 0)).view(nq, n_l, n_h).permute(1, 0, 2)
        hardness = (share * hard_cnt[ls].unsqueeze(1)).sum(2)  # [n_l, nq]
        cand = ~fired_q[:, ls].T
        h = hash31(ids[ls].view(-1, 1), q_cid.view(1, -1))
        big = torch.iinfo(torch.int64).max
        if vectors is None:
            hard, plain = cand & (hardness > 0), cand & (hardness == 0)
            hard_rank = _ranks(torch.where(hard, -hardness * (M31 + 1) + h, big))
        else:
            hard, hard_rank = _similar(vectors, q_vec, t_valid[ls], t_cid[ls], cand, (n_nonactivating + 1) // 2)
            plain = cand & ~hard
        plain_rank = _ranks(torch.where(plain, h, big))
        turn = torch.where(hard, 2 * hard_rank, torch.where(plain, 2 * plain_rank + 1, big))
        kept, pick = turn.topk(min(n_nonactivating, nq), dim=1, largest=False)
        lat, rank = (kept < big).nonzero(as_tuple=True)
        lats.append(lat + lo)
        ranks.append(rank)
        cids.append(q_cid[pick[lat, rank]])
    lat, rank, cid = (torch.cat(x) if x else torch.zeros(0, dtype=torch.long) for x in (lats, ranks, cids))
    lat, rank, cid = _top_up(state.zero_key[sl], lat, rank, cid, n_nonactivating)
    return _rows(lat, rank, cid, torch.zeros(len(cid)), torch.zeros(len(cid), T))


def _similar(vectors: ContextVectors, q_vec: Tensor, t_valid: Tensor, t_cid: Tensor, cand: Tensor,
             n_hard: int) -> tuple[Tensor, Tensor]:
    """The n_hard candidates [n_l, nq] most similar (cosine) to each latent's mean top-example
    embedding, and every candidate's rank by similarity; a latent without top examples gets none."""
    tv, tc = t_valid[:, :EMBED_TOP], t_cid[:, :EMBED_TOP]
    top = torch.zeros(*tv.shape, q_vec.shape[1])
    top[tv] = vectors.of(tc[tv])
    mean = torch.nn.functional.normalize(top.sum(1), dim=-1)  # the mean's direction; a zero row stays zero
    sim = mean @ q_vec.T  # [n_l, nq]
    rank = _ranks(torch.where(cand, -sim, torch.inf))
    return cand & (rank < n_hard) & tv.any(1, keepdim=True), rank


def _random(state: SampleState, s: int, n_random: int) -> dict[str, Any]:
    """The first n_random pool contexts, the same for every latent, with each latent's activations."""
    L, T = state.d_sae, int(state.meta["ctx_len"])
    pk = state.pool_key[s]
    nr = min(n_random, int((pk < EMPTY).sum()))
    q_cid = sketch_cid(pk[:nr])
    k = state.pool_vals.shape[-1]
    dense = torch.zeros(nr * T, L)
    dense.scatter_(1, state.pool_idx[s, :nr].reshape(-1, k).long(), state.pool_vals[s, :nr].reshape(-1, k))
    acts = dense.view(nr, T, L).permute(2, 0, 1).reshape(L * nr, T)
    return _rows(torch.arange(L).repeat_interleave(nr), torch.arange(nr).repeat(L),
                 q_cid.repeat(L), acts.amax(1) if nr else torch.zeros(0), acts)


def _top_up(zero_key: Tensor, lat: Tensor, rank: Tensor, cid: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fill each latent's non-activating examples from the pool up to n with its zero sketch
    (contexts where it never fired, in hash order), skipping contexts it already has. Only
    latents that fire almost everywhere come up short in the pool."""
    L = zero_key.shape[0]
    count = torch.bincount(lat, minlength=L)
    if n == 0 or zero_key.shape[1] == 0 or bool((count >= n).all()):
        return lat, rank, cid
    short = (count < n).nonzero().squeeze(1)
    have = torch.full((L, n), -1, dtype=torch.long)
    have[lat, rank.long()] = cid
    zk = zero_key[short]
    z_cid = sketch_cid(zk)
    ok = (zk < EMPTY) & ~(z_cid.unsqueeze(2) == have[short].unsqueeze(1)).any(2)
    new_rank = count[short].unsqueeze(1) + ok.cumsum(1) - 1
    r, j = (ok & (new_rank < n)).nonzero(as_tuple=True)
    return (torch.cat([lat, short[r]]), torch.cat([rank.long(), new_rank[r, j]]), torch.cat([cid, z_cid[r, j]]))


def _ranks(keys: Tensor) -> Tensor:
    """Position of each entry in its row's ascending order."""
    out = torch.empty(keys.shape, dtype=torch.int64)
    order = keys.argsort(dim=1)
    return out.scatter_(1, order, torch.arange(keys.shape[1]).expand_as(keys).contiguous())


# --- DB rows -------------------------------------------------------------------------------


def kept_ids(state: SampleState) -> np.ndarray:
    """Context ids whose tokens building examples looks up: top examples and the shared pool."""
    tk, pk = state.top_key.cpu(), state.pool_key.cpu()
    ids = torch.cat([top_cid(tk[tk >= 0]), sketch_cid(pk[pk < EMPTY])])
    return ids.unique().numpy()


def token_table(con: duckdb.DuckDBPyConnection, relations: list[str], ids: np.ndarray, ctx_len: int) -> TokenTable:
    """Token ids of the contexts `ids`, read from the given relations (DB table or Parquet)."""
    t = _contexts_by_id(con, relations, ids, "token_ids")
    cids = torch.from_numpy(t.column("context_id").to_numpy().copy())
    flat = t.column("token_ids").combine_chunks().flatten().to_numpy().astype("int64")
    return TokenTable(cids, torch.from_numpy(flat).view(-1, ctx_len))


def _examples_table(dict_id: int, split: str, kind: str, rows: dict[str, Any]) -> pa.Table:
    n, T = rows["acts"].shape
    offsets = pa.array(range(0, n * T + 1, T), pa.int32())
    return pa.table({
        "dict_id": pa.array([dict_id] * n, pa.int32()),
        "latent": rows["latent"].numpy(),
        "split": pa.array([split] * n, pa.string()),
        "kind": pa.array([kind] * n, pa.string()),
        "rank": rows["rank"].numpy(),
        "context_id": rows["context_id"].numpy(),
        "max_act": rows["max_act"].numpy(),
        "acts": pa.ListArray.from_arrays(offsets, pa.array(rows["acts"].reshape(-1).numpy())),
        "bin": pa.array(rows["bin"].int().numpy(), pa.int32()) if rows["bin"] is not None else pa.nulls(n, pa.int32()),
    })


def write_results(con: duckdb.DuckDBPyConnection, dict_id: int, state: SampleState, ss: SampleSettings,
                  relations: list[str]) -> dict[str, Any]:
    """Replace this dictionary's latents and examples from a final state (inside the caller's transaction).

    `relations` (SQL: the DB's contexts rows, or Parquet files) hold the contexts the state counted.

    Sorts the state's slots in place (on CPU): the state is spent afterwards.
    """
    con.execute("DELETE FROM examples WHERE dict_id = ?", [dict_id])
    con.execute("DELETE FROM latents WHERE dict_id = ?", [dict_id])
    tokens = token_table(con, relations, kept_ids(state), int(state.meta["ctx_len"]))
    cpu = torch.device("cpu")
    with one_thread(cpu):
        state = state.to(cpu)
        sort_slots(state)  # in place: the caller is done with the state
        lat = latent_rows(state)
    # Outside one_thread: the encoder is the costly part and uses every thread it is given.
    t = time.perf_counter()
    vectors = context_vectors(con, relations, state) if ss.hard_negatives == "embedding" else None
    embed_s = time.perf_counter() - t
    latents = LatentMap.of_state(state)  # state rows -> the dictionary's latent ids; the sink row is dropped
    lat = {**{k: v[:latents.n_latents] for k, v in lat.items()}, "latent": latents.latents()}
    store.insert_arrow(con, "latents", pa.table({
        "dict_id": pa.array([dict_id] * len(lat["latent"]), pa.int32()),
        **{k: v for k, v in lat.items() if k != "quantiles"},
        "quantiles": pa.array(lat["quantiles"], pa.list_(pa.float32())),
    }))
    for s, split in enumerate(SPLITS):
        with one_thread(cpu):
            kinds = example_rows(state, s, n_quantile=ss.n_quantile, n_bins=ss.n_quantile_bins,
                                 n_nonactivating=ss.n_nonactivating, n_random=ss.n_random, tokens=tokens,
                                 vectors=vectors)
        for kind, rows in kinds.items():
            rows = latents.to_dictionary(rows)
            if len(rows["latent"]):
                store.insert_arrow(con, "examples", _examples_table(dict_id, split, kind, rows))
    sampled = write_sampled(con, dict_id, state)  # histograms and co-occurrence neighbours
    freq = torch.from_numpy(lat["frequency"])
    # Which rule chose the hard negatives, beside the counts: a score's snippets trace back to it.
    return {"dead_latents": int((freq == 0).sum()), "median_frequency": float(freq.median()), **sampled,
            "hard_negatives": ss.hard_negatives,
            **({"hard_negatives_model": embed.MODEL, "hard_negatives_contexts": len(vectors.cids),
                "hard_negatives_embed_s": round(embed_s, 2)} if vectors is not None else {})}
