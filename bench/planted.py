"""Planted-feature benchmark and n-gram throughput.

    python bench/planted.py [--db runs/planted.duckdb] [--tokens 200000] [--base-url URL --model NAME] [--scale 2048]

1. Runs the planted benchmark (explainer.planted.run_planted) on the default corpus with the
   default model's tokenizer and prints per-latent scores, a per-class table (the n-gram on
   its own simulator; with --base-url, the LLM simulator's scores of the n-gram's and the
   LLM's explanations beside it) and the summary.
2. With --scale N, times the n-gram explainer and scorer on N synthetic latents written
   beside the planted dictionary: each fires on one frequent token (magnitude 1-2) plus
   random noise tokens, with the sampler's example counts per split (20 top, 20 quantile,
   20 non-activating, 10 random).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from explainer import ngram, store
from explainer.planted import run_planted
from explainer.settings import Settings
from explainer.vocab import SPLITS


def synthetic(con, planted_dict: int, n_latents: int, seed: int = 0) -> int:
    """A dictionary of n_latents token-triggered latents over the planted dictionary's contexts."""
    rng = np.random.default_rng(seed)
    name = f"synthetic-{n_latents}"
    old = con.execute("SELECT id FROM dictionaries WHERE name = ?", [name]).fetchall()
    if old:
        return old[0][0]
    d = store.register_dictionary(con, name=name, path="-", model="synthetic", hook="-", d_in=1, d_sae=n_latents,
                                  k=1, fingerprint=f"synthetic-{n_latents}-{seed}", config={})
    ctx = con.sql(f"SELECT context_id, split, token_ids FROM contexts WHERE dict_id = {int(planted_dict)} "
                  "ORDER BY context_id").to_arrow_table()
    cids = ctx.column("context_id").to_numpy()
    splits = np.asarray(ctx.column("split").to_pylist())
    tok = ctx.column("token_ids").combine_chunks().flatten().to_numpy().reshape(len(cids), -1)
    vocab, counts = np.unique(tok, return_counts=True)
    frequent = vocab[np.argsort(-counts)[:500]]
    tables = []
    for split in SPLITS:
        rows = np.flatnonzero(splits == split)
        t = tok[rows]
        rand = rng.choice(len(rows), size=min(10, len(rows)), replace=False)
        for latent in range(n_latents):
            trigger = frequent[latent % len(frequent)]
            acts = np.where(t == trigger, 1 + rng.random(t.shape, dtype=np.float32), np.float32(0))
            # Noise no pattern explains, on ~0.2% of tokens.
            noise = rng.integers(0, t.size, size=rng.binomial(t.size, 0.002))
            acts.ravel()[noise] += rng.random(noise.size, dtype=np.float32)
            mx = acts.max(axis=1)
            order = np.argsort(-mx, kind="stable")
            firing = order[mx[order] > 0]
            silent = np.flatnonzero(mx == 0)
            picks = [("top", firing[:20]), ("quantile", rng.permutation(firing[20:])[:20]),
                     ("nonactivating", rng.permutation(silent)[:20]), ("random", rand)]
            for kind, idx in picks:
                if len(idx) == 0:
                    continue
                tables.append({"latent": np.full(len(idx), latent, np.int32), "split": np.full(len(idx), split),
                               "kind": np.full(len(idx), kind), "rank": np.arange(len(idx), dtype=np.int32),
                               "context_id": cids[rows[idx]], "max_act": mx[idx].astype(np.float32),
                               "acts": acts[idx].astype(np.float32)})
    # One insert: thousands of small Arrow inserts cost ~0.1 s each.
    cat = {k: np.concatenate([tb[k] for tb in tables]) for k in tables[0]}
    n, width = cat["acts"].shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    examples = pa.table({
        "dict_id": pa.array(np.full(n, d, np.int32)), "latent": cat["latent"], "split": cat["split"].astype(str),
        "kind": cat["kind"].astype(str), "rank": cat["rank"], "context_id": cat["context_id"],
        "max_act": cat["max_act"], "acts": pa.ListArray.from_arrays(offsets, pa.array(cat["acts"].ravel()))})
    with store.transaction(con):
        con.execute("""INSERT INTO contexts SELECT ?, context_id, doc_id, split, token_ids, tokens
                       FROM contexts WHERE dict_id = ?""", [d, planted_dict])
        store.insert_arrow(con, "examples", examples)
        store.insert_arrow(con, "latents", pa.table({
            "dict_id": pa.array(np.full(n_latents, d, np.int32)), "latent": np.arange(n_latents, dtype=np.int32),
            "frequency": np.zeros(n_latents), "n_fired": np.zeros(n_latents, np.int64),
            "n_tokens": np.zeros(n_latents, np.int64), "n_contexts": np.zeros(n_latents, np.int64)}))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("runs/planted.duckdb"))
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to sample")
    ap.add_argument("--scale", type=int, default=0, help="also time the n-gram explainer on this many latents")
    ap.add_argument("--base-url", default=None, help="also explain and simulate with this OpenAI-compatible endpoint")
    ap.add_argument("--model", default=None, help="the endpoint's model name (llm.model)")
    args = ap.parse_args()

    settings = Settings(sample={"tokens": args.tokens}, llm={"model": args.model} if args.model else {})
    t0 = time.perf_counter()
    res = run_planted(args.db, settings, base_url=args.base_url)
    print(f"planted benchmark: {time.perf_counter() - t0:.1f} s ({res.n_tokens:,} tokens, contexts {res.n_contexts})")
    print(f"{'latent':>6} {'feature':<14} {'category':<11} {'score':>6} {'prec':>5} {'rec':>5}  explanation")
    for r in res.rows:
        sc = "-" if r.score is None else f"{r.score:.3f}"
        pr = "-" if r.precision is None else f"{r.precision:.2f}"
        rc = "-" if r.recall is None else f"{r.recall:.2f}"
        print(f"{r.latent:>6} {r.feature:<14} {r.category:<11} {sc:>6} {pr:>5} {rc:>5}  {r.explanation}")
    print("\nper feature class: mean held-out simulation (n = latents with a score)")
    print(f"{'class':<11} {'latents':>7} {'ngram':>6} {'>=0.7':>5} {'ngram/LLM sim':>14} {'LLM/LLM sim':>12}")
    for c in res.by_class():
        cells = [f"{c[k]:.3f} ({c[k + ' n']})" if c[k] is not None else "-" for k in ("ngram, LLM sim", "llm, LLM sim")]
        print(f"{c['class']:<11} {c['latents']:>7} {c['ngram']:>6.3f} {c['ngram good']:>5} {cells[0]:>14} {cells[1]:>12}")
    print(json.dumps(res.summary(), indent=1, default=str))

    if args.scale:
        with store.connect(args.db) as con:
            t = time.perf_counter()
            d = synthetic(con, res.dict_id, args.scale)
            print(f"\nsynthetic dictionary of {args.scale} latents written in {time.perf_counter() - t:.1f} s")
            ex = ngram.explain_all(con, d)
            print(f"n-gram explain: {ex.explained} latents in {ex.seconds:.1f} s "
                  f"({ex.explained / max(ex.seconds, 1e-9):,.0f} latents/s; skipped {ex.skipped})")
            sc = ngram.score_all(con, d, "heldout")
            print(f"n-gram score:   {sc.scored} explanations in {sc.seconds:.1f} s "
                  f"({sc.scored / max(sc.seconds, 1e-9):,.0f} /s), mean heldout simulation {sc.mean_score}")
            q = con.execute("""SELECT quantile_cont(score, [0.25, 0.5, 0.75]) FROM scores s JOIN explanations e
                               ON e.id = s.explanation_id WHERE s.dict_id = ? AND s.mode = 'ngram'""", [d]).fetchall()
            print(f"synthetic score quartiles: {q[0][0]}")


if __name__ == "__main__":
    main()
