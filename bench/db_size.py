"""DuckDB (and Parquet) bytes per example row and per context, for the DB-size arithmetic in docs/scaling.md.

    python bench/db_size.py [--latents 2000] [--contexts 100000]

Examples: per latent and split, 20 top + 20 quantile + 20 non-activating + 10 random rows of
64 float32 activations, shaped like a TopK latent's: a top or quantile row fires on 1-5 of
its 64 tokens, a non-activating row is all zeros, a random row fires in 5% of cases.
Contexts: 64 token ids drawn from a Zipf law over a 50k vocabulary, with their strings.
Sizes are of the file after CHECKPOINT, less the empty schema's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explainer.store import db as store

KINDS = (("top", 20), ("quantile", 20), ("nonactivating", 20), ("random", 10))
SPLITS = ("train", "validation", "heldout")


def example_rows(n_latents: int, rng: np.random.Generator) -> pa.Table:
    cols: dict[str, list] = {
        k: [] for k in ("dict_id", "latent", "split", "kind", "rank", "context_id", "max_act", "acts", "bin")}
    for lat in range(n_latents):
        for split in SPLITS:
            for kind, n in KINDS:
                for rank in range(n):
                    acts = np.zeros(64, np.float32)
                    if kind in ("top", "quantile") or (kind == "random" and rng.random() < 0.05):
                        m = int(rng.integers(1, 6))
                        acts[rng.choice(64, m, replace=False)] = rng.gamma(2.0, 1.5, m).astype(np.float32)
                    cols["dict_id"].append(1)
                    cols["latent"].append(lat)
                    cols["split"].append(split)
                    cols["kind"].append(kind)
                    cols["rank"].append(rank)
                    cols["context_id"].append(int(rng.integers(0, 30_000_000)))
                    cols["max_act"].append(float(acts.max()))
                    cols["acts"].append(acts.tolist())
                    cols["bin"].append(rank % 5 if kind == "quantile" else None)
    schema = pa.schema([("dict_id", pa.int32()), ("latent", pa.int32()), ("split", pa.string()), ("kind", pa.string()),
                        ("rank", pa.int32()), ("context_id", pa.int64()), ("max_act", pa.float32()),
                        ("acts", pa.list_(pa.float32())), ("bin", pa.int32())])
    return pa.table(cols, schema=schema)


def context_rows(n: int, rng: np.random.Generator) -> pa.Table:
    words = [f" w{i}" if i % 3 else f"tok{i}" for i in range(50_000)]
    ids = np.minimum(rng.zipf(1.2, size=(n, 64)), 49_999).astype(np.int32)
    return pa.table({
        "dict_id": pa.array([1] * n, pa.int32()), "context_id": pa.array(range(n), pa.int64()),
        "doc_id": [f"doc{i // 20}" for i in range(n)], "split": ["train"] * n,
        "token_ids": pa.array(ids.tolist(), pa.list_(pa.int32())), "tokens": [[words[j] for j in row] for row in ids.tolist()],
    })


def size_of(table_name: str, data: pa.Table) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "size.duckdb")
        con = store.connect(path)
        con.execute("CHECKPOINT")
        empty = os.path.getsize(path)
        store.insert_arrow(con, table_name, data)
        con.execute("CHECKPOINT")
        con.close()
        return os.path.getsize(path) - empty


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=int, default=2000)
    ap.add_argument("--contexts", type=int, default=100_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ex = example_rows(args.latents, rng)
    b = size_of("examples", ex)
    print(f"examples: {ex.num_rows:,} rows for {args.latents:,} latents: {b / 1e6:.1f} MB = {b / ex.num_rows:.0f} B/row, "
          f"{b / args.latents / 1e3:.1f} KB/latent, {b / args.latents * 1e6 / 1e9:.1f} GB per million latents")
    ctx = context_rows(args.contexts, rng)
    b = size_of("contexts", ctx)
    print(f"contexts: {args.contexts:,} rows of 64 tokens: {b / 1e6:.1f} MB = {b / args.contexts:.0f} B/context")
    with tempfile.TemporaryDirectory() as tmp:  # as `sample --parquet` writes them (zstd, no dict_id column)
        path = os.path.join(tmp, "part.parquet")
        pq.write_table(ctx.drop_columns(["dict_id"]), path, compression="zstd")
        b = os.path.getsize(path)
    print(f"contexts as Parquet: {b / 1e6:.1f} MB = {b / args.contexts:.0f} B/context")


if __name__ == "__main__":
    main()
