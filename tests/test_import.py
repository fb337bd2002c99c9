"""`explainer import`: explanations made elsewhere become `explainer = 'import'` rows, checked
whole before one transaction writes them; `score` and `labels` then treat them like ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from explainer.cli import main
from explainer.store import db as store
from tests.conftest import fill_db
from tests.openai_server import llm_server  # noqa: F401
from tests.test_score import make_score_db, make_settings, oracle, run_score


def explanations(db: Path) -> list[dict[str, Any]]:
    con = store.connect(db, read_only=True)
    try:
        cur = con.execute("SELECT * FROM explanations WHERE explainer = 'import' ORDER BY id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def runs(db: Path) -> list[tuple]:
    con = store.connect(db, read_only=True)
    try:
        return con.execute("SELECT stage, status FROM runs ORDER BY id").fetchall()
    finally:
        con.close()


def do_import(db: Path, path: Path, *extra: str) -> dict[str, Any]:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["import", str(path), "--db", str(db), "--json", *extra]) == 0
    return json.loads(out.getvalue())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return fill_db(tmp_path / "toy.duckdb")  # dictionary 'toy', d_sae 3


def test_csv_rows_with_source_and_model_columns(db: Path, tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_text("latent,explanation,model\n0,city names,gpt-x\n2, the word lord ,\n")
    got = do_import(db, f)
    assert (got["imported"], got["skipped (already imported)"], got["latents"]) == (2, 0, 2)
    rows = explanations(db)
    assert [(r["latent"], r["text"], r["model"], r["template"], r["status"], r["cost"], r["prompt_tokens"])
            for r in rows] == [(0, "city names", "gpt-x", "csv:labels.csv", "ok", 0.0, None),
                               (2, "the word lord", "unknown", "csv:labels.csv", "ok", 0.0, None)]
    assert runs(db) == [("import", "done")] and rows[0]["run_id"] is not None


def test_jsonl_and_flags_override_the_file(db: Path, tmp_path: Path) -> None:
    f = tmp_path / "labels.jsonl"
    f.write_text('{"latent": 1, "explanation": "digits", "source": "autointerp", "model": "m1"}\n\n'
                 '{"latent": "0", "explanation": "places"}\n')
    do_import(db, f)
    assert [(r["latent"], r["template"], r["model"]) for r in explanations(db)] == [
        (1, "autointerp", "m1"), (0, "jsonl:labels.jsonl", "unknown")]
    do_import(db, f, "--source", "mine", "--model", "m2", "--dict", "toy")
    assert [(r["template"], r["model"]) for r in explanations(db)[2:]] == [("mine", "m2"), ("mine", "m2")]


def test_parquet(db: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"latent": [0, 1], "explanation": ["a", "b"]}), f)
    assert do_import(db, f)["imported"] == 2
    assert [r["template"] for r in explanations(db)] == ["parquet:labels.parquet"] * 2


def test_delphi_folder(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "explanations"
    folder.mkdir()
    # delphi writes orjson.dumps(explanation) to f"{module}_latent{index}.txt"
    (folder / "layers.1_latent0.txt").write_text(json.dumps("Capital cities"))
    (folder / "layers.1_latent2.txt").write_text(json.dumps({"explanation": "lords", "response": "..."}))
    assert do_import(db, folder)["imported"] == 2
    assert [(r["latent"], r["text"], r["template"]) for r in explanations(db)] == [
        (0, "Capital cities", "delphi"), (2, "lords", "delphi")]


def test_neuronpedia_json_and_jsonl(db: Path, tmp_path: Path) -> None:
    f = tmp_path / "np.json"
    f.write_text(json.dumps([
        {"modelId": "gemma-2-2b", "layer": "1-res", "index": "1", "description": " numbers",
         "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
        {"index": 0, "explanations": [{"description": "Paris", "explanationModelName": "claude"}]},
    ]))
    assert do_import(db, f)["format"] == "neuronpedia"
    assert [(r["latent"], r["text"], r["model"], r["template"]) for r in explanations(db)] == [
        (1, "numbers", "gpt-4o-mini", "neuronpedia"), (0, "Paris", "claude", "neuronpedia")]
    g = tmp_path / "np.jsonl"
    g.write_text(json.dumps({"index": "2", "description": "lord"}) + "\n")
    assert do_import(db, g)["format"] == "neuronpedia"
    assert explanations(db)[-1]["template"] == "neuronpedia"


def test_reimport_skips_identical_rows(db: Path, tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_text("latent,explanation\n0,city names\n0,city names\n1,digits\n")
    first = do_import(db, f)
    assert (first["imported"], first["skipped (already imported)"]) == (2, 1)
    again = do_import(db, f)
    assert (again["imported"], again["skipped (already imported)"]) == (0, 3)
    f.write_text("latent,explanation\n0,city names\n1,numbers\n")
    assert do_import(db, f)["imported"] == 1
    assert len(explanations(db)) == 3


BAD = [
    ("out.csv", b"latent,explanation\n0,fine\n3,too far\n", "out.csv line 3: latent 3 is outside the dictionary (0..2)"),
    ("neg.jsonl", b'{"latent": -1, "explanation": "x"}\n', "neg.jsonl line 1: latent -1 is outside"),
    ("empty.csv", b"latent,explanation\n0,fine\n1,   \n", "empty.csv line 3: empty explanation for latent 1"),
    ("float.jsonl", b'{"latent": 0, "explanation": "a"}\n{"latent": 1.5, "explanation": "b"}\n',
     "float.jsonl line 2: latent 1.5 is not an integer"),
    ("word.csv", b"latent,explanation\nseven,x\n", "word.csv line 2: latent 'seven' is not an integer"),
    ("enc.csv", b"latent,explanation\n0,ok\n1,caf\xe9\n", "enc.csv line 3: not UTF-8 text"),
    ("cols.csv", b"id,label\n0,x\n", "cols.csv: needs columns latent and explanation (found: id, label)"),
    ("broken.jsonl", b'{"latent": 0, "explanation": "a"}\n{"latent": 1,\n', "broken.jsonl line 2: not a JSON object"),
    ("np.json", b'[{"index": "0", "description": "a"}, {"index": "1", "description": ""}]',
     "np.json item 2: empty explanation for latent 1"),
    ("bad.parquet", b"not parquet at all", "bad.parquet: not a readable Parquet file"),
    ("labels.txt", b"0 cities\n", "labels.txt: unknown file type"),
]


@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  name: str, data: bytes, message: str) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    assert main(["import", str(f), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert explanations(db) == [] and runs(db) == []


def test_bad_delphi_folders(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two = tmp_path / "two"
    two.mkdir()
    (two / "layers.1_latent0.txt").write_text('"a"')
    (two / "layers.2_latent1.txt").write_text('"b"')
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "layers.1_latent0.txt").write_text('"a"')
    (stray / "notes.md").write_text("hi")
    for folder, message in [(two, "several hookpoints (layers.1, layers.2)"),
                            (stray, "notes.md: not a delphi explanation file")]:
        assert main(["import", str(folder), "--db", str(db)]) == 2
        assert message in capsys.readouterr().err
    assert explanations(db) == []
    assert main(["import", str(tmp_path / "missing.csv"), "--db", str(db)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_imported_rows_are_scored_and_ranked_in_labels(tmp_path: Path, llm_server) -> None:  # noqa: F811
    db = make_score_db(tmp_path / "score.duckdb")
    f = tmp_path / "theirs.csv"
    # The scripted simulator predicts from the city table unless the explanation says "digit".
    f.write_text("latent,explanation,model\n0,names of cities such as Paris,their-model\n"
                 "0,a digit detector,their-model\n")
    do_import(db, f)
    llm_server.responder = oracle
    res = run_score(db, make_settings(llm_server, db, scorers="simulation", split="both",
                                      explanations="explainer = 'import'"))
    assert res.ok == 4  # two imported explanations, validation and heldout
    con = store.connect(db, read_only=True)
    try:
        label = con.execute("SELECT explanation, explainer, explainer_model, validation, simulation FROM labels "
                            "WHERE latent = 0").fetchone()
    finally:
        con.close()
    assert label[:3] == ("names of cities such as Paris", "import", "their-model")
    assert label[3] == pytest.approx(1.0) and label[4] == pytest.approx(1.0)
