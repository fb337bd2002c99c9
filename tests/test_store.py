"""Schema migrations: a blank DB and a DB left at every earlier schema version reach the latest one,
keeping their rows; m005's backfill fills the provenance columns from `details`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from explainer import examples, schema, store

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


@pytest.mark.parametrize("applied", range(len(NAMES)), ids=lambda n: f"at-{NAMES[n - 1] if n else 'blank'}")
def test_every_earlier_schema_migrates_to_the_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     applied: int) -> None:
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
