"""FVU-vs-tokens curve of one training run, to choose the demo's token count, dtype, batch and lr.

    python bench/train_curve.py --out /tmp/curve                       # the default run, a point every 65,536 tokens
    python bench/train_curve.py --out /tmp/bf16 --dtype bfloat16 --tokens 655360
    python bench/train_curve.py --out /tmp/b2k --batch-tokens 2048 --lr 3e-4 --every 32768

One run, trained in segments: `explainer train --resume` with a larger token count continues a
run exactly as if it had been asked for those tokens at first (when a segment ends on a shuffle
block, i.e. a multiple of batch_tokens x shuffle_steps = 8,192 tokens by default). After each
segment the dictionary is evaluated on the same held-out tokens (the first --eval-tokens of the
held-out split): `fvu` on ordinary tokens (outliers excluded), `fvu_all` on every token. The
last point also gets the ΔCE with its interval (--ce-tokens). tok/s is the training loop's own
(LM forward + SAE steps), from this process; on a shared machine compare runs measured alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from explainer.sae import train
from explainer.settings import CorpusSettings, ModelSettings, Settings, TrainSettings


def curve(args: argparse.Namespace) -> list[dict]:
    extra = {k: v for k, v in (("batch_tokens", args.batch_tokens), ("lr", args.lr)) if v is not None}
    points, wall = [], 0.0
    marks = list(range(args.every, args.tokens, args.every)) + [args.tokens]
    for i, tokens in enumerate(marks):
        last = i == len(marks) - 1
        s = Settings(model=ModelSettings(name=args.model, layer=args.layer, dtype=args.dtype),
                     corpus=CorpusSettings(source=args.corpus, ctx_len=args.ctx_len),
                     train=TrainSettings(out=args.out, tokens=tokens, eval_tokens=args.eval_tokens,
                                         n_latents=args.n_latents, k=args.k, median_samples=args.median_samples,
                                         ce_tokens=args.ce_tokens if last else 0, outlier_factor=args.outlier_factor,
                                         normalize=args.normalize, **extra))
        start = time.perf_counter()
        res = train.run(s, resume=i > 0)
        wall += time.perf_counter() - start
        m = res.metrics
        point = {"tokens": res.steps * max(1, round(s.train.batch_tokens / s.corpus.ctx_len)) * s.corpus.ctx_len,
                 "fvu": m.get("fvu"), "fvu_all": m.get("fvu_all"), "l0": m.get("l0"), "dead": m.get("dead_fraction"),
                 "n_outlier_tokens": m.get("n_outlier_tokens"), "train_tok_s": round(res.tokens_per_s),
                 "train_s": round(res.seconds, 1), "wall_s": round(wall, 1)}
        if last:
            point.update({k: m.get(k) for k in ("ce_increase", "ce_increase_ci95", "ce_increase_zero_ablation",
                                                "ce_recovered", "ce_contexts")})
        points.append(point)
        print(json.dumps(point), flush=True)
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="dictionary folder (must not exist)")
    p.add_argument("--tokens", type=int, default=TrainSettings().tokens)
    p.add_argument("--every", type=int, default=65_536, help="tokens between evaluations (a multiple of 32,768)")
    d, t = ModelSettings(), TrainSettings()
    p.add_argument("--model", default=d.name)
    p.add_argument("--layer", type=int, default=d.layer)
    p.add_argument("--corpus", default=CorpusSettings().source)
    p.add_argument("--ctx-len", type=int, default=CorpusSettings().ctx_len)
    p.add_argument("--n-latents", type=int, default=t.n_latents)
    p.add_argument("--k", type=int, default=t.k)
    p.add_argument("--median-samples", type=int, default=t.median_samples)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="LM forward dtype")
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--normalize", default="none", choices=["none", "layernorm"])
    p.add_argument("--outlier-factor", type=float, default=TrainSettings().outlier_factor)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of every curve point")
    p.add_argument("--ce-tokens", type=int, default=TrainSettings().ce_tokens, help="ΔCE tokens at the last point")
    p.add_argument("--json", type=Path, default=None, help="also write the points here")
    args = p.parse_args()
    points = curve(args)
    print(f"\n{'tokens':>9} {'fvu':>7} {'fvu_all':>7} {'L0':>5} {'dead':>5} {'tok/s':>6} {'wall s':>7}")
    for q in points:
        print(f"{q['tokens']:>9,} {q['fvu']:>7.4f} {q['fvu_all']:>7.4f} {q['l0']:>5.1f} {q['dead']:>5.2f} "
              f"{q['train_tok_s']:>6} {q['wall_s']:>7.0f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "points": points},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
