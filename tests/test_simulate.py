"""The simulator against a real HTTP server on 127.0.0.1: json and logprobs modes, parsing, retries.

Snippets are built in memory here; tests/test_score.py covers the stage over a DuckDB file.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import pytest

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import Reply as LLMReply
from explainer.score.answers import expected_digit, json_object, parse_predictions, parse_verdicts
from explainer.score.records import ScoreFailed, Snippet
from explainer.score.simulate import simulate
from explainer.settings import LLMSettings, ScoreSettings
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer, llm_server  # noqa: F401

# The latent: 2.0 on " Paris", 1.0 on " Rome", 0.5 on " Venice". A simulator predicting
# 4x the true activation is perfect (r = 1).
ACT = {" Paris": 2.0, " Rome": 1.0, " Venice": 0.5}
TEXTS = [
    (["The", " king", " of", " Paris", " sat", " in", " Paris", "."], "top"),
    (["We", " rode", " to", " Rome", " at", " dawn", "."], "quantile"),
    (["Boats", " of", " Venice", " float", "."], "random"),
    (["The", " old", " dog", " slept", "."], "random"),
]
SNIPPETS = [Snippet(i, kind, 0, max(ACT.get(t, 0.0) for t in toks), toks, [ACT.get(t, 0.0) for t in toks])
            for i, (toks, kind) in enumerate(TEXTS)]
SNIPPET_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)


def snippets_in(req: Request) -> list[list[str]]:
    return [json.loads(m.group(3)) for m in SNIPPET_LINE.finditer(req.question())]  # not the worked examples


def perfect(req: Request) -> Reply:
    return Reply.content(json.dumps({str(i): [int(4 * ACT.get(t, 0.0)) for t in toks]
                                     for i, toks in enumerate(snippets_in(req), 1)}))


def settings_for(srv: ScriptedServer) -> LLMSettings:
    return LLMSettings(base_url=srv.url, model="sim-model", timeout=2.0, backoff=0.001, backoff_max=0.005,
                       max_attempts=3, concurrency=4)


def run_sim(con, srv: ScriptedServer, s: ScoreSettings, snippets=SNIPPETS, explanation="city names", tpl_name=None):
    tpl = prompts.load(tpl_name or (s.simulation_template if s.mode == "json" else s.logprobs_template))

    async def go():
        async with LLMClient(settings_for(srv), con, stage="score", dict_id=1) as llm:
            try:
                return await simulate(llm, s, tpl, explanation, snippets, latent=0)
            except ScoreFailed as e:
                return e

    return asyncio.run(go())


@pytest.fixture
def con(tmp_path: Path):
    c = store.connect(tmp_path / "sim.duckdb")
    yield c
    c.close()


# --- pure parsing ------------------------------------------------------------------------------


def reply(text: str, finish: str = "stop") -> LLMReply:
    return LLMReply(text=text, finish_reason=finish, top_logprobs=None, body={})


def test_json_object_tolerates_fences_and_chatter():
    assert json_object('```json\n{"1": [0, 1]}\n```') == {"1": [0, 1]}
    assert json_object('Sure! Here you go: {"1": [3]} Hope that helps.') == {"1": [3]}
    for bad, msg in [("no json here", "no JSON object"), ('{"1": [0, 1}', "not valid JSON"), ("[1, 2]", "no JSON")]:
        with pytest.raises(ValueError, match=msg):
            json_object(bad)


@pytest.mark.parametrize("text, msg", [
    ('{"1": [0, 0, 7], "2": [0]}', "snippet 2: 1 predictions for 2 tokens"),
    ('{"1": [0, 0, 7]}', "expected"),  # a snippet missing
    ('{"1": [0, 0, 7], "2": [0, 1], "3": [0]}', "expected"),  # one too many
    ('{"1": [0, 0, 10], "2": [0, 1]}', "less than or equal to 9"),
    ('{"1": [0, 0, -1], "2": [0, 1]}', "greater than or equal to 0"),
    ('{"1": [0, "high", 7], "2": [0, 1]}', "valid integer"),
    ('{"1": [0, 4.5, 7], "2": [0, 1]}', "valid integer"),
    ('{"1": [0, true, 7], "2": [0, 1]}', "valid integer"),
    ('{"1": "0 0 7", "2": [0, 1]}', "valid list"),
])
def test_malformed_predictions_are_rejected(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_predictions(reply(text), {"1": 3, "2": 2})


def test_predictions_parse_and_cut_off_answers_are_rejected():
    assert parse_predictions(reply('{"2": [1, 0], "1": [0, 0, 9]}'), {"1": 3, "2": 2}) == {"1": [0, 0, 9], "2": [1, 0]}
    with pytest.raises(ValueError, match="cut off"):
        parse_predictions(reply('{"1": [0, 0, 9], "2": [1, 0]}', finish="length"), {"1": 3, "2": 2})


def test_verdicts_accept_bools_and_bits_only():
    assert parse_verdicts(reply('{"1": 1, "2": false}'), ["1", "2"]) == {"1": True, "2": False}
    for bad in ['{"1": "yes", "2": 0}', '{"1": 2, "2": 0}', '{"1": 1}']:
        with pytest.raises(ValueError):
            parse_verdicts(reply(bad), ["1", "2"])


def test_expected_digit_from_top_logprobs():
    # " 8" and "8" are the same digit; "x" is not a digit and is left out before renormalizing.
    top = {" 8": math.log(0.4), "8": math.log(0.2), "4": math.log(0.2), "x": math.log(0.2)}
    value, mass = expected_digit(top)
    assert value == pytest.approx((8 * 0.6 + 4 * 0.2) / 0.8) and mass == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no digit"):
        expected_digit({"x": -0.1, "10": -2.0})


# --- json mode over HTTP -------------------------------------------------------------------------


def test_perfect_simulation_scores_one(con, llm_server):
    llm_server.responder = perfect
    out = run_sim(con, llm_server, ScoreSettings(per_call=2))
    assert out.score == pytest.approx(1.0)
    assert out.details["per_kind"]["top"] == pytest.approx(1.0) and out.details["per_kind"]["random"] == pytest.approx(1.0)
    assert out.details["n_tokens"] == sum(len(t) for t, _ in TEXTS)
    assert [r.predicted for r in out.results][0] == [0, 0, 0, 8, 0, 0, 8, 0]
    assert [r.snippet.acts for r in out.results] == [s.acts for s in SNIPPETS]
    # 4 snippets, 2 per call -> 2 calls, each asking for both snippets of its batch
    assert len(llm_server.requests) == 2 and out.spend.calls == 2
    assert [len(snippets_in(r)) for r in llm_server.requests] == [2, 2]
    assert "city names" in llm_server.requests[0].prompt_text()
    assert con.execute("SELECT count(*) FROM llm_calls WHERE stage = 'score'").fetchone()[0] == 2


def test_constant_simulation_scores_zero(con, llm_server):
    llm_server.responder = lambda req: Reply.content(
        json.dumps({str(i): [3] * len(t) for i, t in enumerate(snippets_in(req), 1)}))
    out = run_sim(con, llm_server, ScoreSettings(per_call=4))
    assert out.score == 0.0 and out.details["constant_prediction"]


def test_length_mismatch_is_retried_then_accepted(con, llm_server):
    good = perfect
    short = lambda req: Reply.content(json.dumps({str(i): [0] * (len(t) - 1) for i, t in enumerate(snippets_in(req), 1)}))  # noqa: E731
    calls = []

    def responder(req):
        calls.append(req)
        return short(req) if len(calls) == 1 else good(req)

    llm_server.responder = responder
    out = run_sim(con, llm_server, ScoreSettings(per_call=4))
    assert out.score == pytest.approx(1.0) and len(llm_server.requests) == 2
    # the retry bypassed the cache and the rejected answer was never cached
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 1
    assert con.execute("SELECT attempts FROM llm_calls").fetchall() == [(2,)]


def test_length_mismatch_every_time_is_a_failure_not_a_score(con, llm_server):
    llm_server.responder = lambda req: Reply.content(json.dumps({str(i): [0] for i, _ in enumerate(snippets_in(req), 1)}))
    out = run_sim(con, llm_server, ScoreSettings(per_call=2))
    assert isinstance(out, ScoreFailed)
    assert "predictions for" in out.reason and "after 3 attempts" in out.reason
    assert out.spend.calls == 2 and out.spend.failed_calls == 2
    assert len(llm_server.requests) == 6  # 2 calls x 3 attempts, no more
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0


def test_one_failed_batch_fails_the_whole_score(con, llm_server):
    def responder(req):
        if "Venice" in req.prompt_text():
            return Reply.content("I would rather not say.")
        return perfect(req)

    llm_server.responder = responder
    out = run_sim(con, llm_server, ScoreSettings(per_call=2))
    assert isinstance(out, ScoreFailed) and "1 of 2 calls failed" in out.reason and "no JSON object" in out.reason


def test_nothing_to_correlate_is_a_failure_without_calls(con, llm_server):
    quiet = [SNIPPETS[3]]
    out = run_sim(con, llm_server, ScoreSettings(), snippets=quiet)
    assert isinstance(out, ScoreFailed) and "fires on none" in out.reason
    assert llm_server.requests == []


def test_json_mode_asks_enough_tokens_and_optionally_json_format(con, llm_server):
    llm_server.responder = perfect
    run_sim(con, llm_server, ScoreSettings(per_call=4, json_response_format=True))
    body = llm_server.requests[0].body
    n_tokens = sum(len(t) for t, _ in TEXTS)
    assert body["max_tokens"] >= 3 * n_tokens and body["response_format"] == {"type": "json_object"}


# --- logprobs mode over HTTP --------------------------------------------------------------------

TOKEN_LINE = re.compile(r'^Last token: (".*")$', re.M)


def target_token(req: Request) -> str:
    return json.loads(TOKEN_LINE.findall(req.question())[-1])  # the last one: the worked examples come first


def logprob_responder(req: Request) -> Reply:
    tok = target_token(req)
    if tok in ACT:
        # digits 8 (p .4 + .2 as " 8") and 4 (p .2), and a non-digit: expected (8*.6 + 4*.2) / .8 = 7.0
        top = {" 8": math.log(0.4), "8": math.log(0.2), " 4": math.log(0.2), " high": math.log(0.2)}
    else:
        top = {"0": math.log(0.9), "1": math.log(0.1)}  # expected 0.1
    return Reply.logprobs([top])


def test_logprobs_mode_expected_values_over_completions(con, llm_server):
    llm_server.responder = logprob_responder
    out = run_sim(con, llm_server, ScoreSettings(mode="logprobs", top_logprobs=12), snippets=SNIPPETS[:2])
    n = len(SNIPPETS[0].tokens) + len(SNIPPETS[1].tokens)
    assert len(llm_server.requests) == n and out.spend.calls == n  # one call per token
    assert out.results[0].predicted == pytest.approx([0.1, 0.1, 0.1, 7.0, 0.1, 0.1, 7.0, 0.1])
    assert out.results[1].predicted == pytest.approx([0.1, 0.1, 0.1, 7.0, 0.1, 0.1, 0.1])
    # predictions 7.0 / 0.1 against truths 2.0 and 1.0 / 0: not linear, so r is high but below 1
    assert 0.9 < out.score < 1.0
    # mean probability on digits: 0.8 on the three city tokens, 1.0 elsewhere
    assert out.details["digit_mass"] == pytest.approx((3 * 0.8 + (n - 3) * 1.0) / n, abs=1e-4)
    for req in llm_server.requests:
        assert req.path.endswith("/v1/completions")
        body = req.body
        assert body["prompt"].endswith("Activation: ") and not body["prompt"].endswith("Activation:  ")
        assert body["max_tokens"] == 1 and body["logprobs"] == 12 and "echo" not in body
        assert "city names" in body["prompt"]
    # every token asked about exactly once (requests run concurrently, so compare as multisets)
    assert sorted(target_token(r) for r in llm_server.requests) == sorted(SNIPPETS[0].tokens + SNIPPETS[1].tokens)


def test_logprobs_mode_over_chat(con, llm_server):
    llm_server.responder = logprob_responder
    out = run_sim(con, llm_server, ScoreSettings(mode="logprobs", logprobs_api="chat"), snippets=SNIPPETS[:1])
    assert out.results[0].predicted == pytest.approx([0.1, 0.1, 0.1, 7.0, 0.1, 0.1, 7.0, 0.1])
    body = llm_server.requests[0].body
    assert llm_server.requests[0].path.endswith("/chat/completions")
    assert body["logprobs"] is True and body["top_logprobs"] == 10 and body["max_tokens"] == 1
    assert body["messages"][-1]["content"].endswith("Activation: ")


def test_logprobs_without_digits_fails_and_missing_logprobs_is_an_error(con, llm_server):
    llm_server.responder = lambda req: Reply.logprobs([{"hello": -0.1, "world": -2.0}])
    out = run_sim(con, llm_server, ScoreSettings(mode="logprobs"), snippets=SNIPPETS[2:3])
    assert isinstance(out, ScoreFailed) and "no digit among the top logprobs" in out.reason
    llm_server.responder = lambda req: Reply.content("5")  # an endpoint that ignores logprobs
    with pytest.raises(ExplainerError, match="returned no logprobs"):
        run_sim(con, llm_server, ScoreSettings(mode="logprobs"), snippets=SNIPPETS[2:3])


def test_logprobs_template_must_end_with_activation(tmp_path):
    from explainer.score.simulate import check_template

    bad = tmp_path / "bad.txt"
    bad.write_text("=== user ===\n{explanation} {text} {token}\nWhat is the activation?\n")
    with pytest.raises(ExplainerError, match="must end with 'Activation:'"):
        check_template(prompts.load(str(bad)), "logprobs")
    check_template(prompts.load("simulate_logprobs"), "logprobs")
    check_template(prompts.load("simulate"), "json")


def test_logprobs_prompt_for_token_i_shows_no_later_token():
    """Causal, as Bills et al.: the request about token i shows tokens[:i+1] and nothing after."""
    from explainer.score.simulate import logprobs_prompt

    toks = ["Aq0", " bq1", " cq2", "\ndq3", " eq4", " fq5"]
    sn = Snippet(0, "top", 0, 1.0, toks, [0.0] * len(toks))
    tpl = prompts.load("simulate_logprobs")
    for api in ("completions", "chat"):
        for i in range(len(toks)):
            args = logprobs_prompt(tpl, ScoreSettings(logprobs_api=api), "x", sn, i)
            text = args["prompt"] if api == "completions" else "\n".join(m["content"] for m in args["messages"])
            shown = [prompts.shown(t) for t in toks]
            assert f"Text: {''.join(shown[: i + 1])}\n" in text
            assert not any(t.strip() in text for t in shown[i + 1 :]), (api, i)


def thin_digits(mass_on: dict[str, float]):
    """Digits 8 and 0 (3:1) with total probability `mass_on[token]` (1.0 if absent); the rest on a word."""
    def respond(req: Request) -> Reply:
        m = mass_on.get(target_token(req), 1.0)
        return Reply.logprobs([{" 8": math.log(0.75 * m), " 0": math.log(0.25 * m), " high": math.log(1.0 - m + 1e-12)}])
    return respond


def test_logprobs_rejects_a_token_where_the_digits_get_little_mass(con, llm_server):
    """A token whose digits get 0.02 of the probability is not rescaled into a confident 6.0."""
    llm_server.responder = thin_digits({" Rome": 0.02})
    out = run_sim(con, llm_server, ScoreSettings(mode="logprobs"), snippets=SNIPPETS[1:2])
    assert isinstance(out, ScoreFailed)
    assert "0.02 probability on the digits 0-9 at token 4 (' Rome') of snippet 1" in out.reason
    assert "1 of 7 tokens are below score.min_digit_mass = 0.5" in out.reason
    assert out.spend.calls == 7  # every call was answered (and cached): rejecting spends nothing more
    ok = run_sim(con, llm_server, ScoreSettings(mode="logprobs", min_digit_mass=0.01), snippets=SNIPPETS[1:2])
    assert ok.details["digit_mass_min"] == pytest.approx(0.02) and ok.results[0].predicted[3] == pytest.approx(6.0)
    assert ok.details["digit_mass"] == pytest.approx((6 + 0.02) / 7, abs=1e-4)
    assert len(llm_server.requests) == 7  # the second run read the cache


def test_causal_prompts_shared_by_two_snippets_are_asked_once(con, llm_server):
    """Both snippets open with "The": the question about that first token is the same one, and
    is sent once (concurrent twins would both miss the cache and be paid twice)."""
    llm_server.responder = logprob_responder
    out = run_sim(con, llm_server, ScoreSettings(mode="logprobs"), snippets=[SNIPPETS[0], SNIPPETS[3]])
    n = len(SNIPPETS[0].tokens) + len(SNIPPETS[3].tokens)
    assert len(llm_server.requests) == n - 1 and out.spend.calls == n - 1
    assert out.results[1].predicted[0] == out.results[0].predicted[0] == pytest.approx(0.1)
    assert [len(r.predicted) for r in out.results] == [8, 5]
