"""Named scores, intervals and floors of every scorer (issue 16, findings 4 and 6), against the
real HTTP server in tests/openai_server.py.

- JSON simulation shuffles snippets of all kinds within and across calls (seeded, recorded),
  and one snippet per call works.
- Every Outcome carries `stats`: a bootstrap interval over snippets and the trivial baseline;
  the simulation also Bills et al.'s top-and-random and per-kind correlations, computed by the
  same function for the LLM and the n-gram simulators.
- Fuzzing reports balanced accuracy: an always-yes judge scores 0.5, not 0.6.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest

from explainer import prompts
from explainer.explain import ngram_fit
from explainer.explain.ngram_fit import LatentExamples, Pattern, PatternSet, score_examples
from explainer.llm.client import LLMClient
from explainer.metrics import pearson
from explainer.score.judge import detection_items, fuzzing_items, judge
from explainer.score.records import Outcome, ScoreFailed, Snippet, Spend
from explainer.score.simulate import simulate
from explainer.settings import LLMSettings, ScoreSettings
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer, llm_server  # noqa: F401

ACT = {" Paris": 2.0, " Rome": 1.0, " Venice": 0.5}
SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)
JUDGE_LINE = re.compile(r"^Snippet (\d+): (.*)$", re.M)


def snippet(cid: int, kind: str, city: str | None) -> Snippet:
    """Tokens open with a marker naming the context, so a prompt tells which snippets it holds."""
    toks = [f"c{cid}", " we", " went", " to"] + ([city] if city else [" sleep"]) + [" at", " dawn", "."]
    acts = [ACT.get(t, 0.0) for t in toks]
    return Snippet(cid, kind, cid % 5, max(acts), toks, acts)


# 5 top (Paris), 5 quantile (Rome), 5 random (one Venice, four where the latent is 0).
SNIPPETS = ([snippet(i, "top", " Paris") for i in range(5)] + [snippet(5 + i, "quantile", " Rome") for i in range(5)]
            + [snippet(10, "random", " Venice")] + [snippet(11 + i, "random", None) for i in range(4)])
KIND_OF = {s.context_id: s.kind for s in SNIPPETS}


def shown_snippets(req: Request) -> list[list[str]]:
    return [json.loads(m.group(3)) for m in SIM_LINE.finditer(req.question())]


def simulator(scale: float = 4.0):
    """Predict round(scale x truth) on every token: scale 4 is a perfect simulator."""
    def respond(req: Request) -> Reply:
        return Reply.content(json.dumps({str(i): [int(round(scale * ACT.get(t, 0.0))) for t in toks]
                                         for i, toks in enumerate(shown_snippets(req), 1)}))
    return respond


def llm_settings(srv: ScriptedServer) -> LLMSettings:
    return LLMSettings(base_url=srv.url, model="sim-model", timeout=2.0, backoff=0.001, backoff_max=0.005,
                       max_attempts=3, concurrency=4)


@pytest.fixture
def con(tmp_path: Path):
    c = store.connect(tmp_path / "stats.duckdb")
    yield c
    c.close()


def run_sim(con, srv: ScriptedServer, s: ScoreSettings, snippets=SNIPPETS, latent: int = 0) -> Outcome:
    tpl = prompts.load(s.simulation_template)

    async def go() -> Outcome:
        async with LLMClient(llm_settings(srv), con, stage="score", dict_id=1) as llm:
            return await simulate(llm, s, tpl, "city names", snippets, latent=latent)

    return asyncio.run(go())


def run_judge(con, srv: ScriptedServer, s: ScoreSettings, scorer: str, snippets, latent: int = 0) -> Outcome:
    tpl = prompts.load(s.detection_template if scorer == "detection" else s.fuzzing_template)
    items = (detection_items if scorer == "detection" else fuzzing_items)(snippets, latent, s.seed)

    async def go() -> Outcome:
        async with LLMClient(llm_settings(srv), con, stage="score", dict_id=1) as llm:
            return await judge(llm, s, scorer, tpl, "city names", items, latent, Spend())

    return asyncio.run(go())


def calls_by_kind(srv: ScriptedServer) -> list[list[str]]:
    return [[KIND_OF[int(toks[0][1:])] for toks in shown_snippets(r)] for r in srv.requests]


# --- shuffling (finding 4) ----------------------------------------------------------------------


def test_json_simulation_mixes_kinds_within_and_across_calls(con, llm_server):
    llm_server.responder = simulator()
    out = run_sim(con, llm_server, ScoreSettings(per_call=5, seed=0))
    kinds = calls_by_kind(llm_server)
    assert sorted(len(k) for k in kinds) == [5, 5, 5]
    # Unshuffled, call 1 was the 5 top snippets, call 2 the quantile ones, call 3 the random ones.
    assert all(len(set(k)) > 1 for k in kinds), kinds
    # The order sent is recorded, and the results come back in the snippets' order.
    rec = out.details["shuffle"]
    assert rec["seed"] == 0 and rec["per_call"] == 5
    sent = sorted(sorted(int(t[0][1:]) for t in shown_snippets(r)) for r in llm_server.requests)
    assert sorted(sorted(c) for c in rec["calls"]) == sent
    assert sorted(cid for c in rec["calls"] for cid in c) == list(range(15))
    assert [r.snippet.context_id for r in out.results] == list(range(15))
    assert out.score == pytest.approx(1.0)


def test_shuffle_is_reproducible_for_a_seed_and_changes_with_it(con, llm_server):
    llm_server.responder = simulator()
    orders = [run_sim(con, llm_server, ScoreSettings(per_call=5, seed=seed)).details["shuffle"]["calls"]
              for seed in (0, 0, 1)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    # A rerun with the same seed sends the same prompts: answered from the cache.
    n = len(llm_server.requests)
    again = run_sim(con, llm_server, ScoreSettings(per_call=5, seed=0))
    assert len(llm_server.requests) == n and again.spend.cache_hits == 3


def test_one_snippet_per_call(con, llm_server):
    llm_server.responder = simulator()
    out = run_sim(con, llm_server, ScoreSettings(per_call=1))
    assert len(llm_server.requests) == 15 and all(len(shown_snippets(r)) == 1 for r in llm_server.requests)
    assert out.score == pytest.approx(1.0) and out.spend.calls == 15
    assert [len(c) for c in out.details["shuffle"]["calls"]] == [1] * 15


# --- named scores, interval and floor of the simulation -----------------------------------------


def test_simulation_stats_name_every_score(con, llm_server):
    # An imperfect simulator: it sees Paris and Rome as equally strong (Bills' top-and-random
    # then differs from the all-kinds score).
    def respond(req: Request) -> Reply:
        return Reply.content(json.dumps({str(i): [6 if t in (" Paris", " Rome") else 2 if t == " Venice" else 0
                                                  for t in toks] for i, toks in enumerate(shown_snippets(req), 1)}))

    llm_server.responder = respond
    out = run_sim(con, llm_server, ScoreSettings(per_call=5))
    st = out.stats
    assert set(st) == {"all", "top_random", "top", "quantile", "random", "ci_low", "ci_high", "baseline"}
    assert out.details["stats"] == st
    assert st["all"] == out.score
    pred = {r.snippet.context_id: r.predicted for r in out.results}

    def r_of(ids):
        return pearson(np.concatenate([pred[i] for i in ids]), np.concatenate([SNIPPETS[i].acts for i in ids]))

    assert st["top_random"] == pytest.approx(r_of([0, 1, 2, 3, 4, 10, 11, 12, 13, 14]))
    assert st["all"] == pytest.approx(r_of(range(15))) and st["all"] < st["top_random"]
    assert st["top"] == pytest.approx(1.0) and st["quantile"] == pytest.approx(1.0)
    assert st["random"] == pytest.approx(1.0)
    assert st["baseline"] == 0.0  # a constant predictor's correlation, by the package's convention
    assert st["ci_low"] <= out.score <= st["ci_high"] < 1.0
    assert out.details["bootstrap"] == {"unit": "snippet", "n": 1000, "level": 0.95, "seed": 0}


def test_per_kind_scores_absent_kinds_are_none(con, llm_server):
    llm_server.responder = simulator()
    out = run_sim(con, llm_server, ScoreSettings(per_call=5), snippets=SNIPPETS[:5])
    assert out.stats["quantile"] is None and out.stats["random"] is None
    assert out.stats["top_random"] == pytest.approx(1.0) == out.stats["top"]


def test_ngram_and_llm_simulators_share_the_statistics(con, llm_server):
    """The same predictions on the same snippets give the same named scores and interval,
    whichever simulator made them: the n-gram's SimScore.stats uses the same function."""
    tokens = sorted({t for s in SNIPPETS for t in s.tokens})
    ids = {t: i for i, t in enumerate(tokens)}
    width = max(len(s.tokens) for s in SNIPPETS)
    exact = np.full((len(SNIPPETS), width), -1, dtype=np.int64)
    acts = np.zeros((len(SNIPPETS), width), dtype=np.float32)
    for r, s in enumerate(SNIPPETS):
        exact[r, :len(s.tokens)] = [ids[t] for t in s.tokens]
        acts[r, :len(s.tokens)] = s.acts
    ex = LatentExamples(0, np.array([s.kind for s in SNIPPETS], dtype=object),
                        np.array([s.context_id for s in SNIPPETS]), exact, exact, acts)
    # Paris and Rome equally strong, Venice weak: integer acts, so an LLM can say the same.
    ps = PatternSet((Pattern((" Paris",), "exact", 6.0), Pattern((" Rome",), "exact", 6.0),
                     Pattern((" Venice",), "exact", 2.0)))
    sim = score_examples(ps, ex, (ids, ids))
    pred = ngram_fit.simulate(ps, ex, (ids, ids))

    def respond(req: Request) -> Reply:
        return Reply.content(json.dumps({str(i): [int(pred[int(toks[0][1:]), j]) for j in range(len(toks))]
                                         for i, toks in enumerate(shown_snippets(req), 1)}))

    llm_server.responder = respond
    out = run_sim(con, llm_server, ScoreSettings(per_call=5))
    assert sim.score == pytest.approx(out.score)
    assert set(sim.stats) == set(out.stats)
    for k, v in out.stats.items():
        assert sim.stats[k] == pytest.approx(v), k
    assert sim.details()["stats"] == sim.stats


