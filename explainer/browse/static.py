"""`explainer browse --out DIR`: a compact static site that works from file:// with no server.

DIR/index.html is the index shell; DIR/data/index_K.js hold its rows in the default (spread)
order, CHUNK rows each; DIR/latent.html renders any latent from DIR/data/shard_K.js, which holds
the pages of latents K*SHARD .. K*SHARD+SHARD-1 (latent.html#123). Data files are .js assigning to
a global, since a file:// page cannot fetch() JSON but can load a script. Examples are cut to a
window of tokens around their maximum, and the index and shards share nothing per latent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import duckdb

from explainer.browse import data, render
from explainer.errors import ExplainerError

CHUNK = 5000   # index rows per data file: ~0.5 MB, a page loads one
SHARD = 1024   # latents per shard file
WINDOW = 32    # tokens kept per example
PER_KIND = 5   # examples per kind and split


def build(con: duckdb.DuckDBPyConnection, dict_id: int, out: Path,
          progress: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Write the site into `out`; returns what was written (latents, files, bytes)."""
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainerError(f"browse --out {out}: cannot create that folder ({e.strerror or e}); pass another --out") from None
    name = data.dictionary_name(con, dict_id)
    have = data.tables(con)
    total = data.snapshot(con, dict_id)
    written: list[Path] = []
    config = {"mode": "static", "total": total, "chunk": CHUNK, "shard": SHARD}
    written.append(_write(out / "index.html", render.index_page(name, config, data.overview(con))))
    written.append(_write(out / "latent.html", render.latent_shell(f"{name}: latent", {"mode": "static", "shard": SHARD})))
    for k, chunk in enumerate(index_chunks(con)):
        written.append(_write(out / "data" / f"index_{k}.js", chunk))
    ids = data.latent_ids(con, dict_id)
    done = 0
    for s, lats in shards(ids).items():
        written.append(_write(out / "data" / f"shard_{s}.js", shard_text(con, dict_id, s, lats, have)))
        done += len(lats)
        if progress is not None:
            progress({"done": done, "total": len(ids)})
    size = sum(p.stat().st_size for p in written)
    return {"latents": len(ids), "files": len(written), "bytes": size,
            "bytes_per_latent": round(size / max(len(ids), 1)), "index": str(out / "index.html")}


def index_chunks(con: duckdb.DuckDBPyConnection) -> Iterator[str]:
    """The snapshot's rows in the default order, CHUNK per data file (rows as arrays: no repeated keys)."""
    cur = con.execute(f"SELECT {', '.join(data.COLUMNS)} FROM {data.INDEX} ORDER BY spread")
    k = 0
    while batch := cur.fetchmany(CHUNK):
        rows = [[data._round(v) for v in r] for r in batch]
        yield f"window.EXPLAINER_INDEX[{k}]={render.json_for_script(rows)};\n"
        k += 1


def shards(latents: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for lat in latents:
        out.setdefault(lat // SHARD, []).append(lat)
    return out


def shard_text(con: duckdb.DuckDBPyConnection, dict_id: int, s: int, latents: Sequence[int], have: set[str]) -> str:
    """The data file of shard `s`: each latent's page data (train examples, cut to WINDOW tokens)."""
    pages = data.payloads(con, dict_id, latents, have=have, per_kind=PER_KIND, splits=("train",), window=WINDOW)
    body = render.json_for_script({str(lat): p for lat, p in pages.items()})
    return f"window.EXPLAINER_SHARD=window.EXPLAINER_SHARD||{{}};window.EXPLAINER_SHARD[{s}]={body};\n"


def _write(path: Path, page: str) -> Path:
    # utf-8 whatever the locale: the pages declare it, and tokens are any Unicode.
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExplainerError(f"browse: cannot write {path} ({e.strerror or e}); free space or pass another --out") from None
    return path
