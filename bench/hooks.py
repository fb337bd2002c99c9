"""Activation collection speed and scale at each hook kind of one layer (the forward stops after the hooked module).

    python bench/hooks.py [--model smollm2] [--layer 15] [--contexts 64] [--ctx-len 64] [--repeats 3]

For each hook (layers.L:input, layers.L.self_attn, layers.L.mlp, layers.L, and the full model for
comparison) it runs SubjectModel.activations over the same builtin-corpus contexts and prints
tokens/s (best of --repeats passes, so a busy shared machine disturbs it less) and the median
token norm of what the hook reads. Timings on a shared CPU vary; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import time

import torch

from explainer.corpus.contexts import iter_contexts, load_documents
from explainer.lm import load_model
from explainer.settings import CorpusSettings, ModelSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    corpus = CorpusSettings(ctx_len=args.ctx_len)
    L = args.layer
    hooks = [f"layers.{L}:input", f"layers.{L}.self_attn", f"layers.{L}.mlp", f"layers.{L}"]
    lm = None
    rows = []
    for hook in hooks + ["full model"]:
        if hook != "full model" or lm is None:
            lm = load_model(ModelSettings(name=args.model, hook=hook if hook != "full model" else f"layers.{L}",
                                          device="cpu"))
        if not rows:
            docs = load_documents(corpus)
            ids = torch.tensor([c.token_ids for c, _ in zip(iter_contexts(corpus, lm.tokenizer, documents=docs),
                                                            range(args.contexts))])
        best = float("inf")
        norms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(ids), args.batch_size):
                if hook == "full model":
                    lm.ce_losses(ids[i: i + args.batch_size])
                else:
                    norms.append(lm.activations(ids[i: i + args.batch_size]).norm(dim=-1).flatten())
            best = min(best, time.perf_counter() - t0)
        median = f"{float(torch.cat(norms).median()):.1f}" if norms else "-"
        rows.append((hook, ids.numel() / best, median))
    print(f"model {args.model}, {len(ids)} contexts x {args.ctx_len} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'hook':<24} {'tokens/s':>10} {'median norm':>12}")
    for hook, tps, median in rows:
        print(f"{hook:<24} {tps:>10.0f} {median:>12}")


if __name__ == "__main__":
    main()
