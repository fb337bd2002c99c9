"""The read side: views, SQL verb, BM25 search, show, export, static browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from explainer import query
from explainer.cli import main
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer


def test_labels_view_picks_best_explanation_and_ngram_baseline(filled_db: Path) -> None:
    con = store.connect(filled_db)
    rows = query.rows(con.execute("SELECT * FROM labels ORDER BY latent"))
    assert [r["latent"] for r in rows] == [0, 1, 2]
    # No validation score: nothing is selected by score (held-out never selects); the LLM's
    # explanation comes before the n-gram's and its held-out score is reported.
    assert rows[0]["explanation"] == "capitalised city names after a preposition"
    assert rows[0]["simulation"] == pytest.approx(0.8)
    assert rows[0]["selected_by"] is None and rows[0]["validation"] is None
    # These rows record no snippet set, so the n-gram's 0.6 is not known to be on the same text.
    assert rows[0]["ngram_simulation"] is None
    assert rows[1]["ngram_simulation"] is None
    # A failed explanation never shows up as a label.
    assert rows[2]["explanation"] is None
    costs = query.rows(con.execute("SELECT * FROM costs"))
    assert costs[0]["calls"] == 2 and costs[0]["cache_hits"] == 1 and costs[0]["prompt_tokens"] == 200


def add_score(con, eid: int, split: str, score: float, *, mode: str = "json", model: str = "sim",
              snippet_set: str = "set-a", setup: str = "s1", ci: tuple = (None, None)) -> None:
    con.execute(
        """INSERT INTO scores (explanation_id, dict_id, latent, scorer, mode, split, score, status, created_at,
                               model, template_hash, setup_hash, snippet_set, ci_low, ci_high, baseline)
           SELECT id, dict_id, latent, 'simulation', ?, ?, ?, 'ok', now(), ?, 't1', ?, ?, ?, ?, 0.0
           FROM explanations WHERE id = ?""",
        [mode, split, score, model, setup, snippet_set + split, ci[0], ci[1], eid])


def test_labels_select_on_validation_and_only_report_heldout(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Explanation 1 (LLM) wins on held-out, explanation 2 (n-gram) on validation: validation decides."""
    con = store.connect(filled_db)
    con.execute("DELETE FROM scores")
    add_score(con, 1, "validation", 0.5)
    add_score(con, 2, "validation", 0.7)
    add_score(con, 1, "heldout", 0.9, ci=(0.8, 0.95))
    add_score(con, 2, "heldout", 0.6, ci=(0.4, 0.7))
    lab = query.rows(con.execute("SELECT * FROM labels WHERE latent = 0"))[0]
    assert lab["explanation_id"] == 2 and lab["explainer"] == "ngram"
    assert lab["selected_by"] == "simulation/json/sim" and lab["validation"] == pytest.approx(0.7)
    assert (lab["simulation"], lab["ci_low"], lab["ci_high"], lab["baseline"]) == pytest.approx((0.6, 0.4, 0.7, 0.0))
    assert lab["ngram_simulation"] == pytest.approx(0.6)
    ranks = dict(con.execute("SELECT explanation_id, rank_for_latent FROM explanation_scores "
                             "WHERE latent = 0 AND split = 'heldout'").fetchall())
    assert ranks == {1: 2, 2: 1}  # explanation_scores ranks by validation as well
    con.close()
    assert main(["show", "--db", str(filled_db), "0"]) == 0  # show prints the interval and the baseline
    assert "simulation/json/sim/heldout 0.600 [0.40, 0.70] (baseline 0.00)" in capsys.readouterr().out
    con = store.connect(filled_db)
    # The LLM now wins on validation; the n-gram's held-out score on another snippet set is not comparable.
    add_score(con, 1, "validation", 0.95)
    con.execute("UPDATE scores SET snippet_set = 'other' WHERE explanation_id = 2 AND split = 'heldout'")
    lab = query.rows(con.execute("SELECT * FROM labels WHERE latent = 0"))[0]
    assert lab["explanation_id"] == 1 and lab["validation"] == pytest.approx(0.95)
    assert lab["simulation"] == pytest.approx(0.9) and lab["ngram_simulation"] is None
    # A simulator that scored only one candidate does not select over one that scored both.
    add_score(con, 1, "validation", 0.99, model="other-sim")
    assert query.rows(con.execute("SELECT selected_by FROM labels WHERE latent = 0"))[0]["selected_by"] == \
        "simulation/json/sim"


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


