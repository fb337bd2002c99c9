"""The sampler's streaming state: per-latent counters, a top-k list and hash sketches.

Per-latent tensors have one row per (split, latent), row = split * d_sae + latent, so each
split keeps its own examples.

- top: the n_top contexts with the highest max activation, keyed by a composite int64
  (float32 bits of the max, then the inverted context id): ties break by context id and the
  order is total, so the top-k of a union equals the top-k of the parts' top-ks, exactly.
- reservoir: the n_reservoir activating contexts with the smallest hash h(latent, context),
  a bottom-k sketch: a uniform sample of the activating contexts that does not depend on the
  order or partition of the stream, so resume and shard merges are exact.
- pool: per split the contexts with the smallest hash(context) and their sparse codes. The
  first n_random are the random examples (shared by all latents); non-activating examples
  are pool contexts where a latent is zero everywhere. One shared pool instead of a sketch
  per latent: it costs nothing per latent while streaming and gives the hard-negative search
  a few hundred candidates per latent.
- zero: per latent the n_nonactivating contexts with the smallest hash among those where it
  never fired, a bottom-k sketch like the reservoir's. Only latents that fire almost
  everywhere need it (the pool then holds too few zero contexts for them); it tops up their
  non-activating examples.
- hist: per latent (pooled over splits) the count of firing tokens per activation bin; the
  bins are fixed (HIST_EDGES, log-spaced), so counts add across batches, resumes and shards
  and no activation is stored. Log bins because a latent's activations span decades and the
  final max is unknown while streaming; 10 bins per decade are ~26% wide.
- cooc: per pair of latents the contexts (all splits) where both fire, for the Jaccard
  neighbours; kept only when the latents fit sample.cooccurrence_max_latents (it is
  latents^2 int32), else an empty [0, 0] tensor and no co-occurrence neighbours. Each
  context's firing set is buffered (cooc_buf, COOC_BUFFER contexts) and folded in with one
  [buffer, L] x [buffer, L] matmul when the buffer is full: per batch of 8 the dense outer
  product cost ~200 ms at 4,096 latents, the buffered one ~5 ms.

Slots are unordered while streaming (an entering example takes an evicted one's slot, so
kept activations never move); sort_slots() orders them for the final tables.
Memory: O(splits x latents x (n_top + n_reservoir) x ctx_len) + O(pool x ctx_len x k).
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.vocab import SPLITS

S = len(SPLITS)
FORMAT = 3  # 2: the zero sketch; 3: activation histograms and co-occurrence counts
# Sketch keys are below 2^62 (31-bit hash, 31-bit context id). Empty slots beat "no
# candidate" markers, so a changed row never takes in a non-candidate.
EMPTY = 1 << 62          # empty slot of a bottom-k sketch
CAND_NONE = EMPTY + 1    # a context that is no candidate for this sketch
NO_TOP = -1              # empty slot of a top-k list
TOP_NONE = -2            # a context where the latent did not fire
M31 = (1 << 31) - 1
LOW32 = (1 << 32) - 1
POOL_SALT = M31  # the "latent" whose hash orders the shared pool of contexts
# Histogram bins: [0, 1e-3), then 10 per decade from 1e-3 to 1e5. Activations past the last
# edge are counted in the last bin (select.py widens its upper edge to the latent's max).
HIST_EDGES = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 5, 81, dtype=torch.float64)])
N_BINS = len(HIST_EDGES) - 1
COOC_BUFFER = 1024  # contexts whose firing sets wait for one co-occurrence matmul (float32 exact below 2^24)


def hash31(a: Tensor, b: Tensor) -> Tensor:
    """A 31-bit hash of (a, b), bijective in b for fixed a (no collisions among contexts).

    Built from odd multipliers mod 2^31 and xor-shifts, all inside int64 without overflow,
    so it is identical on every device and torch version.
    """
    x = ((a & M31) * 0x2545F491 + (b & M31) * 0x4F6CDD1D + 0x1B873593) & M31
    for _ in range(2):
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & M31
    return x ^ (x >> 16)


def sketch_key(h: Tensor, cid: Tensor) -> Tensor:
    return (h << 31) | cid


def sketch_cid(key: Tensor) -> Tensor:
    return key & M31


def top_key(ctx_max: Tensor, cid: Tensor) -> Tensor:
    """Order by max activation, then by smaller context id; non-firing contexts get TOP_NONE."""
    bits = ctx_max.contiguous().view(torch.int32).to(torch.int64)
    key = (bits << 32) | (LOW32 - cid)
    return torch.where(ctx_max > 0, key, torch.full_like(key, TOP_NONE))


def top_cid(key: Tensor) -> Tensor:
    return LOW32 - (key & LOW32)


def top_max(key: Tensor) -> Tensor:
    return (key >> 32).to(torch.int32).view(torch.float32)


@dataclass
class SampleState:
    meta: dict[str, Any]
    n_tokens: Tensor      # [S] tokens seen per split
    n_contexts: Tensor    # [S]
    n_fired: Tensor       # [S*L] tokens with activation > 0
    sum_act: Tensor       # [S*L] float64, over firing tokens
    max_act: Tensor       # [S*L]
    n_ctx_fired: Tensor   # [S*L] contexts with at least one firing token
    top_key: Tensor       # [S*L, n_top]
    top_acts: Tensor      # [S*L, n_top, T]
    res_key: Tensor       # [S*L, R]
    res_max: Tensor       # [S*L, R]
    res_acts: Tensor      # [S*L, R, T]
    pool_key: Tensor      # [S, Q]
    pool_vals: Tensor     # [S, Q, T, k]
    pool_idx: Tensor      # [S, Q, T, k] int32
    zero_key: Tensor      # [S*L, Z] contexts where the latent never fired, bottom-k by hash
    hist: Tensor          # [L, N_BINS] firing tokens per HIST_EDGES bin, all splits
    cooc: Tensor          # [L, L] int32 contexts where both fire, or [0, 0] (over the cap)
    cooc_buf: Tensor      # [COOC_BUFFER, L] bool firing sets not yet in cooc (or [0, 0])
    cooc_fill: Tensor     # [1] rows of cooc_buf in use

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}

    def to(self, device: torch.device | str) -> SampleState:
        return SampleState(meta=dict(self.meta), **{k: v.to(device) for k, v in self.tensors().items()})


def cooc_rows(d_sae: int, cap: int) -> int:
    """Rows (and columns) of the co-occurrence counts: all latents up to the cap, else none."""
    return d_sae if d_sae <= cap else 0


def state_bytes(*, d_sae: int, ctx_len: int, k: int, n_top: int, n_reservoir: int, n_pool: int, n_zero: int,
                acts_bytes: int, cooc_cap: int = 0) -> int:
    """What new_state() allocates, from the same shapes (the memory check before a run)."""
    N, T = S * d_sae, ctx_len
    counters = 8 + 8 + 4 + 8  # n_fired, sum_act, max_act, n_ctx_fired
    per_row = counters + n_top * (8 + T * acts_bytes) + n_reservoir * (8 + 4 + T * acts_bytes) + n_zero * 8
    return (N * per_row + S * (2 * 8 + n_pool * (8 + T * k * 8)) + d_sae * N_BINS * 8 + 8
            + cooc_rows(d_sae, cooc_cap) * (cooc_rows(d_sae, cooc_cap) * 4 + COOC_BUFFER))


def new_state(*, d_sae: int, ctx_len: int, k: int, n_top: int, n_reservoir: int, n_pool: int, n_zero: int,
              acts_dtype: torch.dtype, device: torch.device | str, meta: dict[str, Any],
              cooc_cap: int = 0) -> SampleState:
    N, T, C = S * d_sae, ctx_len, cooc_rows(d_sae, cooc_cap)
    i64: dict[str, Any] = dict(dtype=torch.int64, device=device)
    return SampleState(
        meta={**meta, "format": FORMAT, "d_sae": d_sae, "ctx_len": ctx_len, "k": k},
        n_tokens=torch.zeros(S, **i64),
        n_contexts=torch.zeros(S, **i64),
        n_fired=torch.zeros(N, **i64),
        sum_act=torch.zeros(N, dtype=torch.float64, device=device),
        max_act=torch.zeros(N, dtype=torch.float32, device=device),
        n_ctx_fired=torch.zeros(N, **i64),
        top_key=torch.full((N, n_top), NO_TOP, **i64),
        top_acts=torch.zeros(N, n_top, T, dtype=acts_dtype, device=device),
        res_key=torch.full((N, n_reservoir), EMPTY, **i64),
        res_max=torch.zeros(N, n_reservoir, dtype=torch.float32, device=device),
        res_acts=torch.zeros(N, n_reservoir, T, dtype=acts_dtype, device=device),
        pool_key=torch.full((S, n_pool), EMPTY, **i64),
        pool_vals=torch.zeros(S, n_pool, T, k, dtype=torch.float32, device=device),
        pool_idx=torch.zeros(S, n_pool, T, k, dtype=torch.int32, device=device),
        zero_key=torch.full((N, n_zero), EMPTY, **i64),
        hist=torch.zeros(d_sae, N_BINS, **i64),
        cooc=torch.zeros(C, C, dtype=torch.int32, device=device),
        cooc_buf=torch.zeros(COOC_BUFFER if C else 0, C, dtype=torch.bool, device=device),
        cooc_fill=torch.zeros(1, **i64),
    )


def _gather_slots(payload: Tensor, pos: Tensor) -> Tensor:
    """payload [r, M, ...] indexed along dim 1 by pos [r, K]."""
    idx = pos.view(*pos.shape, *([1] * (payload.dim() - 2))).expand(-1, -1, *payload.shape[2:])
    return payload.gather(1, idx)


def _insert(keys: Tensor, cand: Tensor, largest: bool) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Keep the K best of slots [N, K] and candidates [N, B] in the slots, in place.

    Returns (row, slot, candidate column) of each entering candidate, or None. Only rows
    where some candidate beats the worst slot are touched.
    """
    K = keys.shape[1]
    if K == 0 or cand.shape[1] == 0:
        return None
    worst = keys.amin(1, keepdim=True) if largest else keys.amax(1, keepdim=True)
    rows = ((cand > worst) if largest else (cand < worst)).any(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    both = torch.cat([keys[rows], cand[rows]], 1)
    pos = both.topk(K, dim=1, largest=largest, sorted=False).indices
    kept = torch.zeros(both.shape, dtype=torch.bool, device=both.device).scatter_(1, pos, True)
    enter_r, enter_c = kept[:, K:].nonzero(as_tuple=True)
    _, evict_s = (~kept[:, :K]).nonzero(as_tuple=True)
    # Each row has as many entering candidates as evicted slots, and nonzero() lists both
    # row by row, so the i-th entering candidate takes the i-th evicted slot.
    row = rows[enter_r]
    keys[row, evict_s] = cand[row, enter_c]
    return row, evict_s, enter_c


def _acts_of(vals: Tensor, idx: Tensor, ctx: Tensor, latent: Tensor, d_sae: int) -> Tensor:
    """Per-token activations [E, T] of latent[e] in context ctx[e], from sparse codes [b, T, k].

    Sorts the codes by (context, latent) and reads each pair's run of entries, so the cost
    is O(b*T*k log + E*T) with no dense [b, T, d_sae] tensor.
    """
    b, T, k = vals.shape
    keys = (torch.arange(b, device=idx.device).view(b, 1, 1) * d_sae + idx).reshape(-1)
    keys, order = keys.sort()
    q = ctx * d_sae + latent
    lo = torch.searchsorted(keys, q)
    count = torch.searchsorted(keys, q, right=True) - lo
    pair = torch.repeat_interleave(torch.arange(len(q), device=q.device), count)
    first = torch.repeat_interleave(lo - (count.cumsum(0) - count), count)
    entry = order[first + torch.arange(len(pair), device=q.device)]
    out = torch.zeros(len(q), T, dtype=vals.dtype, device=vals.device)
    out[pair, (entry // k) % T] = vals.reshape(-1)[entry]
    return out


def update(state: SampleState, split: Tensor, cids: Tensor, vals: Tensor, idx: Tensor, ids: Tensor) -> Tensor:
    """Fold one batch in. split, cids [B]; vals, idx [B, T, k] (the SAE's sparse codes, in state
    rows); ids: the global latent id of each row, on the batch's device (LatentMap.hash_ids).

    Works on the sparse codes only (never a dense [B, T, d_sae] tensor), so the cost grows
    with B*T*k plus the examples that change. Returns the per-context max activation [B, L].
    """
    B, T, k = vals.shape
    L = state.d_sae
    dev = vals.device
    ctx_max = torch.zeros(B, L, dtype=vals.dtype, device=dev)
    ctx_max.scatter_reduce_(1, idx.reshape(B, T * k), vals.reshape(B, T * k), "amax")
    fired = ctx_max > 0

    firing = vals > 0
    rows_tok = (split.view(B, 1, 1) * L + idx)[firing]
    state.n_fired += torch.bincount(rows_tok, minlength=S * L)
    state.sum_act += torch.bincount(rows_tok, weights=vals[firing].double(), minlength=S * L)
    state.n_contexts += torch.bincount(split, minlength=S)
    state.n_tokens += torch.bincount(split, minlength=S) * T
    _count_bins(state.hist, idx[firing], vals[firing])
    if state.cooc.shape[0]:
        _buffer_pairs(state, fired)

    cid_col = cids.view(B, 1)
    tkey = top_key(ctx_max, cid_col)
    skey = sketch_key(hash31(ids.view(1, L), cid_col), cid_col)
    res_cand = torch.where(fired, skey, torch.full_like(skey, CAND_NONE))
    zero_cand = torch.where(fired, torch.full_like(skey, CAND_NONE), skey)
    pkey = sketch_key(hash31(torch.tensor(POOL_SALT, device=dev), cids), cids)

    for s in range(S):
        m = (split == s).nonzero().squeeze(1)
        if m.numel() == 0:
            continue
        rows = slice(s * L, (s + 1) * L)
        vs, ix, cm = vals[m], idx[m], ctx_max[m]
        state.n_ctx_fired[rows] += fired[m].sum(0)
        state.max_act[rows] = torch.maximum(state.max_act[rows], cm.amax(0))
        hit = _insert(state.top_key[rows], tkey[m].T, True)
        if hit is not None:
            lat, slot, col = hit
            state.top_acts[rows][lat, slot] = _acts_of(vs, ix, col, lat, L).to(state.top_acts.dtype)
        hit = _insert(state.res_key[rows], res_cand[m].T, False)
        if hit is not None:
            lat, slot, col = hit
            state.res_max[rows][lat, slot] = cm[col, lat]
            state.res_acts[rows][lat, slot] = _acts_of(vs, ix, col, lat, L).to(state.res_acts.dtype)
        _insert(state.zero_key[rows], zero_cand[m].T, False)
        hit = _insert(state.pool_key[s:s + 1], pkey[m].view(1, -1), False)
        if hit is not None:
            _, slot, col = hit
            state.pool_vals[s, slot] = vs[col]
            state.pool_idx[s, slot] = ix[col].to(torch.int32)
    return ctx_max


def _count_bins(hist: Tensor, rows: Tensor, vals: Tensor) -> None:
    """Add firing tokens (state rows, values) to the histograms; index_add, not bincount, so the
    cost is O(firing tokens) rather than a [L * N_BINS] temporary per batch."""
    edges = HIST_EDGES.to(device=vals.device, dtype=vals.dtype)
    b = (torch.bucketize(vals, edges[1:-1], right=True)).clamp_(max=N_BINS - 1)
    flat = hist.view(-1)
    flat.index_add_(0, rows * N_BINS + b, torch.ones_like(b))


def _count_pairs(cooc: Tensor, fired: Tensor) -> None:
    """Add contexts' firing sets fired [n, L] to the co-occurrence counts (n < 2^24: float32 is exact)."""
    if fired.shape[0]:
        f = fired.float()
        cooc += (f.T @ f).to(torch.int32)


def _buffer_pairs(state: SampleState, fired: Tensor) -> None:
    n, fill = fired.shape[0], int(state.cooc_fill)
    if fill + n > state.cooc_buf.shape[0]:
        flush_pairs(state)
        fill = 0
    if n > state.cooc_buf.shape[0]:
        _count_pairs(state.cooc, fired)
        return
    state.cooc_buf[fill:fill + n] = fired
    state.cooc_fill += n


def flush_pairs(state: SampleState) -> None:
    """Fold the buffered firing sets into cooc (before its counts are read or merged)."""
    fill = int(state.cooc_fill)
    if fill and state.cooc.shape[0]:
        _count_pairs(state.cooc, state.cooc_buf[:fill])
        state.cooc_buf.zero_()
    state.cooc_fill.zero_()


_SLOTS = {"top_key": (True, ["top_acts"]), "res_key": (False, ["res_max", "res_acts"]),
          "pool_key": (False, ["pool_vals", "pool_idx"]), "zero_key": (False, [])}


def sort_slots(state: SampleState) -> None:
    """Put every slot list in key order (top: best first; sketches: smallest hash first), in place."""
    for key, (largest, payloads) in _SLOTS.items():
        keys, pos = getattr(state, key).sort(dim=1, descending=largest)
        setattr(state, key, keys)
        for p in payloads:
            setattr(state, p, _gather_slots(getattr(state, p), pos))


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """For the bookkeeping: many small ops, where OpenMP fork/join costs more than it saves.
    On a busy 2-core machine the finalize took 7.9 s with 2 threads and 1.3 s with 1."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- merge -----------------------------------------------------------------------------------

_SHAPE_META = ("format", "d_sae", "ctx_len", "k", "config_key", "n_shards")


def merge_states(a: SampleState, b: SampleState) -> SampleState:
    """The state of a run over both parts' contexts (the parts must be disjoint, e.g. shards)."""
    for key in _SHAPE_META:
        if a.meta.get(key) != b.meta.get(key):
            raise ValueError(f"cannot merge sampler states: {key} differs ({a.meta.get(key)} vs {b.meta.get(key)})")
    overlap = set(a.meta["shards"]) & set(b.meta["shards"])
    if overlap:
        raise ValueError(f"cannot merge sampler states: both hold shard(s) {sorted(overlap)}")
    meta = dict(a.meta, shards=sorted(set(a.meta["shards"]) | set(b.meta["shards"])),
                complete=bool(a.meta.get("complete")) and bool(b.meta.get("complete")))
    if "n_outlier_tokens" in a.meta or "n_outlier_tokens" in b.meta:  # counted by sample.py's outlier rule
        meta["n_outlier_tokens"] = a.meta.get("n_outlier_tokens", 0) + b.meta.get("n_outlier_tokens", 0)
        positions = dict(a.meta.get("outlier_positions", {}))
        for pos, n in b.meta.get("outlier_positions", {}).items():
            positions[pos] = positions.get(pos, 0) + n
        meta["outlier_positions"] = positions
    flush_pairs(a)
    flush_pairs(b)
    ta, tb = a.tensors(), b.tensors()
    out = {name: ta[name] + tb[name]
           for name in ("n_tokens", "n_contexts", "n_fired", "sum_act", "n_ctx_fired", "hist", "cooc")}
    out["cooc_buf"], out["cooc_fill"] = ta["cooc_buf"], ta["cooc_fill"]  # both empty after the flushes
    out["max_act"] = torch.maximum(a.max_act, b.max_act)
    for key, (largest, payloads) in _SLOTS.items():
        out[key], pos = torch.cat([ta[key], tb[key]], 1).topk(ta[key].shape[1], dim=1, largest=largest)
        for p in payloads:
            out[p] = _gather_slots(torch.cat([ta[p], tb[p]], 1), pos)
    return SampleState(meta=meta, **out)


# --- files -----------------------------------------------------------------------------------


def save_state(state: SampleState, path: Path) -> None:
    """Atomic: a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"meta": state.meta, **{k: v.cpu() for k, v in state.tensors().items()}}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path: Path, device: torch.device | str = "cpu") -> SampleState:
    try:
        data = torch.load(path, map_location=device, weights_only=True)
        meta = data.pop("meta")
        if meta.get("format") != FORMAT:
            raise ExplainerError(f"sampler state {path} was written by another version of explainer (format "
                                 f"{meta.get('format')}, this one reads {FORMAT}); pass --restart to sample afresh")
        return SampleState(meta=meta, **data)
    except (RuntimeError, EOFError, OSError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as e:
        # A truncated or foreign file (a full disk, a bad copy): say which file and how to get past it.
        raise ExplainerError(
            f"sampler state {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "delete it to resample from the last committed rows, or pass --restart"
        ) from None
