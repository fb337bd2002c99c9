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
- detection's balanced accuracy with the n-gram explanation executed as the judge (a window is
  "yes" when the explanation's patterns match any of its tokens) on the detection items an LLM
  judge would get (explainer.score.judge.detection_items: as many non-activating as firing
  held-out windows);
- the sampling seconds (the embedding rule embeds each pool context and up to 10 top examples
  per latent once).

Detection proper needs an LLM judge; none that can judge runs offline here, so the similarity,
the embedding scorer and the n-gram judge stand in for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from explainer import embed
from explainer.explain.ngram_fit import FORMAT, LatentExamples, PatternSet, normalize, simulate
from explainer.metrics import bootstrap_ci, classify
from explainer.planted.benchmark import run_planted
from explainer.sample.select import EMBED_TOP
from explainer.score.judge import detection_items
from explainer.score.records import ScoreFailed
from explainer.settings_load import deep_merge, load_settings, parse_assignment
from explainer.store import db as store
from explainer.store import examples

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


def ngram_detection(db: Path, dict_id: int, settings: Any) -> dict[int, float]:
    """Per latent: balanced accuracy of its n-gram explanation as a detection judge on its held-out
    detection items (a window is "yes" when a pattern matches any of its tokens)."""
    with store.connect(db, read_only=True) as con:
        pats = {lat: PatternSet.from_json(p) for lat, p in con.execute("""
            SELECT latent, arg_max(pattern::VARCHAR, id) FROM explanations WHERE dict_id = ? AND explainer = 'ngram'
              AND template = ? AND status = 'ok' AND pattern IS NOT NULL GROUP BY latent""",
                                                                        [dict_id, FORMAT]).fetchall()}
        snippets = examples.load(con, dict_id, sorted(pats), "heldout", examples.counts_of(settings.score),
                                 scoring=True)
    out = {}
    for lat, ps in pats.items():
        try:
            items = detection_items(snippets[lat], lat, settings.score.seed)
        except ScoreFailed:
            continue
        index: dict[str, int] = {}
        ids = [[index.setdefault(t, len(index)) for t in it.snippet.tokens] for it in items]
        exact = np.full((len(ids), max(map(len, ids))), -1, dtype=np.int64)
        for i, row in enumerate(ids):
            exact[i, :len(row)] = row
        norm_index: dict[str, int] = {}
        norm_of = np.array([norm_index.setdefault(normalize(t), len(norm_index)) for t in index] + [-1], dtype=np.int64)
        ex = LatentExamples(lat, np.array([it.snippet.kind for it in items], dtype=object),
                            np.array([it.snippet.context_id for it in items]), exact, norm_of[exact],
                            np.zeros(exact.shape, np.float32))
        said = simulate(ps, ex, (index, norm_index)).max(1) > 0
        out[lat] = classify(said, [bool(it.label) for it in items]).balanced_accuracy
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
    results, sims, detect = {}, {}, {}
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
        detect[rule] = ngram_detection(db, res.dict_id, settings)

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
    auc = {rule: {r.latent: None for r in results[rule].rows} for rule in RULES}
    for rule in RULES:
        with store.connect(results[rule].db, read_only=True) as con:
            auc[rule].update(dict(con.execute("""
                SELECT e.latent, arg_max(s.score, s.id) FROM scores s JOIN explanations e ON e.id = s.explanation_id
                WHERE s.scorer = 'embedding' AND s.split = 'heldout' AND s.status = 'ok' AND e.explainer = 'ngram'
                GROUP BY e.latent""").fetchall()))
    paired = [auc["embedding"][i] - auc["tokens"][i] for i in both
              if auc["embedding"].get(i) is not None and auc["tokens"].get(i) is not None]
    print(f"embedding scorer AUROC (matched pairs), paired difference embedding - tokens over {len(paired)} latents: "
          f"{mean_ci(paired)}")
    common = sorted(set(detect["tokens"]) & set(detect["embedding"]))
    for rule in RULES:
        print(f"n-gram explanation as detection judge, {rule} negatives, balanced accuracy over {len(common)} latents: "
              f"{mean_ci([detect[rule][i] for i in common])}")
    print(f"  paired difference embedding - tokens: {mean_ci([detect['embedding'][i] - detect['tokens'][i] for i in common])}")
    print("\nper latent: hard cosine, embedding AUROC, n-gram detection balanced accuracy (tokens -> embedding)")
    for r in results["tokens"].rows:
        a, b = auc["tokens"][r.latent], auc["embedding"][r.latent]
        s0, s1 = sims["tokens"].get(r.latent, {}).get("hard"), sims["embedding"].get(r.latent, {}).get("hard")
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        d0, d1 = detect["tokens"].get(r.latent), detect["embedding"].get(r.latent)
        print(f"  {r.latent:>3} {r.feature:<13} {fmt(s0)} -> {fmt(s1)}   {fmt(a)} -> {fmt(b)}   {fmt(d0)} -> {fmt(d1)}")


if __name__ == "__main__":
    main()
