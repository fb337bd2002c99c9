"""A real HTTP server on 127.0.0.1 that speaks the OpenAI protocol from a script.

Tests point the real `openai` client at it, so retries, timeouts, the cache and the
ledger are exercised over a socket, never through a mock. A reply comes from the queue
(`push`) while it holds anything, otherwise from `responder(request) -> Reply | str`.

    with ScriptedServer() as srv:
        srv.push(Reply.status(429, retry_after=0.1), "a good answer")
        ... LLMSettings(base_url=srv.url) ...
        assert len(srv.requests) == 2

`python tests/openai_server.py --latency 0.2` serves from a separate process (the bench
uses it so the server's threads do not compete with the client for the GIL).
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional, Union

import pytest


@dataclass
class Reply:
    """One scripted answer. Build it with the class methods."""

    kind: str = "text"  # text | status | raw | hang | reset | error200
    text: Optional[str] = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    usage: bool = True
    top_logprobs: Optional[list[dict[str, float]]] = None  # per generated token
    finish_reason: str = "stop"
    delay: float = 0.0

    @classmethod
    def content(cls, text: Optional[str], **kw: Any) -> "Reply":
        return cls(kind="text", text=text, **kw)

    @classmethod
    def logprobs(cls, top: list[dict[str, float]], **kw: Any) -> "Reply":
        """Generated tokens whose alternatives are `top`; each token is its list's argmax."""
        text = "".join(max(d, key=d.get) for d in top)
        return cls(kind="text", text=text, top_logprobs=top, **kw)

    @classmethod
    def http(cls, status: int, retry_after: Optional[Union[float, str]] = None, message: str = "scripted") -> "Reply":
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        body = json.dumps({"error": {"message": message, "type": "scripted", "code": status}}).encode()
        return cls(kind="status", status=status, headers=headers, body=body)

    @classmethod
    def raw(cls, body: Union[bytes, str], status: int = 200, content_type: str = "application/json") -> "Reply":
        """Any bytes as the body: truncated JSON, HTML, nothing."""
        data = body.encode() if isinstance(body, str) else body
        return cls(kind="raw", status=status, body=data, headers={"Content-Type": content_type})

    @classmethod
    def hang(cls, seconds: float = 5.0) -> "Reply":
        """Say nothing for `seconds` (past the client's timeout), then drop the connection."""
        return cls(kind="hang", delay=seconds)

    @classmethod
    def reset(cls) -> "Reply":
        """Close the socket with a TCP reset before any byte of the response."""
        return cls(kind="reset")

    @classmethod
    def error_in_200(cls, message: str = "upstream overloaded") -> "Reply":
        """A 200 whose body is an error object (some proxies do this): choices is missing."""
        return cls(kind="error200", text=message)


@dataclass
class Request:
    path: str
    body: Any
    headers: dict[str, str]

    def prompt_text(self) -> str:
        """Everything the model was shown: chat messages' contents or the completion prompt."""
        if not isinstance(self.body, dict):
            return ""
        if "messages" in self.body:
            return "\n".join(str(m.get("content", "")) for m in self.body["messages"])
        return str(self.body.get("prompt", ""))


Responder = Callable[[Request], Union[Reply, str]]


def default_responder(req: Request) -> Reply:
    return Reply.content("scripted answer")


def count_tokens(text: str) -> int:
    # Whitespace words stand in for tokens: deterministic, so ledger tests can predict them.
    return len(text.split())


