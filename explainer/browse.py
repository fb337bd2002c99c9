"""A static HTML browser generated from the DB: an index with search and sort, a page per latent.

Pages embed their data and a few lines of JavaScript; viewing needs no server and no network
(a file:// page cannot fetch JSON, so the index carries its rows inline).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import duckdb

from explainer.errors import ExplainerError
from explainer.query import latent_record, rows
from explainer.store.db import one_row
from explainer.ui import score_text, visible

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}input{font-size:1em;padding:4px;width:24em}
.ex{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;margin:3px 0;padding:4px;border:1px solid #eee}
.tok{border-radius:2px}.kind{color:#777;font-size:12px;margin-top:1em}.num{text-align:right}
.expl{font-size:1.1em;margin:.3em 0}.score{color:#555;font-size:.9em}
"""

# Rows are built with textContent and setAttribute, never innerHTML: data stays text whatever it holds.
INDEX_JS = """
const rows = JSON.parse(document.getElementById('data').textContent);
let key = 'validation', desc = true;
function fmt(v){ if(v===null||v===undefined) return '';
  return typeof v==='number' ? String(Number.isInteger(v)? v : v.toPrecision(3)) : String(v); }
function cell(tr, text, cls){ const td = document.createElement('td'); if(cls) td.className = cls;
  td.textContent = text; tr.appendChild(td); return td; }
function render(){
  const q = document.getElementById('q').value.toLowerCase();
  const shown = rows.filter(r => !q || String(r.explanation||'').toLowerCase().includes(q) || String(r.latent)===q);
  shown.sort((a,b) => { const x=a[key], y=b[key]; if(x===y) return a.latent-b.latent;
    if(x===null||x===undefined) return 1; if(y===null||y===undefined) return -1; return (x<y?-1:1)*(desc?-1:1); });
  document.getElementById('count').textContent = shown.length + ' latents';
  const body = document.getElementById('body');
  body.replaceChildren(...shown.map(r => {
    const tr = document.createElement('tr');
    const a = document.createElement('a');
    a.setAttribute('href', 'latent_' + Number(r.latent) + '.html'); a.textContent = String(r.latent);
    cell(tr, '').appendChild(a);
    cell(tr, fmt(r.explanation)); cell(tr, fmt(r.explainer));
    cell(tr, fmt(r.validation), 'num'); cell(tr, fmt(r.simulation), 'num');
    cell(tr, (r.ci_low===null||r.ci_low===undefined) ? '' : fmt(r.ci_low) + '\u2013' + fmt(r.ci_high), 'num');
    for (const k of ['ngram_simulation', 'frequency', 'max_act']) cell(tr, fmt(r[k]), 'num');
    return tr; }));
}
document.querySelectorAll('th[data-k]').forEach(th => th.onclick = () => {
  if(key===th.dataset.k) desc=!desc; else {key=th.dataset.k; desc=true;} render(); });
document.getElementById('q').oninput = render;
render();
"""


def _text(value: Any) -> str:
    """Data as HTML text: control and bidi characters shown as escapes (see ui.visible), then escaped."""
    return html.escape(visible(str(value)))


def _json_for_script(data: Any) -> str:
    """JSON that no string can end or re-open from inside a <script> element: every <, > and & is a
    \\u escape (so no </script>, <!-- or <script appears), U+2028/2029 too; non-finite numbers become null,
    which JSON.parse accepts where NaN would blank the page."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, str):
            return visible(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    text = json.dumps(clean(data), default=lambda o: clean(float(o)), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_text(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{script}</body></html>")


def _highlight(tokens: list[str], acts: list[float], scale: float) -> str:
    spans = []
    for tok, a in zip(tokens, acts):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        title = f' title="{a:.3g}"' if a > 0 else ""
        style = f' style="background:rgba(255,120,0,{alpha:.2f})"' if a > 0 else ""
        spans.append(f"<span class='tok'{style}{title}>{_text(tok)}</span>")
    return "".join(spans)


def latent_page(con: duckdb.DuckDBPyConnection, dict_id: int, latent: int) -> str:
    rec = latent_record(con, dict_id, latent, splits=("train", "heldout"), per_kind=10)
    st = rec.stats
    scale = float(st.get("max_act") or 0.0)
    parts = [f"<p><a href='index.html'>&larr; all latents</a></p><h1>Latent {latent}</h1>",
             f"<p class=score>frequency {st['frequency']:.3g} &middot; max activation {scale:.3g} "
             f"&middot; contexts fired {st['n_contexts']}</p><h2>Explanations</h2>"]
    if not rec.explanations:
        parts.append("<p><i>none yet</i></p>")
    for e in rec.explanations:
        scores = score_text(e) or "not scored"
        parts.append(f"<div class=expl>{_text(e['text'] or '')}</div>"
                     f"<div class=score>{_text(e['explainer'])} / {_text(e['model'])}: {_text(scores)}</div>")
    parts.append("<h2>Examples</h2>")
    current = None
    for x in rec.examples:
        if (x.split, x.kind) != current:
            current = (x.split, x.kind)
            parts.append(f"<div class=kind>{_text(x.kind)} &middot; {_text(x.split)}</div>")
        parts.append(f"<div class=ex>{_highlight(x.tokens, x.acts, scale)}</div>")
    return _page(f"Latent {latent}", "".join(parts))


def build(con: duckdb.DuckDBPyConnection, dict_id: int, out: Path,
          progress: Optional[Callable[[dict[str, Any]], None]] = None) -> int:
    """Write index.html and latent_N.html into `out`; returns the number of latent pages."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainerError(f"browse --out {out}: cannot create that folder ({e.strerror or e}); pass another --out") from None
    data = rows(con.execute(
        """SELECT latent, explanation, explainer, validation, simulation, ci_low, ci_high, ngram_simulation,
                  frequency, max_act
           FROM labels WHERE dict_id = ? ORDER BY latent""", [dict_id]))
    name = one_row(con.execute("SELECT name FROM dictionaries WHERE id = ?", [dict_id]))[0]
    head = ("<tr><th data-k=latent>latent</th><th data-k=explanation>explanation</th><th data-k=explainer>by</th>"
            "<th data-k=validation title='validation simulation score: what chose this label'>validation</th>"
            "<th data-k=simulation title='held-out simulation score, reported only'>held-out</th>"
            "<th title='95% bootstrap interval of the held-out score'>95% CI</th>"
            "<th data-k=ngram_simulation title='the n-gram explanation, same simulator and snippets'>n-gram</th>"
            "<th data-k=frequency>frequency</th><th data-k=max_act>max act</th></tr>")
    payload = _json_for_script(data)
    body = (f"<h1>{_text(name)}</h1><p><input id=q placeholder='search explanations or a latent number'> "
            f"<span id=count></span></p><table><thead>{head}</thead><tbody id=body></tbody></table>"
            f"<script id=data type='application/json'>{payload}</script>")
    _write(out / "index.html", _page(name, body, f"<script>{INDEX_JS}</script>"))
    for i, r in enumerate(data):
        _write(out / f"latent_{r['latent']}.html", latent_page(con, dict_id, r["latent"]))
        if progress is not None:
            progress({"done": i + 1, "total": len(data)})
    return len(data)


def _write(path: Path, page: str) -> None:
    # utf-8 whatever the locale: the pages declare it, and tokens are any Unicode.
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ExplainerError(f"browse: cannot write {path} ({e.strerror or e}); free space or pass another --out") from None
