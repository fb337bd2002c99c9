"""Sampler throughput vs the bare LM forward on the same contexts (target: >= 80%).

    python bench/sample.py [--tokens 100000] [--sae runs/sae] [--d-sae 4096 --k 32] [--dtype float32]

The bare forward runs lm.activations (stopped at the hooked layer) over the same contexts in
the same batches; it runs before and after the sampler and the mean is the reference, since
this machine is shared and noisy. The sampler figure is `sample.run` end to end on a fresh
DB (corpus loading, SAE encode, bookkeeping, checkpoints, finalize); the loop-only figure
leaves out corpus loading and the final write.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainer import sample, store  # noqa: E402
from explainer.corpus import iter_contexts, load_documents  # noqa: E402
from explainer.lm import load_model  # noqa: E402
from explainer.sae import TopKSAE, save_dictionary  # noqa: E402
from explainer.settings import CorpusSettings, ModelSettings, SampleSettings, Settings  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(lm, settings: Settings, docs) -> tuple[float, int]:
    T = settings.corpus.ctx_len
    limit = math.ceil(settings.sample.tokens / T)
    ctxs = []
    for c in iter_contexts(settings.corpus, lm.tokenizer, splits=sample.SPLITS, documents=docs):
        if c.context_id >= limit:
            break
        ctxs.append(c)
    bs = settings.model.batch_size
    t0 = time.perf_counter()
    for i in range(0, len(ctxs), bs):
        lm.activations(torch.tensor([c.token_ids for c in ctxs[i:i + bs]]))
    return time.perf_counter() - t0, len(ctxs) * T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--sae", type=Path, default=None, help="a trained dictionary; default runs/sae if present, else random")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(ModelSettings(name=args.model, layer=args.layer, dtype=args.dtype, batch_size=args.batch_size))
    tmp = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    sae_path = args.sae or (Path("runs/sae") if (Path("runs/sae") / "cfg.json").exists() else None)
    if sae_path is None:
        sae = TopKSAE(lm.d_model, args.d_sae, args.k, cfg={"model_name": args.model, "hook_name": lm.hook,
                                                           "hook_layer": lm.layer})
        sae.init_tied(torch.Generator().manual_seed(0))
        sae_path = save_dictionary(sae, tmp / "sae")
        what = f"random TopK SAE d_sae={args.d_sae} k={args.k}"
    else:
        what = f"dictionary {sae_path}"
    settings = Settings(
        db=tmp / "bench.duckdb",
        model=ModelSettings(name=args.model, layer=args.layer, dtype=args.dtype, batch_size=args.batch_size),
        corpus=CorpusSettings(),
        sample=SampleSettings(tokens=args.tokens),
    )
    t = time.perf_counter()
    docs = load_documents(settings.corpus)
    load_s = time.perf_counter() - t
    print(f"model {args.model} layer {args.layer} {args.dtype}, batch {args.batch_size}, {what}, "
          f"{torch.get_num_threads()} threads; corpus load {load_s:.1f} s")

    bare1, n_tok = bare_forward(lm, settings, docs)
    print(f"bare forward (1):   {n_tok / bare1:8.0f} tok/s  ({n_tok:,} tokens, {bare1:.1f} s)")
    rss_before = peak_rss_mb()
    con = store.connect(settings.db)
    t = time.perf_counter()
    res = sample.run(con, settings, sae_path, lm=lm)
    wall = time.perf_counter() - t
    con.close()
    rss_after = peak_rss_mb()
    bare2, _ = bare_forward(lm, settings, docs)
    print(f"bare forward (2):   {n_tok / bare2:8.0f} tok/s")
    bare = n_tok / ((bare1 + bare2) / 2)
    end_to_end = res.n_tokens / wall
    print(f"sampler end to end: {end_to_end:8.0f} tok/s  ({wall:.1f} s, incl. corpus load, finalize)")
    print(f"sampler loop only:  {res.tokens_per_s:8.0f} tok/s")
    print(f"ratio end to end / bare: {end_to_end / bare:.1%}   loop only / bare: {res.tokens_per_s / bare:.1%}   "
          "(target >= 80%)")
    print(f"peak RSS: {rss_before:.0f} MB before sampling, {rss_after:.0f} MB after; "
          f"DB {res.db_bytes / 2**20:.1f} MB; dead latents {res.dead_latents}, median frequency {res.median_frequency:.2e}")


if __name__ == "__main__":
    main()
