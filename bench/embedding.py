"""Hard negatives by tokens vs by embedding, on the planted benchmark.

    python bench/embedding.py [--db-dir /tmp/negatives] [--tokens 200000] [--set section.field=value ...]

Runs the planted benchmark (explainer.planted.run_planted, n-gram and embedding scorer, no
endpoint) twice over the same corpus and pool: with sample.hard_negatives = "tokens" (the
default) into DB_DIR/planted-tokens.duckdb and "embedding" into DB_DIR/planted-embedding.duckdb
(a rerun reuses both). Then, per rule, on the held-out split:

- how similar the non-activating examples the scorers read (score.n_nonactivating of them,
  ranks 0, 2, 4... the hard ones) are to the latent's top examples: cosine in all-MiniLM-L6-v2
  to the mean of its first 10 top examples, averaged per latent, then mean over latents with a
  95% bootstrap interval over latents (and the mean of the paired per-latent difference);
- the embedding scorer's AUROC of the same n-gram explanations (its silent windows are these
  non-activating examples), and its matched-vs-shuffled AUROC;
- the sampling seconds (the embedding rule embeds each pool context and up to 10 top examples
  per latent once).

Detection, the scorer hard negatives are for, needs an LLM judge; none that can judge runs
offline here, so the similarity and the embedding scorer stand in for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from explainer import embed
from explainer.metrics import bootstrap_ci
from explainer.planted.benchmark import run_planted
from explainer.sample.select import EMBED_TOP
from explainer.settings_load import deep_merge, load_settings, parse_assignment
from explainer.store import db as store

RULES = ("tokens", "embedding")


def cosines(db: Path, dict_id: int, n_neg: int) -> dict[int, dict[str, float]]:
    """Per latent: mean cosine of its held-out hard (even rank) and all non-activating examples
    (ranks below n_neg) to the mean embedding of its first EMBED_TOP top examples."""
    with store.connect(db, read_only=True) as con:
        rows = con.execute("""
            SELECT e.latent, e.kind, e.rank, c.tokens FROM examples e JOIN contexts c USING (dict_id, context_id)
            WHERE e.dict_id = ? AND e.split = 'heldout'
              AND ((e.kind = 'top' AND e.rank < ?) OR (e.kind = 'nonactivating' AND e.rank < ?))
            ORDER BY e.latent, e.kind, e.rank""", [dict_id, EMBED_TOP, n_neg]).fetchall()
    vecs = embed.embedder().encode([embed.text_of(t) for *_, t in rows])
    by: dict[int, dict[str, list[Any]]] = {}
    for (latent, kind, rank, _), v in zip(rows, vecs):
        by.setdefault(latent, {"top": [], "hard": [], "all": []})
        if kind == "top":
            by[latent]["top"].append(v)
        else:
            by[latent]["all"].append(v)
            if rank % 2 == 0:
                by[latent]["hard"].append(v)
    out = {}
    for latent, d in by.items():
        if not d["top"] or not d["all"]:
            continue
        top = np.mean(d["top"], axis=0)
        top /= np.linalg.norm(top)
        out[latent] = {k: float(np.mean(np.stack(d[k]) @ top)) for k in ("hard", "all")}
    return out


def mean_ci(vals: list[float]) -> str:
    v = np.asarray(vals)
    lo, hi = bootstrap_ci(lambda ix: float(v[ix].mean()), len(v))
    return f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-dir", type=Path, default=Path("/tmp/negatives"))
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to sample")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()
    args.db_dir.mkdir(parents=True, exist_ok=True)
    results, sims = {}, {}
    for rule in RULES:
        over: dict = {"sample": {"tokens": args.tokens, "hard_negatives": rule}}
        for item in args.set:
            over = deep_merge(over, parse_assignment(item))
        settings = load_settings(None, over)
        db = args.db_dir / f"planted-{rule}.duckdb"
        t = time.perf_counter()
        res = run_planted(db, settings)
        assert res.dict_id is not None
        with store.connect(db, read_only=True) as con:
            sample_s, embed_s, n_embedded = con.execute("""
                SELECT epoch(finished_at - started_at), result->>'hard_negatives_embed_s', result->>'hard_negatives_contexts'
                FROM runs WHERE stage = 'sample' AND status = 'done' ORDER BY id DESC LIMIT 1""").fetchall()[0]
        print(f"{rule}: planted benchmark {time.perf_counter() - t:.1f} s (sampling run {sample_s:.1f} s, of which "
              f"embedding {embed_s or 0} s for {n_embedded or 0} contexts); "
              f"notes: {'; '.join(res.notes) or 'none'}")
        results[rule] = res
        sims[rule] = cosines(db, res.dict_id, settings.score.n_nonactivating)

    both = sorted(set(sims["tokens"]) & set(sims["embedding"]))
    print(f"\nheld-out non-activating examples the scorers read (score.n_nonactivating), cosine to the top "
          f"examples' mean, mean over {len(both)} latents [95% CI over latents]")
    print(f"{'rule':<11} {'hard (even ranks)':<24} {'all':<24} embedding scorer matched mean / shuffled AUROC")
    for rule in RULES:
        sep = next(x for x in results[rule].separation if x.scorer == "embedding")
        ci = "" if sep.ci_low is None else f" [{sep.ci_low:.3f}, {sep.ci_high:.3f}]"
        print(f"{rule:<11} {mean_ci([sims[rule][i]['hard'] for i in both]):<24} "
              f"{mean_ci([sims[rule][i]['all'] for i in both]):<24} {sep.matched_mean or 0:.3f} / "
              f"{sep.auroc or 0:.3f}{ci} ({sep.n_matched}/{sep.n_shuffled} pairs)")
    for k in ("hard", "all"):
        diff = [sims["embedding"][i][k] - sims["tokens"][i][k] for i in both]
        print(f"paired difference embedding - tokens, {k}: {mean_ci(diff)}")
    print("\nper latent: hard cosine tokens -> embedding, embedding AUROC tokens -> embedding")
    auc = {rule: {r.latent: None for r in results[rule].rows} for rule in RULES}
    for rule in RULES:
        with store.connect(results[rule].db, read_only=True) as con:
            auc[rule].update(dict(con.execute("""
                SELECT e.latent, arg_max(s.score, s.id) FROM scores s JOIN explanations e ON e.id = s.explanation_id
                WHERE s.scorer = 'embedding' AND s.split = 'heldout' AND s.status = 'ok' AND e.explainer = 'ngram'
                GROUP BY e.latent""").fetchall()))
    for r in results["tokens"].rows:
        a, b = auc["tokens"][r.latent], auc["embedding"][r.latent]
        s0, s1 = sims["tokens"].get(r.latent, {}).get("hard"), sims["embedding"].get(r.latent, {}).get("hard")
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"  {r.latent:>3} {r.feature:<13} {fmt(s0)} -> {fmt(s1)}   {fmt(a)} -> {fmt(b)}")


if __name__ == "__main__":
    main()
