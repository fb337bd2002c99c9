"""`explainer browse --serve`: pages rendered on demand from the DuckDB file, opened read-only.

Routes: / (the index shell), /latent/N (a latent page, its data inline), /api/latents (one page of
the index as JSON: sort, filter, search, offset, limit), /api/latent/N (a latent's JSON).
The server binds 127.0.0.1 only. One read-only connection serves every thread behind a lock: a
DuckDB connection must not be shared by threads at once, and the index snapshot is a TEMP table
that only this connection sees. While it runs no writer can open the file (DuckDB's file lock).
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlsplit

import duckdb

from explainer.browse import data, render
from explainer.errors import ExplainerError


class Browser:
    """The state a request needs: the connection, its lock, the dictionary and what the DB holds."""

    def __init__(self, con: duckdb.DuckDBPyConnection, dict_id: int) -> None:
        self.con, self.dict_id, self.lock = con, dict_id, threading.Lock()
        self.name = data.dictionary_name(con, dict_id)
        self.have = data.tables(con)
        self.total = data.snapshot(con, dict_id)
        self.overview = data.overview(con)

    def index_html(self) -> str:
        return render.index_page(self.name, {"mode": "served", "total": self.total}, self.overview)

    def index_json(self, params: dict[str, str]) -> dict[str, Any]:
        q = data.parse_query(params)
        with self.lock:
            return data.index_page(self.con, q)

    def latent_json(self, latent: int) -> Optional[dict[str, Any]]:
        with self.lock:
            return data.payloads(self.con, self.dict_id, [latent], have=self.have).get(latent)

    def latent_html(self, latent: int) -> Optional[str]:
        p = self.latent_json(latent)
        if p is None:
            return None
        return render.latent_shell(f"Latent {latent}", {"mode": "served"}, p)


def _handler(app: Browser) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # a request log would interleave with the CLI's output; errors go back to the client

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            url = urlsplit(self.path)
            try:
                params = dict(parse_qsl(url.query, keep_blank_values=True))
            except ValueError:
                return self._send(400, "text/plain; charset=utf-8", "bad query string")
            route = _ROUTES.get(url.path)
            m = re.fullmatch(r"/(api/)?latent/(\d{1,10})", url.path)
            try:
                if route is not None:
                    return route(self, app, params)
                if m:
                    latent = int(m.group(2))
                    if m.group(1):
                        found: Any = app.latent_json(latent)
                        if found is not None:
                            return self._json(200, found)
                    else:
                        found = app.latent_html(latent)
                        if found is not None:
                            return self._send(200, "text/html; charset=utf-8", found)
                    return self._send(404, "text/plain; charset=utf-8", f"latent {latent} is not in this dictionary")
            except ExplainerError as e:
                return self._json(400, {"error": str(e)})
            self._send(404, "text/plain; charset=utf-8", "not found: try / or /latent/0")

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, "application/json", render.json_for_script(obj))

        def _send(self, status: int, ctype: str, body: str) -> None:
            raw = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            # Nothing on these pages loads from elsewhere; the policy says so to the browser too.
            self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline' 'self'; "
                                                        "style-src 'unsafe-inline'; img-src 'self' data:")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(raw)

    return Handler


def _index(h: Any, app: Browser, params: dict[str, str]) -> None:
    h._send(200, "text/html; charset=utf-8", app.index_html())


def _api_latents(h: Any, app: Browser, params: dict[str, str]) -> None:
    h._json(200, app.index_json(params))


def _api_overview(h: Any, app: Browser, params: dict[str, str]) -> None:
    h._json(200, app.overview)


_ROUTES: dict[str, Callable[[Any, Browser, dict[str, str]], None]] = {
    "/": _index, "/index.html": _index, "/api/latents": _api_latents, "/api/overview": _api_overview}


def make_server(app: Browser, port: int) -> ThreadingHTTPServer:
    """Bound to 127.0.0.1:port (0 picks a free port: server.server_address[1])."""
    if not 0 <= port <= 65535:
        raise ExplainerError(f"browse --port {port} is not a TCP port; pass 1..65535 (or 0 for any free one)")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(app))
    except OSError as e:
        raise ExplainerError(f"browse --serve: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                             "pass another --port") from None
    server.daemon_threads = True
    return server