def test_browse_writes_a_compact_site(filled_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(out), "--json"]) == 0
    index = (out / "index.html").read_text()
    assert "http" not in index.replace("http-equiv", "").replace("http://www.w3.org/2000/svg", "")
    assert "capitalised city names" in (out / "data" / "index_0.js").read_text()
    shard = (out / "data" / "shard_0.js").read_text()
    assert "Paris" in shard and "capitalised city names" in shard
    assert sorted(p.name for p in out.iterdir()) == ["data", "index.html", "latent.html"]


def test_browse_needs_serve_or_out(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["browse", "--db", str(filled_db)]) == 2
    assert "--serve" in capsys.readouterr().err


def test_db_locked_by_another_process_is_a_clear_error(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c",
                               f"import duckdb, time; c = duckdb.connect({str(filled_db)!r}); "
                               "print('ok', flush=True); time.sleep(30)"],
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

    monkeypatch.setattr("sys.stdin",
                        io.StringIO("SELECT latent FROM labels ORDER BY latent\nSELEC oops\nSELECT 41 + 1 AS answer\n"))
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


SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)


def sword_model(req: Request) -> Reply:
    """Explains every latent as 'sword'; simulates 8 on " sword" (json) or all mass on 8 (logprobs)."""
    text = req.prompt_text()
    if "prompt" in req.body:
        return Reply.logprobs([{"8" if re.findall(r'^Token \d+ of \d+: " sword"', text, re.M) else "0": -0.01,
                                "x": -5.0}])
    if "You simulate" in text:
        return Reply.content(json.dumps({m.group(1): [8 if t == " sword" else 0 for t in json.loads(m.group(3))]
                                         for m in SIM_LINE.finditer(text)}))
    return Reply.content("the word sword")