class ScriptedServer:
    """Threads on 127.0.0.1:<free port>; use as a context manager or call start()/stop()."""

    def __init__(self, responder: Responder = default_responder, latency: float = 0.0, model: str = "scripted-model"):
        self.responder = responder
        self.latency = latency
        self.model = model
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most completion requests handled at once (checks the client's bound)
        self._queue: deque[Union[Reply, str]] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- script -----------------------------------------------------------------------
    def push(self, *replies: Union[Reply, str]) -> None:
        with self._lock:
            self._queue.extend(replies)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def _next_reply(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            reply = self._queue.popleft() if self._queue else None
        if reply is None:
            reply = self.responder(req)
        return Reply.content(reply) if isinstance(reply, str) else reply

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "ScriptedServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.scripted = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- bodies -------------------------------------------------------------------------
    def _usage(self, req: Request, reply: Reply) -> dict[str, int]:
        p, c = count_tokens(req.prompt_text()), count_tokens(reply.text or "")
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chat_body(self, req: Request, reply: Reply) -> dict[str, Any]:
        logprobs = None
        if reply.top_logprobs is not None:
            logprobs = {
                "content": [
                    {
                        "token": max(top, key=top.get),
                        "logprob": max(top.values()),
                        "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()],
                    }
                    for top in reply.top_logprobs
                ]
            }
        body: dict[str, Any] = {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "logprobs": logprobs,
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.usage:
            body["usage"] = self._usage(req, reply)
        return body

    def completion_body(self, req: Request, reply: Reply) -> dict[str, Any]:
        logprobs = None
        if reply.top_logprobs is not None:
            tokens = [max(top, key=top.get) for top in reply.top_logprobs]
            logprobs = {
                "tokens": tokens,
                "token_logprobs": [max(top.values()) for top in reply.top_logprobs],
                "top_logprobs": reply.top_logprobs,
                "text_offset": list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]])),
            }
        body: dict[str, Any] = {
            "id": f"cmpl-{next(self._ids)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.body.get("model", self.model),
            "choices": [{"index": 0, "text": reply.text, "logprobs": logprobs, "finish_reason": reply.finish_reason}],
        }
        if reply.usage:
            body["usage"] = self._usage(req, reply)
        return body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # The default backlog of 5 drops connections when 32 clients open at once.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and abandoned hangs are scripted; their broken pipes are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this Nagle adds ~40 ms per reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv: ScriptedServer = self.server.scripted  # type: ignore[attr-defined]
        if self.path.rstrip("/").endswith("/models"):
            data = {"object": "list", "data": [{"id": srv.model, "object": "model", "created": 0, "owned_by": "tests"}]}
            self._send(200, json.dumps(data).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        srv: ScriptedServer = self.server.scripted  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        req = Request(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        path = self.path.rstrip("/")
        if not (path.endswith("/chat/completions") or path.endswith("/completions")):
            with srv._lock:
                srv.requests.append(req)
            self._send(404, b'{"error": {"message": "unknown path"}}')
            return
        reply = srv._next_reply(req)
        with srv._lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._answer(srv, req, reply, path)
        finally:
            with srv._lock:
                srv.in_flight -= 1

    def _answer(self, srv: ScriptedServer, req: Request, reply: Reply, path: str) -> None:
        if srv.latency:
            srv._stop.wait(srv.latency)
        if reply.delay and reply.kind != "hang":
            srv._stop.wait(reply.delay)
        if reply.kind == "hang":
            srv._stop.wait(reply.delay)
            self.close_connection = True
            return
        if reply.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if reply.kind in ("status", "raw"):
            self._send(reply.status, reply.body, reply.headers)
            return
        if reply.kind == "error200":
            self._send(200, json.dumps({"error": {"message": reply.text, "code": 503}}).encode())
            return
        make = srv.chat_body if path.endswith("/chat/completions") else srv.completion_body
        self._send(200, json.dumps(make(req, reply)).encode(), reply.headers)


@pytest.fixture
def llm_server() -> Iterator[ScriptedServer]:
    """A started ScriptedServer answering "scripted answer" unless scripted otherwise."""
    with ScriptedServer() as srv:
        yield srv


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="scripted OpenAI-compatible server (answers every call the same)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    ap.add_argument("--answer", default="tokens about scripted things", help="content of every answer")
    args = ap.parse_args(argv)
    srv = ScriptedServer(lambda req: Reply.content(args.answer), latency=args.latency).start()
    print(srv.url, flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
