"""`browse --serve` without a browser: JSON endpoints, bound parameters, read-only, and the spread order."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from explainer.browse import server
from explainer.errors import ExplainerError
from explainer.store import db as store
from explainer.store.spread import spread_labels

# Titles a hostile payload would set if it ran; the Chromium tests look for them.
PWNED = "pwned-by-data"
HOSTILE_EXTRA = [f"<img src=x onerror=\"document.title='{PWNED}'\">", f"<script>document.title='{PWNED}'</script>",
                 "[bold]not bold[/bold]", "\u200fRTL mark \u202eevil", "w" * 2000]


def add_page_rows(db: Path) -> None:
    """Latent 0 gets logit-lens tokens (hostile ones too), neighbours and a histogram; latents 20.. hostile labels."""
    con = store.connect(db)
    for rank, (tok, v) in enumerate([(" Paris", 2.5), ("</script>", 1.5), ("t" * 300, 1.0)]):
        con.execute("INSERT INTO latent_logits VALUES (1, 0, 'top', ?, ?, ?, ?)", [rank, rank, tok, v])
    con.execute("INSERT INTO latent_logits VALUES (1, 0, 'bottom', 0, 9, ?, -2.0)", [HOSTILE_EXTRA[1]])
    con.execute("INSERT INTO latent_neighbours VALUES (1, 0, 'decoder_cosine', 0, 1, 0.42)")
    con.execute("INSERT INTO latent_histograms VALUES (1, 0, [0.0, 1.0, 2.0, 3.0], [5, 3, 1])")
    for eid, score in [(1, 0.7), (3, 0.5)]:  # validation scores: what labels and the spread order rank by
        con.execute("INSERT INTO scores (explanation_id, dict_id, latent, scorer, mode, model, split, score, snippet_set, "
                    "status, created_at) SELECT id, 1, latent, 'simulation', 'json', 'sim', 'validation', ?, 's', 'ok', now() "
                    "FROM explanations WHERE id = ?", [score, eid])
    for i, text in enumerate(HOSTILE_EXTRA):
        con.execute("INSERT INTO latents VALUES (1, ?, 0.02, 10, 100, 3, 2.0, 1.0, [0.5, 1.0, 2.0])", [20 + i])
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, 'llm', 'm', ?, 'ok', now())", [20 + i, text])
    con.execute("UPDATE contexts SET tokens = ? WHERE context_id = 1",
                [[HOSTILE_EXTRA[0], "\u202e[bold]", "x" * 500, " Rome"]])
    con.close()


def _digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


class Served:
    def __init__(self, db: Path) -> None:
        self.con = store.connect(db, read_only=True)
        self.httpd = server.make_server(server.Browser(self.con, 1), 0)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        return status, json.loads(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.con.close()


@pytest.fixture
def page_db(filled_db: Path) -> Path:
    add_page_rows(filled_db)
    return filled_db


@pytest.fixture
def served(page_db: Path) -> Iterator[Served]:
    s = Served(page_db)
    yield s
    s.close()


def test_index_api_pages_sorts_filters_and_searches(served: Served) -> None:
    status, res = served.json("/api/latents")
    assert status == 200 and res["total"] == 3 + len(HOSTILE_EXTRA)
    assert res["rows"][0]["latent"] == 0  # the more frequent of the two scored latents
    everything = [r["latent"] for r in served.json("/api/latents?limit=500")[1]["rows"]]
    assert [r["latent"] for r in served.json("/api/latents?limit=3&offset=2")[1]["rows"]] == everything[2:5]
    _, res = served.json("/api/latents?sort=latent&desc=1&limit=2&offset=1")
    assert [r["latent"] for r in res["rows"]] == [23, 22] and res["total"] == 8
    _, res = served.json("/api/latents?q=CITY")
    assert [r["latent"] for r in res["rows"]] == [0]
    _, res = served.json("/api/latents?q=21")
    assert [r["latent"] for r in res["rows"]] == [21]
    _, res = served.json("/api/latents?min_freq=0.03&sort=frequency")
    assert [r["latent"] for r in res["rows"]] == [1, 0]
    _, res = served.json("/api/latents?explainer=llm&sort=latent&limit=3")
    assert [r["latent"] for r in res["rows"]] == [0, 1, 20]


@pytest.mark.parametrize("query", ["sort=latent;DROP%20TABLE%20latents", "sort=latent%20DESC", "desc=yes",
                                   "min_freq=1%20OR%201=1", "min_score=nan", "limit=100000", "offset=-1",
                                   "limit=1;DELETE", "evil=1"])
def test_bad_parameters_are_a_400_naming_them(served: Served, query: str) -> None:
    status, res = served.json("/api/latents?" + query)
    assert status == 400 and query.split("=")[0] in res["error"]
    assert served.json("/api/latents")[1]["total"] == 8


@pytest.mark.parametrize("text", ["'; DROP TABLE latents; --", "%", "_", "\\", "' OR '1'='1", "$1", "?"])
def test_search_text_is_bound_never_sql(served: Served, text: str) -> None:
    status, res = served.json("/api/latents?" + urllib.parse.urlencode({"q": text, "explainer": text}))
    assert status == 200 and res["total"] == 0
    assert served.json("/api/latents")[1]["total"] == 8


def test_latent_page_and_json(served: Served) -> None:
    status, p = served.json("/api/latent/0")
    assert status == 200
    assert p["hist"] == {"source": "histogram", "edges": [0.0, 1.0, 2.0, 3.0], "counts": [5, 3, 1]}
    assert p["logits"]["top"][0] == [" Paris", 2.5] and p["neighbours"] == [["decoder_cosine", 1, 0.42]]
    assert {e["text"] for e in p["explanations"]} == {"capitalised city names after a preposition", 'fires on " Paris", " Rome"'}
    assert p["label"]["explanation_id"] == 1 and p["frequency"] == 0.1
    assert {(x["split"], x["kind"]) for x in p["examples"]} == {("train", "top"), ("train", "nonactivating"),
                                                               ("heldout", "top"), ("heldout", "nonactivating")}
    status, p1 = served.json("/api/latent/1")
    assert p1["hist"]["source"] == "quantiles" and p1["logits"] == {"top": [], "bottom": []} and p1["neighbours"] == []
    status, page = served.get("/latent/0")
    assert status == 200 and "<script" in page and "</script>" not in page.split("id=payload")[1].split("</script>")[0]
    assert served.get("/latent/999")[0] == 404 and served.get("/nothing")[0] == 404
    assert served.get("/api/latent/99999999999")[0] == 404


def test_the_server_never_writes_and_a_writer_opens_the_db_after_it(page_db: Path) -> None:
    before = _digest(page_db)
    s = Served(page_db)
    try:
        for path in ["/", "/api/latents?sort=validation&desc=1", "/latent/0", "/api/latent/1"]:
            assert s.get(path)[0] == 200
        # DuckDB's lock: while a reader holds the file, a writer cannot open it (a clear one-line error).
        with pytest.raises(ExplainerError):
            store.connect(page_db).close()
    finally:
        s.close()
    assert _digest(page_db) == before
    store.connect(page_db).close()


def test_spread_order_takes_one_latent_per_text_and_every_frequency_decile(db_path: Path) -> None:
    con = store.connect(db_path)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('d', '/x', 'm', 'h', 4, 100, 1, 'fp', '{}', now())")
    for lat in range(100):
        freq = 10 ** (-1 - 4 * lat / 100)  # latent 0 most frequent
        # Latents 0-29: thirty near-identical whitespace labels scoring best; the rest distinct words.
        text = f'fires on "{" " * (lat % 5)}\\n" (strong)' if lat < 30 else f"fires on word{lat}"
        val = 0.99 if lat < 30 else 0.5 + lat / 1000
        con.execute("INSERT INTO latents VALUES (1, ?, ?, 10, 100, 3, 2.0, 1.0, [0.5, 1.0, 2.0])", [lat, freq])
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, 'ngram', 'ngram', ?, 'ok', now())", [lat, text])
        con.execute("INSERT INTO scores (explanation_id, dict_id, latent, scorer, mode, model, split, score, snippet_set, "
                    "status, created_at) SELECT id, 1, latent, 'simulation', 'ngram', 'ngram', 'validation', ?, 's', 'ok', "
                    "now() FROM explanations WHERE latent = ?", [val, lat])
    top = spread_labels(con, 1, 10)
    con.close()
    assert len(top) == 10
    assert sum(r["explanation"].startswith('fires on "') for r in top) == 1  # the whitespace family counts once
    # 71 candidates in 10 deciles: the first ten come one from each, most frequent first.
    freqs = [r["frequency"] for r in top]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > 1e-2 and freqs[-1] < 1e-4


def test_browse_serve_from_the_command_line_prints_its_url_and_stops_on_ctrl_c(page_db: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "explainer", "browse", "--db", str(page_db), "--serve", "--port", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "}\n":
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "no output"
            lines.append(line)
        info = json.loads("".join(lines))
        assert info["url"].startswith("http://127.0.0.1:") and info["latents"] == 8
        with urllib.request.urlopen(info["url"] + "api/latents?limit=1", timeout=30) as r:
            assert json.loads(r.read())["total"] == 8
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_bad_port_is_one_line(page_db: Path, port: str, capsys: pytest.CaptureFixture[str]) -> None:
    from explainer.cli import main

    assert main(["browse", "--db", str(page_db), "--serve", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port" in err
