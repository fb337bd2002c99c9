"""The DuckDB file: connection, refusals and locking messages, migration, transactions, bulk inserts,
runs, dictionaries and latent selectors.

Every stage writes here; users query it with SQL. The migrations themselves are in schema.py
(their view DDL in views.py); `connect()` runs those not yet applied, each in a transaction,
and records it in `_migrations`.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import duckdb

from explainer import selectors
from explainer.errors import ExplainerError, free_space
from explainer.store import schema


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _lock_message(path: Path, err: Exception) -> str:
    pid = re.search(r"PID (\d+)", str(err))
    who = f"process {pid.group(1)}" if pid else "another process"
    return f"database {path} is in use by {who}; wait for it to finish or use another --db file"


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)")
    done = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for fn in schema.MIGRATIONS:
        if fn.__name__ in done:
            continue
        con.execute("BEGIN")
        try:
            fn(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [fn.__name__, now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(fn.__name__)
    return applied


def connect(path: Path | str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) and migrate the DB; a lock held elsewhere is a user error.

    Refused before anything is written: a DuckDB file of another program, one from a newer
    explainer, a truncated one. A file this call created is removed again if opening fails
    (a full disk), so no empty file blocks the next run.
    """
    path = Path(path)
    if not read_only and path.is_file() and path.stat().st_size == 0 and not _wal(path).exists():
        path.unlink()  # zero bytes hold nothing: what a creation on a full disk used to leave behind
    existed = path.exists()
    if read_only and not existed:
        raise ExplainerError(f"database {path} does not exist (run `explainer sample` first, or pass --db)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainerError(f"cannot create the folder {path.parent} for database {path}: {e.strerror}; "
                             "pass a --db in a writable folder") from None
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        _remove_created(path, existed)
        raise ExplainerError(_open_message(path, e, existed)) from None
    try:
        _check_ours(con, path, read_only)
        if not read_only:
            migrate(con)
    except BaseException as e:
        con.close()
        _remove_created(path, existed)
        if isinstance(e, duckdb.Error):
            raise ExplainerError(_open_message(path, e, existed)) from None
        raise
    return con


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _remove_created(path: Path, existed: bool) -> None:
    if existed:
        return
    for p in (path, _wal(path)):
        try:
            p.unlink()
        except OSError:
            pass


def _open_message(path: Path, err: Exception, existed: bool) -> str:
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    if "Could not set lock" in text:
        return _lock_message(path, err)
    if "No space left on device" in text:
        if not existed:
            return (f"disk full: creating database {path} needs about {_NEW_DB_BYTES // 1024} KiB on its device "
                    f"({free_space(str(path))} free); nothing was left behind: free space or pass a --db on another disk")
        return f"disk full while opening database {path} ({free_space(str(path))} free); free space and rerun"
    for reason in ("Permission denied", "Read-only file system"):
        if reason in text:
            where = f"the folder {path.parent}" if not existed else f"database {path}"
            return f"cannot write {where} ({reason.lower()}); pass a --db in a writable folder, or copy the file there"
    if existed and ("not a valid DuckDB database" in text or "Could not read enough bytes" in text
                    or "Corrupt database file" in text or "checksum" in text):
        return f"database {path} is damaged or not a DuckDB file ({first}); restore it from a copy or pass another --db"
    return f"cannot open database {path}: {first}"


