"""The one LLM client: retries, concurrency, the response cache and the cost ledger.

Every stage that talks to a model (explain, score, agents) goes through `LLMClient`, so
there is one retry policy and one place that writes `llm_cache` and `llm_calls`.

- The `openai` client is built with `max_retries=0`; tenacity alone decides what is retried:
  408/409/429/5xx, connection errors, timeouts, 200s whose body is not a completion
  (malformed JSON, HTML, `{"error": ...}`), and answers the caller's `parse` rejects.
  400/401/403/404 (and other 4xx) fail at once. Attempts are capped by `max_attempts`.
- `Retry-After` is read here (the SDK gives up on long ones) and capped at `retry_after_max`.
- A call that finally fails raises `CallFailed` with a reason naming the endpoint; the stage
  records it as a failure row and goes on.
- All DB work runs on the event-loop thread (a DuckDB connection must not be shared across
  threads). Cache and ledger rows are buffered and written in one transaction about once a
  second: an autocommitted insert costs an fsync, and a crash loses at most a second of
  paid answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import duckdb
import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from explainer.errors import ExplainerError
from explainer.llm.http import ResponseTooLarge, error_message, http_client, redirect_message, short
from explainer.results import LLMSpend
from explainer.settings import LLMSettings
from explainer.store import db as store

try:  # openai >= 3 ships httpx2; older releases use httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx  # type: ignore[no-redef]

from explainer.llm.wire import (
    FLUSH_SECONDS,
    LOOPBACK_KEY,
    UNREACHABLE_AFTER,
    Answer,
    CallFailed,
    Reply,
    T,
    Writer,
    cache_key,
    checked_reply,
    parse_retry_after,
    price_of,
    reply_from,
    resolve_endpoint,
    text_of,
    usage_tokens,
)

# --- retry classification ---------------------------------------------------------------


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None, connection: bool = False,
                 immediate: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.connection = connection
        self.immediate = immediate  # a rejected answer: the server is fine, ask again at once


class _Fatal(Exception):
    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _OverBudget(Exception):
    """A live request this run may not send: its spend reached --budget."""


RETRY_STATUS = {408, 409, 429}
_log = logging.getLogger(__name__)


@dataclass
class _CallState:
    attempts: int = 0
    cache_hit: bool = False
    stale_cache: bool = False
    latency: float = 0.0
    spent_cached: Optional[int] = None  # of spent_in, served from the endpoint's prompt cache
    used_cached: Optional[int] = None
    spent_in: Optional[int] = None  # tokens paid for by this run
    spent_out: Optional[int] = None
    used_in: Optional[int] = None  # tokens reported by the responses the answer came from
    used_out: Optional[int] = None


def _add(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else (a if b is None else a + b)


# --- the client -------------------------------------------------------------------------


class LLMClient:
    """Use as `async with LLMClient(settings, con, stage="explain", run_id=...) as llm:`."""

    def __init__(self, settings: LLMSettings, con: duckdb.DuckDBPyConnection, *, stage: str,
                 run_id: Optional[int] = None, dict_id: Optional[int] = None):
        self.settings = settings
        self.base_url, self._key = resolve_endpoint(settings)
        self.stage, self.run_id, self.dict_id = stage, run_id, dict_id
        self.writer = Writer(con)
        # Run totals, for progress bars and results.
        self.calls = self.cache_hits = self.failures = self.connection_failures = 0
        self.answered = 0  # calls that got an accepted answer, from the endpoint or the cache
        self.responses = 0  # HTTP responses of any status
        self.refusals = 0  # calls refused with 401/403/404: a wrong key, URL or model
        self.last_refusal = ""
        self.prompt_tokens = self.completion_tokens = 0
        self.cost = 0.0
        self.over_budget = 0  # calls not sent because this run's spend reached settings.budget
        self.stale_cache_rows = 0  # cached answers rejected on reading (asked again, the row dropped)
        self._client: Optional[openai.AsyncOpenAI] = None
        self._sem: Optional[asyncio.Semaphore] = None
        self._flusher: Optional[asyncio.Task[None]] = None

    def spend(self) -> LLMSpend:
        """This client's call and spend totals so far, for a stage result or progress report."""
        return LLMSpend(self.calls, self.cache_hits, self.prompt_tokens, self.completion_tokens, self.cost)

    async def __aenter__(self) -> LLMClient:
        n = self.settings.concurrency
        http = http_client(n, self.settings.timeout, self.settings.max_response_bytes)
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._key, max_retries=0, timeout=self.settings.timeout, http_client=http
        )
        self._sem = asyncio.Semaphore(n)
        self._flusher = asyncio.create_task(self._flush_loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.stale_cache_rows:
            _log.warning("%d cached answer(s) were unusable (an older parser's, or damaged) and were asked again",
                         self.stale_cache_rows)
        try:
            if self._flusher is not None:
                self._flusher.cancel()
                await asyncio.gather(self._flusher, return_exceptions=True)
            self._raise_if_flush_failed()
            self.writer.flush()  # what the last second answered
        finally:
            if self._client is not None:
                await self._client.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.writer.flush()

    def _raise_if_flush_failed(self) -> None:
        # A DB that cannot take rows (disk full, file gone) must stop the spending, not be ignored.
        f = self._flusher
        if f is not None and f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and self._key != LOOPBACK_KEY else text

    def price(self, prompt_tokens: Optional[int], completion_tokens: Optional[int],
              cached_tokens: Optional[int] = None) -> Optional[float]:
        return price_of(self.settings, prompt_tokens, completion_tokens, cached_tokens)

    def check_reachable(self, final: bool = False) -> None:
        """Raise when nothing has ever answered and calls keep failing the same way: the endpoint,
        key or model is wrong, and going on would only record the same failure for every latent."""
        if self.answered:
            return
        enough = lambda n: n > 0 and (n == self.calls if final else n >= UNREACHABLE_AFTER)  # noqa: E731
        if enough(self.connection_failures) and self.responses == 0:
            raise ExplainerError(
                f"cannot reach the LLM endpoint {self.base_url} ({self.connection_failures} calls failed after "
                f"{self.settings.max_attempts} attempts each); start the server or fix --base-url"
            )
        if enough(self.refusals):
            raise ExplainerError(
                f"the LLM endpoint refused every call ({self.last_refusal}); "
                "check OPENAI_API_KEY, --base-url and --model"
            )

    # --- public calls -------------------------------------------------------------------
    async def chat(self, messages: list[dict[str, str]], *, latent: Optional[int] = None,
                   parse: Callable[[Reply], T] = text_of, **params: Any) -> Answer[T]:  # type: ignore[assignment]
        """One chat completion, parsed. `params` (temperature, max_tokens, logprobs=True,
        top_logprobs=N, ...) override the settings and are part of the cache key.
        `parse` raising ValueError (pydantic's ValidationError is one) rejects the answer: it is
        asked again with the cache bypassed, up to `max_attempts`."""
        return await self._call("chat", self._body("messages", messages, params), latent, parse)

    async def complete(self, prompt: str, *, latent: Optional[int] = None,
                       parse: Callable[[Reply], T] = text_of, **params: Any) -> Answer[T]:  # type: ignore[assignment]
        """A text completion (`/v1/completions`), e.g. `logprobs=10, max_tokens=1` for digit probabilities."""
        return await self._call("completions", self._body("prompt", prompt, params), latent, parse)

    def chat_key(self, messages: list[dict[str, str]], **params: Any) -> str:
        """The cache key `chat(messages, **params)` will use (for `prefetch`)."""
        return cache_key("chat", self._body("messages", messages, params))

    def complete_key(self, prompt: str, **params: Any) -> str:
        return cache_key("completions", self._body("prompt", prompt, params))

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read these keys' cached answers in one query, ahead of the calls that need them."""
        if self.settings.cache:
            self.writer.prefetch(keys)

    def _body(self, field: str, value: Any, params: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        return {"model": s.model, field: value, "temperature": s.temperature, "max_tokens": s.max_tokens, **params}

    # --- one call, several attempts -------------------------------------------------------
    async def _call(self, endpoint: str, body: dict[str, Any], latent: Optional[int],
                    parse: Callable[[Reply], T]) -> Answer[T]:
        assert self._client is not None, "use LLMClient inside `async with`"
        self._raise_if_flush_failed()
        key = cache_key(endpoint, body)
        st = _CallState()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        self.calls += 1
        try:
            value: T = await retrying(self._attempt, endpoint, body, key, parse, st)
        except _OverBudget:
            # Never sent, so no ledger row; the latent fails and a rerun (a new budget) asks again.
            self.failures += 1
            self.over_budget += 1
            raise CallFailed(f"not sent: this run spent ${self.cost:.4f}, its --budget is "
                             f"${self.settings.budget:g}", attempts=0, connection=False, prompt_tokens=None,
                             completion_tokens=None, cost=None) from None
        except (_Retryable, _Fatal) as e:
            reason = self.redact(e.reason)
            if st.attempts > 1:
                reason += f" (after {st.attempts} attempts)"
            connection = isinstance(e, _Retryable) and e.connection
            self.failures += 1
            self.connection_failures += connection
            if isinstance(e, _Fatal) and (e.status in (401, 403, 404) or 300 <= e.status < 400):
                self.refusals += 1
                self.last_refusal = reason
            self._ledger(body["model"], latent, key, st, error=reason)
            raise CallFailed(reason, attempts=st.attempts, connection=connection, prompt_tokens=st.used_in,
                             completion_tokens=st.used_out,
                             cost=self.price(st.used_in, st.used_out, st.used_cached)) from None
        self.answered += 1
        self.cache_hits += st.cache_hit
        self._ledger(body["model"], latent, key, st, error=None)
        return Answer(value, st.used_in, st.used_out, self.price(st.used_in, st.used_out, st.used_cached),
                      st.cache_hit, st.attempts)

    def _wait(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if isinstance(exc, _Retryable) and exc.immediate:
            return 0.0
        base = min(self.settings.backoff_max, self.settings.backoff * 2 ** (rs.attempt_number - 1))
        delay = base / 2 + random.uniform(0, base / 2)  # jitter spreads a burst of retries apart
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.settings.retry_after_max))
        return delay

    async def _attempt(self, endpoint: str, body: dict[str, Any], key: str, parse: Callable[[Reply], T],
                       st: _CallState) -> T:
        st.attempts += 1
        st.cache_hit = False
        if st.attempts == 1 and self.settings.cache:
            try:
                cached = self.writer.cached(key)
                if cached is not None:
                    reply, usage = checked_reply(endpoint, cached)
                    value = parse(reply)
            except ValueError as e:
                # A row an older parser accepted, or one damaged: asked again, and replaced (or dropped).
                st.stale_cache = True
                self.stale_cache_rows += 1
                self.writer.drop_cache(key)
                raise _Retryable(f"cached answer rejected: {short(e)}", immediate=True) from None
            if cached is not None:
                st.cache_hit = True
                st.used_in, st.used_out, st.used_cached = usage
                return value
        data = await self._post(endpoint, body, st)
        try:
            p, c, pc = usage_tokens(data)
        except ValueError as e:  # not believable: neither priced nor cached; its tokens stay unknown
            raise _Retryable(f"{self.base_url} sent an unusable 200: {short(e)}") from None
        self._spend(st, p, c, pc)
        try:
            reply = reply_from(endpoint, data)
        except ValueError as e:  # an error object or no choices in a 200: the server's trouble
            raise _Retryable(f"{self.base_url} sent an unusable 200: {short(e)}") from None
        try:
            value = parse(reply)
        except ValueError as e:
            raise _Retryable(f"answer rejected: {short(e)}", immediate=True) from None
        if self.settings.cache:
            self.writer.put_cache(key, str(body.get("model")), data, replace=st.stale_cache)
        return value

    @staticmethod
    def _spend(st: _CallState, p: Optional[int], c: Optional[int], pc: Optional[int]) -> None:
        st.spent_in, st.spent_out, st.spent_cached = _add(st.spent_in, p), _add(st.spent_out, c), _add(st.spent_cached, pc)
        st.used_in, st.used_out, st.used_cached = _add(st.used_in, p), _add(st.used_out, c), _add(st.used_cached, pc)

    async def _fetch(self, path: str, body: dict[str, Any]) -> str:
        assert self._client is not None
        resp = await self._client.post(path, body=body, cast_to=_httpx.Response)
        return resp.text

    async def _post(self, endpoint: str, body: dict[str, Any], st: _CallState) -> dict[str, Any]:
        assert self._client is not None and self._sem is not None
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        url = self.base_url + path
        async with self._sem:
            # Checked once a slot is free: calls already in flight finish (the overshoot is at
            # most `concurrency` calls), and answers in the cache are served whatever the spend.
            if self.settings.budget is not None and self.cost >= self.settings.budget:
                raise _OverBudget()
            t0 = time.perf_counter()
            try:
                # One deadline for connect, headers and the whole body: httpx's own timeout is per
                # read, so a server dripping a byte per read would hold the call forever. wait_for,
                # not asyncio.timeout: that one is Python 3.11+, and 3.10 is supported.
                text = await asyncio.wait_for(self._fetch(path, body), self.settings.timeout)
            except ResponseTooLarge as e:
                self.responses += 1
                raise _Retryable(f"{url} sent a {e}") from None
            # asyncio.TimeoutError is TimeoutError from 3.11 on, a class of its own on 3.10.
            except (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError):
                raise _Retryable(f"no answer from {url} within {self.settings.timeout:g}s", connection=True) from None
            except openai.APIConnectionError as e:
                # A reset's cause (ReadError) has an empty message: name its type instead.
                cause = f": {short(e.__cause__) or type(e.__cause__).__name__}" if e.__cause__ is not None else ""
                raise _Retryable(f"cannot reach {url}{cause}", connection=True) from None
            except openai.APIStatusError as e:
                self.responses += 1
                status = e.status_code
                reason = f"{url} answered HTTP {status}: {short(error_message(e))}"
                if 300 <= status < 400:
                    reason = redirect_message(url, status, e.response.headers.get("location"))
                if status in RETRY_STATUS or status >= 500:
                    raise _Retryable(reason, retry_after=parse_retry_after(e.response.headers)) from None
                raise _Fatal(reason, status) from None
            finally:
                st.latency += time.perf_counter() - t0
        self.responses += 1
        try:
            data = json.loads(text)
        except ValueError:
            raise _Retryable(f"{url} sent a 200 that is not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise _Retryable(f"{url} sent a 200 that is not a JSON object: {text[:80]!r}")
        return data

    def _ledger(self, model: str, latent: Optional[int], key: str, st: _CallState, error: Optional[str]) -> None:
        cost = self.price(st.spent_in, st.spent_out, st.spent_cached)
        self.prompt_tokens += st.spent_in or 0
        self.completion_tokens += st.spent_out or 0
        self.cost += cost or 0.0
        self.writer.add("llm_calls", {
            "run_id": self.run_id, "stage": self.stage, "model": model, "dict_id": self.dict_id,
            "latent": latent, "cache_key": key, "cache_hit": st.cache_hit, "attempts": st.attempts,
            # A cache hit spends nothing; a call that never got a usage block has unknown tokens.
            "prompt_tokens": 0 if st.cache_hit else st.spent_in,
            "completion_tokens": 0 if st.cache_hit else st.spent_out,
            "cached_tokens": 0 if st.cache_hit else st.spent_cached,
            "latency_s": st.latency, "cost": 0.0 if st.cache_hit else cost, "error": error,
            "created_at": store.now(),
        })
