"""The API key never lands in an artifact: the DB (every table, and its raw bytes with the WAL),
exports, the browse site, stdout/stderr, or any other file a run leaves behind.

The endpoint echoes the key back in its error messages (as some proxies do), so every failure
path that stores or prints a server message is exercised. The key must still reach the server
in the Authorization header, so the test cannot pass by never sending it.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from explainer.cli import main
from tests.openai_server import Reply, Request, ScriptedServer, closed_port_url
from tests.test_faults import MODEL, body_key, build_db, good_answer, latent_of

SECRET = "sk-proj-EXPLAINER-canary-7f3a9c2e51d04b86"
FAST = ["--max-attempts", "3", "--backoff", "0.001", "--backoff-max", "0.002", "--timeout", "2", "--concurrency", "8"]


class EchoingEndpoint:
    """Latent % 3 == 0: HTTP 500 quoting the caller's Authorization header, every time.
    Latent 4: HTTP 401 quoting it (not retried). Latent % 3 == 1: first an HTML 200 quoting it,
    then a good answer. Others: good answers, except a 200 whose error object quotes the key."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> Reply:
        auth = req.headers.get("authorization", "")
        latent = latent_of(req)
        with self.lock:
            self.seen[body_key(req)] += 1
            n = self.seen[body_key(req)]
        if latent is None:
            return good_answer(req)
        if latent % 3 == 0:
            return Reply.http(500, message=f"upstream refused credentials {auth}")
        if latent == 4:
            return Reply.http(401, message=f"Incorrect API key provided: {auth}")
        if n == 1 and latent % 3 == 1:
            return Reply.raw(f"<html>bad gateway; your header was {auth}</html>", content_type="text/html")
        if n == 1:
            return Reply.error_in_200(f"quota exceeded for {auth}")
        return good_answer(req)


def db_dump(db: Path) -> str:
    """Every row of every table and view, as text (column data may be compressed on disk)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return "\n".join(f"{n}: {con.execute(f'SELECT * FROM {n}').fetchall()}" for n in names)
    finally:
        con.close()


def test_the_api_key_appears_in_no_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)  # any stray file a command writes lands where it is searched
    db = tmp_path / "run.duckdb"
    build_db(db, n_latents=9)
    printed: list[str] = []

    def cli(*argv: Any, rc: int = 0) -> None:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        printed.extend([out, err])
        assert code == rc, (argv, out, err)

    with ScriptedServer(EchoingEndpoint()) as srv:
        common = ["--db", db, "--base-url", srv.url, "--model", MODEL, *FAST]
        cli("explain", *common, "--n-top", "2", "--n-quantile", "0")
        cli("score", *common, "--json", "--set", "score.per_call=2", "--set", "score.n_quantile=0")
        cli("explain", *common, "--n-top", "2", "--n-quantile", "0", "--json")  # retries the failures
        requests = list(srv.requests)
    # A server that refuses every call, quoting the key: the stage stops with a message.
    other = tmp_path / "refused.duckdb"
    build_db(other, n_latents=4)
    with ScriptedServer(lambda req: Reply.http(401, message=f"bad key {req.headers.get('authorization')}")) as srv:
        cli("explain", "--db", other, "--base-url", srv.url, "--model", MODEL, *FAST, rc=2)
        requests += srv.requests
    assert "refused every call" in printed[-1] and "***" in printed[-1]
    cli("explain", "--db", other, "--base-url", closed_port_url(), "--model", MODEL, *FAST,
        "--max-attempts", "1", rc=2)
    assert "cannot reach" in printed[-1]
    cli("sql", "--db", db, "SELECT * FROM llm_calls")
    cli("sql", "--db", db, "SELECT stage, settings, result FROM runs", "--json")
    cli("show", "--db", db, "1")
    cli("search", "--db", db, "word")
    cli("export", "--db", db, "--out", tmp_path / "export")
    cli("browse", "--db", db, "--out", tmp_path / "site")

    # Not vacuous: the key went out on every request, came back in error bodies, and failures were
    # recorded with the echoed text redacted.
    assert requests and all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in requests)
    con = duckdb.connect(str(db), read_only=True)
    errors = [r[0] for r in con.execute("SELECT error FROM llm_calls WHERE error IS NOT NULL").fetchall()]
    failed = con.execute("SELECT count(*) FROM explanations WHERE status = 'failed'").fetchone()[0]
    con.close()
    assert failed > 0 and any("Bearer ***" in e for e in errors) and any("HTTP 401" in e for e in errors)

    # Every artifact: raw bytes of every file under the run folder and HOME (DB, WAL, sample and
    # export files, site, logs), the DB's contents as text, the exported Parquet as text, all output.
    files = [p for root in (tmp_path, Path.home()) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.suffix == ".html" for p in files)
    hits = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert hits == []
    for path in (db, other):
        assert SECRET not in db_dump(path)
    for p in (tmp_path / "export").glob("*.parquet"):
        assert SECRET not in json.dumps(pq.read_table(p).to_pylist(), default=str), p
    assert all(SECRET not in text for text in printed)
    assert SECRET[-12:] not in "".join(printed) + "".join(db_dump(p) for p in (db, other))  # nor a fragment of it
