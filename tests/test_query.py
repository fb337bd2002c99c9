"""The read side: views, SQL verb, BM25 search, show, export, static browser."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from explainer import query, store
from explainer.cli import main


def test_labels_view_picks_best_explanation_and_ngram_baseline(filled_db: Path) -> None:
    con = store.connect(filled_db)
    rows = query.rows(con.execute("SELECT * FROM labels ORDER BY latent"))
    assert [r["latent"] for r in rows] == [0, 1, 2]
    assert rows[0]["explanation"] == "capitalised city names after a preposition"
    assert rows[0]["simulation"] == pytest.approx(0.8)
    assert rows[0]["ngram_simulation"] == pytest.approx(0.6)
    assert rows[1]["ngram_simulation"] is None
    # A failed explanation never shows up as a label.
    assert rows[2]["explanation"] is None
    costs = query.rows(con.execute("SELECT * FROM costs"))
    assert costs[0]["calls"] == 2 and costs[0]["cache_hits"] == 1 and costs[0]["prompt_tokens"] == 200


def test_search_ranks_by_relevance(filled_db: Path) -> None:
    con = store.connect(filled_db, read_only=True)
    hits = query.search(con, "city names")
    assert hits[0]["latent"] == 0 and "city" in hits[0]["explanation"]
    hits = query.search(con, "digits")
    assert [h["latent"] for h in hits] == [1]
    assert query.search(con, "zebra") == []


def test_sql_verb_json_and_errors(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--db", str(filled_db), "--json", "SELECT latent, simulation FROM labels ORDER BY latent"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0] == {"latent": 0, "simulation": 0.8}
    assert main(["sql", "--db", str(filled_db), "SELEC nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SQL error:") and "Traceback" not in err


def test_show_and_search_verbs(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--db", str(filled_db), "0"]) == 0
    out = capsys.readouterr().out
    assert "capitalised city names" in out and "Paris" in out
    assert main(["show", "--db", str(filled_db), "--json", "0", "--split", "heldout"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert {e["split"] for e in rec["examples"]} == {"heldout"}
    assert main(["show", "--db", str(filled_db), "7"]) == 2
    assert "latent 7 not found" in capsys.readouterr().err
    assert main(["search", "--db", str(filled_db), "--json", "city"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["latent"] == 0


def test_export_parquet_and_json(filled_db: Path, tmp_path: Path) -> None:
    con = store.connect(filled_db, read_only=True)
    files = query.export(con, tmp_path / "out")
    names = {f.name for f in files}
    assert "explanations.parquet" in names and "toy.json" in names
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'out' / 'examples.parquet'}'").fetchone()[0] == 7
    data = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert data["latents"][0]["explanations"][0]["description"].startswith("capitalised")


def test_browse_writes_index_and_pages(filled_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(out), "--json"]) == 0
    index = (out / "index.html").read_text()
    assert "capitalised city names" in index and "http" not in index.replace("http-equiv", "")
    page = (out / "latent_0.html").read_text()
    assert "background:rgba(255,120,0,1.00)" in page and "Paris" in page


def test_db_locked_by_another_process_is_a_clear_error(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c",
                               f"import duckdb, time; c = duckdb.connect({str(filled_db)!r}); print('ok', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert main(["sql", "--db", str(filled_db), "SELECT 1"]) == 2
        err = capsys.readouterr().err
        assert "in use by process" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()


def test_sql_without_a_query_is_an_interactive_prompt(filled_db: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT latent FROM labels ORDER BY latent\nSELEC oops\nSELECT 41 + 1 AS answer\n"))
    assert main(["sql", "--db", str(filled_db), "--json"]) == 0
    out, err = capsys.readouterr()
    assert '"answer": 42' in out and '"latent": 2' in out
    assert "error:" in err and "Traceback" not in err


def test_status_counts_each_stage_and_lists_unfinished_work(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    con = store.connect(filled_db)
    old = store.start_run(con, "score", {})
    store.finish_run(con, old, "failed", {"error": "killed"})
    later = store.start_run(con, "score", {})
    store.finish_run(con, later, "done", {})  # a later success: the failed one is not pending
    stuck = store.start_run(con, "explain", {})
    store.finish_run(con, stuck, "failed", {"error": "KeyboardInterrupt"})
    con.close()
    assert main(["status", "--db", str(filled_db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (d,) = report["dictionaries"]
    assert (d["name"], d["sampled"], d["dead"], d["contexts"], d["explained"]) == ("toy", 3, 0, 6, 2)
    assert {(r["explainer"], r["ok"], r["failed"]) for r in report["explanations"]} == {("llm", 2, 1), ("ngram", 1, 0)}
    (sc,) = report["scores"]
    assert (sc["scorer"], sc["ok"], sc["mean"]) == ("simulation", 3, 0.6)
    (cost,) = report["costs"]
    assert (cost["calls"], cost["cache_hits"], cost["prompt_tokens"]) == (2, 1, 200)
    assert [(u["what"], u["stage"]) for u in report["unfinished"]] == [("run", "explain")]
    assert main(["status", "--db", str(filled_db)]) == 0
    out = capsys.readouterr().out
    assert "dictionaries" in out and "unfinished work: rerun" in out


def test_the_search_example_run_prints_is_found(filled_db: Path) -> None:
    con = store.connect(filled_db, read_only=True)
    try:
        word = query.search_example(con, 1)
        assert word and word not in ("fires", "and", "the")
        assert query.search(con, word)
    finally:
        con.close()
