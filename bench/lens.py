"""Logit lens and decoder-cosine neighbours: latents/s and peak memory, blockwise.

    python bench/lens.py [--sizes 4096,262144,1048576] [--max-seconds 60] [--smollm2] [--threads N]

Per size, in a fresh subprocess (so each peak RSS is its own): a random decoder [n, 576]
against a random unembedding [49,152, 576] (SmolLM2-135M's shapes; --smollm2 uses the real
model's unembedding and final norm instead, loaded through explainer.lm), computed by
explainer.sample.lens exactly as `explainer sample` / `explainer lens` call it, in the
default blocks. The lens costs n x vocab x d and the neighbours n x n x d multiply-adds: at
1M latents the neighbours are ~5.8e14 flops, hours on a small CPU. So each phase runs
whole blocks until --max-seconds has passed, and the rate is latents done / seconds spent;
`projected_s` is n / rate. Also times the sampler's per-batch histogram and co-occurrence
bookkeeping at the demo's shapes (8 contexts x 64 tokens x k=32, 4,096 latents).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from explainer.sample import lens
from explainer.sample.state import COOC_BUFFER, N_BINS, _count_bins, _count_pairs, one_thread

D, VOCAB = 576, 49_152


def _timed_blocks(n: int, block: int, max_s: float, fn: Any) -> dict[str, Any]:
    """Run fn(slice) over whole blocks until max_s; rate from what was done."""
    t0, done = time.perf_counter(), 0
    for lo in range(0, n, block):
        fn(slice(lo, min(n, lo + block)))
        done = min(n, lo + block)
        if time.perf_counter() - t0 > max_s:
            break
    dt = time.perf_counter() - t0
    return {"latents_done": done, "seconds": round(dt, 2), "latents_per_s": round(done / dt, 1),
            "projected_s": round(n / (done / dt), 1), "block": block}


def one(n: int, max_s: float, smollm2: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if smollm2:
        from explainer.lm import load_model
        from explainer.settings import ModelSettings

        lm = load_model(ModelSettings(name="smollm2", layer=15))
        W_U = lens.unembedding(lm.model).detach()
        nm = lens.norm_map(lens.final_norm(lm.model), W_U.shape[1])
    else:
        W_U = torch.randn(VOCAB, D, generator=g) / D ** 0.5
        nm = lens.NormMap(torch.rand(D, generator=g) + 0.5, False)
    W_dec = torch.randn(n, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    out: dict[str, Any] = {"latents": n, "d": D, "vocab": W_U.shape[0], "threads": torch.get_num_threads(),
                           "unembedding": "smollm2" if smollm2 else "random"}
    lens_block = lens.block_size(W_U.shape[0])
    out["lens"] = _timed_blocks(n, lens_block, max_s, lambda sl: lens.logit_lens(W_dec[sl], W_U, nm))
    nb_block = lens.block_size(n, lens.NEIGHBOUR_BLOCK_ELEMENTS)
    out["neighbours"] = _timed_blocks(n, nb_block, max_s,
                                      lambda sl: lens.decoder_neighbours(W_dec, rows=torch.arange(sl.start, sl.stop)))
    if smollm2:  # sanity: a row along a token's unembedding (gamma undone) puts that token on top
        planted = (W_U[[100, 2000, 30000]] / nm.gamma).float()
        out["planted_top"] = lens.logit_lens(planted, W_U, nm).top_ids[:, 0].tolist()
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def sampler_overhead(reps: int = 50) -> dict[str, Any]:
    """Per-batch cost of the histogram and co-occurrence updates at the demo's shapes."""
    g = torch.Generator().manual_seed(1)
    B, T, k, L = 8, 64, 32, 4096
    idx = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    vals = torch.rand(B, T, k, generator=g) * 5
    hist = torch.zeros(L, N_BINS, dtype=torch.int64)
    cooc = torch.zeros(L, L, dtype=torch.int32)
    ctx_max = torch.zeros(B, L).scatter_reduce_(1, idx.view(B, -1), vals.view(B, -1), "amax")
    t0 = time.perf_counter()
    for _ in range(reps):
        _count_bins(hist, idx[vals > 0], vals[vals > 0])
    t1 = time.perf_counter()
    fired = (ctx_max > 0).repeat(COOC_BUFFER // B, 1)  # what the sampler folds in at once
    for _ in range(3):
        _count_pairs(cooc, fired)
    t2 = t1 + (time.perf_counter() - t1) / 3 / (COOC_BUFFER // B) * reps  # per batch of B
    return {"batch": f"{B} contexts x {T} tokens x k={k}, {L} latents",
            "histogram_ms_per_batch": round((t1 - t0) / reps * 1e3, 2),
            "cooccurrence_ms_per_batch": round((t2 - t1) / reps * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,262144,1048576")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per phase and size")
    ap.add_argument("--smollm2", action="store_true", help="the real SmolLM2 unembedding and norm (demo size only)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(one(args.one, args.max_seconds, args.smollm2)))
        return
    with one_thread(torch.device("cpu")):  # as the sampler runs its bookkeeping
        print(json.dumps({"sampler_bookkeeping": sampler_overhead()}), flush=True)
    for n in map(int, args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--max-seconds", str(args.max_seconds)]
        cmd += (["--smollm2"] if args.smollm2 else []) + (["--threads", str(args.threads)] if args.threads else [])
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
