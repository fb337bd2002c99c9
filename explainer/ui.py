"""Terminal output for the CLI: rich tables, --json, and progress bars fed by stage callbacks.

Stages never print; they call `progress(dict)` and return results. Only the CLI imports this.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def emit(rows: Sequence[dict[str, Any]], *, as_json: bool, title: Optional[str] = None) -> None:
    """Print rows as a rich table, or as JSON for machines."""
    if as_json:
        sys.stdout.write(json.dumps(list(rows), default=str, indent=1) + "\n")
        return
    if not rows:
        console.print(f"[dim]{title + ': ' if title else ''}no rows[/dim]")
        return
    table = Table(title=title, show_lines=False)
    for col in rows[0].keys():
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in rows[0].keys()))
    console.print(table)


def emit_mapping(data: dict[str, Any], *, as_json: bool, title: Optional[str] = None) -> None:
    """A result object as a two-column table (or one JSON object)."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, indent=1) + "\n")
        return
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for k, v in data.items():
        table.add_row(str(k), _fmt(v))
    console.print(table)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield a callback taking {"done"/"tokens": n, "total": m, other stats...} dicts."""
    if not enabled:
        yield lambda _info: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    ]
    with Progress(*columns, console=err_console, transient=False) as prog:
        task = prog.add_task(description, total=None, stats="", count="")

        def update(info: Any) -> None:
            if not isinstance(info, dict):
                info = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)
            done = info.get("done", info.get("tokens"))
            total = info.get("total")
            stats = "  ".join(
                f"{k}={_fmt(v)}" for k, v in info.items() if k not in ("done", "tokens", "total", "stage")
            )
            if "stage" in info:
                prog.update(task, description=f"{description}: {info['stage']}")
            count = f"{done:,.0f}/{total:,.0f}" if done is not None and total else (f"{done:,.0f}" if done is not None else "")
            prog.update(task, completed=done, total=total, stats=stats, count=count)

        yield update


def show_latent(rec: Any) -> None:
    """A latent's explanations and examples, each token shaded by its activation."""
    from rich.text import Text

    from explainer import query

    st = rec.stats
    scale = float(st.get("max_act") or 0.0)
    console.print(f"[bold]latent {rec.latent}[/bold]  frequency {_fmt(st['frequency'])}  "
                  f"max {_fmt(st['max_act'])}  contexts fired {st['n_contexts']}")
    if not rec.explanations:
        console.print("[dim]no explanations yet (explainer explain ...)[/dim]")
    for e in rec.explanations:
        scores = query.score_text(e) or "not scored"
        console.print(f"  [bold]{e['text']}[/bold]  [dim]{e['explainer']}/{e['model']}: {scores}[/dim]")
    current = None
    for x in rec.examples:
        if (x.split, x.kind) != current:
            current = (x.split, x.kind)
            console.print(f"\n[dim]{x.kind} examples, {x.split} split[/dim]")
        line = Text(f"{x.max_act:7.3g}  ")
        for tok, a in zip(x.tokens, x.acts):
            tok = tok.replace("\n", "\u21b5")
            if a > 0 and scale > 0:
                level = int(80 + 175 * min(1.0, a / scale))
                line.append(tok, style=f"black on rgb(255,{255 - level + 80},{max(0, 255 - level)})")
            else:
                line.append(tok)
        console.print(line)
