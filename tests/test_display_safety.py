"""Text from users, corpora and LLMs is shown as written (issue 17, findings 4, 5, 7, 9).

Terminal: nothing is read as rich markup, no control or bidi character reaches the terminal raw.
SQL: `explainer sql` cannot write outside its DB; no path is ever formatted into SQL (export).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from explainer import query, ui
from explainer.cli import main
from explainer.store import db as store
from explainer.store import sql_guard

LONG = "y" * 3000 + "[/z]"
# Each is stored as an explanation of its own latent (3, 4, ...) and shown by every read verb.
HOSTILE = ["[/x]", "[/INST] tokens after the instruction", "[bold red]x", "\x1b[31mred", "\x1b]0;title\x07",
           "a\rb", "\u202ertl", "<!--<script>", "</script>", "back\x08space \x9b31m", LONG]
TOKENS = ["[/INST]", "\x1b[2Jclear", "</script>", "line\nbreak"]
# Control and bidi characters a terminal would act on; none may reach the output raw.
RAW = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n"] + ["\u202e", "\u2066"]


def shown(s: str) -> str:
    """What a user should read for `s`: its controls as escapes (the one rule, ui.visible)."""
    return ui.visible(s)


def assert_clean(text: str) -> None:
    bad = sorted({repr(c) for c in text if c in RAW})
    assert not bad, f"raw control characters reached the output: {bad}"


def add_hostile_rows(db: Path) -> Path:
    """Latents 3.. each explained by one HOSTILE string; context 0's tokens hostile; a hostile model name."""
    con = store.connect(db)
    for i, text in enumerate(HOSTILE):
        latent = 3 + i
        con.execute("INSERT INTO latents VALUES (1, ?, 0.01, 10, 100, 3, 2.0, 1.0, [0.5, 1.0, 2.0])", [latent])
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, 'llm', ?, ?, 'ok', now())", [latent, f"m[/{i}]\x1b[0m", text])
    con.execute("UPDATE contexts SET tokens = ? WHERE context_id = 0", [TOKENS])
    con.execute("INSERT INTO llm_calls (stage, model, latent, cache_hit, prompt_tokens, completion_tokens, cost, "
                "created_at) VALUES ('explain', '[bold]evil\x1b]0;t\x07', 3, false, 1, 1, 0.0, now())")
    con.close()
    return db


@pytest.fixture
def hostile_db(filled_db: Path) -> Path:
    return add_hostile_rows(filled_db)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide enough that no cell wraps, so each string can be found whole in the output.
    monkeypatch.setattr(ui.console, "width", 20000)
    monkeypatch.setattr(ui.err_console, "width", 20000)


def test_sql_results_are_shown_literally(hostile_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--db", str(hostile_db), "SELECT '[/x]' AS \"[/y]\""]) == 0
    out = capsys.readouterr().out
    assert "[/x]" in out and "[/y]" in out
    assert main(["sql", "--db", str(hostile_db), "SELECT latent, text FROM explanations WHERE latent >= 3"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    for text in HOSTILE:
        assert shown(text) in out
    assert "\\x1b[31mred" in out and "a\\rb" in out and "\\u202ertl" in out


def test_show_and_search_show_explanations_and_tokens_literally(hostile_db: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    for i, text in enumerate(HOSTILE):
        assert main(["show", "--db", str(hostile_db), str(3 + i)]) == 0
        out = capsys.readouterr().out
        assert_clean(out)
        assert shown(text) in out and f"m[/{i}]\\x1b[0m" in out
    assert main(["show", "--db", str(hostile_db), "0"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    # Newlines inside tokens keep show's own mark; every other control is an escape.
    assert "[/INST]" in out and "\\x1b[2Jclear" in out and "</script>" in out and "line\u21b5break" in out
    assert main(["search", "--db", str(hostile_db), "INST instruction"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert "[/INST] tokens after the instruction" in out and "explanations matching" in out
    assert main(["search", "--db", str(hostile_db), "red 31mred"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert "[bold red]x" in out and "\\x1b[31mred" in out


def test_status_and_error_lines_show_data_literally(hostile_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--db", str(hostile_db)]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert "[bold]evil\\x1b]0;t\\x07" in out and "m[/0]\\x1b[0m" in out
    con = store.connect(hostile_db)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('[/d]\x1b[31mevil\r\nnext', '/y', 'tiny', 'layers.1', 32, 3, 1, 'fp2', '{}', now())")
    con.close()
    # Two dictionaries and no --dict: the error lists their names.
    assert main(["show", "--db", str(hostile_db), "0"]) == 2
    err = capsys.readouterr().err
    assert_clean(err)
    assert err.count("\n") == 1 and "[/d]\\x1b[31mevil\\r\\nnext" in err
    assert main(["sql", "--db", str(hostile_db), "SELECT \"\x1b[31mcol\""]) == 2
    err = capsys.readouterr().err
    assert_clean(err)
    assert err.startswith("error: SQL error:") and "\\x1b[31mcol" in err


def test_sql_prompt_errors_and_csv_on_a_terminal_are_literal(hostile_db: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT \"[/x]\x1b[1m\"\nSELECT '[/ok]' AS v\n"))
    assert main(["sql", "--db", str(hostile_db)]) == 0
    out, err = capsys.readouterr()
    assert_clean(err)
    assert "[/x]\\x1b[1m" in err and "[/ok]" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["sql", "--db", str(hostile_db), "--csv", "SELECT text FROM explanations WHERE latent = 6"]) == 0
    out = capsys.readouterr().out
    assert_clean(out.replace("\r\n", "\n"))  # CSV's own record ends are \r\n
    assert "\\x1b[31mred" in out


def test_progress_descriptions_and_stats_are_literal(capsys: pytest.CaptureFixture[str]) -> None:
    with ui.progress_bar("stage [/x]\x1b[2J") as bar:
        bar({"stage": "[bold]s\x07", "done": 1, "total": 2, "model": "[/m]\x1b]0;t\x07"})
    err = capsys.readouterr().err
    assert_clean(err)
    assert "stage [/x]\\x1b[2J" in err and "[bold]s\\x07" in err and "[/m]\\x1b]0;t\\x07" in err


def test_emit_titles_headers_and_empty_tables_are_literal(capsys: pytest.CaptureFixture[str]) -> None:
    ui.emit([{"[/h]": "[/v]", ":warning:": ":smile:"}], as_json=False, title="[/t]\x1b[0m")
    ui.emit([], as_json=False, title="[/empty]")
    ui.emit_mapping({"[/k]": ["[/a]", "\x1b"]}, as_json=False, title="[bold]t")
    out = capsys.readouterr().out
    assert_clean(out)
    for s in ("[/h]", "[/v]", ":warning:", ":smile:", "[/t]\\x1b[0m", "[/empty]: no rows", "[/k]", "[/a], \\x1b", "[bold]t"):
        assert s in out


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list("[]/\\\x1b\x9b\r\u202e:")), max_size=60))
def test_any_string_through_the_display_function_is_shown_and_safe(s: str) -> None:
    buf = io.StringIO()
    con = Console(file=buf, width=1000, color_system=None, force_terminal=False)
    table = Table(title=ui.literal(s))
    table.add_column(ui.literal(s))
    table.add_row(ui.literal(s))
    con.print(ui.literal(s))
    con.print(table)
    out = buf.getvalue()
    assert_clean(out)
    if "\t" not in s and "\n" not in s:  # rich expands tabs; newlines split the line
        assert ui.visible(s) in out
    if not any(c in RAW or "\ud800" <= c <= "\udfff" or c in "\u2028\u2029\u061c\u200e\u200f" for c in s):
        assert ui.visible(s) == s  # ordinary text is never altered


# --- sql cannot write outside its DB ------------------------------------------------------------


@pytest.fixture
def parquet_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "user data" / "part"
    folder.mkdir(parents=True)
    duckdb.sql("SELECT range AS x FROM range(5)").write_parquet(str(folder / "a.parquet"))
    return folder


@pytest.mark.parametrize("statement", [
    "COPY (SELECT 1) TO '{tmp}/copied.csv'",
    "COPY labels TO '{tmp}/copied.csv' (FORMAT csv)",
    "EXPORT DATABASE '{tmp}/exported'",
    "ATTACH '{tmp}/other.duckdb' AS o (READ_ONLY false); DELETE FROM o.t",
    "INSTALL fts",
    "LOAD parquet",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "CALL enable_logging(storage = 'file', storage_path = '{tmp}/logs')",
    "PRAGMA enable_profiling = 'json'",
    "CREATE TABLE x AS SELECT 1",
    "SELECT 1; COPY (SELECT 1) TO '{tmp}/copied.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/copied.csv'",
])
def test_sql_refuses_every_write_with_one_line(filled_db: Path, tmp_path: Path, statement: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.duckdb"
    c = duckdb.connect(str(other))
    c.execute("CREATE TABLE t AS SELECT range AS x FROM range(3)")
    c.close()
    assert main(["sql", "--db", str(filled_db), statement.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: explainer sql only reads:") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.duckdb", "test.duckdb"]
    assert duckdb.connect(str(other), read_only=True).execute("SELECT count(*) FROM t").fetchone()[0] == 3


def test_the_engine_refuses_writes_even_past_the_statement_check(filled_db: Path, tmp_path: Path,
                                                                 parquet_folder: Path) -> None:
    """The statement check is the second layer: DuckDB's own settings alone stop these."""
    con = store.connect(filled_db, read_only=True)
    try:
        sql_guard.lock_down(con, [str(parquet_folder / "*.parquet")])
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [str(parquet_folder / "*.parquet")]).fetchone()[0] == 5
        for sql in [f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", f"EXPORT DATABASE '{tmp_path}/e'",
                    f"ATTACH '{tmp_path}/o.duckdb' (READ_ONLY false)", "INSTALL fts",
                    f"SELECT * FROM read_csv('{tmp_path}/../elsewhere.csv')",
                    "SET enable_external_access = true", "SET allowed_directories = ['/']",
                    "SET autoinstall_known_extensions = true"]:
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.duckdb", "user data"]


def test_sql_still_reads_the_parquet_files_a_user_names(filled_db: Path, parquet_folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    db = str(filled_db)
    for source in [f"read_parquet('{parquet_folder}/*.parquet')", f"'{parquet_folder}/a.parquet'",
                   f"read_parquet(['{parquet_folder}/a.parquet'], filename = true)",
                   f"read_parquet('{parquet_folder.parent}/**/*.parquet', hive_partitioning = false)"]:
        assert main(["sql", "--db", db, "--json", f"SELECT count(*) AS n, sum(x) AS s FROM {source}"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"n": 5, "s": 10}], source
    monkeypatch.chdir(parquet_folder.parent)
    assert main(["sql", "--db", db, "--json", "SELECT count(*) AS n FROM 'part/a.parquet' JOIN labels ON true"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 15}]
    # A file the statement does not name as a source stays out of reach.
    assert main(["sql", "--db", db, f"SELECT * FROM read_parquet((SELECT '{parquet_folder}/a.parquet'))"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["sql", "--db", db, "--json", "SELECT 1 AS a, 2 AS a"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"a": 1, "a_2": 2}]


@pytest.mark.parametrize("statement", [
    "SHOW TABLES", "DESCRIBE labels", "SUMMARIZE labels", "FROM labels SELECT latent", "PRAGMA table_info('labels')",
    "CALL pragma_version()", "/* why */ EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT count(*) FROM labels",
    "PIVOT labels ON explainer USING count(*)", "PIVOT read_parquet('{folder}/*.parquet') ON x USING count(*)",
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t; SELECT 2",
])
def test_sql_keeps_every_kind_of_query(filled_db: Path, parquet_folder: Path, statement: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--db", str(filled_db), "--json", statement.format(folder=parquet_folder)]) == 0
    assert json.loads(capsys.readouterr().out)


def test_an_empty_sql_query_is_one_line(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--db", str(filled_db), " ; "]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty" in err


# --- export: no path in SQL -----------------------------------------------------------------------


def test_export_paths_with_quotes_never_become_sql(filled_db: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x' (FORMAT csv); COPY (SELECT 42 AS pwned) TO 'pwned.csv' (FORMAT csv); --"
    assert main(["export", "--db", str(filled_db), "--out", str(out), "--json"]) == 0
    assert not (tmp_path / "pwned.csv").exists()
    assert duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)", [str(out / "examples.parquet")]).fetchone()[0] == 7
    assert (out / "toy.json").exists() and not list(out.glob("*.partial"))


def test_export_keeps_dictionaries_whose_names_clean_alike(filled_db: Path, tmp_path: Path) -> None:
    con = store.connect(filled_db)
    for name, fp in [("a b", "f1"), ("a_b", "f2")]:
        con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                    "VALUES (?, '/y', 'tiny', 'layers.1', 32, 3, 1, ?, '{}', now())", [name, fp])
    files = query.export(con, tmp_path / "out")
    con.close()
    jsons = sorted(f.name for f in files if f.suffix == ".json")
    assert len(jsons) == 3 and "toy.json" in jsons
    assert {json.loads((tmp_path / "out" / j).read_text())["dictionary"] for j in jsons} == {"toy", "a b", "a_b"}


def test_export_to_a_file_is_one_line(filled_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--db", str(filled_db), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile" in err and "--out" in err


# --- search --limit -------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["-1", "0", "99999999999999999999"])
def test_search_limit_must_be_a_positive_count(filled_db: Path, limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--db", str(filled_db), "--limit", limit, "city"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit" in err and "Traceback" not in err
    assert main(["search", "--db", str(filled_db), "--limit", "1", "--json", "city"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.characters(codec="utf-8") | st.sampled_from(
    ["<!--", "<script>", "</script>", "<", ">", "&", "\u2028", "\u2029", "]]>", "\x1b"]), max_size=20).map("".join),
    max_size=5), st.floats(allow_nan=True, allow_infinity=True))
def test_inline_index_data_cannot_leave_its_script_element(texts: list[str], number: float) -> None:
    from explainer.browse.render import json_for_script, text

    rows = [{"latent": i, "explanation": t, "simulation": number} for i, t in enumerate(texts)]
    payload = json_for_script(rows)
    # The HTML tokenizer only leaves script data at '<'; JSON.parse reads the escapes back.
    assert not any(c in payload for c in "<>&\u2028\u2029")
    back = json.loads(payload)
    assert [r["explanation"] for r in back] == [ui.visible(t) for t in texts]
    assert all(r["simulation"] is None or r["simulation"] == number for r in back)
    for t in texts:
        assert "<" not in text(t) and ">" not in text(t)


def test_browse_into_a_file_is_one_line(filled_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["browse", "--db", str(filled_db), "--out", str(tmp_path / "afile"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile" in err and "--out" in err


def test_progress_is_a_line_every_30_s_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """Logs and pipes get plain progress lines (first, one per PROGRESS_EVERY_S, last), never bar redraws."""
    from explainer import ui

    clock = [1000.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: clock[0])
    with ui.progress_bar("train") as update:
        for step in range(1, 8):
            update({"stage": "train", "tokens": step * 100, "total": 700, "fvu": 0.5, "note": "[bold]x\x1b"})
            clock[0] += 10.0
    err = capsys.readouterr().err.splitlines()
    # updates at t=0..60 s: lines at 0, 30 and 60 s; the last update (t=60) was printed, so no extra final line
    assert len(err) == 3, err
    assert err[0].startswith("train: train 100/700") and "700/700" in err[-1]
    assert "[bold]x\\x1b" in err[0] and "\x1b" not in "".join(err)
