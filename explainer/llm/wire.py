"""What the LLM client speaks and stores: replies, answers, failures, cache keys, endpoint
resolution, Retry-After parsing, turning a raw response body into a Reply, and the Writer that
batches cache and ledger rows into one transaction about once a second.

Split from llm.py so the client module holds only the retry loop and the call bookkeeping.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Generic, Iterable, Optional, TypeVar
from urllib.parse import urlparse

import duckdb

from explainer.errors import ExplainerError
from explainer.settings import LLMSettings
from explainer.store import db as store
from explainer.store.rows import StageRows

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Loopback servers (llama.cpp, the test server) ignore the key but the SDK insists on one.
LOOPBACK_KEY = "no-key-needed-for-loopback"
FLUSH_SECONDS = 1.0
# Consecutive unreachable calls, with no answer ever received, before a stage gives up.
UNREACHABLE_AFTER = 3
# Above any real response's usage (a million-token context is 1e6); keeps every cost finite.
MAX_USAGE_TOKENS = 10**9


# --- small public types ---------------------------------------------------------------


@dataclass
class Reply:
    """What one completion said: the text and, when asked for, each generated token's alternatives.

    With `echo` on /v1/completions the logprobs cover the prompt's tokens too: then `tokens` and
    `text_offset` (the character where each token starts) line up with `top_logprobs`.
    """

    text: Optional[str]
    finish_reason: Optional[str]
    top_logprobs: Optional[list[dict[str, float]]]  # one {token: logprob} per generated (or echoed) token
    body: dict[str, Any]
    tokens: Optional[list[str]] = None
    text_offset: Optional[list[int]] = None


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


def _count(block: dict[str, Any], name: str, where: str) -> Optional[int]:
    v = block.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # some servers write 12.0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_USAGE_TOKENS:
        raise ValueError(f"{where}{name} is {str(v)[:40]!r}, not a token count from 0 to {MAX_USAGE_TOKENS:.0e}")
    return v


def usage_tokens(body: Optional[dict[str, Any]]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(prompt, completion, cached prompt) tokens of a response's usage block; None where absent.

    A usage block that is there but malformed (strings, negatives, absurd counts) is a ValueError:
    such a response is neither priced nor cached, since its cost would be wrong for good."""
    if not isinstance(body, dict) or body.get("usage") is None:
        return None, None, None
    usage = body["usage"]
    if not isinstance(usage, dict):
        raise ValueError(f"usage is {type(usage).__name__}, not an object")
    details = usage.get("prompt_tokens_details")
    if details is not None and not isinstance(details, dict):
        raise ValueError("usage.prompt_tokens_details is not an object")
    cached = _count(details, "cached_tokens", "usage.prompt_tokens_details.") if details else None
    return _count(usage, "prompt_tokens", "usage."), _count(usage, "completion_tokens", "usage."), cached


def checked_reply(endpoint: str, body: Any) -> tuple[Reply, tuple[Optional[int], Optional[int], Optional[int]]]:
    """A response body the pipeline can use: its Reply and usage, or a ValueError saying why not.
    Everything that is cached passes this first, and so does everything read back from the cache."""
    if not isinstance(body, dict):
        raise ValueError(f"body is {type(body).__name__}, not a JSON object")
    usage = usage_tokens(body)
    return reply_from(endpoint, body), usage


def price_of(settings: LLMSettings, prompt_tokens: Optional[int], completion_tokens: Optional[int],
             cached_tokens: Optional[int] = None) -> Optional[float]:
    """USD of a response at the settings' prices; prompt tokens the endpoint served from its
    prompt cache cost price_cached_in (OpenAI bills them at half) when that is set."""
    if prompt_tokens is None and completion_tokens is None:
        return None
    cached = min(cached_tokens or 0, prompt_tokens or 0)
    cached_price = settings.price_cached_in if settings.price_cached_in is not None else settings.price_in
    return (((prompt_tokens or 0) - cached) * settings.price_in + cached * cached_price
            + (completion_tokens or 0) * settings.price_out) / 1e6


