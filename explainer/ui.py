"""Terminal output for the CLI: rich tables, --json, and progress bars fed by stage callbacks.

Stages never print; they call `progress(...)` and return results. Only the CLI imports this.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from explainer.results import ProgressInfo, StageResult, progress_dict

console = Console(stderr=False)
err_console = Console(stderr=True)


# Characters a terminal acts on instead of showing: C0/C1 controls (ESC starts colour, cursor, title and
# hyperlink sequences; CR and BS overwrite what came before; BEL rings), DEL, bidi overrides and isolates
# (they reorder what follows, so a token could display as other text), line/paragraph separators.
# Lone surrogates cannot be encoded at all. Each is shown as its Python escape instead.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_VISIBLE = {c: _NAMED.get(chr(c), f"\\x{c:02x}") for c in [*range(0x20), *range(0x7F, 0xA0)]}
_VISIBLE.update({ord(c): f"\\u{ord(c):04x}" for c in _BIDI})
_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=64)
def _table(keep: str) -> dict[int, str]:
    # Built once per `keep`: rebuilding it on every call was most of the cost of exporting pages.
    return {c: r for c, r in _VISIBLE.items() if chr(c) not in keep}


def visible(text: str, *, keep: str = "\n\t") -> str:
    """`text` made safe to show: every control, bidi or unencodable character becomes its escape
    (ESC -> \\x1b, CR -> \\r, U+202E -> \\u202e) except those in `keep`. The one place that decides this."""
    out = text.translate(_table(keep))
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)


def literal(v: Any, *, keep: str = "\n\t", style: str = "") -> Text:
    """Data as a rich Text: shown as written, never read as markup ([/x], [bold]) or emoji codes."""
    return Text(visible(v if isinstance(v, str) else _fmt(v), keep=keep), style=style)


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
        console.print(literal(f"{title + ': ' if title else ''}no rows", style="dim"))
        return
    table = Table(title=literal(title) if title else None, show_lines=False)
    for col in rows[0].keys():
        table.add_column(literal(str(col)), overflow="fold")
    for row in rows:
        table.add_row(*(literal(row.get(c)) for c in rows[0].keys()))
    console.print(table)


def emit_mapping(data: dict[str, Any], *, as_json: bool, title: Optional[str] = None) -> None:
    """A result object as a two-column table (or one JSON object)."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, indent=1) + "\n")
        return
    table = Table(title=literal(title) if title else None, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for k, v in data.items():
        table.add_row(literal(str(k)), literal(v))
    console.print(table)


def show_result(result: StageResult, *, as_json: bool, title: Optional[str] = None) -> None:
    """Any stage's result: its row tables, then its summary as a two-column table; or its JSON."""
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), default=str, indent=1) + "\n")
        return
    for name, rows in result.tables().items():
        emit(rows, as_json=False, title=name)
    summary = result.summary()
    if summary:
        emit_mapping(summary, as_json=False, title=result.title(title) if title is not None else None)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[ProgressInfo], None]]:
    """Yield a callback taking a results.Progress, or a {"done"/"tokens": n, "total": m, other stats...} dict."""
    if not enabled:
        yield lambda _info: None
        return
    if not err_console.is_terminal:
        with _progress_lines(visible(description, keep="")) as update:
            yield update
        return
    # markup=False: descriptions and stats carry stage names and values, which are data.
    columns = [
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        TextColumn("{task.fields[count]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}", markup=False),
    ]
    description = visible(description, keep="")
    with Progress(*columns, console=err_console, transient=False) as prog:
        task = prog.add_task(description, total=None, stats="", count="")

        def update(info: ProgressInfo) -> None:
            info = progress_dict(info)
            done = info.get("done", info.get("tokens"))
            total = info.get("total")
            stats = visible("  ".join(
                f"{k}={_fmt(v)}" for k, v in info.items() if k not in ("done", "tokens", "total", "stage")
            ), keep="")
            if "stage" in info:
                prog.update(task, description=f"{description}: {visible(str(info['stage']), keep='')}")
            count = f"{done:,.0f}/{total:,.0f}" if done is not None and total else (f"{done:,.0f}" if done is not None else "")
            prog.update(task, completed=done, total=total, stats=stats, count=count)

        yield update


