"""The embedding scorer on the planted benchmark, next to the n-gram simulation.

    python bench/embedding.py [--db /tmp/planted.duckdb] [--tokens 200000] [--set section.field=value ...]

Runs the planted benchmark (explainer.planted.run_planted, n-gram only: no endpoint), then
`explainer score --scorer embedding` over the held-out split for the n-gram explanations, timed
(latents/s, model load excluded: it is loaded once before the clock starts). Then every
explanation against every other latent's held-out windows (shuffled pairs), to print the
matched-vs-shuffled AUROC of the embedding score beside the n-gram simulation's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from explainer.planted.benchmark import run_planted
from explainer.planted.report import separation
from explainer.score import embedding
from explainer.score import scorer as score
from explainer.score import setup as score_setup
from explainer.score.records import ScoreFailed
from explainer.settings_load import deep_merge, load_settings, parse_assignment
from explainer.store import db as store
from explainer.store import examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("/tmp/planted-embedding.duckdb"))
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to sample")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()
    over: dict = {"sample": {"tokens": args.tokens}}
    for item in args.set:
        over = deep_merge(over, parse_assignment(item))
    settings = load_settings(None, over)

    t0 = time.perf_counter()
    res = run_planted(args.db, settings)
    print(f"planted benchmark (n-gram): {time.perf_counter() - t0:.1f} s, {res.n_tokens:,} tokens")
    assert res.dict_id is not None
    settings.score.scorers = "embedding"
    settings.score.explanations = "explainer = 'ngram'"
    t = time.perf_counter()
    embedding.embedder()
    print(f"embedding model load: {time.perf_counter() - t:.1f} s")
    with store.connect(args.db) as con:
        t = time.perf_counter()
        out = score.run(con, settings, res.dict_id)
        dt = time.perf_counter() - t
        n = len(out.per_scorer["embedding"].latents)
        print(f"embedding scores: {out.ok} ok, {out.failed} failed, {out.skipped} already scored; "
              f"{dt:.2f} s for {n} latents = {n / dt if dt else float('nan'):.1f} latents/s")
        texts = dict(con.execute("SELECT latent, text FROM explanations WHERE dict_id = ? AND explainer = 'ngram' "
                                 "AND status = 'ok' ORDER BY id", [res.dict_id]).fetchall())
        matched = dict(con.execute(
            "SELECT latent, score FROM scores WHERE dict_id = ? AND scorer = 'embedding' AND split = 'heldout' "
            "AND status = 'ok' AND setup_hash = ?",
            [res.dict_id, score_setup.setup_hash(score_setup.setup_of(settings, "embedding"))]).fetchall())
        snippets = examples.load(con, res.dict_id, sorted(texts), "heldout", examples.counts_of(settings.score),
                                 scoring=True)
    t = time.perf_counter()
    shuffled, skipped = [], []
    for latent in sorted(texts):
        wrong = [texts[j] for j in sorted(texts) if j != latent]
        try:
            shuffled += [r.score for r in embedding.score_texts(wrong, snippets[latent], seed=settings.score.seed)]
        except ScoreFailed as e:  # the matched row failed the same way; its latent has no shuffled pairs
            skipped.append(f"{latent} ({e.reason})")
    print(f"shuffled pairs: {len(shuffled)} in {time.perf_counter() - t:.2f} s; latents without both kinds "
          f"(matched counted 0.5, no shuffled pairs): {', '.join(skipped) or 'none'}")
    seps = [s for s in res.separation if s.explainer == "ngram"]
    seps.append(separation("ngram", "embedding", "embedding", [matched.get(i, 0.5) for i in sorted(texts)], shuffled))
    print(f"\n{'scorer':<22}{'matched':>9}{'shuffled':>10}{'n':>10}{'AUROC':>8}")
    for s in seps:
        print(f"{s.scorer + '/' + s.mode:<22}{s.matched_mean or 0:>9.3f}{s.shuffled_mean or 0:>10.3f}"
              f"{f'{s.n_matched}/{s.n_shuffled}':>10}{s.auroc or 0:>8.3f}")
    print("\nper latent (held-out): latent, embedding AUROC, n-gram explanation")
    for i in sorted(texts):
        print(f"  {i:>3}  {matched.get(i, float('nan')):.3f}  {texts[i][:70]}")


if __name__ == "__main__":
    main()
