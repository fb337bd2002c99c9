"""Throughput of one TopK SAE train step (forward + backward + decoder geometry + Adam).

    python bench/train.py                     # d=576, 16,384 latents, k=32, 4,096-token batches
    python bench/train.py --steps 10 --device cuda --latents 32768 --batch 65536
    python bench/train.py --onthefly 8        # + real LM forward vs forward + SAE step, interleaved
    python bench/train.py --demo              # + the default `explainer train` run, end to end

Prints tokens/s for our sparse and dense paths in fp32 and bf16, EleutherAI sparsify's
SparseCoder step when `eai-sparsify` is installed (the `bench` extra), and a bare bf16
`x @ W_enc` of the same shape as the bound a step can at best approach. All figures come
from this one process, the configurations taking turns step by step so that load from other
processes hits them alike: compare the ratios, not the absolute numbers.

--demo also runs the default training (real model, default settings) and then the bare LM
forward, stopped at the hook layer, on the same number of tokens: on-the-fly training should
keep >= 80% of the bare forward's tokens/s.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from explainer.sae.model import TopKSAE
from explainer.sae.step import Trainer
from explainer.settings import TrainSettings


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Fastest seconds per call of each step, timed in turns so load changes hit all alike.

    The minimum, not the median: on a shared machine other processes only ever add time, so the
    fastest of several calls is the best estimate of a step's own cost.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for warm in range(2 + rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if warm >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def ours(x: torch.Tensor, latents: int, k: int, decoder: str, autocast: str) -> Callable[[], None]:
    sae = TopKSAE(x.shape[1], latents, k, device=x.device)
    sae.init_tied(torch.Generator().manual_seed(0))
    trainer = Trainer(sae, TrainSettings(n_latents=latents, k=k, decoder=decoder, autocast=autocast))
    return lambda: trainer.step(x)


def sparsify_step(x: torch.Tensor, latents: int, k: int) -> Callable[[], None]:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=latents, k=k), device=x.device)
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4, eps=6.25e-10)

    def step() -> None:
        # What sparsify's trainer does per step for an SAE with the fvu loss.
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def demo(tokens: int | None) -> None:
    import json
    import tempfile
    from pathlib import Path

    from explainer.corpus.contexts import load_documents
    from explainer.lm import load_model
    from explainer.sae import train
    from explainer.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(train=TrainSettings(out=Path(tmp) / "sae", **({"tokens": tokens} if tokens else {})))
        start = time.perf_counter()
        res = train.run(s)
        wall = time.perf_counter() - start
    keys = ("fvu", "fvu_all", "n_outlier_tokens", "l0", "dead_fraction", "ce_increase", "ce_increase_ci95",
            "ce_increase_zero_ablation", "ce_recovered")
    print(f"demo: {res.tokens:,} tokens, {s.train.n_latents} latents, k={s.train.k}, {s.model.name} {s.model.layer}: "
          f"{wall:.0f} s wall, training {res.seconds:.0f} s ({res.tokens_per_s:,.0f} tok/s)")
    print("demo metrics:", json.dumps({k: res.metrics.get(k) for k in keys}))
    lm = load_model(s.model)
    stream = train.ContextStream(s, lm.tokenizer, load_documents(s.corpus))
    ids = stream.take(max(1, min(res.tokens, 32768) // s.corpus.ctx_len))
    start = time.perf_counter()
    train._activations(lm, ids, s.model.batch_size)
    bare = ids.numel() / (time.perf_counter() - start)
    print(f"bare LM forward to layer {s.model.layer}: {bare:,.0f} tok/s; "
          f"training keeps {res.tokens_per_s / bare:.0%} (target >= 80%)")


def onthefly(rounds: int) -> None:
    """The on-the-fly target, interleaved: per round, the bare LM forward on a block of contexts
    and the same forward followed by the SAE step on it, taking turns so load hits both alike."""
    import math

    from explainer.corpus.contexts import load_documents
    from explainer.lm import load_model
    from explainer.sae import train
    from explainer.settings import Settings

    s = Settings()
    lm = load_model(s.model)
    stream = train.ContextStream(s, lm.tokenizer, load_documents(s.corpus))
    per_step = max(1, s.train.batch_tokens // s.corpus.ctx_len)
    first = train._activations(lm, stream.take(per_step), s.model.batch_size)
    scale = math.sqrt(lm.d_model) / float(first.norm(dim=1).mean())
    sae = TopKSAE(lm.d_model, s.train.n_latents, s.train.k, device=lm.device)
    sae.init_tied(torch.Generator().manual_seed(0))
    trainer = Trainer(sae, s.train)
    trainer.step(first * scale)  # warm-up: allocator, Adam state

    def bare(ids: torch.Tensor) -> None:
        train._activations(lm, ids, s.model.batch_size)

    def both(ids: torch.Tensor) -> None:
        trainer.step(train._activations(lm, ids, s.model.batch_size) * scale)

    t_bare = t_both = 0.0
    for r in range(rounds):
        ids = stream.take(per_step)
        for fn in ((bare, both) if r % 2 == 0 else (both, bare)):
            t0 = time.perf_counter()
            fn(ids)
            dt = time.perf_counter() - t0
            if fn is bare:
                t_bare += dt
            else:
                t_both += dt
    n = rounds * per_step * s.corpus.ctx_len
    print(f"on-the-fly, {s.model.name} to layer {s.model.layer}, {s.train.n_latents} latents k={s.train.k}, "
          f"{rounds} rounds of {per_step * s.corpus.ctx_len} tokens: bare forward {n / t_bare:,.0f} tok/s, "
          f"forward + SAE step {n / t_both:,.0f} tok/s: {t_bare / t_both:.1%} (target >= 80%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096, help="tokens per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense reference paths (slow)")
    ap.add_argument("--onthefly", type=int, default=0, metavar="ROUNDS",
                    help="also time the real LM forward against forward + SAE step, interleaved, for ROUNDS blocks")
    ap.add_argument("--demo", action="store_true", help="also time the default training run end to end (minutes)")
    ap.add_argument("--demo-tokens", type=int, default=None, help="training tokens for --demo (default: the setting's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d, device=device)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; d={args.d} "
          f"latents={args.latents} k={args.k} batch={args.batch} tokens, fastest of {args.steps} steps each")

    w = torch.randn(args.d, args.latents, device=device).bfloat16()
    xb = x.bfloat16()
    steps: dict[str, Callable[[], None]] = {"bf16 x @ W_enc alone (bound)": lambda: xb @ w}
    configs = [("ours sparse fp32", "sparse", "none"), ("ours sparse bf16", "sparse", "bfloat16")]
    if not args.skip_dense:
        configs += [("ours dense fp32", "dense", "none"), ("ours dense bf16", "dense", "bfloat16")]
    for name, decoder, autocast in configs:
        steps[name] = ours(x, args.latents, args.k, decoder, autocast)
    try:
        import sparsify  # noqa: F401
    except ImportError:
        print("sparsify: skipped (pip install eai-sparsify, or the `bench` extra, to compare)")
    else:
        steps["sparsify SparseCoder fp32"] = sparsify_step(x, args.latents, args.k)
    results = {name: args.batch / sec for name, sec in interleaved(steps, args.steps, device).items()}
    bound = results.pop("bf16 x @ W_enc alone (bound)")
    flops = 2 * args.batch * args.d * args.latents
    print(f"{'bf16 x @ W_enc alone (bound)':38s} {bound:10,.0f} tok/s  ({flops * bound / args.batch / 1e12:.2f} TFLOP/s)")
    for name, tok_s in results.items():
        print(f"{name:38s} {tok_s:10,.0f} tok/s  ({tok_s / bound:6.1%} of the bf16 matmul bound)")
    if "ours dense fp32" in results:
        print(f"sparse / dense, fp32: {results['ours sparse fp32'] / results['ours dense fp32']:.2f}x; "
              f"bf16: {results['ours sparse bf16'] / results['ours dense bf16']:.2f}x")
    if "sparsify SparseCoder fp32" in results:
        ref = results["sparsify SparseCoder fp32"]
        print(f"ours sparse fp32 / sparsify fp32: {results['ours sparse fp32'] / ref:.2f}x (target >= 1.5x)")
    print(f"ours sparse bf16 / bf16 matmul bound: {results['ours sparse bf16'] / bound:.1%} (target >= 45%)")
    if args.onthefly:
        onthefly(args.onthefly)
    if args.demo:
        demo(args.demo_tokens)


if __name__ == "__main__":
    main()