# --- detection and fuzzing: balanced accuracy, interval, always-yes floor (finding 6) ------------


def always_yes(req: Request) -> Reply:
    return Reply.content(json.dumps({m.group(1): 1 for m in JUDGE_LINE.finditer(req.question())}))


def test_always_yes_fuzzing_scores_half_not_three_fifths(con, llm_server):
    # 5 firing snippets (the default 5 top): 2 get moved highlights, 3 keep the right ones.
    llm_server.responder = always_yes
    out = run_judge(con, llm_server, ScoreSettings(per_call=5), "fuzzing", SNIPPETS[:5])
    labels = [it.label for it in out.results]
    assert sorted(labels) == [False, False, True, True, True]
    assert out.details["accuracy"] == pytest.approx(0.6)  # what fuzzing reported before
    assert out.score == pytest.approx(0.5)
    assert out.stats == {"ci_low": 0.5, "ci_high": 0.5, "baseline": 0.5}
    assert out.details["stats"] == out.stats


def test_always_yes_detection_scores_half_and_floors_are_recorded(con, llm_server):
    llm_server.responder = always_yes
    out = run_judge(con, llm_server, ScoreSettings(per_call=5), "detection", SNIPPETS)
    assert out.score == pytest.approx(0.5) and out.stats["baseline"] == 0.5


def test_judge_interval_brackets_a_mixed_judge(con, llm_server):
    # Says yes exactly on Paris snippets: right on the top ones and every negative, wrong on Rome.
    def respond(req: Request) -> Reply:
        return Reply.content(json.dumps({m.group(1): int("Paris" in m.group(2))
                                         for m in JUDGE_LINE.finditer(req.question())}))

    llm_server.responder = respond
    out = run_judge(con, llm_server, ScoreSettings(per_call=3), "detection", SNIPPETS)
    assert 0.5 < out.score < 1.0
    assert out.stats["ci_low"] < out.score < out.stats["ci_high"] and out.stats["baseline"] == 0.5


def test_no_score_means_no_stats(con, llm_server):
    with pytest.raises(ScoreFailed):
        run_sim(con, llm_server, ScoreSettings(), snippets=SNIPPETS[11:])
