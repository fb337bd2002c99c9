"""The LLM layer against a real HTTP server on 127.0.0.1: retries, cap, cache, ledger, secrets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import CallFailed, cache_key, parse_retry_after, resolve_endpoint
from explainer.llm.wire import Reply as LLMReply
from explainer.settings import LLMSettings
from explainer.store import db as store
from tests.openai_server import Reply, ScriptedServer, closed_port_url, llm_server  # noqa: F401

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c"
MESSAGES = [{"role": "user", "content": "what does this latent do"}]


def fast(srv: ScriptedServer, **kw: Any) -> LLMSettings:
    base = dict(base_url=srv.url, model="test-model", timeout=0.5, backoff=0.001, backoff_max=0.005,
                retry_after_max=0.3, max_attempts=3, concurrency=4, price_in=2.0, price_out=10.0)
    base.update(kw)
    return LLMSettings(**base)


def call(con, settings: LLMSettings, messages=MESSAGES, run_id: int = 1, **kw: Any):
    """One chat call in its own client; returns (Answer or CallFailed, client)."""

    async def go():
        async with LLMClient(settings, con, stage="test", run_id=run_id, dict_id=1) as llm:
            try:
                return await llm.chat(messages, latent=7, **kw), llm
            except CallFailed as e:
                return e, llm

    return asyncio.run(go())


@pytest.fixture
def con(tmp_path: Path):
    c = store.connect(tmp_path / "llm.duckdb")
    yield c
    c.close()


def ledger(con) -> list[dict[str, Any]]:
    cur = con.execute("SELECT * FROM llm_calls ORDER BY id")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_answer_ledger_and_cache_row(con, llm_server):
    llm_server.push("archaic second-person pronouns")
    ans, llm = call(con, fast(llm_server))
    assert ans.value == "archaic second-person pronouns"
    assert (ans.attempts, ans.cache_hit) == (1, False)
    # The test server counts whitespace words: 5 prompt words, 3 completion words.
    assert (ans.prompt_tokens, ans.completion_tokens) == (5, 3)
    assert ans.cost == pytest.approx((5 * 2.0 + 3 * 10.0) / 1e6)
    [row] = ledger(con)
    assert row["stage"] == "test" and row["model"] == "test-model" and row["latent"] == 7 and row["run_id"] == 1
    assert (row["cache_hit"], row["attempts"], row["prompt_tokens"], row["completion_tokens"]) == (False, 1, 5, 3)
    assert row["error"] is None and row["latency_s"] > 0 and row["cost"] == pytest.approx(ans.cost)
    assert con.execute("SELECT count(*) FROM llm_cache WHERE key = ?", [row["cache_key"]]).fetchone()[0] == 1
    body = llm_server.requests[0].body
    assert body["model"] == "test-model" and body["messages"] == MESSAGES and body["temperature"] == 0.0


def test_retries_after_429_and_500_then_succeeds(con, llm_server):
    llm_server.push(Reply.http(429), Reply.http(500), "fine")
    ans, _ = call(con, fast(llm_server))
    assert ans.value == "fine" and ans.attempts == 3
    assert len(llm_server.requests) == 3
    assert ledger(con)[0]["attempts"] == 3


@pytest.mark.parametrize("status", [408, 409, 502, 503])
def test_other_transient_statuses_are_retried(con, llm_server, status):
    llm_server.push(Reply.http(status), "fine")
    ans, _ = call(con, fast(llm_server))
    assert ans.value == "fine" and len(llm_server.requests) == 2


def test_retry_after_is_honoured(con, llm_server):
    llm_server.push(Reply.http(429, retry_after=0.25), "fine")
    t0 = time.monotonic()
    ans, _ = call(con, fast(llm_server))
    # backoff is 1-5 ms here, so only the header can explain a wait this long
    assert time.monotonic() - t0 >= 0.25
    assert ans.value == "fine"


def test_retry_after_is_capped(con, llm_server):
    # A server asking for 10 minutes gets retry_after_max (0.3 s here); the SDK alone would give up.
    llm_server.push(Reply.http(503, retry_after=600), "fine")
    ans, _ = call(con, fast(llm_server))
    assert ans.value == "fine" and len(llm_server.requests) == 2


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a past date
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(con, llm_server, status):
    llm_server.push(Reply.http(status, message="bad request body"), "never sent")
    err, _ = call(con, fast(llm_server))
    assert isinstance(err, CallFailed)
    assert f"HTTP {status}" in err.reason and "bad request body" in err.reason and llm_server.url in err.reason
    assert len(llm_server.requests) == 1 and llm_server.pending() == 1
    [row] = ledger(con)
    assert row["attempts"] == 1 and row["error"] == err.reason


def test_attempts_are_capped(con, llm_server):
    llm_server.responder = lambda req: Reply.http(500)
    err, llm = call(con, fast(llm_server, max_attempts=4))
    assert isinstance(err, CallFailed) and "HTTP 500" in err.reason and "after 4 attempts" in err.reason
    assert len(llm_server.requests) == 4
    assert (llm.calls, llm.failures) == (1, 1)
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0


@pytest.mark.parametrize(
    "bad",
    [
        Reply.raw('{"id": "x", "choices": [{"message": {"content": "tru'),  # truncated JSON
        Reply.raw("<html>502 Bad Gateway</html>", content_type="text/html"),  # not JSON
        Reply.raw("[1, 2, 3]"),  # JSON, not an object
        Reply.error_in_200("model overloaded"),
        Reply.raw('{"object": "chat.completion", "choices": []}'),
        Reply.reset(),
        Reply.hang(3.0),  # past the 0.5 s timeout
    ],
    ids=["truncated", "html", "array", "error200", "nochoices", "reset", "hang"],
)
def test_broken_responses_are_retried(con, llm_server, bad):
    llm_server.push(bad, "recovered")
    ans, _ = call(con, fast(llm_server))
    assert ans.value == "recovered" and ans.attempts == 2
    assert len(llm_server.requests) == 2


def test_every_attempt_broken_records_reason(con, llm_server):
    llm_server.responder = lambda req: Reply.error_in_200("model overloaded")
    err, _ = call(con, fast(llm_server))
    assert isinstance(err, CallFailed) and "model overloaded" in err.reason
    assert len(llm_server.requests) == 3


def test_missing_usage_gives_null_tokens(con, llm_server):
    llm_server.push(Reply.content("no usage here", usage=False))
    ans, _ = call(con, fast(llm_server))
    assert ans.value == "no usage here" and ans.prompt_tokens is None and ans.cost is None
    [row] = ledger(con)
    assert row["prompt_tokens"] is None and row["completion_tokens"] is None and row["cost"] is None


def test_rejected_answers_retry_then_fail_without_caching(con, llm_server):
    llm_server.push("", Reply.content(None), "   ", "never asked for")
    err, _ = call(con, fast(llm_server))
    assert isinstance(err, CallFailed) and "answer rejected" in err.reason and "empty" in err.reason
    assert len(llm_server.requests) == 3
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0
    # tokens of rejected answers were paid for, and the ledger says so
    assert ledger(con)[0]["completion_tokens"] == 0 and ledger(con)[0]["prompt_tokens"] == 15


def test_parser_rejection_retries_and_counts(con, llm_server):
    def parse(reply: LLMReply) -> int:
        return int(reply.text)  # ValueError on words

    llm_server.push("seven", "7")
    ans, _ = call(con, fast(llm_server), parse=parse)
    assert ans.value == 7 and ans.attempts == 2


def test_rerun_hits_cache_and_sends_nothing(con, llm_server):
    llm_server.push("first answer")
    call(con, fast(llm_server), run_id=1)
    assert len(llm_server.requests) == 1
    ans, llm = call(con, fast(llm_server), run_id=2)
    assert ans.value == "first answer" and ans.cache_hit
    assert len(llm_server.requests) == 1  # no new request
    assert (ans.prompt_tokens, ans.completion_tokens) == (5, 2)  # the cached response's usage
    hit = ledger(con)[1]
    assert hit["cache_hit"] and hit["run_id"] == 2 and hit["attempts"] == 1
    assert (hit["prompt_tokens"], hit["completion_tokens"], hit["cost"]) == (0, 0, 0.0)
    assert llm.cache_hits == 1


def test_cache_key_covers_parameters(con, llm_server):
    llm_server.responder = lambda req: Reply.content(f"t={req.body['temperature']}")
    a, _ = call(con, fast(llm_server))
    b, _ = call(con, fast(llm_server, temperature=0.7))
    c, _ = call(con, fast(llm_server, model="other-model"))
    assert (a.value, b.value) == ("t=0.0", "t=0.7") and not c.cache_hit
    assert len(llm_server.requests) == 3
    assert cache_key("chat", {"a": 1, "b": 2}) == cache_key("chat", {"b": 2, "a": 1})


def test_cache_disabled_always_calls(con, llm_server):
    call(con, fast(llm_server, cache=False))
    call(con, fast(llm_server, cache=False))
    assert len(llm_server.requests) == 2
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0


def test_stale_cache_entry_is_bypassed_and_replaced(con, llm_server):
    llm_server.push("words", "42")
    call(con, fast(llm_server))  # caches "words"
    ans, _ = call(con, fast(llm_server), parse=lambda r: int(r.text))
    assert ans.value == 42 and not ans.cache_hit and len(llm_server.requests) == 2
    again, _ = call(con, fast(llm_server), parse=lambda r: int(r.text))
    assert again.value == 42 and again.cache_hit and len(llm_server.requests) == 2
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 1


def test_concurrency_is_bounded(con):
    with ScriptedServer(latency=0.05) as srv:
        settings = fast(srv, concurrency=3, timeout=5.0)

        async def go():
            async with LLMClient(settings, con, stage="test") as llm:
                msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
                return await asyncio.gather(*(llm.chat(m) for m in msgs))

        answers = asyncio.run(go())
        assert len(answers) == 12 and len(srv.requests) == 12
        assert 1 <= srv.max_in_flight <= 3
    assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 12


def test_logprobs_chat_and_completions(con, llm_server):
    top = [{"7": -0.1, "6": -2.5, "8": -3.0}]
    llm_server.push(Reply.logprobs(top), Reply.logprobs(top))

    async def go():
        async with LLMClient(fast(llm_server), con, stage="score") as llm:
            a = await llm.chat(MESSAGES, parse=lambda r: r.top_logprobs, logprobs=True, top_logprobs=3, max_tokens=1)
            b = await llm.complete("Activation: ", parse=lambda r: (r.text, r.top_logprobs), logprobs=3, max_tokens=1)
            return a, b

    a, b = asyncio.run(go())
    assert a.value == top and b.value == ("7", top)
    chat_req, comp_req = llm_server.requests
    assert chat_req.path.endswith("/chat/completions") and comp_req.path.endswith("/v1/completions")
    assert chat_req.body["logprobs"] is True and chat_req.body["top_logprobs"] == 3 and chat_req.body["max_tokens"] == 1
    assert comp_req.body["prompt"] == "Activation: "


def test_unreachable_endpoint_names_url(con):
    url = closed_port_url()
    settings = LLMSettings(base_url=url, timeout=0.5, backoff=0.001, backoff_max=0.002, max_attempts=2)

    async def go():
        async with LLMClient(settings, con, stage="test") as llm:
            errs = []
            for i in range(3):
                try:
                    await llm.chat([{"role": "user", "content": str(i)}])
                except CallFailed as e:
                    errs.append(e)
            return errs, llm

    errs, llm = asyncio.run(go())
    assert len(errs) == 3 and all(e.connection and url in e.reason for e in errs)
    with pytest.raises(ExplainerError, match="cannot reach the LLM endpoint " + url):
        llm.check_reachable()


def test_refusing_endpoint_stops_the_stage(con, llm_server):
    llm_server.responder = lambda req: Reply.http(401, message="invalid api key")

    async def go():
        async with LLMClient(fast(llm_server), con, stage="test") as llm:
            for i in range(3):
                with pytest.raises(CallFailed):
                    await llm.chat([{"role": "user", "content": str(i)}])
            return llm

    llm = asyncio.run(go())
    with pytest.raises(ExplainerError, match="refused every call.*HTTP 401"):
        llm.check_reachable()


def test_missing_key_for_remote_endpoint_is_a_user_error():
    with pytest.raises(ExplainerError, match="no API key for https://api.openai.com/v1.*OPENAI_API_KEY"):
        resolve_endpoint(LLMSettings())
    with pytest.raises(ExplainerError, match="no API key for https://example.org/v1"):
        resolve_endpoint(LLMSettings(base_url="https://example.org/v1"))
    for url in ("http://127.0.0.1:8080/v1", "http://localhost:1/v1", "http://[::1]:9/v1"):
        assert resolve_endpoint(LLMSettings(base_url=url))[1]  # a dummy key, no error
    assert resolve_endpoint(LLMSettings(base_url="https://example.org/v1", api_key="k"))[1] == "k"


def test_api_key_never_reaches_the_db(con, llm_server, tmp_path):
    # The server echoes the key in its error message, as some proxies do.
    llm_server.push(Reply.http(401, message=f"key {SECRET} is not valid"), Reply.http(500, message=SECRET), "ok")
    settings = fast(llm_server, api_key=SECRET)
    err, _ = call(con, settings, messages=[{"role": "user", "content": "a"}])
    assert isinstance(err, CallFailed) and SECRET not in err.reason and "***" in err.reason
    err2, _ = call(con, settings, messages=[{"role": "user", "content": "b"}])
    assert isinstance(err2, CallFailed) is False and err2.value == "ok"
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # it was used...
    con.execute("CHECKPOINT")
    for table in ("llm_calls", "llm_cache", "runs"):
        assert SECRET not in str(con.execute(f"SELECT * FROM {table}").fetchall())
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert SECRET.encode() not in raw  # ...and is nowhere in the DB files


def test_prefetch_reads_the_cache_ahead_of_the_call(con, llm_server):
    call(con, fast(llm_server))
    assert len(llm_server.requests) == 1

    async def go():
        async with LLMClient(fast(llm_server), con, stage="test") as llm:
            other = [{"role": "user", "content": "never asked"}]
            llm.prefetch([llm.chat_key(MESSAGES), llm.chat_key(other)])
            con.execute("DELETE FROM llm_cache")  # from now on only the prefetched copy can answer
            return await llm.chat(MESSAGES), await llm.chat(other)

    hit, miss = asyncio.run(go())
    assert hit.cache_hit and hit.value == "scripted answer"
    assert not miss.cache_hit and len(llm_server.requests) == 2
    keys = [r["cache_key"] for r in ledger(con)]
    assert keys[0] == keys[1]  # chat_key() is the key chat() used


def test_malformed_logprobs_are_retried(con, llm_server):
    bad = Reply.raw('{"choices": [{"message": {"content": "7"}, "logprobs": {"content": [{"top_logprobs": [{}]}]}}]}')
    llm_server.push(bad, Reply.logprobs([{"7": -0.5}]))

    async def go():
        async with LLMClient(fast(llm_server), con, stage="score") as llm:
            return await llm.chat(MESSAGES, parse=lambda r: r.top_logprobs, logprobs=True, top_logprobs=1)

    assert asyncio.run(go()).value == [{"7": -0.5}] and len(llm_server.requests) == 2


def test_writer_keeps_every_column_of_uneven_rows(con):
    from explainer.llm.wire import Writer

    w = Writer(con)
    w.add("llm_calls", {"cache_hit": False, "created_at": store.now()})
    w.add("llm_calls", {"cache_hit": True, "created_at": store.now(), "latent": 5, "error": "x"})
    w.flush()
    assert con.execute("SELECT cache_hit, latent, error FROM llm_calls ORDER BY id").fetchall() == [
        (False, None, None), (True, 5, "x")]


def test_prompt_cache_tokens_are_priced_apart(con, llm_server):
    """usage.prompt_tokens_details.cached_tokens: priced at price_cached_in, recorded in the ledger."""
    llm_server.push(Reply.content("a label of five words", cached_tokens=4))
    messages = [{"role": "user", "content": "one two three four five six seven eight"}]  # 8 prompt "tokens"
    ans, llm = call(con, fast(llm_server, price_in=2.0, price_cached_in=0.5, price_out=10.0), messages=messages)
    expected = ((8 - 4) * 2.0 + 4 * 0.5 + 5 * 10.0) / 1e6
    assert ans.cost == pytest.approx(expected) and llm.cost == pytest.approx(expected)
    (row,) = ledger(con)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (8, 4, 5)
    assert row["cost"] == pytest.approx(expected)
    # A cache hit replays the answer's cost (and spends nothing); without price_cached_in, price_in applies.
    again, llm2 = call(con, fast(llm_server, price_in=2.0, price_out=10.0), messages=messages)
    assert again.cache_hit and again.cost == pytest.approx((8 * 2.0 + 5 * 10.0) / 1e6) and llm2.cost == 0
