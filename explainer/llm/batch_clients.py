"""The two LLM clients of `--batch` (explainer/llm/batch.py): one collects requests, one finishes.

- `Collector` answers a call from the cache when it can; otherwise it spools the call's exact
  request body (so its exact cache key) as a Batch API line and raises `Deferred`, a
  `CallFailed` the stages already handle. It sends nothing and writes nothing.
- `Finisher` is the online client for the pass after the batches: a request the batches
  left unanswered fails with the batch's reason instead of going live, and an answer a
  batch delivered is priced at `batch_price_factor` in the stage's rows.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any, Callable, Optional, TypeVar

import duckdb

from explainer.llm.client import LLMClient
from explainer.llm.wire import Answer, CallFailed, Reply, Writer, cache_key, checked_reply
from explainer.settings import LLMSettings
from explainer.store.rows import StageRows

T = TypeVar("T")
URLS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class Deferred(CallFailed):
    """A call the collector spooled for a batch instead of sending."""

    def __init__(self) -> None:
        super().__init__("deferred to a batch", attempts=0, connection=False, prompt_tokens=None,
                         completion_tokens=None, cost=None)


class Spool:
    """Batch lines spooled to a temporary file (a million prompts do not fit in memory), by cache key."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.pending: dict[str, tuple[str, Optional[int], int, int]] = {}  # key -> endpoint, latent, offset, length
        self.seen: set[str] = set()  # every key the stage asked for, cached or not

    def add(self, key: str, endpoint: str, body: dict[str, Any], latent: Optional[int]) -> None:
        if key in self.pending:  # the same request twice (two latents, one prompt): one line
            return
        line = json.dumps({"custom_id": key, "method": "POST", "url": URLS[endpoint], "body": body},
                          ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        offset = self.file.seek(0, 2)
        self.file.write(line)
        self.pending[key] = (endpoint, latent, offset, len(line))

    def line(self, key: str) -> bytes:
        _, _, offset, length = self.pending[key]
        self.file.seek(offset)
        return self.file.read(length)

    def latent(self, key: str) -> Optional[int]:
        found = self.pending.get(key)
        return found[1] if found else None

    def close(self) -> None:
        self.file.close()


class _NoWrites(Writer):
    """Reads the cache like the online writer; drops every row (the collect pass leaves no trace)."""

    def add(self, table: str, row: dict[str, Any]) -> None:
        pass

    def commit_with(self, rows: StageRows) -> None:
        pass

    def drop_cache(self, key: str) -> None:
        pass

    def put_cache(self, key: str, model: str, body: dict[str, Any], replace: bool) -> None:
        pass

    def flush(self) -> None:
        pass


class Collector(LLMClient):
    """An LLM client that answers from the cache or spools the request and raises `Deferred`."""

    collecting = True  # for callers that would otherwise wait on an answer (simulate_echo's probe)

    def __init__(self, settings: LLMSettings, con: duckdb.DuckDBPyConnection, *, stage: str,
                 run_id: Optional[int] = None, dict_id: Optional[int] = None, spool: Spool):
        super().__init__(settings, con, stage=stage, run_id=run_id, dict_id=dict_id)
        self.writer = _NoWrites(con)
        self.spool = spool

    async def __aenter__(self) -> Collector:
        return self  # no HTTP client: nothing is sent

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def _call(self, endpoint: str, body: dict[str, Any], latent: Optional[int],
                    parse: Callable[[Reply], T]) -> Answer[T]:
        key = cache_key(endpoint, body)
        self.calls += 1
        self.spool.seen.add(key)
        try:
            cached = self.writer.cached(key)
            if cached is not None:
                reply, (p, c, pc) = checked_reply(endpoint, cached)
                value = parse(reply)
        except ValueError:
            pass  # a stale or damaged answer: the batch asks again and the ingest replaces it
        else:
            if cached is not None:
                self.answered += 1
                self.cache_hits += 1
                return Answer(value, p, c, self.price(p, c, pc), cache_hit=True, attempts=1)
        self.spool.add(key, endpoint, body, latent)
        raise Deferred()


class Finisher(LLMClient):
    """The online client for the pass after the batches: requests the batches left unanswered
    fail with the batch's reason instead of going live; batch answers are priced as batches."""

    def __init__(self, settings: LLMSettings, con: duckdb.DuckDBPyConnection, *, stage: str,
                 run_id: Optional[int] = None, dict_id: Optional[int] = None,
                 failed: dict[str, str], discounted: set[str], live: bool = True):
        if not live:
            # A folder batch has no endpoint to ask again: a rejected answer fails at its first reading.
            settings = settings.model_copy(update={"max_attempts": 1})
        super().__init__(settings, con, stage=stage, run_id=run_id, dict_id=dict_id)
        self.batch_failed = failed
        self.discounted = discounted

    async def _call(self, endpoint: str, body: dict[str, Any], latent: Optional[int],
                    parse: Callable[[Reply], T]) -> Answer[T]:
        key = cache_key(endpoint, body)
        reason = self.batch_failed.get(key)
        if reason is not None:
            # Its ledger row was written at ingest; a second one would count the call twice.
            self.calls += 1
            self.failures += 1
            raise CallFailed(reason, attempts=0, connection=False, prompt_tokens=None, completion_tokens=None, cost=None)
        ans = await super()._call(endpoint, body, latent, parse)
        if ans.cache_hit and ans.cost is not None and key in self.discounted:
            ans.cost *= self.settings.batch_price_factor
        return ans
