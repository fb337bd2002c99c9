"""Sampling into Parquet (`--parquet DIR`): shards, resume after kills, merge, and queries in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from explainer.errors import ExplainerError
from explainer.sample import merge as sample_merge
from explainer.sample import sampler as sample_mod
from explainer.store import db as store
from tests.test_sample import die_at_second_save, env, make_sae, tables  # noqa: F401  (env is a fixture)


def examples_and_latents(db: Path) -> dict[str, list[tuple]]:
    t = tables(db)
    return {"latents": [r[:4] for r in t["latents"]], "examples": [r[:5] for r in t["examples"]]}


def parquet_contexts(folder: Path) -> list[tuple]:
    con = duckdb.connect()
    try:
        return con.execute("SELECT context_id, doc_id, split, token_ids, tokens FROM read_parquet(?) ORDER BY 1",
                           [str(folder / "contexts" / "*" / "*.parquet")]).fetchall()
    finally:
        con.close()


def run_shard(env: dict[str, Any], db: Path, folder: Path, shard: str) -> sample_mod.SampleResult:
    s = env["settings"].model_copy(deep=True)
    s.db, s.sample.shard, s.sample.parquet = db, shard, str(folder)
    con = store.connect(s.db)
    try:
        return sample_mod.run(con, s, env["sae"], lm=env["lm"])
    finally:
        con.close()


def test_parquet_shards_survive_kills_and_merge_to_a_single_run(env: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "parts"
    # Shard 1 dies between writing a Parquet part and saving the state that counts it:
    # the resume must drop that part and redo its contexts, not count them twice.
    real_save = die_at_second_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_shard(env, tmp_path / "s1.duckdb", folder, "1/2")
    monkeypatch.setattr(sample_mod, "save_state", real_save)
    parts = sorted((folder / "contexts" / "shard=1-of-2").glob("*.parquet"))
    assert len(parts) == 2  # the second one is past the saved state

    con = store.connect(tmp_path / "merged.duckdb")
    with pytest.raises(ExplainerError, match="unfinished"):
        sample_merge.merge(con, [folder])
    con.close()
    for i in range(2):
        res = run_shard(env, tmp_path / f"s{i}.duckdb", folder, f"{i}/2")
        assert not res.complete and res.state_path == str(folder / "state" / f"shard-{i}-of-2.pt")
        shard_db = duckdb.connect(str(tmp_path / f"s{i}.duckdb"), read_only=True)
        assert shard_db.execute("SELECT count(*) FROM contexts").fetchone()[0] == 0  # rows went to Parquet
        shard_db.close()

    single = tables(env["settings"].db)
    assert parquet_contexts(folder) == single["contexts"]  # every context once, none lost or doubled

    con = store.connect(tmp_path / "merged.duckdb")
    with pytest.raises(ExplainerError, match="merge that folder"):
        sample_merge.merge(con, [tmp_path / "s0.duckdb"])
    res = sample_merge.merge(con, [folder])
    used = {r[0] for r in con.execute("SELECT DISTINCT context_id FROM examples").fetchall()}
    # The rest stay in Parquet and DuckDB reads them in place, from the same DB connection.
    in_place = con.execute(f"SELECT count(*) FROM read_parquet('{folder}/contexts/*/*.parquet')").fetchone()[0]
    con.close()
    assert res.complete and res.n_contexts == env["result"].n_contexts
    assert examples_and_latents(tmp_path / "merged.duckdb") == examples_and_latents(env["settings"].db)
    merged = tables(tmp_path / "merged.duckdb")
    assert merged["contexts"] == [r for r in single["contexts"] if r[0] in used]
    assert len(used) < len(single["contexts"]) == in_place


def test_unsharded_parquet_run_and_the_cli(env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from explainer.cli import main

    folder = tmp_path / "one"
    res = run_shard(env, tmp_path / "one.duckdb", folder, "0/1")
    assert res.complete
    assert examples_and_latents(tmp_path / "one.duckdb") == examples_and_latents(env["settings"].db)
    assert parquet_contexts(folder) == tables(env["settings"].db)["contexts"]
    assert not list((folder / "state").glob("*.pt"))  # spent once the tables are written

    # Another dictionary may not write into this folder.
    with pytest.raises(ExplainerError, match="holds samples of another dictionary"):
        s = env["settings"].model_copy(deep=True)
        s.db, s.sample.parquet = tmp_path / "other.duckdb", str(folder)
        con = store.connect(s.db)
        try:
            sample_mod.run(con, s, make_sae(tmp_path / "other_sae", seed=3), lm=env["lm"])
        finally:
            con.close()

    assert main(["merge", "--db", str(tmp_path / "m.duckdb"), str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", "--db", str(tmp_path / "m.duckdb"), str(tmp_path)]) == 2
    assert "not a `sample --parquet` output" in capsys.readouterr().err
    glob = folder / "contexts" / "*" / "*.parquet"
    assert main(["sql", "--db", str(tmp_path / "one.duckdb"), "--json",
                 f"SELECT split, count(*) AS n FROM read_parquet('{glob}') GROUP BY split ORDER BY split"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["split"]: r["n"] for r in rows} == env["result"].n_contexts


def test_subset_shards_in_parquet_merge_to_the_full_runs_rows(env: dict[str, Any], tmp_path: Path) -> None:
    """--latents, --shard and --parquet together: the merged rows are the full run's, restricted."""
    folder = tmp_path / "sub"
    for i in range(2):
        s = env["settings"].model_copy(deep=True)
        s.db, s.sample.shard, s.sample.parquet, s.sample.latents = tmp_path / f"s{i}.duckdb", f"{i}/2", str(folder), "0-15,40"
        con = store.connect(s.db)
        try:
            sample_mod.run(con, s, env["sae"], lm=env["lm"])
        finally:
            con.close()
    con = store.connect(tmp_path / "m.duckdb")
    try:
        sample_merge.merge(con, [folder])
    finally:
        con.close()
    wanted = set(range(16)) | {40}
    full = examples_and_latents(env["settings"].db)
    assert examples_and_latents(tmp_path / "m.duckdb") == {
        "latents": [r for r in full["latents"] if r[0] in wanted],
        "examples": [r for r in full["examples"] if r[0] in wanted]}
