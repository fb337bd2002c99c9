"""`explainer forget`: delete cached LLM answers, explanations or scores by selector, so that
work can be redone (`explainer sql` is read-only, and a cached answer is replayed forever).

    explainer forget --cache --model gpt-4o-mini            # every cached answer of that model
    explainer forget --explanations --scores --latents 0-9  # both kinds of rows of latents 0..9
    explainer forget --scores --where "scorer = 'fuzzing'" --dry-run

Kinds (any together): --cache (llm_cache), --explanations (with the scores of the deleted
explanations), --scores. Selectors narrow each kind; they combine with AND:
--latents (of --dict; cache rows through the ledger's calls for those latents), --model
(tables with a model column), --where (a SQL WHERE over the kind's own table). With no
selector --all is required. Everything is deleted in one transaction and the counts are
printed; --dry-run prints them and deletes nothing.

User text reaches SQL as parameters, except --where and a SQL --latents, which are SQL by
intent: --where is checked to be one SELECT over the one table (no UNION, no second
statement) before it runs, and only the ids it selects are deleted.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import duckdb

from explainer import selectors
from explainer.errors import ExplainerError
from explainer.store import db as store

KINDS = {"cache": ("llm_cache", "key"), "explanations": ("explanations", "id"), "scores": ("scores", "id")}


@dataclass
class Selector:
    kinds: list[str]
    latents: Optional[str] = None
    model: Optional[str] = None
    where: Optional[str] = None
    dict_name: Optional[str] = None
    all: bool = False


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                      [table]).fetchall()}


def _checked_where(con: duckdb.DuckDBPyConnection, table: str, id_col: str, where: str, flag: str) -> str:
    """`SELECT id_col FROM table WHERE (where)`, refused unless it parses as one plain SELECT over `table`
    (a second statement, a UNION or a CTE would reach past the one table the user meant)."""
    sql = f"SELECT {id_col} FROM {table} WHERE ({where}\n)"
    try:
        tree = json.loads((con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone() or ["{}"])[0])
        statements = tree.get("statements") or []
        node = statements[0]["node"] if len(statements) == 1 and not tree.get("error") else {}
    except (duckdb.Error, ValueError, KeyError, TypeError):
        node = {}
    frm = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or frm.get("type") != "BASE_TABLE" or frm.get("table_name") != table
            or len(node.get("select_list") or []) != 1 or node.get("cte_map", {}).get("map")):
        raise ExplainerError(f"{flag} {where!r} is not a SQL condition over the {table} table alone "
                             f"(write e.g. {flag} \"{'model' if table == 'llm_cache' else 'latent'} < 10\")")
    return sql


def _where_ids(con: duckdb.DuckDBPyConnection, table: str, id_col: str, where: str) -> set[Any]:
    """Ids of `table` rows the user's SQL WHERE selects."""
    sql = _checked_where(con, table, id_col, where, "--where")
    try:
        return {r[0] for r in con.execute(sql).fetchall()}
    except duckdb.Error as e:
        cols = ", ".join(sorted(_columns(con, table)))
        raise ExplainerError(f"--where {where!r} failed on {table} ({str(e).splitlines()[0]}); "
                             f"its columns: {cols}") from None


def _ids(con: duckdb.DuckDBPyConnection, kind: str, sel: Selector, dict_id: Optional[int],
         latents: Optional[list[int]]) -> set[Any]:
    table, id_col = KINDS[kind]
    sql, params = f"SELECT {id_col} FROM {table} WHERE true", list[Any]()
    if kind != "cache" and dict_id is not None:
        sql, params = sql + " AND dict_id = ?", params + [dict_id]
    if latents is not None:
        if kind == "cache":  # a cached answer belongs to the latents whose calls asked for it
            sql += " AND key IN (SELECT cache_key FROM llm_calls WHERE dict_id = ? AND list_contains(?, latent))"
            params += [dict_id, latents]
        else:
            sql, params = sql + " AND list_contains(?, latent)", params + [latents]
    if sel.model is not None:
        if "model" not in _columns(con, table):
            raise ExplainerError(f"--model cannot select {kind} (the {table} table has no model column); use --where")
        sql, params = sql + " AND model = ?", params + [sel.model]
    ids = {r[0] for r in con.execute(sql, params).fetchall()}
    if sel.where is not None:
        ids &= _where_ids(con, table, id_col, sel.where)
    return ids


