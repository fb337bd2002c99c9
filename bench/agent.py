"""The explanation agent on the planted-feature benchmark: one-shot vs best-of-k vs refined.

    python bench/agent.py [--db runs/planted-agent.duckdb] [--tokens 200000] [--candidates 4]
                          [--max-rounds 3] [--base-url URL --llm-model NAME]

Builds (or reuses) the planted DB (explainer.planted.run_planted: latents with known
explanations), clears earlier agent rows, then runs the agent with the n-gram explainer (and
the LLM explainer when --base-url is given) on every planted latent. For each latent it reports
the HELDOUT simulation score of
  one-shot  candidate 0, the explanation `explain` alone would store,
  best-of-k the candidate with the best validation score,
  refined   the agent's choice after refinement,
and the calls each needed per latent: LLM calls (explanations plus validation simulations;
the final heldout score is counted apart), or for the n-gram, pattern sets simulated on
validation. Heldout scores of one-shot and best-of-k are computed here without writing rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from explainer.explain import agent, agent_loop, ngram, ngram_fit
from explainer.planted.benchmark import run_planted
from explainer.planted.features import default_features
from explainer.score import scorer as score
from explainer.settings import Settings
from explainer.store import db as store


def clear(con: Any, dict_id: int, model: str) -> None:
    sel = "SELECT id FROM explanations WHERE dict_id = ? AND explainer = 'agent' AND model = ?"
    con.execute(f"DELETE FROM scores WHERE explanation_id IN ({sel})", [dict_id, model])
    con.execute(f"DELETE FROM explanations WHERE id IN ({sel})", [dict_id, model])


def baselines(con: Any, dict_id: int, model: str) -> dict[int, dict[str, Any]]:
    """Per latent: candidate 0 and the best candidate by validation score (text, pattern)."""
    rows = con.execute("""
        SELECT e.latent, e.candidate, e.text, e.pattern::VARCHAR, s.score FROM explanations e
        JOIN scores s ON s.explanation_id = e.id AND s.split = 'validation' AND s.status = 'ok'
        WHERE e.dict_id = ? AND e.explainer = 'agent' AND e.model = ? AND e.round = 0
        ORDER BY e.latent, e.candidate""", [dict_id, model]).fetchall()
    out: dict[int, dict[str, Any]] = {}
    for latent, cand, text, pattern, val in rows:
        d = out.setdefault(latent, {"best_val": -2.0})
        if cand == 0:
            d["one_shot"] = (text, pattern)
        if val > d["best_val"]:  # the earliest on ties, as the agent picks
            d["best_val"], d["best"] = val, (text, pattern)
    return out


def heldout_ngram(con: Any, dict_id: int, picks: dict[int, Optional[tuple[str, str]]]) -> dict[int, float]:
    sets = {lat: [ngram_fit.PatternSet.from_json(p[1])] for lat, p in picks.items() if p}
    return {lat: s[0].score for lat, s in ngram.score_pattern_sets(con, dict_id, sets, "heldout").items()}


def heldout_llm(con: Any, s: Settings, dict_id: int, picks: dict[int, Optional[tuple[str, str]]]) -> dict[int, float]:
    out = {}
    for lat, p in picks.items():
        if p:
            try:
                out[lat] = score.evaluate(con, s, dict_id, lat, p[0], split="heldout", stage="bench-agent").score
            except score.ScoreFailed:
                pass
    return out


def report(name: str, res: agent_loop.AgentResult, one: dict[int, float], best: dict[int, float],
           features: list[Any], calls_unit: str) -> dict[str, Any]:
    reps = {r.latent: r for r in res.latents}
    print(f"\n== {name}: heldout simulation score per latent ==")
    print(f"{'lat':>3} {'feature':<13} {'one-shot':>8} {'best-k':>7} {'refined':>7} {'val':>6} {'k':>2} {'rnd':>3}"
          "  stop / chosen")
    for i, f in enumerate(features):
        r = reps.get(i)
        if r is None:
            continue

        def fmt(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.3f}"

        print(f"{i:>3} {f.name:<13} {fmt(one.get(i)):>8} {fmt(best.get(i)):>7} {fmt(r.heldout):>7} "
              f"{fmt(r.validation):>6} {r.candidates:>2} {r.rounds:>3}  {r.stop}: {r.text}")
    n = len(features)
    # A latent without a score counts 0, as the planted benchmark counts an unexplained latent.
    mean = lambda d: float(np.mean([d.get(i) or 0.0 for i in range(n)]))  # noqa: E731
    done = [r for r in res.latents if r.status == "chosen"]
    one_calls = 1.0 if calls_unit == "LLM calls" else 0.0
    summary = {
        "heldout one-shot": round(mean(one), 4),
        "heldout best-of-k": round(mean(best), 4),
        "heldout refined": round(mean({i: r.heldout for i, r in reps.items()}), 4),
        "validation refined (chosen)": round(float(np.mean([r.validation or 0.0 for r in done])), 4) if done else None,
        f"{calls_unit} per latent, one-shot": one_calls,
        f"{calls_unit} per latent, best-of-k": round(float(np.mean([r.calls_candidates for r in done])), 2) if done else None,
        f"{calls_unit} per latent, refined": round(float(np.mean([r.calls_candidates + r.calls_refine for r in done])), 2)
        if done else None,
        "heldout-score calls per latent (not in the above)": round(float(np.mean([r.calls_heldout for r in done])), 2)
        if done else None,
        "candidates per latent": round(float(np.mean([r.candidates for r in res.latents])), 2),
        "rounds per latent": round(float(np.mean([r.rounds for r in res.latents])), 2),
        "stops": res.stops, "agent wall s": round(res.wall_s, 2),
    }
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("runs/planted-agent.duckdb"))
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to sample")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--base-url", default=None, help="also run the LLM agent against this endpoint")
    ap.add_argument("--llm-model", default="gpt-4o-mini")
    args = ap.parse_args()

    features = default_features()
    n = len(features)
    settings = Settings(sample={"tokens": args.tokens}, explain={"latents": f"0-{n - 1}"},
                        agent={"candidates": args.candidates, "max_rounds": args.max_rounds})
    t0 = time.perf_counter()
    planted = run_planted(args.db, settings)
    print(f"planted DB: {time.perf_counter() - t0:.1f} s, {planted.n_tokens:,} tokens, contexts {planted.n_contexts}")
    d = planted.dict_id
    with store.connect(args.db) as con:
        s = settings.model_copy(deep=True)
        s.agent.explainer = "ngram"
        clear(con, d, "ngram")
        res = agent.run(con, s, d)
        base = baselines(con, d, "ngram")
        one = heldout_ngram(con, d, {i: b.get("one_shot") for i, b in base.items()})
        best = heldout_ngram(con, d, {i: b.get("best") for i, b in base.items()})
        plain = {r.latent: r.score for r in planted.rows}
        same = all(abs((one.get(i) or 0.0) - (plain.get(i) or 0.0)) < 1e-9 for i in range(n))
        print(f"\none-shot n-gram == the stored `explain --explainer ngram` score on every latent: {same}")
        report("n-gram agent", res, one, best, features, "validation simulations")

        if args.base_url:
            s = settings.model_copy(deep=True)
            s.agent.explainer = "llm"
            s.llm.base_url, s.llm.model = args.base_url, args.llm_model
            clear(con, d, args.llm_model)
            res = agent.run(con, s, d)
            base = baselines(con, d, args.llm_model)
            one = heldout_llm(con, s, d, {i: b.get("one_shot") for i, b in base.items()})
            best = heldout_llm(con, s, d, {i: b.get("best") for i, b in base.items()})
            report(f"LLM agent ({args.llm_model})", res, one, best, features, "LLM calls")


if __name__ == "__main__":
    main()
