"""The browser's SQL: a snapshot of the labels view to page through, the overview bins, and the
per-latent data a latent page shows (the same JSON for the server and the static shards).

Every value from a user (sort key, filters, search text, paging) reaches SQL as a bound
parameter or as a name picked from a fixed whitelist; no SQL text is built from user input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import duckdb

from explainer import vocab
from explainer.errors import ExplainerError
from explainer.sample.select import QUANTILE_LEVELS
from explainer.store import examples as example_store
from explainer.store.spread import spread_rank_sql

INDEX = "browse_index"  # a TEMP table: lives in this connection's memory, never in the DB file
# Sort keys a request may name, each a column of INDEX.
SORTS = ("spread", "latent", "validation", "simulation", "ngram_simulation", "frequency", "max_act", "n_contexts",
         "explanation", "explainer")
COLUMNS = ("latent", "explanation", "explainer", "validation", "simulation", "ci_low", "ci_high",
           "ngram_simulation", "frequency", "max_act", "spread")
MAX_LIMIT = 500


def snapshot(con: duckdb.DuckDBPyConnection, dict_id: int) -> int:
    """Copy one dictionary's labels (and their spread rank) into a TEMP table; returns its rows.

    The labels view ranks every explanation of every latent: run once, not per request. A
    read-only connection keeps the file unchanged (temp tables live in memory), and no writer
    can change the file while it is open, so the copy cannot go stale."""
    con.execute(f"DROP TABLE IF EXISTS {INDEX}")
    con.execute(
        f"""CREATE TEMP TABLE {INDEX} AS
            WITH lab AS (
                SELECT latent, explanation, explainer, validation, simulation, ci_low, ci_high, baseline,
                       ngram_simulation, frequency, max_act, n_contexts, selected_by, explanation_id
                FROM labels WHERE dict_id = ?),
            r AS ({spread_rank_sql('lab')})
            SELECT lab.*, r.spread FROM lab JOIN r USING (latent) ORDER BY r.spread""", [dict_id])
    n = con.execute(f"SELECT count(*) FROM {INDEX}").fetchone()
    return int(n[0]) if n else 0


@dataclass
class IndexQuery:
    sort: str = "spread"
    desc: bool = False
    q: str = ""
    explainer: str = ""
    min_freq: Optional[float] = None
    max_freq: Optional[float] = None
    min_score: Optional[float] = None
    offset: int = 0
    limit: int = 50


def parse_query(params: Mapping[str, str]) -> IndexQuery:
    """An IndexQuery from URL parameters; a bad value is an ExplainerError naming it (HTTP 400)."""
    known = {"sort", "desc", "q", "explainer", "min_freq", "max_freq", "min_score", "offset", "limit"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ExplainerError(f"unknown parameter {unknown[0]!r}; use {', '.join(sorted(known))}")
    sort = params.get("sort", "spread")
    if sort not in SORTS:
        raise ExplainerError(f"sort={sort!r} is not a column; use one of {', '.join(SORTS)}")
    desc = params.get("desc", "0")
    if desc not in ("0", "1"):
        raise ExplainerError(f"desc={desc!r}: use desc=1 or desc=0")

    def number(name: str) -> Optional[float]:
        raw = params.get(name, "")
        if raw == "":
            return None
        try:
            v = float(raw)
        except ValueError:
            raise ExplainerError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(v):
            raise ExplainerError(f"{name}={raw!r} must be a finite number")
        return v

    def count(name: str, default: int, hi: int) -> int:
        raw = params.get(name, str(default))
        if not raw.isdigit() or int(raw) > hi:
            raise ExplainerError(f"{name}={raw!r} must be a whole number from 0 to {hi}")
        return int(raw)

    return IndexQuery(sort=sort, desc=desc == "1", q=params.get("q", "")[:500], explainer=params.get("explainer", ""),
                      min_freq=number("min_freq"), max_freq=number("max_freq"), min_score=number("min_score"),
                      offset=count("offset", 0, 2**62), limit=max(1, count("limit", 50, MAX_LIMIT)))


def index_page(con: duckdb.DuckDBPyConnection, q: IndexQuery) -> dict[str, Any]:
    """One page of the snapshot: filtered, searched and sorted in SQL, with the total that matched."""
    where, params = ["TRUE"], []
    text = q.q.strip()
    if text:
        if text.isdigit():
            where.append("(latent = ? OR contains(lower(explanation), ?))")
            params += [int(text) if len(text) < 12 else -1, text.lower()]
        else:
            where.append("contains(lower(explanation), ?)")
            params.append(text.lower())
    if q.explainer:
        where.append("explainer = ?")
        params.append(q.explainer)
    for col, op, v in (("frequency", ">=", q.min_freq), ("frequency", "<=", q.max_freq), ("validation", ">=", q.min_score)):
        if v is not None:
            where.append(f"{col} {op} ?")
            params.append(v)
    assert q.sort in SORTS  # parse_query refused anything else; the name goes into SQL below
    order = f"{q.sort} {'DESC' if q.desc else 'ASC'} NULLS LAST, latent"
    cond = " AND ".join(where)
    page_params: list[Any] = [*params, q.limit, q.offset]
    if len(where) == 1 and q.sort == "spread" and not q.desc:
        # The default view: spread is 1..n in the table's own order, so a page is a range (zone maps
        # skip the rest) instead of a sort of every row.
        cond, page_params = "spread > ?", [q.offset, q.limit, 0]
    cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM {INDEX} WHERE {cond} "
                      f"ORDER BY {order} LIMIT ? OFFSET ?", page_params)
    cols = [d[0] for d in cur.description]
    found = [dict(zip(cols, r)) for r in cur.fetchall()]
    # A separate count: count(*) OVER () in the page query would carry every matching row through the sort.
    one = con.execute(f"SELECT count(*) FROM {INDEX} WHERE {' AND '.join(where)}", params).fetchone()
    total = one[0] if one else 0
    out_rows = [{k: _round(v) for k, v in r.items()} for r in found]
    return {"total": int(total), "offset": q.offset, "limit": q.limit, "sort": q.sort, "desc": q.desc, "rows": out_rows}


def overview(con: duckdb.DuckDBPyConnection, nx: int = 40, ny: int = 20) -> dict[str, Any]:
    """Counts of latents binned by log10(frequency) (x) and validation score (y), for the index plot."""
    r = con.execute(f"""SELECT min(log10(frequency)), max(log10(frequency)), min(validation), count(*),
                               count(*) FILTER (WHERE frequency > 0 AND validation IS NOT NULL AND isfinite(validation))
                        FROM {INDEX} WHERE frequency > 0""").fetchone()
    total = con.execute(f"SELECT count(*) FROM {INDEX}").fetchone()
    lo, hi, vmin, _, n = r if r else (None, None, None, 0, 0)
    out: dict[str, Any] = {"total": int(total[0]) if total else 0, "plotted": int(n or 0), "cells": []}
    if not n:
        return out
    lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    ylo = min(0.0, math.floor(float(vmin) * 10) / 10)
    cells = con.execute(
        f"""SELECT least(CAST(floor((log10(frequency) - ?) / ? * ?) AS INTEGER), ? - 1) AS x,
                   least(CAST(floor((validation - ?) / ? * ?) AS INTEGER), ? - 1) AS y, count(*) AS n
            FROM {INDEX} WHERE frequency > 0 AND validation IS NOT NULL AND isfinite(validation)
            GROUP BY ALL""", [lo, hi - lo, nx, nx, ylo, 1.0 - ylo, ny, ny]).fetchall()
    out.update({"x0": lo, "x1": hi, "y0": ylo, "y1": 1.0, "nx": nx, "ny": ny,
                "cells": [[int(x), int(y), int(c)] for x, y, c in cells]})
    return out


def tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def latent_ids(con: duckdb.DuckDBPyConnection, dict_id: int) -> list[int]:
    return [r[0] for r in con.execute("SELECT latent FROM latents WHERE dict_id = ? ORDER BY latent", [dict_id]).fetchall()]


def payloads(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Sequence[int], *, have: set[str],
             per_kind: int = 10, splits: Sequence[str] = ("train", "heldout"),
             window: Optional[int] = None) -> dict[int, dict[str, Any]]:
    """What a latent page shows, per latent, as JSON-ready dicts. Latents are read as one range
    (zone maps skip other row groups), so a shard of neighbouring latents costs a few queries.
    `window` keeps that many tokens of each example around its maximum (the static site's size)."""
    wanted = sorted({int(x) for x in latents})
    if not wanted:
        return {}
    rng = [dict_id, wanted[0], wanted[-1]]
    out: dict[int, dict[str, Any]] = {}
    for lat, freq, n_ctx, mx, mean, qs in con.execute(
            "SELECT latent, frequency, n_contexts, max_act, mean_act, quantiles FROM latents "
            "WHERE dict_id = ? AND latent BETWEEN ? AND ?", rng).fetchall():
        if lat in wanted:
            out[lat] = {"latent": lat, "frequency": _round(freq), "n_contexts": n_ctx, "max_act": _round(mx),
                        "mean_act": _round(mean), "quantiles": [_round(x) for x in (qs or [])], "label": None,
                        "explanations": [], "examples": [], "hist": _hist_from_quantiles(qs, n_ctx),
                        "logits": None if "latent_logits" not in have else {"top": [], "bottom": []},
                        "neighbours": None if "latent_neighbours" not in have else []}
    if not out:
        return out
    lo_hi = [wanted[0], wanted[-1]]
    for r in _dicts(con.execute(f"""SELECT latent, explanation_id, selected_by, validation, simulation, ci_low, ci_high,
                                           baseline, ngram_simulation FROM {INDEX} WHERE latent BETWEEN ? AND ?""", lo_hi)):
        if r["latent"] in out:
            out[r["latent"]]["label"] = {k: _round(v) for k, v in r.items() if k != "latent"}
    expl: dict[int, dict[str, Any]] = {}
    for r in _dicts(con.execute(
            """SELECT id, latent, explainer, model, text FROM explanations
               WHERE dict_id = ? AND latent BETWEEN ? AND ? AND status = 'ok' ORDER BY id""", rng)):
        if r["latent"] in out:
            e = {"id": r["id"], "explainer": r["explainer"], "model": r["model"], "text": r["text"], "scores": []}
            expl[r["id"]] = e
            out[r["latent"]]["explanations"].append(e)
    for sr in con.execute(
            """SELECT explanation_id, scorer, mode, model, split, score, ci_low, ci_high, baseline, n_snippets
               FROM scores WHERE dict_id = ? AND latent BETWEEN ? AND ? AND status = 'ok' AND score IS NOT NULL
               ORDER BY id""", rng).fetchall():
        if sr[0] in expl:
            expl[sr[0]]["scores"].append([_round(v) for v in sr[1:]])
    if "latent_histograms" in have:
        for lat, edges, counts in con.execute("SELECT latent, edges, counts FROM latent_histograms "
                                              "WHERE dict_id = ? AND latent BETWEEN ? AND ?", rng).fetchall():
            if lat in out and counts:
                out[lat]["hist"] = {"source": "histogram", "edges": [_round(x) for x in edges], "counts": list(counts)}
    if "latent_logits" in have:
        for lat, sign, tok, val in con.execute("SELECT latent, sign, token, value FROM latent_logits WHERE dict_id = ? "
                                               "AND latent BETWEEN ? AND ? ORDER BY latent, sign, rank", rng).fetchall():
            if lat in out and sign in ("top", "bottom"):
                out[lat]["logits"][sign].append([tok, _round(val)])
    if "latent_neighbours" in have:
        for lat, kind, nb, val in con.execute("SELECT latent, kind, neighbour, value FROM latent_neighbours WHERE dict_id = ? "
                                              "AND latent BETWEEN ? AND ? ORDER BY latent, kind, rank", rng).fetchall():
            if lat in out:
                out[lat]["neighbours"].append([kind, nb, _round(val)])
    counts = {k: per_kind for k in vocab.KINDS}
    for split in splits:
        for lat, exs in example_store.load(con, dict_id, list(out), split, counts).items():
            out[lat]["examples"] += [_example(x, window) for x in exs]
    return out


def _example(x: example_store.Example, window: Optional[int]) -> dict[str, Any]:
    start, toks, acts = 0, x.tokens, x.acts
    if window is not None and len(toks) > window:
        peak = max(range(len(acts)), key=lambda i: acts[i])
        start = min(max(0, peak - (3 * window) // 4), len(toks) - window)
        toks, acts = toks[start:start + window], acts[start:start + window]
    return {"split": x.split, "kind": x.kind, "bin": x.bin, "max": _round(x.max_act), "start": start,
            "of": len(x.tokens), "tokens": toks, "acts": [_round(a, 3) or 0 for a in acts]}


def _hist_from_quantiles(qs: Optional[Sequence[Optional[float]]], n_contexts: int) -> Optional[dict[str, Any]]:
    """Until the sampler fills latent_histograms: per-context max activation, from latents.quantiles
    (each gap between two quantile levels holds that share of the firing contexts)."""
    pairs = [(lv, q) for lv, q in zip(QUANTILE_LEVELS, qs or []) if q is not None and math.isfinite(q)]
    if len(pairs) < 2:
        return None
    edges = [_round(q) for _, q in pairs]
    counts = [round((b[0] - a[0]) * n_contexts, 1) for a, b in zip(pairs, pairs[1:])]
    return {"source": "quantiles", "edges": edges, "counts": counts,
            "levels": [lv for lv, _ in pairs]}


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _round(v: Any, digits: int = 4) -> Any:
    """Floats to `digits` significant digits (JSON size), non-finite ones to None."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}")
    return v


def dictionary_name(con: duckdb.DuckDBPyConnection, dict_id: int) -> str:
    r = con.execute("SELECT name FROM dictionaries WHERE id = ?", [dict_id]).fetchone()
    if r is None:
        raise ExplainerError(f"dictionary {dict_id} not found in this DB (pass --dict with a name `explainer status` lists)")
    return str(r[0])
