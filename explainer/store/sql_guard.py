"""`explainer sql` runs what the user types: it reads the results DB and the files the statement names as
sources, and writes nothing anywhere.

The boundary is DuckDB's own configuration, set on a fresh read-only connection per statement before the
statement runs: external access off, so the only files the engine opens are the DB and the paths allowed
here, which are exactly those named as sources (read_parquet('DIR/*.parquet'), FROM 'x.parquet');
extension install and autoload off; then the configuration locked, so no SET, PRAGMA or CALL undoes it.
An allowed folder is writable to the engine too, so statements are also checked by type first: only
queries run (SELECT, EXPLAIN, PIVOT; PRAGMA and CALL, which name no file), and COPY, EXPORT, ATTACH,
INSTALL, LOAD, SET, CREATE ... get one line saying why.

DuckDB shares one instance, settings included, between connections to a file within a process: the
lockdown assumes `explainer sql` is the only user of the DB in its process, as on the command line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import duckdb

from explainer.errors import ExplainerError

# SELECT covers DESCRIBE, SHOW, SUMMARIZE, FROM-first and VALUES; PIVOT parses as MULTI. PRAGMA and CALL name
# no files (the engine refuses any they reach) and the locked configuration refuses those that change settings.
_NO_FILES = ("PRAGMA", "CALL")
_GLOB = re.compile(r"[*?\[{]")
# Set before external access goes off (allowed_* cannot change after), lock_configuration last.
_LOCKDOWN = (("autoinstall_known_extensions", False), ("autoload_known_extensions", False),
             ("allow_community_extensions", False), ("allow_persistent_secrets", False),
             ("enable_external_access", False), ("lock_configuration", True))
REFUSED = ("explainer sql only reads: {what} is refused (it cannot write files, attach databases, install or load "
           "extensions or change settings); use SELECT ..., or `explainer export --out DIR` for files")
FILE_REFUSED = ("explainer sql reads only the results DB and files named as sources in the statement, e.g. "
                "read_parquet('DIR/*.parquet') or FROM 'file.parquet' ({detail})")


def _kind(stmt: Any) -> str:
    kind = str(stmt.type).rsplit(".", 1)[-1]
    return "INSTALL/LOAD" if kind == "LOAD" else kind  # DuckDB parses INSTALL as a LOAD statement


def _strings(node: Any, out: list[str]) -> None:
    """Every string constant in an expression subtree (a path, or a list of paths)."""
    if isinstance(node, dict):
        lit = node.get("literal") if node.get("class") == "CONSTANT" else None
        if isinstance(lit, dict) and lit.get("kind") == "STRING":
            out.append(str(lit.get("text")))
        for v in node.values():
            _strings(v, out)
    elif isinstance(node, list):
        for v in node:
            _strings(v, out)


def _sources(node: Any, out: list[str]) -> None:
    """Paths a parsed query reads: table functions' first argument, and file names used as tables."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            args = (node.get("function") or {}).get("arguments") or []
            if args:
                _strings(args[0].get("expression"), out)
        elif node.get("type") == "BASE_TABLE":
            name = str(node.get("table_name") or "")
            if "/" in name or "." in name or "\\" in name:
                out.append(name)
        for v in node.values():
            _sources(v, out)
    elif isinstance(node, list):
        for v in node:
            _sources(v, out)


def _select_sources(con: duckdb.DuckDBPyConnection, query: str) -> list[str]:
    row = con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    ast = json.loads(row[0]) if row else {"error": True}
    if ast.get("error"):
        raise ExplainerError(f"SQL error: {ast.get('error_message', 'cannot parse the statement')}")
    out: list[str] = []
    _sources(ast.get("statements"), out)
    return out


