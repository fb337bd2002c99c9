"""Sampler throughput vs the bare LM forward on the same contexts (target: >= 80%).

    python bench/sample.py [--tokens 65536] [--sae runs/sae] [--d-sae 4096 --k 32] [--dtype float32]

This machine is shared and its load swings by 5x within a minute, so the two are measured
interleaved: after each sampler batch the progress callback runs the bare forward
(lm.activations, stopped at the hooked layer) on the same contexts, timed apart. The
sampler's time per batch is the time between callbacks minus that bare forward. The
end-to-end figure adds the sampler's fixed costs (corpus load, split plan, final write).
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

from explainer.corpus.contexts import iter_contexts, load_documents  # noqa: E402
from explainer.lm import load_model  # noqa: E402
from explainer.sae.formats import save_dictionary  # noqa: E402
from explainer.sae.model import TopKSAE  # noqa: E402
from explainer.sample import sampler as sample
from explainer.settings import CorpusSettings, ModelSettings, SampleSettings, Settings  # noqa: E402
from explainer.store import db as store


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_contexts(lm, settings: Settings, docs) -> list:
    limit = math.ceil(settings.sample.tokens / settings.corpus.ctx_len)
    out = []
    for c in iter_contexts(settings.corpus, lm.tokenizer, splits=sample.SPLITS, documents=docs):
        if c.context_id >= limit:
            break
        out.append(c)
    return out


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

    ctxs = first_contexts(lm, settings, docs)
    T, bs = settings.corpus.ctx_len, args.batch_size
    lm.activations(torch.tensor([c.token_ids for c in ctxs[:bs]]))  # warm up
    timing = {"bare": [], "tokens": [], "sampler": 0.0, "last": None}

    def interleave(info: dict) -> None:
        now = time.perf_counter()
        if timing["last"] is not None:
            timing["sampler"] += now - timing["last"]
        done = info["tokens"] // T
        batch = ctxs[done - bs:done]
        t = time.perf_counter()
        lm.activations(torch.tensor([c.token_ids for c in batch]))
        timing["bare"].append(time.perf_counter() - t)
        timing["tokens"].append(len(batch) * T)
        timing["last"] = time.perf_counter()

    rss_before = peak_rss_mb()
    con = store.connect(settings.db)
    t = time.perf_counter()
    res = sample.run(con, settings, sae_path, lm=lm, progress=interleave)
    wall = time.perf_counter() - t - sum(timing["bare"])
    con.close()
    rss_after = peak_rss_mb()
    # The first batch has no interval before it: compare the batches both sides timed.
    bare = sum(timing["tokens"][1:]) / sum(timing["bare"][1:])
    loop = sum(timing["tokens"][1:]) / timing["sampler"]
    end_to_end = res.n_tokens / wall
    print(f"bare forward:       {bare:8.0f} tok/s  ({sum(timing['tokens']):,} tokens, {sum(timing['bare']):.1f} s)")
    print(f"sampler loop:       {loop:8.0f} tok/s  (LM + SAE encode + bookkeeping + checkpoints)")
    print(f"sampler end to end: {end_to_end:8.0f} tok/s  ({wall:.1f} s: adds corpus load, split plan, final write)")
    print(f"ratio loop / bare: {loop / bare:.1%}   end to end / bare: {end_to_end / bare:.1%}   (target >= 80%)")
    print(f"peak RSS: {rss_before:.0f} MB before sampling, {rss_after:.0f} MB after; "
          f"DB {res.db_bytes / 2**20:.1f} MB; dead latents {res.dead_latents}, median frequency {res.median_frequency:.2e}")


if __name__ == "__main__":
    main()