def _delete(con: duckdb.DuckDBPyConnection, table: str, id_col: str, ids: set[Any]) -> None:
    if ids:
        con.execute(f"DELETE FROM {table} WHERE list_contains(?, {id_col})", [sorted(ids)])


def run(con: duckdb.DuckDBPyConnection, sel: Selector, *, dry_run: bool = False) -> list[dict[str, Any]]:
    """Delete (or with dry_run only count) what `sel` selects; one row per table touched."""
    if not sel.kinds:
        raise ExplainerError("say what to forget: --cache, --explanations and/or --scores")
    if sel.latents is None and sel.model is None and sel.where is None and not sel.all:
        raise ExplainerError("no selector: narrow it with --latents, --model or --where, or pass --all "
                             "to forget every row of " + ", ".join(sel.kinds))
    needs_dict = sel.latents is not None or sel.dict_name is not None
    dict_id = store.dictionary_id(con, sel.dict_name) if needs_dict else None
    latents = None
    if sel.latents is not None and dict_id is not None:
        if selectors.parse(sel.latents).kind == "sql":
            # A SQL --latents runs on this writable connection: one SELECT over latents, nothing else.
            _checked_where(con, "latents", "latent", sel.latents, "--latents")
        latents = store.select_latents(con, dict_id, sel.latents)
    chosen = {kind: _ids(con, kind, sel, dict_id, latents) for kind in sel.kinds}
    if "explanations" in chosen and chosen["explanations"]:
        # A score without its explanation would be an orphan row in every read verb.
        dependent = {r[0] for r in con.execute("SELECT id FROM scores WHERE list_contains(?, explanation_id)",
                                               [sorted(chosen["explanations"])]).fetchall()}
        chosen["scores"] = chosen.get("scores", set()) | dependent
    verb = "would delete" if dry_run else "deleted"
    report = [{"table": KINDS[k][0], verb: len(v), "latents": _latents_of(con, k, v)} for k, v in chosen.items()]
    if not dry_run:
        with store.transaction(con):
            for kind in ("scores", "explanations", "cache"):
                if kind in chosen:
                    _delete(con, *KINDS[kind], chosen[kind])
    return report


def _latents_of(con: duckdb.DuckDBPyConnection, kind: str, ids: set[Any]) -> str:
    """The latents the rows belong to, as ranges ("0-9, 12"); cached answers through the ledger."""
    if not ids:
        return ""
    sql = ("SELECT DISTINCT latent FROM llm_calls WHERE list_contains(?, cache_key) AND latent IS NOT NULL"
           if kind == "cache" else f"SELECT DISTINCT latent FROM {KINDS[kind][0]} WHERE list_contains(?, id)")
    found = sorted(r[0] for r in con.execute(sql, [sorted(ids)]).fetchall())
    runs: list[list[int]] = []
    for x in found:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return text if len(text) <= 80 else text[:77] + "..."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", action="store_true", help="forget cached LLM answers (llm_cache): the next run asks again")
    p.add_argument("--explanations", action="store_true", help="forget explanations (and the scores of those explanations)")
    p.add_argument("--scores", action="store_true", help="forget scores")
    p.add_argument("--latents", default=None,
                   help="only rows of these latents of --dict: 3, 0-99, 1,5,9, all or a SQL WHERE over latents")
    p.add_argument("--model", default=None, help="only rows of this model (cached answers, explanations; scores where recorded)")
    p.add_argument("--where", default=None,
                   help="only rows this SQL WHERE over the kind's own table selects, e.g. \"scorer = 'fuzzing'\"")
    p.add_argument("--dict", default=None, help="dictionary name or id when the DB holds several")
    p.add_argument("--all", action="store_true", help="with no other selector: forget every row of the kinds named")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")


def cmd_forget(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.settings_load import load_settings

    db = Path(args.db or load_settings(args.config, {}).db)
    if not db.exists():
        raise ExplainerError(f"database {db} does not exist; pass --db")
    kinds = [k for k in KINDS if getattr(args, k)]
    sel = Selector(kinds, latents=args.latents, model=args.model, where=args.where, dict_name=args.dict, all=args.all)
    with store.connect(db) as con:
        rows = run(con, sel, dry_run=args.dry_run)
    ui.emit(rows, as_json=args.json, title="forget (dry run: nothing deleted)" if args.dry_run else "forget")
    return 0
