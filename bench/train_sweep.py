"""FVU-vs-tokens curves for a grid of batch sizes x learning rates, to choose the demo's training defaults.

    python bench/train_sweep.py --cache /tmp/sweep_acts.pt                       # 131,072 tokens, a point every 32,768
    python bench/train_sweep.py --cache /tmp/sweep_acts.pt --grid "4096:1;1024:1,2,4,8;512:4" --json /tmp/sweep.json
    python bench/train_sweep.py --cache /tmp/sweep_acts.pt --tokens 65536 --every 16384 --grid "2048:2,4"

The subject model runs once: the first run writes the train-split activations of the default
run's context stream (and the first --eval-tokens of the --eval-split) to --cache, a file
outside the repository (~340 MB for 147k tokens of d_model 576 in float32); later runs with the
same model, layer, corpus and token counts read it back. Every grid point then trains a fresh
dictionary through the package's own code on those activations: `train._start` (outlier rule and
norm scale measured on the b_pre sample, geometric-median b_pre, tied init), `train._block` (the
same shuffle blocks, outlier flags and scaling as `explainer train`) and `Trainer.step`; the
cache only stands in for the LM forward, keyed by the context's token ids. What differs from
`explainer train`: no checkpoints, and no held-out evaluation.

Every --every tokens the dictionary is evaluated on the first --eval-tokens of the VALIDATION
split (the split that may select settings; held-out tokens never do): `fvu` on ordinary tokens
(outliers excluded, as in metrics.json), `fvu_all` on every token, L0 on ordinary tokens, `dead`
(train-side: no firing in the last train.dead_tokens tokens) and `never` (never fired on the
eval tokens). `sae_s` is the seconds spent in SAE steps alone; the LM forward, which dominates
`explainer train` on a CPU, costs the same per token whatever the batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explainer.corpus.contexts import iter_contexts, load_documents
from explainer.sae import train
from explainer.sae.distributed import Dist
from explainer.sae.evaluate import _Sums
from explainer.sae.step import Trainer
from explainer.settings import CorpusSettings, ModelSettings, Settings, TrainSettings

GAO_LR = 2e-4  # Gao et al.'s lr at 16k latents; --grid multiplies it, whatever train.default_lr does


def parse_grid(text: str) -> list[tuple[int, float]]:
    """"4096:1;1024:1,2" -> [(4096, 1.0), (1024, 1.0), (1024, 2.0)]: batch tokens and lr multipliers."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        batch, mults = part.split(":")
        out += [(int(batch), float(m)) for m in mults.split(",")]
    return out


class CachedLM:
    """Stands in for SubjectModel.activations with activations computed once, looked up by token ids."""

    def __init__(self, ids: Tensor, acts: Tensor, tokenizer: Any) -> None:
        self.rows = {tuple(r): i for i, r in enumerate(ids.tolist())}
        self.acts, self.tokenizer = acts, tokenizer
        self.d_model, self.device = acts.shape[-1], torch.device("cpu")

    def activations(self, ids: Tensor) -> Tensor:
        return self.acts[[self.rows[tuple(r)] for r in ids.tolist()]]


def _cache_key(s: Settings, n_eval: int, split: str) -> str:
    """What a cache must match to be reused; one holding more train contexts than asked for serves too."""
    return json.dumps({"model": s.model.model_dump(mode="json"), "corpus": s.corpus.model_dump(mode="json"),
                       "n_eval": n_eval, "split": split}, sort_keys=True)


def build_cache(s: Settings, path: Path, n_train: int, n_eval: int, split: str) -> dict[str, Any]:
    """Run the LM once over the train stream's first n_train contexts and the split's first n_eval."""
    from explainer.lm import load_model

    lm = load_model(s.model)
    docs = load_documents(s.corpus)
    ids = train.ContextStream(s, lm.tokenizer, docs).take(n_train)
    rows = []
    for ctx in iter_contexts(s.corpus, lm.tokenizer, splits=(split,), documents=docs):
        rows.append(ctx.token_ids)
        if len(rows) >= n_eval:
            break
    eval_ids = torch.tensor(rows, dtype=torch.long)
    every, start, parts = 64, time.perf_counter(), []
    for i in range(0, len(ids), every):
        parts.append(train._activations(lm, ids[i : i + every], s.model.batch_size))
        done = min(i + every, len(ids)) * s.corpus.ctx_len
        print(f"cache: {done:,} train tokens, {done / (time.perf_counter() - start):.0f} tok/s", flush=True)
    shape = (-1, s.corpus.ctx_len, lm.d_model)
    data = {"key": _cache_key(s, n_eval, split), "ids": ids, "acts": torch.cat(parts).reshape(shape),
            "eval_ids": eval_ids, "eval_acts": train._activations(lm, eval_ids, s.model.batch_size).reshape(shape),
            "forward_tok_s": len(ids) * s.corpus.ctx_len / (time.perf_counter() - start)}
    tmp = path.with_suffix(".partial")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


