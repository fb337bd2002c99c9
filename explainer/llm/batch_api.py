"""The Batch API on the wire for `--batch`: files and batches calls with retries, and result lines."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Optional, TypeVar

import duckdb
import openai
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from explainer.errors import ExplainerError
from explainer.llm.batch_files import FolderClient
from explainer.llm.batch_wire import Refused
from explainer.llm.http import error_message, redirect_message, short
from explainer.llm.wire import checked_reply, resolve_endpoint
from explainer.settings import LLMSettings

T = TypeVar("T")
UPLOAD_TIMEOUT = 600.0  # an input file may be 190 MB


class _Transient(Exception):
    pass


class BatchApi:
    """files/batches calls with the LLM layer's retry settings; refusals become user errors."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.client: Any
        if settings.batch_dir:  # an offline engine answers through a folder (batch_files.py)
            self.client = FolderClient(settings.batch_dir)
            self.base_url, self._key = self.client.base_url, ""
            return
        self.base_url, self._key = resolve_endpoint(settings)
        # Not following redirects: a redirected POST comes back as a GET elsewhere (a misleading 404).
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self._key, max_retries=0,
                                    timeout=max(settings.timeout, UPLOAD_TIMEOUT),
                                    http_client=openai.DefaultHttpxClient(follow_redirects=False))

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if len(self._key) > 8 else text

    def call(self, what: str, fn: Callable[..., T], *args: Any, idempotent: bool = True, **kw: Any) -> T:
        """`fn(*args, **kw)`, retried on 408/409/429/5xx and, when `idempotent`, on timeouts and
        lost connections (a create that may have gone through is not repeated: it would bill twice)."""
        s = self.settings

        def once() -> T:
            try:
                return fn(*args, **kw)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                if idempotent:
                    raise _Transient(f"cannot reach {self.base_url}: {short(e)}") from None
                raise ExplainerError(
                    f"{what} at {self.base_url} got no answer ({short(e)}); it may have gone through: rerun the "
                    "same command, it finds such a batch by its metadata and adopts it instead of buying it twice"
                ) from None
            except openai.APIStatusError as e:
                msg = self._redact(f"HTTP {e.status_code}: {short(error_message(e))}")
                if 300 <= e.status_code < 400:
                    msg = redirect_message(str(e.request.url), e.status_code, e.response.headers.get("location"))
                if e.status_code in (408, 409, 429) or e.status_code >= 500:
                    raise _Transient(msg) from None
                raise Refused(e.status_code, msg) from None

        def wait(rs: Any) -> float:
            return min(s.backoff_max, s.backoff * 2 ** (rs.attempt_number - 1))

        try:
            for attempt in Retrying(stop=stop_after_attempt(s.max_attempts), wait=wait,
                                    retry=retry_if_exception_type(_Transient), reraise=True):
                with attempt:
                    return once()
        except _Transient as e:
            raise ExplainerError(f"{what} failed at {self.base_url} after {s.max_attempts} attempts ({e}); "
                                 "rerun the same command later (submitted batches are resumed)") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def recent_batches(self, pages: int = 10, max_age_s: float = 30 * 86400) -> list[Any]:
        """The endpoint's batches of the last `max_age_s` (newest first, at most `pages` pages of 100);
        Refused when it cannot list them."""
        def fetch() -> list[Any]:
            out: list[Any] = []
            cutoff = time.time() - max_age_s
            page = self.client.batches.list(limit=100)
            for _ in range(pages):
                for b in page.data:
                    if (b.created_at or 0) < cutoff:
                        return out
                    out.append(b)
                if not page.has_next_page():
                    break
                page = page.get_next_page()
            return out

        return self.call("batches.list", fetch)

    def checked(self, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`call`, with a refusal turned into a message naming the fix."""
        try:
            return self.call(what, fn, *args, **kw)
        except Refused as e:
            hint = ("the endpoint has no Batch API (vLLM, llama.cpp and Ollama servers serve none): run without --batch"
                    if e.status == 404 else "check OPENAI_API_KEY, --base-url and --model, or run without --batch")
            raise ExplainerError(f"{what} refused by {self.base_url} ({e.message}); {hint}") from None


def read_line(raw: bytes, endpoint: str) -> tuple[Optional[str], Optional[dict[str, Any]], Optional[str]]:
    """(custom_id, usable response body or None, error reason or None) of one result line."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return None, None, None
    if not isinstance(rec, dict) or not isinstance(rec.get("custom_id"), str):
        return None, None, None
    key = rec["custom_id"]
    err = rec.get("error")
    if err:
        if isinstance(err, dict):
            return key, None, f"{err.get('code') or 'error'}: {short(err.get('message') or '')}"
        return key, None, short(err)
    resp = rec.get("response")
    if not isinstance(resp, dict):
        resp = {}
    code, body = resp.get("status_code"), resp.get("body")
    if code == 200 and isinstance(body, dict):
        try:
            checked_reply(endpoint, body)  # what the cache would not hand back is not cached
        except ValueError as e:
            return key, None, f"unusable answer: {short(e)}"
        return key, body, None
    msg = body
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message", inner) if isinstance(inner, dict) else inner
    return key, None, f"HTTP {code}: {short(msg)}"


def batch_key(con: duckdb.DuckDBPyConnection, endpoint: str, data: bytes) -> str:
    """What a batch holds and for which DB: the input's bytes (their custom_ids are cache keys, so
    model, prompts and parameters), the endpoint, and when this DB was created (its identity)."""
    born = (con.execute("SELECT min(applied_at) FROM _migrations").fetchone() or [None])[0]
    h = hashlib.sha256(f"{born}\n{endpoint}\n".encode())
    h.update(data)
    return h.hexdigest()[:40]
