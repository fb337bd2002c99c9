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
import hashlib
import ipaddress
import json
import re
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar
from urllib.parse import urlparse

import duckdb
import openai
import pyarrow as pa
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from explainer import store
from explainer.errors import ExplainerError
from explainer.settings import LLMSettings

try:  # openai >= 3 ships httpx2; older releases use httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx  # type: ignore[no-redef]

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Loopback servers (llama.cpp, the test server) ignore the key but the SDK insists on one.
LOOPBACK_KEY = "no-key-needed-for-loopback"
FLUSH_SECONDS = 1.0
# Consecutive unreachable calls, with no answer ever received, before a stage gives up.
UNREACHABLE_AFTER = 3


# --- small public types ---------------------------------------------------------------


@dataclass
class Reply:
    """What one completion said: the text and, when asked for, each generated token's alternatives."""

    text: Optional[str]
    finish_reason: Optional[str]
    top_logprobs: Optional[list[dict[str, float]]]  # one {token: logprob} per generated token
    body: dict[str, Any]


@dataclass
class Answer(Generic[T]):
    """A parsed answer and what the responses it came from cost.

    Tokens and cost are those the answering responses reported, whether fetched now or
    read from the cache, so a rerun writes the same result rows. What this run actually
    spent is in the ledger (`llm_calls`), where a cache hit costs nothing.
    """

    value: T
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    cost: Optional[float]
    cache_hit: bool
    attempts: int


class CallFailed(Exception):
    """A call that got no acceptable answer within `max_attempts`; `reason` is safe to store."""

    def __init__(self, reason: str, *, attempts: int, connection: bool, prompt_tokens: Optional[int],
                 completion_tokens: Optional[int], cost: Optional[float]):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.connection = connection  # the endpoint was never reached on the last attempt
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost = cost


def text_of(reply: Reply) -> str:
    """Default parser: the message text, which must not be empty."""
    if reply.text is None or not reply.text.strip():
        raise ValueError("empty answer")
    return reply.text