@torch.no_grad()
def evaluate(trainer: Trainer, r: Any, eval_acts: Tensor) -> dict[str, float]:
    """fvu (ordinary tokens), fvu_all, L0 and never-fired fraction of the folded dictionary on raw eval activations."""
    sae = trainer.sae.folded(r.scale)
    ordinary, every = _Sums(sae.d_in), _Sums(sae.d_in)
    l0, counts = 0.0, torch.zeros(sae.d_sae, dtype=torch.long)
    for chunk in eval_acts.split(64):
        x = chunk.reshape(-1, sae.d_in)
        keep = ~r.rule.mask(x)
        values, indices, x_hat = sae.encode_decode(x)
        every.add(x, x_hat)
        ordinary.add(x[keep], x_hat[keep])
        active = (values > 0) & keep[:, None]
        l0 += float(active.sum())
        counts += torch.bincount(indices[active], minlength=sae.d_sae)
    return {"fvu": ordinary.fvu(), "fvu_all": every.fvu(), "l0": l0 / max(ordinary.n, 1),
            "dead": float(trainer.dead_mask().float().mean()), "never": float((counts == 0).float().mean())}


def sweep_one(s: Settings, lm: CachedLM, docs: Any, eval_acts: Tensor, every: int) -> list[dict[str, Any]]:
    """Train one fresh dictionary as `explainer train` would, evaluating every `every` tokens."""
    ts, ctx_len, dist = s.train, s.corpus.ctx_len, Dist()
    torch.manual_seed(ts.seed)
    r, position = train._start(s, lm, docs, {}, dist, None)
    trainer = r.trainer
    ctx_per_step = max(1, round(ts.batch_tokens / ctx_len))
    step_tokens = ctx_per_step * ctx_len
    total_steps = max(1, ts.tokens // step_tokens)
    stream = train.ContextStream(s, lm.tokenizer, docs, **position)
    points: list[dict[str, Any]] = []
    sae_s, next_eval, stats = 0.0, every, {"fvu": math.nan}
    while trainer.steps < total_steps:
        block = trainer.steps // ts.shuffle_steps
        block_steps = min(ts.shuffle_steps, total_steps - block * ts.shuffle_steps)
        acts, outlier, _where = train._block(s, lm, stream.take(ctx_per_step * block_steps), dist, r, block)
        for j in range(block_steps):
            rows = slice(j * step_tokens, (j + 1) * step_tokens)
            keep = ~outlier[rows]
            start = time.perf_counter()
            if bool(keep.any()):
                stats = trainer.step(acts[rows][keep])
                if not math.isfinite(stats["loss"]):
                    points.append({"tokens": trainer.steps * step_tokens, "diverged": True})
                    return points
            else:
                trainer.steps += 1
            sae_s += time.perf_counter() - start
            tokens = trainer.steps * step_tokens
            if tokens >= next_eval or trainer.steps == total_steps:
                points.append({"tokens": tokens, **evaluate(trainer, r, eval_acts), "train_fvu": stats["fvu"],
                               "sae_s": round(sae_s, 1)})
                next_eval += every
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="activation cache file, outside the repo (made if missing)")
    p.add_argument("--grid", default="4096:1;1024:1,2,4,8;512:4",
                   help="BATCH_TOKENS:LR_MULT,...;... with lr = mult x 2e-4/sqrt(n_latents/16384) (Gao et al.)")
    p.add_argument("--tokens", type=int, default=131_072, help="training tokens per grid point")
    p.add_argument("--every", type=int, default=32_768, help="tokens between evaluations")
    p.add_argument("--eval-split", default="validation", choices=["validation", "heldout"])
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--json", type=Path, default=None, help="also write every point here")
    args = p.parse_args()

    s = Settings(model=ModelSettings(), corpus=CorpusSettings(), train=TrainSettings(tokens=args.tokens))
    ctx_len = s.corpus.ctx_len
    n_train = max(math.ceil(args.tokens / ctx_len), math.ceil(s.train.median_samples / ctx_len))
    n_eval = math.ceil(args.eval_tokens / ctx_len)
    data = torch.load(args.cache, mmap=True) if args.cache.is_file() else None
    if data is None or data["key"] != _cache_key(s, n_eval, args.eval_split) or len(data["ids"]) < n_train:
        data = build_cache(s, args.cache, n_train, n_eval, args.eval_split)
    from transformers import AutoTokenizer

    from explainer.lm import resolve

    lm = CachedLM(data["ids"], data["acts"], AutoTokenizer.from_pretrained(resolve(s.model.name)))
    docs = load_documents(s.corpus)
    results = []
    for batch, mult in parse_grid(args.grid):
        lr = mult * GAO_LR / math.sqrt(s.train.n_latents / 2**14)
        run = s.model_copy(update={"train": s.train.model_copy(update={"batch_tokens": batch, "lr": lr})})
        for point in sweep_one(run, lm, docs, data["eval_acts"], args.every):
            row = {"batch_tokens": batch, "lr_mult": mult, "lr": lr, **point}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'batch':>6} {'lr x':>5} {'tokens':>8} {'fvu':>7} {'fvu_all':>7} {'L0':>5} {'dead':>5} {'never':>5} {'sae_s':>6}")
    for q in results:
        if q.get("diverged"):
            print(f"{q['batch_tokens']:>6} {q['lr_mult']:>5g} {q['tokens']:>8,} diverged (non-finite loss)")
            continue
        print(f"{q['batch_tokens']:>6} {q['lr_mult']:>5g} {q['tokens']:>8,} {q['fvu']:>7.4f} {q['fvu_all']:>7.4f} "
              f"{q['l0']:>5.1f} {q['dead']:>5.3f} {q['never']:>5.3f} {q['sae_s']:>6.0f}")
    if args.json:
        meta = {"args": {k: str(v) for k, v in vars(args).items()}, "eval_split": args.eval_split,
                "forward_tok_s_when_cached": data.get("forward_tok_s")}
        args.json.write_text(json.dumps({**meta, "points": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
