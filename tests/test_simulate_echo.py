"""All-at-once simulation from echoed prompt logprobs, against a real HTTP server on 127.0.0.1.

The scripted server tokenizes the prompt with a small regex, reports each token's offset, and
puts at each "unknown" slot a digit distribution for the token on that line, as a model would;
a second variant echoes every distribution one position late, as llama.cpp does for SmolLM2.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

import numpy as np
import pytest

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.llm import serve
from explainer.score.echo import PROBE, SLOT, render
from explainer.score.records import ScoreFailed
from explainer.settings import ScoreSettings
from tests.openai_server import ECHO_TOKEN, Reply, Request, echo_reply, llm_server  # noqa: F401
from tests.test_score import db, make_settings, rows, run_score  # noqa: F401  (db is a fixture)
from tests.test_simulate import ACT, SNIPPETS, con, run_sim  # noqa: F401  (con is a fixture)


def slot_guess(word: str) -> dict[str, float]:
    """A model's guess at a slot: mostly 8 (some as " 8") on a city, a clear 0 elsewhere."""
    if word in ACT:
        return {"8": math.log(0.4), " 8": math.log(0.2), "4": math.log(0.2), "high": math.log(0.2)}
    return {"0": math.log(0.9), "1": math.log(0.1)}


def guess(toks: list[str], i: int) -> dict[str, float]:
    if toks[i] == SLOT and i >= 2 and toks[i - 1] == "\t":
        return slot_guess(toks[i - 2])
    return {toks[i]: -0.05, "zz": -3.0}  # a good predictor of ordinary text: its top guess is the token


def echo_responder(shift: int = 0, merge_slots: bool = False) -> Callable[[Request], Reply]:
    pattern = re.compile(r"\tunknown|" + ECHO_TOKEN.pattern) if merge_slots else ECHO_TOKEN
    return lambda req: echo_reply(req, guess, shift=shift, pattern=pattern)


def test_render_puts_a_slot_after_every_token() -> None:
    tpl = prompts.load("simulate_all_at_once")
    tokens = ["The", " king\n", "\tof", " Paris"]
    prompt, slots = render(tpl, "city names", tokens)
    assert len(slots) == 4 and all(prompt[s : s + len(SLOT)] == SLOT and prompt[s - 1] == "\t" for s in slots)
    lines = prompt[slots[0] - 4 :].splitlines()
    assert lines[:4] == ["The\tunknown", " king\\n\tunknown", "\\tof\tunknown", " Paris\tunknown"]
    assert "Explanation: city names" in prompt and "{rows}" not in prompt


def test_one_call_per_snippet_reads_the_slots(con, llm_server) -> None:
    llm_server.responder = echo_responder()
    s = ScoreSettings(mode="all_at_once", top_logprobs=7)
    out = run_sim(con, llm_server, s, tpl_name=s.all_at_once_template)
    assert len(llm_server.requests) == len(SNIPPETS) + 1  # + the alignment probe, once per client
    probe = [r for r in llm_server.requests if r.body["prompt"] == PROBE]
    assert len(probe) == 1
    for req in llm_server.requests:
        assert req.path.endswith("/v1/completions")
        assert req.body["echo"] is True and req.body["logprobs"] == 7 and req.body["max_tokens"] == 1
    # A city: digits 8 (p .4 + .2 as " 8") and 4 (p .2) renormalised over .8: (8*.6 + 4*.2) / .8 = 7.0
    assert out.results[0].predicted == pytest.approx([0.1, 0.1, 0.1, 7.0, 0.1, 0.1, 7.0, 0.1])
    assert out.results[3].predicted == pytest.approx([0.1] * 5)
    preds = [7.0 if t in ACT else 0.1 for sn in SNIPPETS for t in sn.tokens]
    assert out.mode == "all_at_once" and out.score == pytest.approx(float(np.corrcoef(
        preds, [a for sn in SNIPPETS for a in sn.acts])[0, 1]), abs=1e-6)
    assert out.spend.calls == len(SNIPPETS)  # the probe is the client's, not this latent's
    assert out.details["digit_mass_min"] == pytest.approx(0.8)  # "high" takes 0.2 at a city
    assert out.details["digit_mass"] == pytest.approx((4 * 0.8 + 21 * 1.0) / 25, abs=1e-4)  # 4 cities
    # Rerun: the probe and every snippet come from the cache.
    out2 = run_sim(con, llm_server, s, tpl_name=s.all_at_once_template)
    assert len(llm_server.requests) == len(SNIPPETS) + 1 and out2.score == out.score


def test_a_shifted_endpoint_is_refused_before_any_snippet(con, llm_server) -> None:
    llm_server.responder = echo_responder(shift=1)
    with pytest.raises(ExplainerError, match="one position late"):
        run_sim(con, llm_server, ScoreSettings(mode="all_at_once"), tpl_name="simulate_all_at_once")
    assert [r.body["prompt"] for r in llm_server.requests] == [PROBE]


