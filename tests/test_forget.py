"""`explainer forget`: deletes cached answers, explanations and scores by selector, in one
transaction, printing what it deleted; SQL selectors cannot reach past their one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from explainer import cli
from explainer.explain import llm as explain
from explainer.store import db as store
from tests.openai_server import ScriptedServer
from tests.test_faults import build_db, good_answer, stage_settings


def counts(db: Path) -> dict[str, int]:
    con = store.connect(db)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("llm_cache", "explanations", "scores", "llm_calls", "latents")}
    finally:
        con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """9 latents explained through the scripted endpoint (cache + ledger rows), 9 scores, 9 other-model rows."""
    path = tmp_path / "f.duckdb"
    dict_id = build_db(path)
    with ScriptedServer(good_answer) as srv:
        con = store.connect(path)
        try:
            explain.run(con, stage_settings("explain", srv.url, path), dict_id)
            con.execute("INSERT INTO llm_cache VALUES ('other-key', 'other-model', '{}', now())")
            con.execute("""INSERT INTO scores (explanation_id, dict_id, latent, scorer, split, score, status, created_at)
                           SELECT id, dict_id, latent, 'simulation', 'heldout', 0.5, 'ok', now() FROM explanations""")
        finally:
            con.close()
    return path


def forget(db: Path, *args: str, capsys=None) -> tuple[int, list[dict]]:
    rc = cli.main(["forget", "--db", str(db), "--json", *args])
    out = json.loads(capsys.readouterr().out) if capsys is not None and rc == 0 else []
    return rc, out


def test_forget_cache_by_model(db, capsys):
    before = counts(db)
    rc, out = forget(db, "--cache", "--model", "fault-model", capsys=capsys)
    assert rc == 0 and out == [{"table": "llm_cache", "deleted": before["llm_cache"] - 1, "latents": "0-8"}]
    after = counts(db)
    assert after["llm_cache"] == 1 and after["explanations"] == before["explanations"]  # only the other model's row


def test_forget_explanations_of_latents_takes_their_scores_along(db, capsys):
    rc, out = forget(db, "--explanations", "--latents", "0-2", capsys=capsys)
    assert rc == 0
    assert {r["table"]: (r["deleted"], r["latents"]) for r in out} == {"explanations": (3, "0-2"), "scores": (3, "0-2")}
    con = store.connect(db)
    assert con.execute("SELECT min(latent) FROM explanations").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM scores s ANTI JOIN explanations e ON s.explanation_id = e.id").fetchone()[0] == 0
    con.close()


def test_forget_then_rerun_redoes_only_that_work(db, capsys):
    rc, _ = forget(db, "--explanations", "--cache", "--latents", "4", capsys=capsys)
    assert rc == 0
    with ScriptedServer(good_answer) as srv:
        con = store.connect(db)
        try:
            res = explain.run(con, stage_settings("explain", srv.url, db), 1)
        finally:
            con.close()
        assert res.ok == 1 and len(srv.requests) == 1 and "tok4" in srv.requests[0].prompt_text()


def test_dry_run_deletes_nothing(db, capsys):
    before = counts(db)
    rc, out = forget(db, "--scores", "--where", "latent >= 5", "--dry-run", capsys=capsys)
    assert rc == 0 and out == [{"table": "scores", "would delete": 4, "latents": "5-8"}]
    assert counts(db) == before


@pytest.mark.parametrize("args,message", [
    (["--scores"], "no selector"),
    (["--latents", "3"], "say what to forget"),
    (["--scores", "--where", "1=1); DROP TABLE latents; --"], "not a SQL condition over the scores table"),
    (["--scores", "--where", "1=1) UNION SELECT id FROM explanations --"], "not a SQL condition"),
    (["--scores", "--where", "no_such_column = 1"], "columns:"),
    (["--explanations", "--latents", "1=1); DROP TABLE latents; --"], "not a SQL condition over the latents table"),
])
def test_bad_selectors_are_one_line_and_change_nothing(db, capsys, args, message):
    before = counts(db)
    rc, _ = forget(db, *args)
    assert rc == 2 and message in capsys.readouterr().err
    assert counts(db) == before


def test_all_forgets_every_row_of_the_kind(db, capsys):
    rc, out = forget(db, "--scores", "--all", capsys=capsys)
    assert rc == 0 and out[0]["deleted"] == 9 and counts(db)["scores"] == 0


def test_missing_db_is_refused(tmp_path, capsys):
    rc, _ = forget(tmp_path / "none.duckdb", "--cache", "--all")
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.duckdb").exists()


def test_forget_is_a_verb():
    assert "forget" in cli.VERBS