def _check_ours(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    """Refuse a file that is shorter than its blocks, is not an explainer DB, or is from a newer explainer."""
    if not _wal(path).exists():  # with a WAL the blocks' final place is decided at the next checkpoint
        # Used blocks, not total: DuckDB cuts free blocks off the end of the file, so only a file
        # shorter than its used blocks is surely truncated.
        row = con.execute("SELECT block_size, used_blocks FROM pragma_database_size() "
                          "WHERE database_name = current_database()").fetchone()
        want = _HEADER_BYTES + int(row[0]) * int(row[1]) if row is not None else 0
        have = path.stat().st_size
        if have < want:
            raise ExplainerError(f"database {path} is truncated ({have:,} bytes, and its used blocks need at "
                                 f"least {want:,}: a copy cut short or a full disk); restore it from a copy or "
                                 "pass another --db")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1").fetchall()]
    known = {fn.__name__ for fn in schema.MIGRATIONS}
    if tables and "_migrations" not in tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise ExplainerError(f"{path} is a DuckDB file of another program (tables: {shown}), not an explainer "
                             "database; explainer adds no tables to it: pass another --db")
    if "_migrations" in tables:
        try:
            names = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
        except duckdb.Error:
            names = {"?"}  # no `name` column: someone else's table
        if names and not names & known:
            raise ExplainerError(f"{path} has a _migrations table that is not explainer's, so it is not an "
                                 "explainer database; pass another --db")
        newer = sorted(names - known)
        if newer:
            raise ExplainerError(f"database {path} was written by a newer explainer (schema steps this version "
                                 f"does not know: {', '.join(newer)}); upgrade explainer to use it")
    elif read_only:
        raise ExplainerError(f"database {path} holds no explainer tables yet (run `explainer sample` first, "
                             "or pass another --db)")


_HEADER_BYTES = 3 * 4096  # DuckDB's file header and two database headers, before the first block
_NEW_DB_BYTES = _HEADER_BYTES + 3 * 262144  # a freshly migrated explainer DB (measured: 798,720 bytes)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All-or-nothing: a crash inside leaves no partial rows (DuckDB commits are durable)."""
    con.execute("BEGIN")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


_CONFLICT = {"": "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: Any, conflict: str = "") -> None:
    """Bulk insert a pyarrow Table (or anything DuckDB can scan) by column name.

    conflict: "" (a duplicate key is an error), "ignore" (the row already there stays) or
    "replace" (the new row wins)."""
    con.register("_bulk", data)
    try:
        cols = ", ".join(f'"{c}"' for c in data.column_names)
        con.execute(f"{_CONFLICT[conflict]} INTO {table} ({cols}) SELECT {cols} FROM _bulk")
    finally:
        con.unregister("_bulk")


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]],
                conflict: str = "") -> None:
    """Bulk insert row dicts through Arrow (~400x faster than executemany). The columns are every
    key of every row, not the first row's; a key a row lacks is NULL there."""
    if not rows:
        return
    import pyarrow as pa  # ~0.5 s to import: commands that only read never pay it

    names = list(dict.fromkeys(k for r in rows for k in r))
    insert_arrow(con, table, pa.table({n: [r.get(n) for r in rows] for n in names}), conflict)


# --- runs -------------------------------------------------------------------------------