def test_every_read_verb_after_every_write_path(db_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """One DB written by n-gram explain+score, LLM explain, LLM score in json and logprobs mode
    (so explanations carry scores from several simulators and modes), and the n-gram agent;
    then show, search, status, browse, export and sql over it (issue 17: map keys must be unique)."""
    from tests.test_ngram import LATENTS
    from tests.test_ngram import fill_db as fill_splits

    con = store.connect(db_path)
    fill_splits(con, LATENTS)
    con.close()
    db = ["--db", str(db_path), "--json"]
    with ScriptedServer(sword_model) as srv:
        llm = ["--base-url", srv.url, "--model", "sim", "--set", "llm.backoff=0.001"]
        assert main(["explain", *db, "--set", "explain.explainer=ngram"]) == 0
        assert main(["explain", *db, *llm, "--set", "explain.latents=0,1"]) == 0
        assert main(["score", *db, *llm, "--set", "score.latents=0,1", "--set", "score.split=both"]) == 0
        assert main(["score", *db, *llm, "--set", "score.latents=0", "--set", "score.mode=logprobs",
                     "--set", "score.explanations=explainer = 'llm'"]) == 0
        assert main(["explain", *db, "--agent", "--set", "agent.explainer=ngram", "--set", "agent.candidates=2",
                     "--set", "agent.max_rounds=1"]) == 0
        # The Batch API path writes through the same rows: explain and score latent 2 in one batch each.
        batch = ["--batch", "--batch-poll", "0.001"]
        assert main(["explain", *db, *llm, *batch, "--set", "explain.latents=2"]) == 0
        assert main(["score", *db, *llm, *batch, "--set", "score.latents=2",
                     "--set", "score.explanations=explainer = 'llm'"]) == 0
    capsys.readouterr()
    con = store.connect(db_path, read_only=True)
    try:
        n_modes = con.execute("SELECT count(DISTINCT (s.mode, s.model)) FROM scores s JOIN explanations e "
                              "ON e.id = s.explanation_id WHERE e.latent = 0 AND e.explainer = 'llm'").fetchone()[0]
        assert n_modes == 2  # json and logprobs on one explanation
        rec = query.latent_record(con, 1, 0)
        llm_expl = next(e for e in rec.explanations if e["explainer"] == "llm")
        assert {"simulation/json/sim/heldout", "simulation/json/sim/validation",
                "simulation/logprobs/sim/heldout"} <= set(llm_expl["scores"])
        ngram_expl = next(e for e in rec.explanations if e["explainer"] == "ngram")
        assert {"simulation/ngram/ngram/heldout", "simulation/json/sim/heldout"} <= set(ngram_expl["scores"])
        assert query.search(con, "sword")
        assert query.status(con)["scores"]
        query.export(con, tmp_path / "export")
        from explainer.browse import static

        assert static.build(con, 1, tmp_path / "site")["latents"] == 5
        # Like with like: the LLM simulator scored the n-gram and the LLM explanation on one snippet set,
        # and so did the n-gram simulator when given the same counts.
        sets = dict(con.execute("""SELECT s.mode || '/' || e.explainer || '/' || s.split, s.snippet_set
                                   FROM scores s JOIN explanations e ON e.id = s.explanation_id
                                   WHERE e.latent = 0 AND s.status = 'ok' AND s.mode IN ('json', 'ngram')
                                     AND e.explainer IN ('llm', 'ngram')""").fetchall())
        for split in ("validation", "heldout"):
            assert sets[f"json/llm/{split}"] == sets[f"json/ngram/{split}"] == sets[f"ngram/ngram/{split}"], sets
            assert sets[f"json/llm/{split}"] is not None
        assert sets["json/llm/validation"] != sets["json/llm/heldout"]
        lab = query.rows(con.execute("SELECT * FROM labels WHERE latent = 0"))[0]
        assert lab["selected_by"] == "simulation/json/sim" and lab["ngram_simulation"] is not None
        # README's "LLM vs n-gram" query runs and compares one simulator on one snippet set.
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        sql = re.search(r"-- where does the LLM beat the n-gram baseline\?.*?\n(SELECT.*?;)", readme, re.S).group(1)
        sql = sql.replace("AND l.score > n.score", "")  # the scripted simulator scores both alike
        got = query.rows(con.execute(sql))
        assert got and {r["simulator"] for r in got} == {"sim"}
    finally:
        con.close()
    con = store.connect(db_path, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM llm_batches").fetchone()[0] == 2
        assert con.execute("SELECT count(*) FROM scores s JOIN explanations e ON e.id = s.explanation_id "
                           "WHERE e.latent = 2 AND e.explainer = 'llm' AND s.status = 'ok'").fetchone()[0] == 1
    finally:
        con.close()
    for verb in (["show", "0"], ["show", "1", "--json"], ["show", "2"], ["search", "sword"], ["status"],
                 ["browse", "--out", str(tmp_path / "site2")], ["export", "--out", str(tmp_path / "exp2")],
                 ["sql", "SELECT * FROM labels"], ["sql", "SELECT * FROM explanation_scores"]):
        assert main([verb[0], "--db", str(db_path), *verb[1:]]) == 0, verb
    # A second dictionary in the same DB, explained and scored by the n-gram: every read verb still works,
    # those that work on one dictionary with --dict.
    con = store.connect(db_path)
    with store.transaction(con):
        d2 = store.register_dictionary(con, name="t2", path="-", model="m", hook="h", d_in=1, d_sae=len(LATENTS),
                                       k=1, fingerprint="f2", config={})
        for table in ("contexts", "latents", "examples"):
            cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] != "dict_id"]
            con.execute(f"INSERT INTO {table} (dict_id, {', '.join(cols)}) SELECT ?, {', '.join(cols)} "
                        f"FROM {table} WHERE dict_id = 1", [d2])
    con.close()
    assert main(["explain", *db, "--dict", "t2", "--set", "explain.explainer=ngram"]) == 0
    for verb in (["show", "0", "--dict", "t2"], ["show", "0", "--dict", "t"], ["search", "sword", "--dict", "t2"],
                 ["search", "sword"], ["status"], ["browse", "--dict", "t2", "--out", str(tmp_path / "site3")],
                 ["export", "--out", str(tmp_path / "exp3")], ["sql", "SELECT dict_id, count(*) FROM labels GROUP BY 1"]):
        assert main([verb[0], "--db", str(db_path), *verb[1:]]) == 0, verb
    capsys.readouterr()