def resolve_endpoint(settings: LLMSettings) -> tuple[str, str]:
    """(base_url, api_key): a remote endpoint without a key is a user error, raised before any call."""
    base_url = (settings.base_url or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlparse(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # "localhost:8000/v1" parses as scheme "localhost": without this it reads as a remote host needing a key.
        raise ExplainerError(f"--base-url {settings.base_url!r} is not an http(s) URL: write it with its scheme, "
                             f"e.g. http://{base_url.split('://')[-1]} (or https://...)")
    key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    if key:
        return base_url, key
    if is_loopback(base_url):
        return base_url, LOOPBACK_KEY
    if (settings.batch and settings.batch_dir) or settings.estimate:
        # Every answer comes from the folder (batch_files.py), or nothing is sent (--estimate).
        return base_url, "unused"
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
    tokens: Optional[list[str]] = None
    offset: Optional[list[int]] = None
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
            if isinstance(logprobs.get("tokens"), list):
                tokens = [str(t) for t in logprobs["tokens"]]
                offsets = logprobs.get("text_offset")
                offset = [int(o) for o in offsets] if isinstance(offsets, list) else None
                if len(tokens) != len(top) or (offset is not None and len(offset) != len(top)):
                    raise ValueError("logprobs tokens, text_offset and top_logprobs differ in length")
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError("malformed logprobs") from None
    if top is not None and any(lp != lp or lp == math.inf for d in top for lp in d.values()):
        raise ValueError("non-finite logprobs (NaN or +inf)")
    if text is not None and not isinstance(text, str):
        raise ValueError("content is not a string")
    return Reply(text=text, finish_reason=choice.get("finish_reason"), top_logprobs=top, body=body,
                 tokens=tokens, text_offset=offset)


# --- buffered writes --------------------------------------------------------------------


class Writer:
    """Rows waiting for the next transaction; the cache part doubles as a read-through buffer.

    Besides its own cache and ledger rows it commits the stage's rows (rows.StageRows) in the
    same transaction as the answers that produced them, without knowing what they are."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.rows = StageRows()  # ledger rows and the stage rows queued with them
        self.cache_rows: dict[str, dict[str, Any]] = {}
        self.replace_keys: set[str] = set()  # cache rows deleted before cache_rows are inserted
        self.prefetched: dict[str, Optional[str]] = {}  # key -> response JSON, or None: known absent

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows.add(table, row)

    def commit_with(self, rows: StageRows) -> None:
        """A stage's rows (and the rows they replace) for the next transaction."""
        self.rows.extend(rows)

    def drop_cache(self, key: str) -> None:
        """Delete a cached answer at the next transaction (one the parser now rejects)."""
        self.replace_keys.add(key)

    def put_cache(self, key: str, model: str, body: dict[str, Any], replace: bool) -> None:
        self.cache_rows[key] = {"key": key, "model": model, "response": json.dumps(body), "created_at": store.now()}
        if replace:
            self.replace_keys.add(key)

    def cached(self, key: str) -> Optional[dict[str, Any]]:
        """The cached response body, None when there is none; a ValueError when the row is not JSON."""
        row = self.cache_rows.get(key)
        if row is not None:
            return json.loads(row["response"])
        if key in self.prefetched:
            text = self.prefetched.pop(key)
        else:
            found = self.con.execute("SELECT response FROM llm_cache WHERE key = ?", [key]).fetchone()
            text = found[0] if found else None
        if text is None:
            return None
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            raise ValueError("the cached row is not JSON") from None

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
        return len(self.rows) + len(self.cache_rows) + len(self.replace_keys)

    def flush(self) -> None:
        if not self.pending():
            return
        with store.transaction(self.con):  # one transaction, one fsync
            if self.replace_keys:
                self.con.execute("DELETE FROM llm_cache WHERE list_contains(?, key)", [sorted(self.replace_keys)])
            store.insert_rows(self.con, "llm_cache", list(self.cache_rows.values()), conflict="ignore")
            self.rows.write(self.con)
        self.rows.clear()
        self.cache_rows.clear()
        self.replace_keys.clear()


