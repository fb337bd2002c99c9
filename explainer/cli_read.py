"""The read-side verbs (sql, search, show, status, browse, export): they open the DB read-only
and print. cli.py builds the parser and holds the error boundary for them too."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError
from explainer.settings_load import load_settings


def cmd_sql(args: argparse.Namespace) -> int:
    from explainer.store import db as store
    from explainer.store import sql_guard

    db = args.db or load_settings(args.config, {}).db
    if args.query is None:
        store.connect(db, read_only=True).close()  # a missing or locked DB fails before the prompt shows
        return _sql_prompt(db, args)
    result = sql_guard.run(db, args.query)
    if result is not None:
        cols, rows = result
        _print_rows([dict(zip(cols, r)) for r in rows], cols, args)
    return 0


def _sql_prompt(db: Path, args: argparse.Namespace) -> int:
    """A small read-eval-print loop: one statement per line; an error is shown, not fatal."""
    from explainer import ui
    from explainer.store import sql_guard

    ui.err_console.print("[dim]SQL on the results DB (read-only). Tables: labels, explanation_scores, costs, latents, "
                         "examples, contexts, explanations, scores, llm_calls. Empty line or Ctrl-D quits.[/dim]")
    while True:
        try:
            line = input("sql> ").strip()
        except EOFError:
            return 0
        if not line or line in ("quit", "exit", ".quit"):
            return 0
        try:
            # Each line gets its own locked connection: what it may read depends on what it names.
            result = sql_guard.run(db, line)
        except ExplainerError as e:
            ui.err_console.print(ui.literal(f"error: {e}", keep=""))
            continue
        if result is not None:
            cols, rows = result
            _print_rows([dict(zip(cols, r)) for r in rows], cols, args)


def _print_rows(rows: list[dict[str, Any]], cols: list[str], args: argparse.Namespace) -> None:
    from explainer import ui

    if args.csv:
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=cols)
        w.writeheader()
        if sys.stdout.isatty():  # a terminal would act on control characters; a pipe gets the data as stored
            rows = [{k: ui.visible(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
        w.writerows(rows)
    else:
        ui.emit(rows, as_json=args.json)


def _db(args: argparse.Namespace) -> Path:
    return args.db or load_settings(args.config, {}).db


def cmd_search(args: argparse.Namespace) -> int:
    from explainer import query, ui
    from explainer.store import db as store

    with store.connect(_db(args), read_only=True) as con:
        # Without --dict, search every dictionary (rows carry dict_id): refusing would make a user
        # name one before knowing which holds the label they are looking for.
        dict_id = store.dictionary_id(con, args.dict) if args.dict is not None else None
        found = query.search(con, args.query, dict_id=dict_id, limit=args.limit)
    ui.emit(found, as_json=args.json, title=f"explanations matching {args.query!r}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from explainer import query, ui
    from explainer.store import db as store

    with store.connect(_db(args), read_only=True) as con:
        dict_id = store.dictionary_id(con, args.dict)
        rec = query.latent_record(con, dict_id, args.latent, splits=tuple(args.split.split(",")), per_kind=args.n)
    if args.json:
        ui.emit_mapping(rec.to_json(), as_json=True)
    else:
        ui.show_latent(rec)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from explainer import query, ui
    from explainer.store import db as store

    with store.connect(_db(args), read_only=True) as con:
        report = query.status(con)
    if args.json:
        ui.emit_mapping(report, as_json=True)
        return 0
    for name, rows in report.items():
        if rows or name != "unfinished":
            ui.emit(rows, as_json=False, title=name)
    if report["unfinished"]:
        ui.console.print("[yellow]unfinished work: rerun the command that started it and it continues[/yellow]")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.browse import server, static
    from explainer.store import db as store

    if args.serve == (args.out is not None):
        raise ExplainerError("browse needs exactly one of --serve (pages on demand) or --out DIR (a static site)")
    with store.connect(_db(args), read_only=True) as con:
        dict_id = store.dictionary_id(con, args.dict)
        if args.out is not None:
            with ui.progress_bar("browse", enabled=not args.json) as bar:
                res = static.build(con, dict_id, args.out, progress=bar)
            ui.emit_mapping(res, as_json=args.json, title="static site written")
            return 0
        app = server.Browser(con, dict_id)
        httpd = server.make_server(app, args.port)
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        ui.emit_mapping({"url": url, "latents": app.total, "db": str(_db(args))}, as_json=args.json,
                        title="serving (read-only; Ctrl-C stops; no writer can open the DB meanwhile)")
        sys.stdout.flush()
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from explainer import query, ui
    from explainer.store import db as store

    with store.connect(_db(args), read_only=True) as con:
        files = query.export(con, args.out)
    ui.emit([{"file": str(f), "bytes": f.stat().st_size} for f in files], as_json=args.json, title="exported")
    return 0
