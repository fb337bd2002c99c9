"""HTML, CSS and JavaScript of the browser, shared by the server and the static site.

Pages are small shells: data arrives as JSON (inline in a <script type=application/json>, from the
server's /api, or from static .js data files) and the page's script builds every element with
textContent, setAttribute and createElementNS, never innerHTML: data stays text whatever it holds.
Plots are inline SVG; there are no external scripts, styles or fonts.
"""

from __future__ import annotations

import functools
import html
import json
import math
from pathlib import Path
from typing import Any

from explainer.store.spread import DESCRIPTION
from explainer.ui import visible

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1150px}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f6f6f6}th[data-k]{cursor:pointer}input,select{font-size:1em;padding:3px}
.ex{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;margin:3px 0;padding:4px;border:1px solid #eee;
  overflow-wrap:anywhere}
.tok{border-radius:2px}.kind{color:#555;font-size:13px;margin-top:.8em;font-weight:600}.num{text-align:right}
.expl{overflow-wrap:anywhere}.muted{color:#777;font-size:.9em}.cols{display:flex;gap:2em;flex-wrap:wrap}
.cols>div{min-width:260px}.pager button{margin-right:.5em}svg text{font-size:10px;fill:#444}
td.expl{max-width:520px}.lbl{font-size:1.15em;margin:.3em 0;overflow-wrap:anywhere}
"""

_JS_DIR = Path(__file__).with_name("js")
# Tokens repeat across a shard's examples: caching each string's escape saves the translate
# and regex pass per occurrence.
_visible = functools.lru_cache(maxsize=1 << 16)(visible)


def text(value: Any) -> str:
    """Data as HTML text: control and bidi characters shown as escapes (ui.visible), then escaped."""
    return html.escape(visible(str(value)))


def json_for_script(data: Any) -> str:
    """JSON that no string can end or re-open from inside a <script> element: every <, > and & is a
    \\u escape (so no </script>, <!-- or <script appears), U+2028/2029 too; strings pass through
    ui.visible; non-finite numbers become null, which JSON.parse accepts where NaN would blank the page."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, str):
            return _visible(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    out = json.dumps(clean(data), default=lambda o: clean(float(o)), allow_nan=False, separators=(",", ":"))
    return (out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def page(title: str, body: str, scripts: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{text(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{scripts}</body></html>")


def data_script(element_id: str, data: Any) -> str:
    return f"<script id={element_id} type='application/json'>{json_for_script(data)}</script>"


def script(name: str) -> str:
    """One of the package's own scripts (browse/js/NAME.js), inline."""
    return f"<script>{(_JS_DIR / f'{name}.js').read_text(encoding='utf-8')}</script>"


def index_page(name: str, config: dict[str, Any], overview: dict[str, Any], extra_scripts: str = "") -> str:
    """The index shell; config says where rows come from ({"mode": "served"} or "static" with chunk info)."""
    body = (f"<h1>{text(name)}</h1>"
            f"<div id=overview>{overview_svg(overview)}</div>"
            "<p><input id=q placeholder='search explanations or a latent number' size=40> "
            "<select id=explainer><option value=''>any explainer</option><option>ngram</option><option>llm</option>"
            "<option>agent</option><option>import</option></select> "
            "frequency &ge; <input id=min_freq size=7> &le; <input id=max_freq size=7> "
            "validation &ge; <input id=min_score size=5> <span id=count></span></p>"
            f"<p class=muted id=order>{text(DESCRIPTION)}. Click a column to sort by it.</p>"
            "<table><thead><tr><th data-k=latent>latent</th><th data-k=explanation>explanation</th>"
            "<th data-k=explainer>by</th>"
            "<th data-k=validation title='validation simulation score: what chose this label'>validation</th>"
            "<th data-k=simulation title='held-out simulation score, reported only'>held-out</th>"
            "<th title='95% bootstrap interval of the held-out score'>95% CI</th>"
            "<th data-k=ngram_simulation title='the n-gram explanation, same simulator and snippets'>n-gram</th>"
            "<th data-k=frequency>frequency</th><th data-k=max_act>max act</th></tr></thead>"
            "<tbody id=body></tbody></table><p class=pager><button id=prev>&larr; previous</button>"
            "<button id=next>next &rarr;</button><span id=pos></span></p>"
            + data_script("config", config))
    return page(name, body, extra_scripts + script("common") + script("index"))


def latent_shell(title: str, config: dict[str, Any], payload: Any = None) -> str:
    """A latent page: the payload inline (served), or loaded from a shard by the hash (static)."""
    body = ("<p><a id=back href='index.html'>&larr; all latents</a></p><div id=page><p class=muted>loading&hellip;</p></div>"
            + data_script("config", config) + (data_script("payload", payload) if payload is not None else ""))
    return page(title, body, script("common") + script("latent"))


def overview_svg(ov: dict[str, Any], w: int = 640, h: int = 200) -> str:
    """Latents binned by log10 frequency (x) and validation score (y), darker = more; numbers only."""
    if not ov.get("cells"):
        return (f"<p class=muted>overview: no latent has both a frequency and a validation score "
                f"({ov.get('total', 0)} latents)</p>")
    left, bottom = 40, 30
    pw, ph = w - left - 10, h - bottom - 10
    cw, ch = pw / ov["nx"], ph / ov["ny"]
    peak = max(c[2] for c in ov["cells"])
    rects = []
    for x, y, n in ov["cells"]:
        a = 0.15 + 0.85 * math.log1p(n) / math.log1p(peak)
        rects.append(f"<rect x='{left + x * cw:.1f}' y='{10 + ph - (y + 1) * ch:.1f}' width='{cw:.1f}' height='{ch:.1f}' "
                     f"fill='rgba(40,90,200,{a:.2f})'><title>{n} latents</title></rect>")
    ticks = []
    for e in range(int(ov["x0"]), int(ov["x1"]) + 1):
        tx = left + (e - ov["x0"]) / (ov["x1"] - ov["x0"]) * pw
        ticks.append(f"<line x1='{tx:.1f}' x2='{tx:.1f}' y1='{10 + ph}' y2='{14 + ph}' stroke='#888'/>"
                     f"<text x='{tx:.1f}' y='{26 + ph}' text-anchor='middle'>1e{e}</text>")
    for v in (ov["y0"], (ov["y0"] + ov["y1"]) / 2, ov["y1"]):
        ty = 10 + ph - (v - ov["y0"]) / (ov["y1"] - ov["y0"]) * ph
        ticks.append(f"<text x='{left - 4}' y='{ty + 3:.1f}' text-anchor='end'>{v:.2g}</text>")
    return (f"<svg width='{w}' height='{h}' role='img' aria-label='frequency by validation score'>"
            f"<rect x='{left}' y='10' width='{pw}' height='{ph}' fill='#fafafa' stroke='#ddd'/>{''.join(rects)}{''.join(ticks)}"
            f"<text x='{left + pw / 2}' y='{h - 1}' text-anchor='middle'>frequency (log)</text>"
            f"<text x='10' y='{10 + ph / 2}' transform='rotate(-90 10 {10 + ph / 2})' text-anchor='middle'>validation</text>"
            f"</svg><p class=muted>{ov['plotted']} of {ov['total']} latents have a frequency above 0 and a validation "
            "score; each cell counts them (darker: more, log scale).</p>")
