"""A real HTTP server on 127.0.0.1 that speaks the OpenAI protocol from a script.

Tests point the real `openai` client at it, so retries, timeouts, the cache and the
ledger are exercised over a socket, never through a mock. A reply comes from the queue
(`push`) while it holds anything, otherwise from `responder(request) -> Reply | str`.

    with ScriptedServer() as srv:
        srv.push(Reply.status(429, retry_after=0.1), "a good answer")
        ... LLMSettings(base_url=srv.url) ...
        assert len(srv.requests) == 2

It also serves `/v1/files` and `/v1/batches` (the Batch API): an uploaded JSONL is answered
line by line through the same queue and responder when a batch reaches `completed`; each
status check moves a batch one step along `batch_statuses`. Lines served in a batch are
recorded in `batch_requests`, never in `requests`.

`python tests/openai_server.py --latency 0.2` serves from a separate process (the bench
uses it so the server's threads do not compete with the client for the GIL).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import functools
import gzip
import itertools
import json
import re
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

    kind: str = "text"  # text | status | raw | hang | reset | error200 | endless | drip
    text: Optional[str] = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    usage: bool = True
    top_logprobs: Optional[list[dict[str, float]]] = None  # per generated token
    finish_reason: str = "stop"
    delay: float = 0.0
    cached_tokens: int = 0  # reported as usage.prompt_tokens_details.cached_tokens when > 0

    @classmethod
    def content(cls, text: Optional[str], **kw: Any) -> Reply:
        return cls(kind="text", text=text, **kw)

    @classmethod
    def logprobs(cls, top: list[dict[str, float]], **kw: Any) -> Reply:
        """Generated tokens whose alternatives are `top`; each token is its list's argmax."""
        text = "".join(max(d, key=d.get) for d in top)
        return cls(kind="text", text=text, top_logprobs=top, **kw)

    @classmethod
    def http(cls, status: int, retry_after: Optional[Union[float, str]] = None, message: str = "scripted") -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        body = json.dumps({"error": {"message": message, "type": "scripted", "code": status}}).encode()
        return cls(kind="status", status=status, headers=headers, body=body)

    @classmethod
    def raw(cls, body: Union[bytes, str], status: int = 200, content_type: str = "application/json") -> Reply:
        """Any bytes as the body: truncated JSON, HTML, nothing."""
        data = body.encode() if isinstance(body, str) else body
        return cls(kind="raw", status=status, body=data, headers={"Content-Type": content_type})

    @classmethod
    def hang(cls, seconds: float = 5.0) -> Reply:
        """Say nothing for `seconds` (past the client's timeout), then drop the connection."""
        return cls(kind="hang", delay=seconds)

    @classmethod
    def reset(cls) -> Reply:
        """Close the socket with a TCP reset before any byte of the response."""
        return cls(kind="reset")

    @classmethod
    def endless(cls, chunk: int = 65536) -> Reply:
        """A 200 whose chunked body never ends: `chunk`-byte pieces of one JSON string, until the client leaves."""
        return cls(kind="endless", body=b"a" * chunk)

    @classmethod
    def drip(cls, every: float = 0.5) -> Reply:
        """A 200 announcing a 1 MB body, then one byte of it every `every` seconds (each read is quick)."""
        return cls(kind="drip", delay=every)

    @classmethod
    def redirect(cls, status: int = 301, location: str = "https://example.invalid/v1/chat/completions") -> Reply:
        return cls(kind="status", status=status, headers={"Location": location}, body=b"")

    @classmethod
    def gzip_bomb(cls, size: int = 256 * 2**20) -> Reply:
        """A 200 whose gzip body is small on the wire and `size` bytes once decompressed."""
        return cls(kind="raw", status=200, body=_bomb(size),
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    @classmethod
    def error_in_200(cls, message: str = "upstream overloaded") -> Reply:
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

    def question(self) -> str:
        """What the model is asked now: a chat's last message (earlier user/assistant turns may be
        worked examples that look just like it), or the whole completion prompt."""
        if isinstance(self.body, dict) and self.body.get("messages"):
            return str(self.body["messages"][-1].get("content", ""))
        return self.prompt_text()


Responder = Callable[[Request], Union[Reply, str]]

ECHO_TOKEN = re.compile(r"\t|\n| ?[^\s]+| ")


def echo_reply(req: Request, guess: Callable[[list[str], int], dict[str, float]], *, shift: int = 0,
               pattern: re.Pattern[str] = ECHO_TOKEN, delay: float = 0.0) -> Reply:
    """A /v1/completions answer with `echo`: the prompt split by `pattern` into tokens with their
    offsets, `guess(tokens, i)` as the alternatives at position i, one generated token "0".
    `shift=1` reports every position's alternatives one position early, as llama.cpp does
    for models without BOS. Usage counts the echoed tokens."""
    prompt = req.body["prompt"]
    found = [(m.group(), m.start()) for m in pattern.finditer(prompt)]
    toks = [t for t, _ in found]
    tops: list[Optional[dict[str, float]]] = [None] + [guess(toks, i) for i in range(1, len(toks))]
    if shift:
        tops = [None] + tops[1 + shift :] + [None] * shift
    logprobs = {"tokens": toks + ["0"], "text_offset": [o for _, o in found] + [len(prompt)],
                "token_logprobs": [None] + [-0.1] * len(toks), "top_logprobs": tops + [{"0": -0.1}]}
    body = {"id": "cmpl-echo", "object": "text_completion", "created": int(time.time()), "model": req.body.get("model"),
            "choices": [{"index": 0, "text": prompt + "0", "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(toks), "completion_tokens": 1, "total_tokens": len(toks) + 1}}
    reply = Reply.raw(json.dumps(body))
    reply.delay = delay
    return reply


def closed_port_url() -> str:
    """A loopback URL nothing listens on: the port was bound, then released."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


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
        # Batch API state: uploaded files, batch objects, and the statuses a batch walks through
        # (one step per retrieve; the last is final: completed, expired, cancelled or failed).
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_statuses: tuple[str, ...] = ("validating", "in_progress", "finalizing", "completed")
        self.batch_requests: list[Request] = []
        self.batch_api = True  # False: /files and /batches answer 404, as vLLM and llama.cpp servers do
        self.batch_api_errors = 0  # this many next /files or /batches requests answer 503 (retry tests)
        # This many next batches.create calls create the batch, then drop the connection unanswered
        # (as a client killed right after sending would never see the answer).
        self.batch_create_drops = 0
        self.batch_lists = 0  # GET /batches (list) requests served
        self.moved_to: Optional[str] = None  # set: every request answers 301 to this base + its path after /v1
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

    def _next_reply(self, req: Request, batch: bool = False) -> Reply:
        with self._lock:
            (self.batch_requests if batch else self.requests).append(req)
            reply = self._queue.popleft() if self._queue else None
        if reply is None:
            reply = self.responder(req)
        return Reply.content(reply) if isinstance(reply, str) else reply

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> ScriptedServer:
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

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- bodies -------------------------------------------------------------------------
    def _usage(self, req: Request, reply: Reply) -> dict[str, Any]:
        p, c = count_tokens(req.prompt_text()), count_tokens(reply.text or "")
        usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if reply.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": min(reply.cached_tokens, p)}
        return usage

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


    # --- Batch API ----------------------------------------------------------------------
    def add_file(self, data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        with self._lock:
            fid = f"file-{next(self._ids)}"
            obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                   "filename": filename, "purpose": purpose, "status": "processed"}
            self.files[fid] = {"object": obj, "data": data}
        return obj

    def create_batch(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fid = body.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"no file {fid}", "type": "invalid_request_error"}}
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/completions"):
            return 400, {"error": {"message": f"endpoint {body.get('endpoint')} not supported", "type": "invalid_request_error"}}
        n = len(self.files[fid]["data"].splitlines())
        with self._lock:
            bid = f"batch_{next(self._ids)}"
            batch = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None, "input_file_id": fid,
                     "completion_window": body.get("completion_window", "24h"), "status": self.batch_statuses[0],
                     "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                     "request_counts": {"total": n, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
                     "_step": 0}
            self.batches[bid] = batch
        if batch["status"] in ("completed", "expired", "cancelled", "failed"):
            self._finish_batch(batch)
        return 200, self._public(batch)

    def retrieve_batch(self, bid: str) -> Optional[dict[str, Any]]:
        batch = self.batches.get(bid)
        if batch is None:
            return None
        if batch["status"] not in ("completed", "expired", "cancelled", "failed"):
            batch["_step"] = min(batch["_step"] + 1, len(self.batch_statuses) - 1)
            batch["status"] = self.batch_statuses[batch["_step"]]
            if batch["status"] in ("completed", "expired", "cancelled", "failed"):
                self._finish_batch(batch)
        return self._public(batch)

    def list_batches(self, path: str) -> dict[str, Any]:
        """GET /batches?limit=N&after=ID: newest first, as OpenAI lists them."""
        from urllib.parse import parse_qs, urlparse

        q = parse_qs(urlparse(path).query)
        limit = int(q.get("limit", ["20"])[0])
        with self._lock:
            self.batch_lists += 1
            ids = list(reversed(self.batches))
        if "after" in q and q["after"][0] in ids:
            ids = ids[ids.index(q["after"][0]) + 1:]
        page = [self._public(self.batches[i]) for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _finish_batch(self, batch: dict[str, Any]) -> None:
        """Answer every line (completed) or none (expired/cancelled: each line an error; failed: no files)."""
        status = batch["status"]
        if status == "failed":
            batch["errors"] = {"object": "list", "data": [{"code": "scripted_failure", "message": "the batch failed",
                                                           "param": None, "line": None}]}
            return
        out, err = [], []
        for raw in self.files[batch["input_file_id"]]["data"].splitlines():
            line = json.loads(raw)
            rid = f"batch_req_{next(self._ids)}"
            if status != "completed":
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": f"batch_{status}", "message": f"the batch was {status} before this request ran"}})
                continue
            req = Request(line["url"], line["body"], {})
            reply = self._next_reply(req, batch=True)
            code, body = self._line_response(req, reply)
            record = {"id": rid, "custom_id": line["custom_id"], "error": None,
                      "response": {"status_code": code, "request_id": f"req_{rid}", "body": body}}
            if reply.kind in ("hang", "reset"):
                record["response"] = None
                record["error"] = {"code": "server_error", "message": "the request could not be processed"}
            (out if code == 200 and record["error"] is None else err).append(record)
        for name, records in (("output_file_id", out), ("error_file_id", err)):
            if records:
                data = "".join(json.dumps(r) + "\n" for r in records).encode()
                batch[name] = self.add_file(data, "batch_output", f"{batch['id']}_{name}.jsonl")["id"]
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    def _line_response(self, req: Request, reply: Reply) -> tuple[int, Any]:
        if reply.kind in ("status", "raw"):
            try:
                return reply.status, json.loads(reply.body)
            except ValueError:
                return reply.status, reply.body.decode(errors="replace")
        if reply.kind == "error200":
            return 200, {"error": {"message": reply.text, "code": 503}}
        if reply.kind in ("hang", "reset"):
            return 500, None
        make = self.chat_body if req.path.endswith("/chat/completions") else self.completion_body
        return 200, make(req, reply)


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

    def _batch_fault(self, srv: ScriptedServer) -> bool:
        """Answer 503 while `batch_api_errors` lasts."""
        with srv._lock:
            if srv.batch_api_errors <= 0:
                return False
            srv.batch_api_errors -= 1
        self._send(503, b'{"error": {"message": "scripted outage"}}')
        return True

    def _moved(self, srv: ScriptedServer) -> bool:
        if srv.moved_to is None:
            return False
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(301, b"", {"Location": srv.moved_to + self.path.split("/v1", 1)[-1]})
        return True

    def do_GET(self) -> None:
        srv: ScriptedServer = self.server.scripted  # type: ignore[attr-defined]
        if self._moved(srv):
            return
        path = self.path.split("?")[0].rstrip("/")
        parts = path.split("/")
        if ("/batches/" in path or "/files/" in path) and srv.batch_api and self._batch_fault(srv):
            return
        if path.endswith("/models"):
            data = {"object": "list", "data": [{"id": srv.model, "object": "model", "created": 0, "owned_by": "tests"}]}
            self._send(200, json.dumps(data).encode())
        elif srv.batch_api and path.endswith("/batches"):
            self._send(200, json.dumps(srv.list_batches(self.path)).encode())
        elif srv.batch_api and len(parts) >= 2 and parts[-2] == "batches":
            with srv._lock:
                srv.requests.append(Request(self.path, None, {k.lower(): v for k, v in self.headers.items()}))
            batch = srv.retrieve_batch(parts[-1])
            if batch is None:
                self._send(404, json.dumps({"error": {"message": f"no batch {parts[-1]}"}}).encode())
            else:
                self._send(200, json.dumps(batch).encode())
        elif srv.batch_api and len(parts) >= 3 and parts[-3] == "files" and parts[-1] == "content":
            with srv._lock:
                srv.requests.append(Request(self.path, None, {k.lower(): v for k, v in self.headers.items()}))
            f = srv.files.get(parts[-2])
            if f is None:
                self._send(404, json.dumps({"error": {"message": f"no file {parts[-2]}"}}).encode())
            else:
                self._send(200, f["data"], {"Content-Type": "application/octet-stream"})
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def _batch_api(self, srv: ScriptedServer, req: Request, raw: bytes, path: str) -> bool:
        """POST /files (multipart upload) and /batches; False for any other path."""
        if not srv.batch_api or not (path.endswith("/files") or path.endswith("/batches")):
            return False
        if self._batch_fault(srv):
            return True
        if path.endswith("/files"):
            form = _multipart(self.headers.get("Content-Type", ""), raw)
            if "file" not in form:
                self._send(400, b'{"error": {"message": "no file part"}}')
            else:
                data, filename = form["file"]
                obj = srv.add_file(data, form.get("purpose", (b"", ""))[0].decode(), filename or "upload.jsonl")
                self._send(200, json.dumps(obj).encode())
            return True
        if path.endswith("/batches") and isinstance(req.body, dict):
            status, obj = srv.create_batch(req.body)
            with srv._lock:
                drop = status == 200 and srv.batch_create_drops > 0
                srv.batch_create_drops -= drop
            if drop:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return True
            self._send(status, json.dumps(obj).encode())
            return True
        return False

    def do_POST(self) -> None:
        srv: ScriptedServer = self.server.scripted  # type: ignore[attr-defined]
        if self._moved(srv):
            return
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
            if not self._batch_api(srv, req, raw, path):
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
        if reply.kind in ("endless", "drip"):
            self._stream_forever(srv, reply)
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


    def _stream_forever(self, srv: ScriptedServer, reply: Reply) -> None:
        """Endless: chunk after chunk; drip: one byte per `delay`. Until the client hangs up or the server stops."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if reply.kind == "endless":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(2**20))
        self.end_headers()
        try:
            if reply.kind == "endless":
                head = b'{"id": "'
                self.wfile.write(b"%x\r\n%s\r\n" % (len(head), head))
                frame = b"%x\r\n%s\r\n" % (len(reply.body), reply.body)
                while not srv._stop.is_set():
                    self.wfile.write(frame)
            else:
                for byte in b'{"id": "' + b"a" * (2**20):
                    if srv._stop.wait(reply.delay):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
        except OSError:
            pass  # the client gave up, as it should


_BOMB_LOCK = threading.Lock()


def _bomb(size: int) -> bytes:
    with _BOMB_LOCK:  # made once per size, not by every handler thread at the same time
        return _bomb_bytes(size)


@functools.lru_cache(maxsize=4)
def _bomb_bytes(size: int) -> bytes:
    return gzip.compress(b'{"x": "' + b"a" * size + b'"}', compresslevel=6)


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[bytes, Optional[str]]]:
    """Form fields of a multipart/form-data body: name -> (bytes, filename)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict[str, tuple[bytes, Optional[str]]] = {}
    if not msg.is_multipart():
        return out
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = (part.get_payload(decode=True) or b"", part.get_filename())
    return out


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
