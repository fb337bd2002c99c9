"""The HTTP client under LLMClient: a cap on every response body, and redirects not followed.

A hostile or broken endpoint can stream a body forever or send a small gzip that inflates to
gigabytes; httpx reads either into memory. `CappedTransport` counts the bytes a response
body yields after decompression (it decompresses itself, with a bounded output per step) and
raises `ResponseTooLarge` once they pass `max_response_bytes`. The time side (a body that
drips one byte per read timeout) is the caller's one deadline per request (llm.py).

Redirects are not followed: a POST that a server redirects comes back as a GET elsewhere
(a misleading 404 or a DNS error); the 3xx itself says what to fix (`redirect_message`).
"""

from __future__ import annotations

import zlib
from typing import Any, AsyncIterator, Optional

import openai

try:  # openai >= 3 ships httpx2; older releases use httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx  # type: ignore[no-redef]


class ResponseTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"response body over {limit:,} bytes (llm.max_response_bytes)")
        self.limit = limit


class _CappedStream(_httpx.AsyncByteStream):
    def __init__(self, inner: Any, limit: int, encoding: str):
        self.inner, self.limit = inner, limit
        # gzip or zlib-wrapped deflate, told apart by their headers (wbits 47).
        self.inflate = zlib.decompressobj(47) if encoding in ("gzip", "deflate") else None
        self.seen = 0

    def _count(self, n: int) -> None:
        self.seen += n
        if self.seen > self.limit:
            raise ResponseTooLarge(self.limit)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.inner:
            if self.inflate is None:
                self._count(len(part))
                yield part
                continue
            data = part
            while data:
                # At most limit+1 bytes out per step: a bomb is stopped before it is inflated.
                try:
                    out = self.inflate.decompress(data, self.limit - self.seen + 1)
                except zlib.error as e:
                    raise _httpx.DecodingError(f"bad compressed body: {e}") from None
                self._count(len(out))
                if out:
                    yield out
                data = self.inflate.unconsumed_tail
        if self.inflate is not None:
            rest = self.inflate.flush()
            self._count(len(rest))
            if rest:
                yield rest

    async def aclose(self) -> None:
        await self.inner.aclose()


class CappedTransport(_httpx.AsyncBaseTransport):
    """Wraps the default transport; bodies above `limit` bytes (decompressed) raise ResponseTooLarge."""

    def __init__(self, inner: Any, limit: int):
        self.inner, self.limit = inner, limit

    async def handle_async_request(self, request: Any) -> Any:
        # Asked for plain bodies; a server that compresses anyway is decompressed here, under the cap.
        request.headers["Accept-Encoding"] = "gzip, deflate"
        resp = await self.inner.handle_async_request(request)
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity", "gzip", "deflate"):
            headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in (b"content-encoding", b"content-length")]
            return _httpx.Response(resp.status_code, headers=headers, stream=_CappedStream(resp.stream, self.limit, encoding),
                                   extensions=resp.extensions)
        await resp.aclose()
        raise _httpx.DecodingError(f"unsupported Content-Encoding {encoding!r} (asked for gzip or deflate)")

    async def aclose(self) -> None:
        await self.inner.aclose()


def http_client(concurrency: int, timeout: float, max_bytes: int) -> Any:
    # A connection pool smaller than the concurrency silently caps throughput.
    limits = _httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout, follow_redirects=False)
    # The client's own transports are wrapped (not replaced: a transport passed in would make
    # httpx ignore HTTPS_PROXY and friends), proxy mounts included.
    http._transport = CappedTransport(http._transport, max_bytes)
    http._mounts = {k: (CappedTransport(t, max_bytes) if t is not None else None) for k, t in http._mounts.items()}
    return http


def redirect_message(url: str, status: int, location: Optional[str]) -> str:
    """A 3xx names where it points and the --base-url that would go there directly."""
    if not location:
        return f"{url} answered HTTP {status} (a redirect without a Location); check --base-url"
    suggestion = ""
    for tail in ("/chat/completions", "/completions"):
        if location.rstrip("/").endswith(tail):
            suggestion = f": use --base-url {location.rstrip('/')[: -len(tail)]}"
            break
    return f"{url} redirected (HTTP {status}) to {location}{suggestion or '; point --base-url at the new address'}"


def short(e: Any, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def error_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
    return e.message
