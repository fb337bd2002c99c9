"""Schema migrations: a blank DB and a DB left at every earlier schema version reach the latest one,
keeping their rows, with the same catalog as a fresh DB; m005's backfill fills the provenance
columns from `details`."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from explainer.store import db as store
from explainer.store import examples, schema

NAMES = [fn.__name__ for fn in schema.MIGRATIONS]
SNIPPETS = [{"context_id": 12, "kind": "quantile", "pred": [0, 1]}, {"context_id": 3, "kind": "top", "pred": [0, 9]}]


def _fill(con) -> None:
    """Rows every schema version since m001 can hold: one explanation, three scores, one call."""
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('toy', '/x', 'tiny', 'h', 4, 2, 1, 'fp', '{}', now())")
    con.execute("INSERT INTO latents VALUES (1, 0, 0.1, 10, 100, 3, 2.0, 1.0, NULL)")
    con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                "VALUES (1, 0, 'llm', 'gpt', 'city names', 'ok', now())")
    llm = {"model": "sim", "template_hash": "t" * 64, "setup_hash": "s" * 16, "snippets": SNIPPETS}
    rows = [("simulation", "json", 0.5, llm), ("simulation", "ngram", 0.4, {"pearson": 0.4, "snippets": {"top": 2}}),
            ("detection", "json", 0.75, {**llm, "snippets": SNIPPETS[:1]})]
    for scorer, mode, score, details in rows:
        con.execute("INSERT INTO scores (explanation_id, dict_id, latent, scorer, mode, split, score, details, status, "
                    "created_at) VALUES (1, 1, 0, ?, ?, 'heldout', ?, ?, 'ok', now())",
                    [scorer, mode, score, json.dumps(details)])
    con.execute("INSERT INTO llm_calls (stage, model, cache_hit, created_at) VALUES ('score', 'sim', false, now())")


def catalog(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """What the schema defines, not what it holds: tables, columns (name, type, default, nullable)
    in order, constraints, views with their SQL, and sequences. A sequence's start_value is left
    out: DuckDB writes a used sequence back with its next value there, so it depends on the rows."""
    mine = "database_name = current_database() AND schema_name = 'main'"
    queries = {
        "tables": f"SELECT table_name, sql FROM duckdb_tables() WHERE {mine} AND NOT temporary",
        "columns": f"""SELECT table_name, column_index, column_name, data_type, column_default, is_nullable
                       FROM duckdb_columns() WHERE {mine} AND NOT internal""",
        "constraints": f"""SELECT table_name, constraint_type, constraint_text, constraint_column_names
                           FROM duckdb_constraints() WHERE {mine}""",
        "views": f"SELECT view_name, sql FROM duckdb_views() WHERE {mine} AND NOT internal AND NOT temporary",
        "sequences": f"""SELECT sequence_name, min_value, max_value, increment_by, cycle
                         FROM duckdb_sequences() WHERE {mine} AND NOT temporary""",
    }
    return {name: sorted(con.execute(sql).fetchall(), key=repr) for name, sql in queries.items()}


@pytest.fixture(scope="module")
def fresh_catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple]]:
    con = store.connect(tmp_path_factory.mktemp("fresh") / "fresh.duckdb")
    try:
        return catalog(con)
    finally:
        con.close()


@pytest.mark.parametrize("applied", range(len(NAMES)), ids=lambda n: f"at-{NAMES[n - 1] if n else 'blank'}")
def test_every_earlier_schema_migrates_to_the_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     applied: int, fresh_catalog: dict[str, list[tuple]]) -> None:
    path = tmp_path / "old.duckdb"
    if applied:
        with monkeypatch.context() as m:  # a DB written by the version whose last migration was NAMES[applied - 1]
            m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:applied])
            con = store.connect(path)
            assert [r[0] for r in con.execute("SELECT name FROM _migrations ORDER BY name").fetchall()] == \
                sorted(NAMES[:applied])
            _fill(con)
            con.close()
    con = store.connect(path)
    try:
        assert [r[0] for r in con.execute("SELECT name FROM _migrations ORDER BY name").fetchall()] == sorted(NAMES)
        assert store.migrate(con) == []  # idempotent
        cols = {r[0] for r in con.execute("DESCRIBE scores").fetchall()}
        assert {"model", "template_hash", "setup_hash", "snippet_set", "ci_low", "ci_high", "baseline",
                "score_top_random", "score_all"} <= cols
        for view in ("labels", "explanation_scores", "costs"):
            con.execute(f"SELECT * FROM {view}").fetchall()
        n_scores = con.execute("SELECT count(*) FROM scores").fetchone()[0]
        assert n_scores == (3 if applied else 0)  # no row lost
        if applied:
            assert con.execute("SELECT explanation FROM labels").fetchone()[0] == "city names"
        got = catalog(con)
    finally:
        con.close()
    for part, want in fresh_catalog.items():
        assert got[part] == want, part
    assert len(fresh_catalog["views"]) == 3 and len(fresh_catalog["sequences"]) == 5  # the catalog was read


def test_catalog_sees_a_schema_difference(tmp_path: Path, fresh_catalog: dict[str, list[tuple]]) -> None:
    """The comparison above would notice a column of another type, a changed view or a lost sequence."""
    con = store.connect(tmp_path / "changed.duckdb")
    try:
        for change, part in (("ALTER TABLE llm_calls ALTER COLUMN cached_tokens TYPE INTEGER", "columns"),
                             ("CREATE OR REPLACE VIEW costs AS SELECT 1 AS calls", "views"),
                             ("DROP SEQUENCE run_ids CASCADE", "sequences")):
            con.execute(change)
            assert catalog(con)[part] != fresh_catalog[part], change
    finally:
        con.close()


def test_m005_backfills_provenance_from_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m004.duckdb"
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:NAMES.index("m005_score_provenance")])
        con = store.connect(path)
        _fill(con)
        con.close()
    con = store.connect(path)
    try:
        got = {(r[0], r[1]): r[2:] for r in con.execute(
            """SELECT scorer, mode, model, template_hash, setup_hash, snippet_set, baseline, score_all, ci_low
               FROM scores""").fetchall()}
    finally:
        con.close()
    want_set = schema.snippet_hash([(12, "quantile"), (3, "top")])
    # The same hash a scorer computes for a new row from the snippets it scored, in any order.
    assert want_set == examples.snippet_set([examples.Example(3, "top", 0, 1.0, [], []),
                                             examples.Example(12, "quantile", 0, 1.0, [], [])])
    assert got["simulation", "json"] == ("sim", "t" * 64, "s" * 16, want_set, 0.0, 0.5, None)
    # n-gram rows list no context ids: their snippet set is unknown, never guessed.
    assert got["simulation", "ngram"] == ("ngram", None, None, None, 0.0, 0.4, None)
    assert got["detection", "json"] == ("sim", "t" * 64, "s" * 16, schema.snippet_hash([(12, "quantile")]),
                                        0.5, None, None)


def test_a_db_file_named_like_any_alias_of_the_views_opens_and_its_views_answer(tmp_path: Path) -> None:
    import re

    from explainer.store import views

    # The file's stem becomes a catalog name, which competes with table aliases in 3-part names.
    aliases = set(re.findall(r"\b([a-z_]{1,12})\.[a-z_]", "".join(v for v in vars(views).values() if isinstance(v, str))))
    assert {"h", "bh", "b"} <= aliases
    for name in sorted(aliases | {"main", "labels", "scores"}):
        con = store.connect(tmp_path / f"{name}.duckdb")
        for view in ("labels", "explanation_scores", "costs"):
            con.execute(f"SELECT * FROM {view}").fetchall()
        con.close()