def _words(text: str) -> list[tuple[int, str]]:
    """(offset, lowercased text) of each token's start, comments skipped."""
    toks = [pos for pos, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
    return [(pos, text[pos:].split(None, 1)[0].lower() if text[pos:].strip() else "") for pos in toks]


def _query_sources(con: duckdb.DuckDBPyConnection, stmt: Any) -> list[str]:
    """Sources of one query statement; ExplainerError for anything that is not a query."""
    kind = _kind(stmt)
    text = stmt.query.strip().rstrip(";")
    words = _words(text)
    lead = [w for _, w in words if w not in ("explain", "analyze", "analyse")][:1]
    if kind == "SELECT":
        return _select_sources(con, text)
    if kind == "MULTI" and lead and lead[0] in ("pivot", "unpivot"):  # PIVOT, or EXPLAIN of one
        # A query, but one json_serialize_sql cannot take apart: each string in it may name a source.
        return [_unquote(text[pos:]) for pos, k in duckdb.tokenize(text) if k == duckdb.token_type.string_const]
    if kind == "EXPLAIN":
        rest = words[2:] if len(words) > 1 and words[1][1].startswith(("analyze", "analyse")) else words[1:]
        inner = con.extract_statements(text[rest[0][0]:]) if rest else []
        if len(inner) != 1 or _kind(inner[0]) not in ("SELECT", "MULTI"):
            raise ExplainerError(REFUSED.format(what="EXPLAIN of anything but a query"))
        return _query_sources(con, inner[0])
    if kind in _NO_FILES:
        return []
    raise ExplainerError(REFUSED.format(what=f"the {kind} statement"))


def _unquote(rest: str) -> str:
    """The SQL string literal at the start of `rest` ('it''s' -> it's)."""
    m = re.match(r"'((?:[^']|'')*)'", rest)
    return m.group(1).replace("''", "'") if m else ""


def sources(con: duckdb.DuckDBPyConnection, query: str) -> list[str]:
    """The paths `query` reads; ExplainerError when it is not a query or cannot be parsed."""
    try:
        statements = con.extract_statements(query)
        if not statements:
            raise ExplainerError('the SQL query is empty; e.g. explainer sql "SELECT * FROM labels LIMIT 5"')
        return [p for stmt in statements for p in _query_sources(con, stmt)]
    except duckdb.Error as e:
        raise ExplainerError(f"SQL error: {str(e).splitlines()[0]}") from None


def allowances(paths: list[str]) -> tuple[list[str], list[str]]:
    """(allowed_paths, allowed_directories) that let DuckDB open exactly `paths` (globs: their folder)."""
    files: set[str] = set()
    dirs: set[str] = set()
    for raw in paths:
        p = raw.removeprefix("file://")
        if "://" in p:
            continue  # remote: no local file to allow (and no httpfs to reach it)
        p = os.path.expanduser(p)
        m = _GLOB.search(p)
        if m:
            prefix = p[:m.start()]
            folder = prefix if prefix.endswith(("/", os.sep)) else os.path.dirname(prefix)
            dirs.add(os.path.join(os.path.abspath(folder or "."), ""))
            continue
        files.update({raw, p, os.path.abspath(p)})
        if os.path.isdir(p):
            dirs.add(os.path.join(os.path.abspath(p), ""))
    return sorted(files), sorted(dirs)


def lock_down(con: duckdb.DuckDBPyConnection, paths: list[str]) -> None:
    """Leave `con` able to read only its DB and `paths`, with no way back (see the module docstring)."""
    files, dirs = allowances(paths)
    try:
        if files:
            con.execute("SET allowed_paths = ?", [files])
        if dirs:
            con.execute("SET allowed_directories = ?", [dirs])
        for name, value in _LOCKDOWN:
            con.execute(f"SET {name} = ?", [value])  # names are the constants above, never user text
    except duckdb.Error as e:  # another connection in this process already locked the shared instance
        raise ExplainerError(f"cannot open the DB for read-only SQL: {str(e).splitlines()[0]}") from None


def run(db: Path, query: str) -> Optional[tuple[list[str], list[tuple[Any, ...]]]]:
    """Run `query` read-only on `db`: (columns, rows), or None for a statement without a result."""
    from explainer.store import db as store

    with store.connect(db, read_only=True) as con:
        lock_down(con, sources(con, query))
        try:
            cur = con.execute(query)
        except duckdb.PermissionException as e:
            raise ExplainerError(FILE_REFUSED.format(detail=str(e).splitlines()[0])) from None
        except duckdb.Error as e:
            first = str(e).splitlines()[0]
            if "configuration has been locked" in first:
                raise ExplainerError(REFUSED.format(what=f"changing a setting ({first})")) from None
            raise ExplainerError(f"SQL error: {first}") from None
        if cur is None or cur.description is None:
            return None
        return _unique([d[0] for d in cur.description]), cur.fetchall()


def _unique(cols: list[str]) -> list[str]:
    """SELECT 1 AS a, 2 AS a: rows become dicts, so a repeated name would hide a column."""
    seen: set[str] = set()
    out = []
    for c in cols:
        name, i = c, 1
        while name in seen:
            i += 1
            name = f"{c}_{i}"
        seen.add(name)
        out.append(name)
    return out
