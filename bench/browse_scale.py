"""The browser at scale: a synthetic DB of N latents, then index and latent-page latency through
`browse --serve` and the static export's bytes per latent.

    python bench/browse_scale.py [--latents 1000000] [--examples 10] [--db /tmp/x.duckdb] [--keep]
    python bench/browse_scale.py --db runs/explainer.duckdb --existing     # measure a real DB

What the synthetic DB holds (built with SQL generate_series/range, deterministic by hash):
- latents: N rows, frequency log-uniform in 1e-6..1e-1, quantiles, max/mean activation;
- explanations: one n-gram label per latent from a 5,000-word vocabulary (two words each);
- scores: a validation and a held-out simulation score per explanation (2N rows), so `labels` selects;
- contexts: 100,000 windows of 64 tokens; examples: --examples per latent (half top, half quantile in
  5 bins) in the train split, each 64 activations with 1-2 nonzero tokens;
- latent_logits: 5 top + 5 bottom tokens per latent; latent_neighbours: 5 per latent;
  latent_histograms: 20 bins per latent.
The issue asks ~100 examples per latent; 1M x 100 x 64 float32 is ~25 GB raw, more than this
machine's disk and time allow, so the default is 10 (say what you ran).

Latencies are wall times of HTTP requests to a server on 127.0.0.1 (one client, after one warm-up
request each); the static export is measured on the full index and the first --shards shards.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explainer.browse import data, server, static
from explainer.store import db as store

CONTEXTS = 100_000
WORDS = 5_000


def build(path: Path, n: int, per_latent: int) -> float:
    t0 = time.perf_counter()
    con = store.connect(path)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('synthetic', '/x', 'm', 'layers.1', 64, ?, 32, 'fp', '{}', now())", [n])
    # hash() is UBIGINT, which list indexing refuses: a BIGINT below 2^30 instead.
    con.execute("CREATE TEMP MACRO hh(x) AS CAST(hash(x) % 1073741824 AS BIGINT)")
    con.execute(f"""CREATE TEMP TABLE words AS
                    SELECT i, CASE WHEN i % 3 = 0 THEN 'tok' || i ELSE ' w' || i END AS w FROM range({WORDS}) t(i)""")
    con.execute("CREATE TEMP TABLE wl AS SELECT list(w ORDER BY i) AS ws FROM words")
    u = "((hh(i * 7 + 1) % 1000000) / 1e6)"
    con.execute(f"""INSERT INTO latents
        SELECT 1, i, pow(10, -6 + 5 * {u}) AS f, CAST(f * 1e6 AS BIGINT), 1000000, CAST(f * 1e4 AS BIGINT) + 1,
               2 + 8 * {u}, 1 + {u}, [0.5, 0.8, 1.2, 1.8, 2.5, 3.5]
        FROM range(?) t(i) ORDER BY i""", [n])
    con.execute(f"""INSERT INTO explanations (id, dict_id, latent, explainer, model, text, status, created_at)
        SELECT i + 1, 1, i, 'ngram', 'ngram',
               'fires on "' || ws[1 + hh(i) % {WORDS}] || '" (strong); "' || ws[1 + hh(i + 99) % {WORDS}] || '" (medium)',
               'ok', now()
        FROM range(?) t(i), wl ORDER BY i""", [n])
    con.execute(f"""INSERT INTO scores (id, explanation_id, dict_id, latent, scorer, mode, model, split, score, n_snippets,
                                        snippet_set, ci_low, ci_high, baseline, status, created_at)
        SELECT 2 * i + s + 1, i + 1, 1, i, 'simulation', 'ngram', 'ngram', CASE s WHEN 0 THEN 'validation' ELSE 'heldout' END,
               {u} * 0.9 + s * 0.05, 30, 'set' || i, {u} * 0.8, {u}, 0.0, 'ok', now()
        FROM range(?) t(i), range(2) k(s) ORDER BY i, s""", [n])
    # The ids above were given, not drawn: move the sequences past them, so `explain` and `score`
    # can add rows to this DB (a primary-key clash otherwise).
    con.execute("SELECT max(nextval('explanation_ids')) FROM range(?)", [n])
    con.execute("SELECT max(nextval('score_ids')) FROM range(?)", [2 * n])
    con.execute(f"""INSERT INTO contexts
        SELECT 1, c, 'doc' || c // 10, 'train', list_transform(range(64), lambda j: CAST(hh(c * 64 + j) % {WORDS} AS INTEGER)),
               list_transform(range(64), lambda j: ws[1 + hh(c * 64 + j) % {WORDS}])
        FROM range({CONTEXTS}) t(c), wl""")
    half = max(per_latent // 2, 1)
    con.execute(f"""INSERT INTO examples
        SELECT 1, i, 'train', CASE WHEN k < {half} THEN 'top' ELSE 'quantile' END, k % {half},
               hh(i * 131 + k) % {CONTEXTS}, v, list_transform(range(64), lambda j: CASE WHEN j = p THEN v
                                                                WHEN j = p + 1 THEN v / 2 ELSE 0.0 END),
               CASE WHEN k < {half} THEN NULL ELSE (k - {half}) % 5 END
        FROM (SELECT i, k, CAST(hh(i + k) % 60 AS INTEGER) AS p, CAST(1 + (hh(i * 3 + k) % 1000) / 100.0 AS REAL) AS v
              FROM range(?) t(i), range({per_latent}) e(k)) ORDER BY i, k""", [n])
    con.execute(f"""INSERT INTO latent_logits
        SELECT 1, i, CASE WHEN r < 5 THEN 'top' ELSE 'bottom' END, r % 5, CAST(hh(i * 11 + r) % {WORDS} AS INTEGER),
               ws[1 + hh(i * 11 + r) % {WORDS}], CASE WHEN r < 5 THEN 3.0 - r * 0.3 ELSE -3.0 + (r - 5) * 0.3 END
        FROM range(?) t(i), range(10) q(r), wl ORDER BY i, r""", [n])
    con.execute("""INSERT INTO latent_neighbours
        SELECT 1, i, 'decoder_cosine', r, CAST(hh(i * 17 + r) % ? AS INTEGER), 0.9 - r * 0.1
        FROM range(?) t(i), range(5) q(r) ORDER BY i, r""", [n, n])
    con.execute("""INSERT INTO latent_histograms
        SELECT 1, i, list_transform(range(21), lambda j: CAST(j * 0.5 AS REAL)),
               list_transform(range(20), lambda j: CAST(hh(i * 20 + j) % 100 AS BIGINT))
        FROM range(?) t(i) ORDER BY i""", [n])
    con.execute("CHECKPOINT")
    con.close()
    return time.perf_counter() - t0


def timed(fetch: str, base: str, reps: int = 1) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + fetch, timeout=600) as r:
            r.read()
        out.append(time.perf_counter() - t0)
    return out


def measure(path: Path, shards_to_write: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    con = store.connect(path, read_only=True)
    n = con.execute("SELECT count(*) FROM latents").fetchone()[0]  # type: ignore[index]
    ex = con.execute("SELECT count(*) FROM examples").fetchone()[0]  # type: ignore[index]
    rows += [("latents", f"{n:,}"), ("examples", f"{ex:,}"), ("DB file", f"{path.stat().st_size / 1e6:,.0f} MB")]
    t0 = time.perf_counter()
    app = server.Browser(con, store.dictionary_id(con, None))
    rows.append(("server start (labels snapshot + overview)", f"{time.perf_counter() - t0:.2f} s"))
    httpd = server.make_server(app, 0)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    word = (con.execute(f"SELECT explanation FROM {data.INDEX} WHERE explanation IS NOT NULL LIMIT 1 OFFSET 7").fetchone()
            or ["the"])[0].split('"')[1].strip() if n else "x"
    queries = {
        "index: default (spread) page 1": "/api/latents",
        "index: default, page 2,000 (offset 100k)": "/api/latents?offset=100000",
        "index: sort validation desc": "/api/latents?sort=validation&desc=1",
        "index: sort frequency asc": "/api/latents?sort=frequency",
        "index: sort explanation (text)": "/api/latents?sort=explanation",
        f"index: search {word!r}": f"/api/latents?q={urllib.request.quote(word)}",
        "index: search + filter + sort": f"/api/latents?q={urllib.request.quote(word)}&min_freq=1e-4&sort=validation&desc=1",
        "index: search, no match": "/api/latents?q=zzzzqqq",
        "index HTML (/)": "/",
    }
    for name, q in queries.items():
        timed(q, base)
        ts = timed(q, base, 3)
        rows.append((name, f"{statistics.median(ts) * 1000:.0f} ms (median of 3)"))
    rnd = random.Random(0)
    lats = [rnd.randrange(n) for _ in range(20)] if n else []
    for kind, fmt in (("latent page /latent/N", "/latent/{}"), ("latent JSON /api/latent/N", "/api/latent/{}")):
        if lats:
            timed(fmt.format(lats[0]), base)
            ts = [timed(fmt.format(lat), base)[0] for lat in lats]
            rows.append((kind, f"median {statistics.median(ts) * 1000:.0f} ms, max {max(ts) * 1000:.0f} ms (20 random latents)"))
    httpd.shutdown()
    httpd.server_close()
    # Static export: the whole index, the first shards; bytes as the site would hold them.
    t0 = time.perf_counter()
    index_bytes = sum(len(c.encode()) for c in static.index_chunks(con))
    t_index = time.perf_counter() - t0
    ids = data.latent_ids(con, app.dict_id)
    have = data.tables(con)
    shard_bytes = shard_latents = 0
    t0 = time.perf_counter()
    for s, group in list(static.shards(ids).items())[:shards_to_write]:
        shard_bytes += len(static.shard_text(con, app.dict_id, s, group, have).encode())
        shard_latents += len(group)
    t_shards = time.perf_counter() - t0
    per = index_bytes / max(n, 1) + shard_bytes / max(shard_latents, 1)
    rows += [("static: index data", f"{index_bytes / 1e6:,.1f} MB ({index_bytes / max(n, 1):.0f} B/latent), {t_index:.1f} s"),
             (f"static: {shard_latents:,} latents in shards", f"{shard_bytes / 1e6:,.1f} MB "
              f"({shard_bytes / max(shard_latents, 1):,.0f} B/latent), {t_shards:.1f} s "
              f"({t_shards / max(shard_latents, 1) * 1000:.1f} ms/latent)"),
             ("static: bytes per latent (index + shard)", f"{per:,.0f} B = {per / 147_000:.1%} of the old 147 KB page")]
    con.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=1_000_000)
    ap.add_argument("--examples", type=int, default=10, help="examples per latent (train split)")
    ap.add_argument("--db", type=Path, default=None, help="where to build (default: a temp folder)")
    ap.add_argument("--existing", action="store_true", help="measure --db as it is; build nothing")
    ap.add_argument("--shards", type=int, default=4, help="static shards to render for the size (1,024 latents each)")
    ap.add_argument("--keep", action="store_true", help="keep the built DB")
    args = ap.parse_args()
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory()
        args.db = Path(tmp.name) / "browse_scale.duckdb"
    rows = []
    if not args.existing:
        args.db.unlink(missing_ok=True)
        secs = build(args.db, args.latents, args.examples)
        rows.append(("build", f"{secs:.0f} s ({args.latents:,} latents, {args.examples} examples each)"))
    rows += measure(args.db, args.shards)
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    if not args.keep and not args.existing:
        args.db.unlink(missing_ok=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
