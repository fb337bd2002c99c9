"""Property tests (Hypothesis): whatever JSON an endpoint sends as a 200, the LLM layer returns an
Answer or a CallFailed with a reason, never another exception, and caches only what it and the
stage's parser accept, in a form that reads back as accepted."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explainer.errors import ExplainerError
from explainer.explain.llm import parse_explanation
from explainer.llm.client import LLMClient
from explainer.llm.wire import MAX_USAGE_TOKENS, CallFailed, cache_key, checked_reply, text_of
from explainer.score.answers import parse_logprobs, parse_predictions, parse_verdicts
from explainer.settings import LLMSettings
from explainer.store import db as store
from tests.openai_server import Reply, ScriptedServer

# --- endpoint bodies -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
counts = st.one_of(st.integers(-5, 10**12), st.integers(10**29, 10**31), st.floats(allow_nan=True, allow_infinity=True),
                   st.none(), json_values)
usage = st.one_of(json_values, st.fixed_dictionaries(
    {"prompt_tokens": counts, "completion_tokens": counts},
    optional={"prompt_tokens_details": st.one_of(json_values, st.fixed_dictionaries({"cached_tokens": counts}))}))
logprob = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-20, 0), json_values)
alternative = st.fixed_dictionaries({"token": st.one_of(st.sampled_from(list("0123456789") + [" 5"]), json_values),
                                     "logprob": logprob})
chat_logprobs = st.one_of(json_values, st.fixed_dictionaries({"content": st.one_of(json_values, st.lists(
    st.fixed_dictionaries({"token": json_values, "logprob": logprob,
                           "top_logprobs": st.one_of(json_values, st.lists(alternative, max_size=4))}),
    max_size=2))}))
content = st.one_of(st.text(max_size=40), st.just('{"1": [0, 5], "2": [1]}'), st.just('{"1": true, "2": false}'),
                    json_values)
message = st.one_of(json_values, st.fixed_dictionaries({"role": st.just("assistant"), "content": content}))
choice = st.one_of(json_values, st.fixed_dictionaries(
    {"message": message, "finish_reason": st.one_of(st.sampled_from(["stop", "length"]), json_values),
     "logprobs": chat_logprobs}))
bodies = st.one_of(json_values, st.fixed_dictionaries(
    {"choices": st.one_of(json_values, st.lists(choice, max_size=2))},
    optional={"usage": usage, "error": json_values, "id": json_values}))

PARSERS: dict[str, Callable[[Any], Any]] = {
    "text": text_of,
    "explanation": lambda r: parse_explanation(r, 300),
    "predictions": lambda r: parse_predictions(r, {"1": 2, "2": 1}),
    "verdicts": lambda r: parse_verdicts(r, ["1", "2"]),
    "logprobs": lambda r: parse_logprobs(r, "http://x"),
}


def _finite_or_minus_inf(x: float) -> bool:
    return math.isfinite(x) or x == -math.inf


@settings(max_examples=400, deadline=None)
@given(body=bodies, endpoint=st.sampled_from(["chat", "completions"]))
def test_checked_reply_accepts_or_says_why(body: Any, endpoint: str) -> None:
    try:
        reply, (p, c, pc) = checked_reply(endpoint, body)
    except ValueError as e:
        assert str(e)
        return
    for n in (p, c, pc):
        assert n is None or (type(n) is int and 0 <= n <= MAX_USAGE_TOKENS)
    assert reply.text is None or isinstance(reply.text, str)
    for top in reply.top_logprobs or []:
        assert all(isinstance(v, float) and _finite_or_minus_inf(v) for v in top.values())


# --- over the socket --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory):
    c = store.connect(Path(tmp_path_factory.mktemp("props")) / "p.duckdb")
    yield c
    c.close()


_n = itertools.count()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, parser=st.sampled_from(sorted(PARSERS)))
def test_any_200_body_gives_an_answer_or_a_reason_and_caches_only_accepted(server, con, body, parser) -> None:
    parse = PARSERS[parser]
    messages = [{"role": "user", "content": f"example {next(_n)}"}]  # a fresh cache key per example
    server.push(Reply.raw(json.dumps(body)))
    s = LLMSettings(base_url=server.url, model="prop", max_attempts=1, timeout=5.0, price_in=1.0, price_out=2.0)

    async def go() -> Any:
        async with LLMClient(s, con, stage="props") as llm:
            try:
                return await llm.chat(messages, parse=parse)
            except CallFailed as e:
                return e

    try:
        out = asyncio.run(go())
    except ExplainerError as e:  # parse_logprobs stops the stage on an endpoint that sends no logprobs at all
        assert parser == "logprobs" and "no logprobs" in str(e)
        return
    key = cache_key("chat", {"model": "prop", "messages": messages, "temperature": s.temperature,
                             "max_tokens": s.max_tokens})
    row = con.execute("SELECT response FROM llm_cache WHERE key = ?", [key]).fetchone()
    if isinstance(out, CallFailed):
        assert out.reason and row is None
        return
    assert row is not None, "an accepted answer is cached"
    reply, _ = checked_reply("chat", json.loads(row[0]))  # reads back as accepted
    assert parse(reply) == out.value
    assert out.cost is None or (math.isfinite(out.cost) and out.cost >= 0)
