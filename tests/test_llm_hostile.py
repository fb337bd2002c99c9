"""The LLM layer against hostile endpoints (issue 17): endless or dripping bodies, decompression
bombs, redirects, absurd usage blocks, NaN logprobs, damaged cache rows, non-finite prices."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
from pydantic import ValidationError

from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import CallFailed, price_of, resolve_endpoint
from explainer.settings import LLMSettings
from tests.openai_server import Reply, ScriptedServer, llm_server  # noqa: F401
from tests.test_llm import MESSAGES, con, fast, ledger  # noqa: F401

GUARD = 20.0  # seconds; the old code ran past any limit here, so the guard turns a hang into a failure


def guarded(con, settings: LLMSettings, **kw: Any):
    """One chat call, as tests/test_llm.call, but never longer than GUARD seconds."""

    async def go():
        async with LLMClient(settings, con, stage="test", run_id=1, dict_id=1) as llm:
            try:
                return await asyncio.wait_for(llm.chat(MESSAGES, latent=7, **kw), GUARD), llm
            except CallFailed as e:
                return e, llm

    return asyncio.run(go())


def body(text: Any = "an answer", usage: Any = None, logprobs: Any = None, endpoint: str = "chat") -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": logprobs}
    choice.update({"message": {"role": "assistant", "content": text}} if endpoint == "chat" else {"text": text})
    data: dict[str, Any] = {"id": "x", "object": "chat.completion", "choices": [choice]}
    if usage is not None:
        data["usage"] = usage
    return json.dumps(data)  # allow_nan: NaN and Infinity go out as the literals Python's json reads


# --- time and memory ------------------------------------------------------------------------------


def test_an_endless_body_is_cut_at_max_response_bytes(con, llm_server):
    llm_server.responder = lambda req: Reply.endless()
    t0 = time.monotonic()
    err, _ = guarded(con, fast(llm_server, timeout=10.0, max_attempts=2, max_response_bytes=2**20))
    assert isinstance(err, CallFailed), err
    assert "over 1,048,576 bytes" in err.reason and "max_response_bytes" in err.reason
    assert time.monotonic() - t0 < 10 and len(llm_server.requests) == 2


def test_a_dripping_body_meets_one_deadline_per_request(con, llm_server):
    # Every read gets a byte within 0.1 s, so a per-read timeout never fires; the 0.5 s deadline does.
    llm_server.responder = lambda req: Reply.drip(0.1)
    t0 = time.monotonic()
    err, _ = guarded(con, fast(llm_server, timeout=0.5, max_attempts=2))
    assert isinstance(err, CallFailed) and "no answer from" in err.reason and "within 0.5s" in err.reason
    assert time.monotonic() - t0 < 4


def test_a_decompression_bomb_is_stopped_before_it_is_inflated(con, llm_server):
    llm_server.push(Reply.gzip_bomb(64 * 2**20), "recovered")
    ans, _ = guarded(con, fast(llm_server, max_response_bytes=2**20))
    assert ans.value == "recovered" and ans.attempts == 2


def test_a_compressed_answer_still_works(con, llm_server):
    import gzip

    reply = Reply.raw(gzip.compress(body("zipped", {"prompt_tokens": 3, "completion_tokens": 1}).encode()))
    reply.headers["Content-Encoding"] = "gzip"
    llm_server.push(reply)
    ans, _ = guarded(con, fast(llm_server))
    assert ans.value == "zipped" and ans.prompt_tokens == 3


# --- messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_names_where_it_points(con, llm_server, status):
    llm_server.responder = lambda req: Reply.redirect(status, "https://api.example.invalid/v1/chat/completions")
    err, llm = guarded(con, fast(llm_server))
    assert isinstance(err, CallFailed)
    assert f"redirected (HTTP {status}) to https://api.example.invalid/v1/chat/completions" in err.reason
    assert "use --base-url https://api.example.invalid/v1" in err.reason and "404" not in err.reason
    assert len(llm_server.requests) == 1 and llm.refusals == 1  # not followed, not retried
    with pytest.raises(ExplainerError, match="redirected"):
        llm.check_reachable(final=True)


def test_nan_logprobs_are_named_as_such(con, llm_server):
    lp = {"content": [{"token": "5", "logprob": float("nan"),
                       "top_logprobs": [{"token": "5", "logprob": float("nan")}, {"token": "3", "logprob": -2.0}]}]}
    llm_server.responder = lambda req: Reply.raw(body("5", logprobs=lp))
    err, _ = guarded(con, fast(llm_server), logprobs=True, top_logprobs=2)
    assert isinstance(err, CallFailed) and "non-finite logprobs" in err.reason


@pytest.mark.parametrize("url", ["localhost:8000/v1", "127.0.0.1:8080", "api.openai.com/v1", "ftp://host/v1"])
def test_a_scheme_less_base_url_says_to_add_the_scheme(url):
    with pytest.raises(ExplainerError, match=r"not an http\(s\) URL.*http://") as e:
        resolve_endpoint(LLMSettings(base_url=url))
    assert "API key" not in str(e.value)


# --- usage: validated before anything is priced or cached -------------------------------------------


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "12", "completion_tokens": 3},
    {"prompt_tokens": 10**30, "completion_tokens": 3},
    {"prompt_tokens": -5, "completion_tokens": 3},
    {"prompt_tokens": 5, "completion_tokens": float("inf")},
    {"prompt_tokens": True, "completion_tokens": 3},
    {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "all"}},
    "lots",
], ids=["string", "1e30", "negative", "inf", "bool", "cached-string", "not-an-object"])
def test_a_bad_usage_block_is_neither_cached_nor_priced(con, llm_server, usage):
    llm_server.responder = lambda req: Reply.raw(body("poisoned", usage))
    err, _ = guarded(con, fast(llm_server))
    assert isinstance(err, CallFailed) and "unusable 200" in err.reason and "usage" in err.reason
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0
    [row] = ledger(con)
    assert row["prompt_tokens"] is None and row["cost"] is None
    # A healthy server afterwards answers: nothing poisoned was kept to replay.
    llm_server.responder = lambda req: Reply.content("healthy")
    ans, _ = guarded(con, fast(llm_server))
    assert ans.value == "healthy" and not ans.cache_hit


@pytest.mark.parametrize("row", [
    json.dumps("a string, not a response"),
    body("x", {"prompt_tokens": "12", "completion_tokens": 1}),
    body("x", {"prompt_tokens": 10**30, "completion_tokens": 1}),
    json.dumps([1, 2]),
    json.dumps({"choices": "none"}),
], ids=["string", "string-usage", "huge-usage", "array", "bad-choices"])
def test_a_damaged_cache_row_is_dropped_and_asked_again(con, llm_server, row, caplog):
    from explainer.llm.wire import cache_key

    s = fast(llm_server)
    key = cache_key("chat", {"model": s.model, "messages": MESSAGES, "temperature": s.temperature,
                             "max_tokens": s.max_tokens})
    con.execute("INSERT INTO llm_cache VALUES (?, ?, ?, now())", [key, s.model, row])
    llm_server.push("fresh")
    ans, llm = guarded(con, s)
    assert ans.value == "fresh" and not ans.cache_hit and llm.stale_cache_rows == 1
    assert "asked again" in caplog.text
    [(cached,)] = con.execute("SELECT response FROM llm_cache WHERE key = ?", [key]).fetchall()
    assert json.loads(cached)["choices"][0]["message"]["content"] == "fresh"


def test_a_damaged_cache_row_is_dropped_even_when_the_reask_fails(con, llm_server):
    from explainer.llm.wire import cache_key

    s = fast(llm_server)
    key = cache_key("chat", {"model": s.model, "messages": MESSAGES, "temperature": s.temperature,
                             "max_tokens": s.max_tokens})
    con.execute("INSERT INTO llm_cache VALUES (?, ?, '{\"choices\": null}', now())", [key, s.model])
    llm_server.responder = lambda req: Reply.http(500)
    err, _ = guarded(con, s)
    assert isinstance(err, CallFailed)
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0


# --- prices and budget ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["price_in", "price_out", "price_cached_in", "budget", "batch_price_factor",
                                   "timeout", "backoff", "temperature"])
@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 1e300])
def test_prices_budget_and_times_must_be_finite_and_non_negative(field, value):
    with pytest.raises(ValidationError):
        LLMSettings(**{field: value})


def test_a_cost_is_finite_at_the_largest_counts_and_prices():
    s = LLMSettings(price_in=1e9, price_out=1e9, price_cached_in=1e9)
    cost = price_of(s, 10**9, 10**9, 10**9)
    assert cost is not None and math.isfinite(cost) and cost >= 0


def test_budget_stops_sending_once_reached(con, llm_server):
    llm_server.responder = lambda req: Reply.content("one two three four five")
    s = fast(llm_server, price_in=1e6, price_out=1e6, budget=5.0, concurrency=1)
    first, _ = guarded(con, s)
    assert first.cost is not None and first.cost >= 5.0

    async def two():
        async with LLMClient(s, con, stage="test", run_id=2) as llm:
            await llm.chat([{"role": "user", "content": "a"}])
            with pytest.raises(CallFailed, match="--budget"):
                await llm.chat([{"role": "user", "content": "b"}])

    asyncio.run(two())