def one_row(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The row of a query that always yields one: an aggregate, INSERT ... RETURNING, a known id."""
    row = cur.fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row


def start_run(con: duckdb.DuckDBPyConnection, stage: str, settings: dict[str, Any]) -> int:
    return one_row(con.execute(
        "INSERT INTO runs (stage, settings, status, started_at) VALUES (?, ?, 'running', ?) RETURNING id",
        [stage, json.dumps(settings), now()],
    ))[0]


@contextmanager
def recorded_run(con: duckdb.DuckDBPyConnection, run_id: int, result: Any, t0: float) -> Iterator[None]:
    """Finish the run row as done or failed with the result (a results.StageResult, its wall time
    set), however the body ends; a failed run's record says why."""
    try:
        yield
    except BaseException as e:
        result.wall_s = time.perf_counter() - t0
        finish_run(con, run_id, "failed", {**result.as_dict(), "error": f"{type(e).__name__}: {e}"})
        raise
    result.wall_s = time.perf_counter() - t0
    finish_run(con, run_id, "done", result.as_dict())


def finish_run(con: duckdb.DuckDBPyConnection, run_id: int, status: str, result: Optional[dict] = None) -> None:
    con.execute(
        "UPDATE runs SET status = ?, result = ?, finished_at = ? WHERE id = ?",
        [status, json.dumps(result) if result is not None else None, now(), run_id],
    )


# --- dictionaries -------------------------------------------------------------------------


def dictionary_id(con: duckdb.DuckDBPyConnection, name: Optional[str] = None) -> int:
    """The dictionary a command works on: the only one, or the one named with --dict."""
    rows = con.execute("SELECT id, name FROM dictionaries ORDER BY id").fetchall()
    if not rows:
        raise ExplainerError("the database holds no dictionary yet (run `explainer sample` first)")
    if name is None:
        if len(rows) > 1:
            names = ", ".join(r[1] for r in rows)
            raise ExplainerError(f"the database holds several dictionaries ({names}); choose one with --dict NAME")
        return rows[0][0]
    for rid, rname in rows:
        if rname == name or str(rid) == name:
            return rid
    names = ", ".join(r[1] for r in rows)
    raise ExplainerError(f"no dictionary named {name!r} in the database (it holds: {names})")


def register_dictionary(con: duckdb.DuckDBPyConnection, *, name: str, path: str, model: str, hook: str,
                        d_in: int, d_sae: int, k: Optional[int], fingerprint: str, config: dict) -> int:
    """Return the id for this dictionary, adding it if new; refuse a different one under the same name."""
    row = con.execute("SELECT id, fingerprint FROM dictionaries WHERE name = ?", [name]).fetchone()
    if row is not None:
        if row[1] != fingerprint:
            raise ExplainerError(
                f"the database already holds a different dictionary named {name!r}; "
                "pass another --db, or --dict-name to keep both apart"
            )
        return row[0]
    row = con.execute("SELECT id, name FROM dictionaries WHERE fingerprint = ?", [fingerprint]).fetchone()
    if row is not None:
        return row[0]
    return one_row(con.execute(
        """INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
        [name, path, model, hook, d_in, d_sae, k, fingerprint, json.dumps(config), now()],
    ))[0]


# --- latent selectors ---------------------------------------------------------------------

def select_latents(con: duckdb.DuckDBPyConnection, dict_id: int, selector: str | Sequence[int]) -> list[int]:
    """The sampled latents a selector picks: a list of ids, or text (selectors.py): `all`, `7`,
    `0-99`, `1,5,10-19`, or a SQL condition over the latents table's columns."""
    if isinstance(selector, str):
        sel = selectors.parse(selector)
    else:  # each id a range of one
        ids = sorted({int(i) for i in selector})
        sel = selectors.LatentSelector("ids", str(ids), ranges=[(i, i) for i in ids])
    top = 2**31  # latent is an INTEGER: larger ids are simply absent, never a bind error
    if sel.kind == "all":
        rows = con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent", [dict_id]).fetchall()
    elif sel.ranges is not None:
        # A range join over the merged (disjoint) ranges: each latent appears once.
        rows = con.execute(
            """SELECT l.latent FROM latents l
               JOIN (SELECT unnest(?::BIGINT[]) AS lo, unnest(?::BIGINT[]) AS hi) r ON l.latent BETWEEN r.lo AND r.hi
               WHERE l.dict_id = ? ORDER BY l.latent""",
            [[min(lo, top) for lo, _ in sel.ranges], [min(hi, top) for _, hi in sel.ranges], dict_id]).fetchall()
    elif sel.kind == "random":
        raise ExplainerError(f"--latents {selector!r}: random:N picks the latents `sample` keeps; here use "
                             f"{selectors.IDS_GRAMMAR}, or a SQL condition over the latents columns")
    else:
        rows = _select_where(con, dict_id, sel.text, sel.text.strip())
    latents = [r[0] for r in rows]
    if not latents:
        raise ExplainerError(
            f"--latents {selector!r} matches no latent (columns: latent, frequency, max_act, mean_act, n_contexts)"
        )
    return latents


def _select_where(con: duckdb.DuckDBPyConnection, dict_id: int, selector: str, sel: str) -> list[tuple]:
    """A SQL condition, accepted only when it is one boolean expression that reads a latents column:
    `-5`, `1.5` or `true` are valid SQL that would select everything, so they are refused."""
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'latents' AND schema_name = 'main' "
        "ORDER BY column_index").fetchall()]
    grammar = (f"expected {selectors.IDS_GRAMMAR}, or a SQL condition over the latents columns "
               f"({', '.join(c for c in cols if c != 'dict_id')}), e.g. \"frequency > 1e-4\"")
    query = f"SELECT latent FROM latents WHERE dict_id = ? AND ({sel}) ORDER BY latent"
    describe = f"DESCRIBE SELECT ({sel}) AS v FROM latents"
    try:
        # `1); DROP TABLE x; SELECT (1` would run three statements: refuse before executing any.
        if any(len(con.extract_statements(text)) != 1 for text in (query, describe)):
            raise ExplainerError(f"--latents {selector!r} is not one condition: {grammar}")
        kind = (con.execute(describe).fetchone() or ("", ""))[1]  # binds the columns: an unknown one is named here
        if kind != "BOOLEAN":
            raise ExplainerError(f"--latents {selector!r} is a value of type {kind}, not a true/false condition: {grammar}")
        tree = json.loads((con.execute("SELECT json_serialize_sql(?)",
                                       [f"SELECT ({sel}) FROM latents"]).fetchone() or ("{}",))[0])
        if tree.get("error") or not _column_refs(tree) & set(cols):
            raise ExplainerError(f"--latents {selector!r} does not read any latents column: {grammar}")
        return con.execute(query, [dict_id]).fetchall()
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise ExplainerError(
            f"--latents {selector!r} is not a range, a list, 'all' or a valid SQL WHERE over latents: {msg}"
        ) from None


def _column_refs(node: Any) -> set[str]:
    """Column names referenced anywhere in a json_serialize_sql tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        if node.get("class") == "COLUMN_REF" and node.get("column_names"):
            found.add(str(node["column_names"][-1]).lower())
        for value in node.values():
            found |= _column_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _column_refs(value)
    return found
