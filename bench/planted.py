"""Planted-feature benchmark and n-gram throughput.

    python bench/planted.py [--db runs/planted.duckdb] [--tokens 200000] [--set section.field=value ...]
                            [--base-url URL --model NAME [--llm-latents 1,16,20] [--no-shuffled]]
                            [--no-embedding] [--json] [--scale 2048]

1. Runs the planted benchmark (explainer.planted.run_planted) on the default corpus with the
   default model's tokenizer and prints per-latent held-out simulation scores (Pearson r with
   its 95% interval over the snippets) of the n-gram explanation on the n-gram simulator and,
   with --base-url, of the n-gram's and the LLM's explanations on the LLM simulator; a latent
   whose compared rows share one snippet_set is marked [same snippets]. Then a per-class and
   overall table (means with 95% intervals over the latents) and the summary. The score
   settings (--set score.n_top=1 ...) set the snippets of both simulators.
   --llm-latents limits the LLM to a few latents (a slow local endpoint); --no-shuffled skips
   the LLM scores of shuffled explanation/latent pairs (the separation check), which double
   the LLM's simulation calls. Then each scorer's matched-vs-shuffled AUROC, with a 95% interval
   resampling latents: the n-gram simulation and, unless --no-embedding, the embedding scorer
   (all-MiniLM-L6-v2, no LLM) on the n-gram's explanations and the same held-out examples, with
   its latents/s (model load excluded). --json prints the whole result as JSON instead of tables.
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

from explainer.errors import ExplainerError
from explainer.explain import ngram
from explainer.planted.benchmark import run_planted
from explainer.selectors import parse
from explainer.settings_load import deep_merge, load_settings, parse_assignment
from explainer.store import db as store
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


def _cell(c) -> str:
    if c is None or c.score is None:
        return "-"
    ci = "" if c.ci_low is None else f" [{c.ci_low:.2f}, {c.ci_high:.2f}]"
    return f"{c.score:.3f}{ci}"


def _mean(m, ci, n=None) -> str:
    if m is None:
        return "-"
    lo, hi = ci
    return f"{m:.3f} [{lo:.2f}, {hi:.2f}]" + ("" if n is None else f" n={n}")


def print_tables(res) -> None:
    print(f"{'latent':>6} {'feature':<13} {'class':<10} {'ngram/ngram sim':<21} {'ngram/LLM sim':<21} "
          f"{'LLM/LLM sim':<21} explanations")
    for r in res.rows:
        cells = [_cell(r.cells.get(k)) for k in ("ngram/ngram", "ngram/llm", "llm/llm")]
        mark = " [same snippets]" if r.same_snippets() else ""
        llm = f" | LLM: {r.llm_explanation!r}" if r.llm_explanation else (
            f" | LLM failed: {r.llm_error}" if r.llm_error else "")
        print(f"{r.latent:>6} {r.feature:<13} {r.category:<10} {cells[0]:<21} {cells[1]:<21} {cells[2]:<21} "
              f"{r.explanation!r}{llm}{mark}")
    print("\nper feature class and overall: mean held-out simulation [95% interval over latents]")
    print(f"{'class':<11} {'latents':>7} {'ngram/ngram sim':<22} {'>=0.7':>5} {'ngram/LLM sim':<27} "
          f"{'LLM/LLM sim':<27} same snippets")
    for c in res.by_class() + [res.overall()]:
        cells = [_mean(c[k], c[f"{k} ci"], c[f"{k} n"]) for k in ("ngram, LLM sim", "llm, LLM sim")]
        print(f"{c['class']:<11} {c['latents']:>7} {_mean(c['ngram'], c['ngram ci']):<22} {c['ngram good']:>5} "
              f"{cells[0]:<27} {cells[1]:<27} {c['same snippets']}")
    print("\nmatched vs shuffled explanation/latent pairs, held-out (95% interval resampling latents)")
    print(f"{'explanation/scorer(mode)':<32} {'matched':>8} {'shuffled':>9} {'pairs':>9} {'AUROC [95% CI]':<22} latents/s")
    for x in res.separation:
        ci = "" if x.ci_low is None else f" [{x.ci_low:.3f}, {x.ci_high:.3f}]"
        auc = "-" if x.auroc is None else f"{x.auroc:.3f}{ci}"
        speed = "-" if x.latents_per_s is None else f"{x.latents_per_s:.1f}"
        print(f"{f'{x.explainer}/{x.scorer}({x.mode})':<32} {x.matched_mean or 0:>8.3f} {x.shuffled_mean or 0:>9.3f} "
              f"{f'{x.n_matched}/{x.n_shuffled}':>9} {auc:<22} {speed}")
    # The class means and separations are in the tables above; the summary's other lines follow.
    rest = {k: v for k, v in res.summary().items()
            if "mean score" not in k and "simulator mean" not in k and "shuffled AUROC" not in k and "latents/s" not in k}
    print(json.dumps(rest, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("runs/planted.duckdb"))
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to sample")
    ap.add_argument("--scale", type=int, default=0, help="also time the n-gram explainer on this many latents")
    ap.add_argument("--base-url", default=None, help="also explain and simulate with this OpenAI-compatible endpoint")
    ap.add_argument("--model", default=None, help="the endpoint's model name (llm.model)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="any setting, repeatable, e.g. --set score.n_top=1 --set score.mode=logprobs")
    ap.add_argument("--llm-latents", default=None, help="planted latents the LLM explains and scores, e.g. 1,16,20 "
                    "(default: all)")
    ap.add_argument("--no-shuffled", action="store_true", help="skip the LLM scores of shuffled pairs")
    ap.add_argument("--no-embedding", action="store_true", help="skip the embedding scorer's matched/shuffled pairs")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    over: dict = {"sample": {"tokens": args.tokens}, **({"llm": {"model": args.model}} if args.model else {})}
    for item in args.set:
        over = deep_merge(over, parse_assignment(item))
    try:
        settings = load_settings(None, over)
    except ExplainerError as e:
        ap.error(str(e))
    sel = None if args.llm_latents is None else parse(args.llm_latents, "--llm-latents")
    if sel is not None and sel.kind != "ids":
        ap.error(f"--llm-latents {args.llm_latents!r}: give ids like 1,16,20 or 0-3")
    subset = None if sel is None else sel.ranges
    t0 = time.perf_counter()
    res = run_planted(args.db, settings, base_url=args.base_url, shuffled=not args.no_shuffled,
                      embedding=not args.no_embedding,
                      llm_latents=None if subset is None else [i for lo, hi in subset for i in range(lo, hi + 1)])
    if args.json:
        print(json.dumps(res.to_json(), indent=1, default=str))
    else:
        print(f"planted benchmark: {time.perf_counter() - t0:.1f} s ({res.n_tokens:,} tokens, "
              f"contexts {res.n_contexts})")
        print_tables(res)

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