def cache_key(endpoint: str, body: dict[str, Any]) -> str:
    """sha256 of the endpoint, model, messages/prompt and every sampling parameter."""
    blob = json.dumps([endpoint, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_endpoint(settings: LLMSettings) -> tuple[str, str]:
    """(base_url, api_key): a remote endpoint without a key is a user error, raised before any call."""
    base_url = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
    key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    if key:
        return base_url, key
    if is_loopback(base_url):
        return base_url, LOOPBACK_KEY
    raise ExplainerError(
        f"no API key for {base_url}: set OPENAI_API_KEY, or point --base-url at a local server (127.0.0.1)"
    )


def parse_retry_after(headers: Any) -> Optional[float]:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent or odd."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def reply_from(endpoint: str, body: dict[str, Any]) -> Reply:
    """Read a chat or text completion body; a body without a usable first choice is a ValueError."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        err = body.get("error")
        if err:
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise ValueError(f"error object in a 200 response: {str(msg)[:200]}")
        raise ValueError("response has no choices")
    choice = choices[0]
    logprobs = choice.get("logprobs") or None
    top: Optional[list[dict[str, float]]] = None
    if endpoint == "chat":
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ValueError("choice has no message")
        text = message.get("content")
    else:
        text = choice.get("text")
    try:
        if logprobs and endpoint == "chat" and isinstance(logprobs.get("content"), list):
            top = [{alt["token"]: float(alt["logprob"]) for alt in tok.get("top_logprobs") or []}
                   for tok in logprobs["content"]]
        elif logprobs and isinstance(logprobs.get("top_logprobs"), list):
            top = [{k: float(v) for k, v in (d or {}).items()} for d in logprobs["top_logprobs"]]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError("malformed logprobs") from None
    if text is not None and not isinstance(text, str):
        raise ValueError("content is not a string")
    return Reply(text=text, finish_reason=choice.get("finish_reason"), top_logprobs=top, body=body)


# --- buffered writes --------------------------------------------------------------------


class Writer:
    """Rows waiting for the next transaction; the cache part doubles as a read-through buffer."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.statements: list[tuple[str, list[Any]]] = []
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.cache_rows: dict[str, dict[str, Any]] = {}
        self.replace_keys: set[str] = set()
        self.prefetched: dict[str, Optional[str]] = {}  # key -> response JSON, or None: known absent

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)

    def execute(self, sql: str, params: list[Any]) -> None:
        """A statement for the next transaction, run before its inserts (e.g. replacing a failure row)."""
        self.statements.append((sql, params))

    def put_cache(self, key: str, model: str, body: dict[str, Any], replace: bool) -> None:
        self.cache_rows[key] = {"key": key, "model": model, "response": json.dumps(body), "created_at": store.now()}
        if replace:
            self.replace_keys.add(key)

    def cached(self, key: str) -> Optional[dict[str, Any]]:
        row = self.cache_rows.get(key)
        if row is not None:
            return json.loads(row["response"])
        if key in self.prefetched:
            text = self.prefetched.pop(key)
            return None if text is None else json.loads(text)
        found = self.con.execute("SELECT response FROM llm_cache WHERE key = ?", [key]).fetchone()
        return json.loads(found[0]) if found else None

    def prefetch(self, keys: Iterable[str]) -> None:
        """Look many keys up at once; each later `cached(key)` of them then skips the DB."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache_rows and k not in self.prefetched]
        for i in range(0, len(todo), 256):
            part = todo[i: i + 256]
            # An IN list of parameters uses the primary-key index; list_contains() would scan.
            marks = ", ".join("?" * len(part))
            found = dict(self.con.execute(f"SELECT key, response FROM llm_cache WHERE key IN ({marks})", part).fetchall())
            self.prefetched.update({k: found.get(k) for k in part})

    def pending(self) -> int:
        return len(self.statements) + len(self.cache_rows) + sum(len(r) for r in self.rows.values())

    def flush(self) -> None:
        if not self.pending():
            return
        # Arrow tables insert ~400x faster than executemany; one transaction, one fsync.
        with store.transaction(self.con):
            for sql, params in self.statements:
                self.con.execute(sql, params)
            if self.replace_keys:
                self.con.execute("DELETE FROM llm_cache WHERE list_contains(?, key)", [sorted(self.replace_keys)])
            if self.cache_rows:
                self._insert("llm_cache", list(self.cache_rows.values()), "ON CONFLICT DO NOTHING")
            for table, rows in self.rows.items():
                if rows:
                    self._insert(table, rows, "")
        self.statements.clear()
        self.rows.clear()
        self.cache_rows.clear()
        self.replace_keys.clear()

    def _insert(self, table: str, rows: list[dict[str, Any]], conflict: str) -> None:
        names = list(dict.fromkeys(k for r in rows for k in r))  # every key of every row, not the first row's
        data = pa.table({n: [r.get(n) for r in rows] for n in names})
        cols = ", ".join(f'"{c}"' for c in names)
        self.con.register("_pending", data)
        try:
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _pending {conflict}")
        finally:
            self.con.unregister("_pending")


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


RETRY_STATUS = {408, 409, 429}


@dataclass
class _CallState:
    attempts: int = 0
    cache_hit: bool = False
    stale_cache: bool = False
    latency: float = 0.0
    spent_in: Optional[int] = None  # tokens paid for by this run
    spent_out: Optional[int] = None
    used_in: Optional[int] = None  # tokens reported by the responses the answer came from
    used_out: Optional[int] = None


def _add(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else (a if b is None else a + b)


# --- the client -------------------------------------------------------------------------


_REASON_KINDS = r"HTTP \d{3}|not JSON|cannot reach|no answer from|answer rejected|unusable 200"


def reason_kind(error: Optional[str], extra: str = "") -> str:
    """A failure reason without its details, for summaries (e.g. 'HTTP 500'); `extra` adds stage patterns."""
    text = error or "unknown"
    m = re.search(_REASON_KINDS + (f"|{extra}" if extra else ""), text)
    return m.group(0) if m else text[:60]


async def gather_or_cancel(coros: list[Any]) -> None:
    """Run coroutines as tasks together; if one fails, cancel the rest before re-raising."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
        self._client: Optional[openai.AsyncOpenAI] = None
        self._sem: Optional[asyncio.Semaphore] = None
        self._flusher: Optional[asyncio.Task[None]] = None

    def spend_into(self, result: Any) -> None:
        """Copy this client's call and spend totals onto a stage result."""
        result.calls, result.cache_hits = self.calls, self.cache_hits
        result.prompt_tokens, result.completion_tokens, result.cost = self.prompt_tokens, self.completion_tokens, self.cost

    async def __aenter__(self) -> "LLMClient":
        n = self.settings.concurrency
        # A connection pool smaller than the concurrency silently caps throughput.
        http = openai.DefaultAsyncHttpxClient(
            limits=_httpx.Limits(max_connections=n, max_keepalive_connections=n), timeout=self.settings.timeout
        )
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._key, max_retries=0, timeout=self.settings.timeout, http_client=http
        )
        self._sem = asyncio.Semaphore(n)
        self._flusher = asyncio.create_task(self._flush_loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
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

    def price(self, prompt_tokens: Optional[int], completion_tokens: Optional[int]) -> Optional[float]:
        if prompt_tokens is None and completion_tokens is None:
            return None
        s = self.settings
        return ((prompt_tokens or 0) * s.price_in + (completion_tokens or 0) * s.price_out) / 1e6

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
            value = await retrying(self._attempt, endpoint, body, key, parse, st)
        except (_Retryable, _Fatal) as e:
            reason = self.redact(e.reason)
            if st.attempts > 1:
                reason += f" (after {st.attempts} attempts)"
            connection = isinstance(e, _Retryable) and e.connection
            self.failures += 1
            self.connection_failures += connection
            if isinstance(e, _Fatal) and e.status in (401, 403, 404):
                self.refusals += 1
                self.last_refusal = reason
            self._ledger(body["model"], latent, key, st, error=reason)
            raise CallFailed(reason, attempts=st.attempts, connection=connection, prompt_tokens=st.used_in,
                             completion_tokens=st.used_out, cost=self.price(st.used_in, st.used_out)) from None
        self.answered += 1
        self.cache_hits += st.cache_hit
        self._ledger(body["model"], latent, key, st, error=None)
        return Answer(value, st.used_in, st.used_out, self.price(st.used_in, st.used_out), st.cache_hit, st.attempts)

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
            cached = self.writer.cached(key)
            if cached is not None:
                try:
                    value = parse(reply_from(endpoint, cached))
                except ValueError as e:
                    st.stale_cache = True  # the parser changed since; replace the entry
                    raise _Retryable(f"cached answer rejected: {_short(e)}", immediate=True) from None
                st.cache_hit = True
                usage = cached.get("usage") or {}
                st.used_in, st.used_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
                return value
        data = await self._post(endpoint, body, st)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        st.spent_in, st.spent_out = _add(st.spent_in, p), _add(st.spent_out, c)
        st.used_in, st.used_out = _add(st.used_in, p), _add(st.used_out, c)
        try:
            reply = reply_from(endpoint, data)
        except ValueError as e:  # an error object or no choices in a 200: the server's trouble
            raise _Retryable(f"{self.base_url} sent an unusable 200: {_short(e)}") from None
        try:
            value = parse(reply)
        except ValueError as e:
            raise _Retryable(f"answer rejected: {_short(e)}", immediate=True) from None
        if self.settings.cache:
            self.writer.put_cache(key, str(body.get("model")), data, replace=st.stale_cache)
        return value

    async def _post(self, endpoint: str, body: dict[str, Any], st: _CallState) -> dict[str, Any]:
        assert self._client is not None and self._sem is not None
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        url = self.base_url + path
        async with self._sem:
            t0 = time.perf_counter()
            try:
                resp = await self._client.post(path, body=body, cast_to=_httpx.Response)
            except openai.APITimeoutError:
                raise _Retryable(f"no answer from {url} within {self.settings.timeout:g}s", connection=True) from None
            except openai.APIConnectionError as e:
                # A reset's cause (ReadError) has an empty message: name its type instead.
                cause = f": {_short(e.__cause__) or type(e.__cause__).__name__}" if e.__cause__ is not None else ""
                raise _Retryable(f"cannot reach {url}{cause}", connection=True) from None
            except openai.APIStatusError as e:
                self.responses += 1
                status = e.status_code
                reason = f"{url} answered HTTP {status}: {_short(_error_message(e))}"
                if status in RETRY_STATUS or status >= 500:
                    raise _Retryable(reason, retry_after=parse_retry_after(e.response.headers)) from None
                raise _Fatal(reason, status) from None
            finally:
                st.latency += time.perf_counter() - t0
            text = resp.text
        self.responses += 1
        try:
            data = json.loads(text)
        except ValueError:
            raise _Retryable(f"{url} sent a 200 that is not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise _Retryable(f"{url} sent a 200 that is not a JSON object: {text[:80]!r}")
        return data

    def _ledger(self, model: str, latent: Optional[int], key: str, st: _CallState, error: Optional[str]) -> None:
        cost = self.price(st.spent_in, st.spent_out)
        self.prompt_tokens += st.spent_in or 0
        self.completion_tokens += st.spent_out or 0
        self.cost += cost or 0.0
        self.writer.add("llm_calls", {
            "run_id": self.run_id, "stage": self.stage, "model": model, "dict_id": self.dict_id,
            "latent": latent, "cache_key": key, "cache_hit": st.cache_hit, "attempts": st.attempts,
            # A cache hit spends nothing; a call that never got a usage block has unknown tokens.
            "prompt_tokens": 0 if st.cache_hit else st.spent_in,
            "completion_tokens": 0 if st.cache_hit else st.spent_out,
            "latency_s": st.latency, "cost": 0.0 if st.cache_hit else cost, "error": error,
            "created_at": store.now(),
        })


def _short(e: Any, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _error_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
    return e.message