def test_no_echo_and_merged_slots(con, llm_server) -> None:
    llm_server.responder = lambda req: Reply.logprobs([{"0": -0.1}])  # logprobs of the generated token only
    with pytest.raises(ExplainerError, match="did not echo the prompt's logprobs"):
        run_sim(con, llm_server, ScoreSettings(mode="all_at_once"), tpl_name="simulate_all_at_once")
    llm_server.responder = lambda req: Reply.http(404, message="no such route")  # a chat-only API
    with pytest.raises(ExplainerError, match="refused an echo\\+logprobs request"):
        run_sim(con, llm_server, ScoreSettings(mode="all_at_once"), tpl_name="simulate_all_at_once")
    llm_server.responder = echo_responder(merge_slots=True)
    out = run_sim(con, llm_server, ScoreSettings(mode="all_at_once"), tpl_name="simulate_all_at_once",
                  snippets=SNIPPETS[:1])
    assert isinstance(out, ScoreFailed) and "no token starts at the slot" in out.reason


def test_score_stage_all_at_once_and_batch_refusal(db, llm_server) -> None:
    llm_server.responder = echo_responder()
    res = run_score(db, make_settings(llm_server, db, scorers="simulation", mode="all_at_once"))
    assert res.ok >= 1 and res.failed == 0
    got = rows(db, "SELECT * FROM scores WHERE scorer = 'simulation'")
    assert got and all(r["mode"] == "all_at_once" and r["status"] == "ok" for r in got)
    details = json.loads(got[0]["details"])
    assert all(isinstance(p, float) for sn in details["snippets"] for p in sn["pred"])
    settings = make_settings(llm_server, db, scorers="simulation", mode="all_at_once")
    settings.llm.batch = True
    with pytest.raises(ExplainerError, match="run it without --batch"):
        run_score(db, settings)


@pytest.mark.skipif(not serve.server_available(), reason="needs llama-cpp-python[server]: pip install -e '.[local]'")
def test_real_llama_cpp_smollm2_is_caught_by_the_probe(con: Any) -> None:
    """llama.cpp echoes SmolLM2's prompt logprobs one position late (no BOS): the probe must say so."""
    import asyncio

    from explainer.llm.client import LLMClient
    from explainer.score.simulate import simulate
    from explainer.settings import LLMSettings

    with serve.local_server("smollm2") as url:
        settings = LLMSettings(base_url=url, model="smollm2", timeout=120, max_attempts=2, concurrency=1)

        async def go() -> None:
            async with LLMClient(settings, con, stage="score", dict_id=1) as llm:
                await simulate(llm, ScoreSettings(mode="all_at_once"), prompts.load("simulate_all_at_once"),
                               "city names", SNIPPETS[:1], latent=0)

        with pytest.raises(ExplainerError, match="one position late"):
            asyncio.run(go())
    ledger = con.execute("SELECT count(*), min(prompt_tokens) FROM llm_calls WHERE error IS NULL").fetchone()
    assert ledger[0] == 1 and ledger[1] > 50  # the probe alone: no snippet was sent


def test_estimate_counts_one_request_per_snippet_and_no_probe(db, llm_server) -> None:
    llm_server.responder = echo_responder()
    settings = make_settings(llm_server, db, scorers="simulation", mode="all_at_once")
    settings.llm.estimate = True
    res = run_score(db, settings)
    assert llm_server.requests == [] and res.estimate["requests"] > 0
    assert rows(db, "SELECT * FROM scores") == []
    settings.llm.estimate = False
    run_score(db, settings)
    assert len(llm_server.requests) == res.estimate["requests"] + 1  # the real run adds the probe


def collapsing(toks: list[str], i: int) -> dict[str, float]:
    """The measured failure: each "unknown" row already in the prompt moves probability from the
    digits to the slot word, so later rows get little digit mass (0.85 ** rows before)."""
    if toks[i] == SLOT and i >= 2 and toks[i - 1] == "\t":
        m = 0.85 ** sum(1 for t in toks[:i] if t == SLOT)
        return {"8": math.log(0.5 * m), "0": math.log(0.5 * m), SLOT: math.log(1.0 - m + 1e-12)}
    return guess(toks, i)


def test_a_slot_with_little_digit_mass_rejects_the_score(con, llm_server) -> None:
    """Never a silent number rescaled from ~1% mass: the score fails and says where and why."""
    llm_server.responder = lambda req: echo_reply(req, collapsing)
    out = run_sim(con, llm_server, ScoreSettings(mode="all_at_once"), tpl_name="simulate_all_at_once",
                  snippets=SNIPPETS[:1])
    assert isinstance(out, ScoreFailed)
    # 0.85 ** 7 = 0.32 at the 8th row: the 5th row (0.85 ** 4 = 0.52) is the first still accepted
    assert "probability on the digits 0-9 at token 8 ('.') of snippet 1" in out.reason
    assert "3 of 8 tokens are below score.min_digit_mass = 0.5" in out.reason
    ok = run_sim(con, llm_server, ScoreSettings(mode="all_at_once", min_digit_mass=0.3),
                 tpl_name="simulate_all_at_once", snippets=SNIPPETS[:1])
    assert ok.details["digit_mass_min"] == pytest.approx(0.85 ** 7, abs=1e-4)
    assert ok.details["digit_mass"] == pytest.approx(sum(0.85 ** k for k in range(8)) / 8, abs=1e-4)