PROGRESS_EVERY_S = 30.0


@contextmanager
def _progress_lines(description: str) -> Iterator[Callable[[ProgressInfo], None]]:
    """Progress for logs and pipes: a bar's redraws would be lost or garble a file, so one plain
    line when a stage starts, every PROGRESS_EVERY_S, and the last state when it ends."""
    last: dict[str, Any] = {"at": None, "line": None}

    def line(info: dict[str, Any]) -> str:
        done, total = info.get("done", info.get("tokens")), info.get("total")
        count = f"{done:,.0f}/{total:,.0f}" if done is not None and total else (f"{done:,.0f}" if done is not None else "")
        stage = f": {info['stage']}" if "stage" in info else ""
        stats = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items() if k not in ("done", "tokens", "total", "stage"))
        return visible(f"{description}{stage} {count} {stats}".strip(), keep="")

    def update(info: ProgressInfo) -> None:
        info = progress_dict(info)
        last["line"] = line(info)
        now = time.monotonic()
        if last["at"] is None or now - last["at"] >= PROGRESS_EVERY_S:
            last["at"] = now
            err_console.print(Text(last["line"]), soft_wrap=True)
            last["line"] = None

    yield update
    if last["line"] is not None:
        err_console.print(Text(last["line"]), soft_wrap=True)


def show_latent(rec: Any) -> None:
    """A latent's explanations and examples, each token shaded by its activation."""
    st = rec.stats
    scale = float(st.get("max_act") or 0.0)
    console.print(Text.assemble((f"latent {rec.latent}", "bold"), f"  frequency {_fmt(st['frequency'])}  "
                                f"max {_fmt(st['max_act'])}  contexts fired {st['n_contexts']}"))
    if not rec.explanations:
        console.print("[dim]no explanations yet (explainer explain ...)[/dim]")
    for e in rec.explanations:
        scores = score_text(e) or "not scored"
        console.print(Text.assemble("  ", literal(e["text"], style="bold"), "  ",
                                    literal(f"{e['explainer']}/{e['model']}: {scores}", style="dim")))
    current = None
    for x in rec.examples:
        if (x.split, x.kind) != current:
            current = (x.split, x.kind)
            console.print(Text.assemble("\n", literal(f"{x.kind} examples, {x.split} split", style="dim")))
        line = Text(f"{x.max_act:7.3g}  ")
        for tok, a in zip(x.tokens, x.acts):
            tok = visible(tok.replace("\n", "\u21b5"), keep="\t")
            if a > 0 and scale > 0:
                level = int(80 + 175 * min(1.0, a / scale))
                line.append(tok, style=f"black on rgb(255,{255 - level + 80},{max(0, 255 - level)})")
            else:
                line.append(tok)
        console.print(line)


def score_key(r: dict[str, Any]) -> str:
    """scorer/mode/model/split of a score row, e.g. simulation/json/gpt-4o-mini/heldout."""
    return "/".join(str(r.get(k) if r.get(k) is not None else "?") for k in ("scorer", "mode", "model", "split"))


def score_text(expl: dict[str, Any]) -> str:
    """An explanation's scores for people: the latest per scorer/mode/model/split, with its 95%
    interval and trivial baseline where recorded, e.g. `simulation/json/m/heldout 0.61 [0.50, 0.72] (baseline 0.00)`."""
    latest = {score_key(r): r for r in expl.get("score_rows", [])}
    parts = []
    for key, r in latest.items():
        text = f"{key} {r['score']:.3f}"
        if r.get("ci_low") is not None and r.get("ci_high") is not None:
            text += f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        if r.get("baseline") is not None:
            text += f" (baseline {r['baseline']:.2f})"
        parts.append(text)
    return ", ".join(parts)
