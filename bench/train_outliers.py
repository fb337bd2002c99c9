"""Old recipe (every token trained on) vs outlier-excluding recipe, on the SAME activations.

    python bench/train_outliers.py --tokens 65536 --every 16384

The LM forward dominates a run's cost, so this runs it once: it collects --tokens train-split
activations and the first --eval-tokens held-out ones, then trains two SAEs with train_step.Trainer
from the same init seed on the same shuffled batches, one on every token (the recipe before
outlier exclusion) and one with outlier tokens removed from every batch (and from the b_pre /
scale init sample). Every --every tokens both are evaluated on the same held-out tokens:
`fvu` on ordinary tokens (norm <= outlier_factor x median), `fvu_all` on all of them. It shows
the effect of the exclusion with the LM cost of one run, when a full `explainer train` per
arm does not fit the machine; no ΔCE (that needs the full model, 3 passes per point).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from explainer.corpus.contexts import iter_contexts, load_documents
from explainer.lm import load_model
from explainer.sae import step as train_step
from explainer.sae import train
from explainer.sae.model import TopKSAE
from explainer.sae.outliers import OutlierRule
from explainer.settings import ModelSettings, Settings


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65_536)
    p.add_argument("--every", type=int, default=16_384)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    s = Settings(model=ModelSettings(dtype=args.dtype))
    ts, T = s.train, s.corpus.ctx_len
    t0 = time.perf_counter()
    lm = load_model(s.model)
    docs = load_documents(s.corpus)
    stream = train.ContextStream(s, lm.tokenizer, docs)
    start = time.perf_counter()
    acts = train._activations(lm, stream.take(math.ceil(args.tokens / T)), s.model.batch_size)
    fwd_tok_s = len(acts) / (time.perf_counter() - start)
    rows = []
    for c in iter_contexts(s.corpus, lm.tokenizer, splits=("heldout",), documents=docs):
        rows.append(c.token_ids)
        if len(rows) * T >= args.eval_tokens:
            break
    ev = train._activations(lm, torch.tensor(rows), s.model.batch_size)
    print(f"LM forward: {fwd_tok_s:,.0f} tok/s ({args.dtype}, machine shared); {len(acts):,} train tokens, "
          f"{len(ev):,} held-out tokens", flush=True)
    sample = acts[: ts.median_samples]
    rule = OutlierRule.measure(ts.outlier_factor, sample)
    ev_ord = ~rule.mask(ev)
    print(f"median norm {rule.median_norm:.1f}; outliers: train {int(rule.mask(acts).sum())}, "
          f"held-out {int((~ev_ord).sum())}", flush=True)
    arms = {}
    for name, exclude in (("all tokens (old)", False), ("outliers excluded (new)", True)):
        init = sample[~rule.mask(sample)] if exclude else sample
        scale = math.sqrt(lm.d_model) / float(init.norm(dim=1).mean())
        sae = TopKSAE(lm.d_model, ts.n_latents, ts.k)
        sae.init_tied(torch.Generator().manual_seed(ts.seed))
        with torch.no_grad():
            sae.b_dec.copy_(train_step.geometric_median(init * scale))
        arms[name] = (train_step.Trainer(sae, ts), scale, exclude)
    perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(ts.seed))
    keep_all = ~rule.mask(acts)
    points = []
    for i in range(0, len(acts) - ts.batch_tokens + 1, ts.batch_tokens):
        idx = perm[i : i + ts.batch_tokens]
        for trainer, scale, exclude in arms.values():
            trainer.step(acts[idx[keep_all[idx]] if exclude else idx] * scale)
        done = i + ts.batch_tokens
        if done % args.every == 0 or done + ts.batch_tokens > len(acts):
            for name, (trainer, scale, _) in arms.items():
                x_hat = trainer.sae.folded(scale).reconstruct(ev)
                point = {"arm": name, "tokens": done, "fvu": fvu(ev[ev_ord], x_hat[ev_ord]), "fvu_all": fvu(ev, x_hat),
                         "dead": float(trainer.dead_mask().float().mean()), "wall_s": round(time.perf_counter() - t0)}
                points.append(point)
                print(json.dumps(point), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "forward_tok_s": fwd_tok_s, "median_norm": rule.median_norm,
                       "points": points}, f, indent=2)


if __name__ == "__main__":
    main()
