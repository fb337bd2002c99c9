"""Where the sampler's contexts rows go: the DB's contexts table, or Parquet files.

The contexts rows (every window the sampler ran, ~275 B each in DuckDB) grow with the corpus,
not with the dictionary, and shards on many machines should not each grow a DB of them only
to copy it into another.
With `--parquet DIR` a run writes its contexts as Parquet, one file per checkpoint, and its
sampler state beside them; `merge DIR` (or the end of an unsharded run) writes latents and
examples into the DB and copies in only the contexts those examples use. DuckDB reads the
rest in place: SELECT ... FROM read_parquet('DIR/contexts/*/*.parquet').

Layout of DIR (one dictionary, any number of shards of one run):
    dictionary.json                          the dictionary row; a folder never mixes two
    contexts/shard=I-of-N/part-<first id>.parquet
    state/shard-I-of-N.pt                    sampler state: resume point, then merge input
A part is renamed into place before the state that counts it is saved, so on resume the parts
starting at or past the saved position are exactly the ones to delete (as rows in the DB case).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from explainer.corpus.contexts import Context
from explainer.errors import ExplainerError
from explainer.store import db as store

DICT_FIELDS = ("name", "path", "model", "hook", "d_in", "d_sae", "k", "fingerprint", "config")


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DbContexts:
    """Contexts rows in the DB's contexts table (the default)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, dict_id: int, shard: tuple[int, int]) -> None:
        self.con, self.dict_id, self.shard = con, dict_id, shard

    def write(self, table: pa.Table) -> None:
        """Append rows; call inside the checkpoint's transaction."""
        store.insert_arrow(self.con, "contexts", table.add_column(0, "dict_id", pa.array(
            [self.dict_id] * table.num_rows, pa.int32())))

    def delete_from(self, start: int) -> None:
        self.con.execute("DELETE FROM contexts WHERE dict_id = ? AND context_id >= ? AND context_id % ? = ?",
                         [self.dict_id, start, self.shard[1], self.shard[0]])

    def count_below(self, below: int) -> int:
        return store.one_row(self.con.execute(
            "SELECT count(*) FROM contexts WHERE dict_id = ? AND context_id < ? AND context_id % ? = ?",
            [self.dict_id, below, self.shard[1], self.shard[0]]))[0]

    def relation(self) -> str:
        return f"(SELECT * FROM contexts WHERE dict_id = {int(self.dict_id)})"

    def finish(self) -> None:
        """Nothing to do: the rows are in the DB already."""


class ParquetContexts:
    """Contexts rows as Parquet files under a --parquet folder; see the module docstring."""

    def __init__(self, con: duckdb.DuckDBPyConnection, dict_id: int, shard: tuple[int, int], folder: Path,
                 dictionary: dict[str, Any]) -> None:
        self.con, self.dict_id, self.shard, self.folder = con, dict_id, shard, Path(folder)
        i, n = shard
        self.parts = self.folder / "contexts" / f"shard={i}-of-{n}"
        self.state_path = self.folder / "state" / f"shard-{i}-of-{n}.pt"
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            self.state_path.parent.mkdir(exist_ok=True)
        except OSError as e:
            raise ExplainerError(f"--parquet {folder}: cannot create the folder ({e.strerror}); choose a writable path") from None
        claim_folder(self.folder, dictionary)

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        first = int(table.column("context_id")[0].as_py())
        final = self.parts / f"part-{first:012d}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)

    def _files(self) -> list[tuple[int, Path]]:
        for tmp in self.parts.glob("*.tmp"):  # a kill mid-write
            tmp.unlink()
        return sorted((int(p.stem.split("-")[1]), p) for p in self.parts.glob("part-*.parquet"))

    def delete_from(self, start: int) -> None:
        for first, path in self._files():
            if first >= start:
                path.unlink()

    def count_below(self, below: int) -> int:
        files = [p for first, p in self._files() if first < below]
        return sum(pq.ParquetFile(p).metadata.num_rows for p in files)

    def relation(self) -> str:
        return parquet_relation(self.folder)

    def finish(self) -> None:
        """Copy into the DB the contexts this dictionary's examples use (call inside the final transaction)."""
        self.con.execute("DELETE FROM contexts WHERE dict_id = ?", [self.dict_id])  # rows of an earlier DB-mode try
        copy_used_contexts(self.con, self.dict_id, [self.relation()])


def claim_folder(folder: Path, dictionary: dict[str, Any]) -> None:
    """Write dictionary.json, or check that the folder's one matches (a folder holds one dictionary)."""
    meta = folder / "dictionary.json"
    row = {k: dictionary[k] for k in DICT_FIELDS}
    if meta.exists():
        old = read_dictionary(folder)
        if old["fingerprint"] != row["fingerprint"]:
            raise ExplainerError(f"--parquet {folder} holds samples of another dictionary ({old['name']!r}); "
                                 "use one folder per dictionary")
        return
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, meta)


def read_dictionary(folder: Path) -> dict[str, Any]:
    try:
        row = json.loads((folder / "dictionary.json").read_text())
        return {k: row[k] for k in DICT_FIELDS}
    except (OSError, ValueError, KeyError) as e:
        raise ExplainerError(
            f"{folder}/dictionary.json is unreadable ({e}); that folder is not a `sample --parquet` output") from None


def is_parquet_folder(path: Path) -> bool:
    return path.is_dir() and (path / "dictionary.json").exists()


def parquet_relation(folder: Path) -> str:
    glob = str(Path(folder).resolve() / "contexts" / "*" / "*.parquet")
    return f"read_parquet({_sql_str(glob)})"


def state_files(folder: Path) -> list[Path]:
    return sorted((folder / "state").glob("shard-*.pt"))


def copy_used_contexts(con: duckdb.DuckDBPyConnection, dict_id: int, relations: list[str]) -> None:
    """Insert the contexts this dictionary's examples use and the DB lacks, read from `relations`."""
    if not relations:
        return
    union = " UNION ALL ".join(f"SELECT context_id, doc_id, split, token_ids, tokens FROM {r}" for r in relations)
    con.execute(f"""
        INSERT INTO contexts
        SELECT ? AS dict_id, c.context_id, c.doc_id, c.split, c.token_ids, c.tokens FROM ({union}) c
        WHERE c.context_id IN (SELECT context_id FROM examples WHERE dict_id = ?)
          AND c.context_id NOT IN (SELECT context_id FROM contexts WHERE dict_id = ?)""", [dict_id, dict_id, dict_id])


def pending_table(rows: list, token_strings: Any) -> pa.Table:
    """Arrow rows (without dict_id) for a batch of corpus contexts."""
    return pa.table({
        "context_id": pa.array([c.context_id for c in rows], pa.int64()),
        "doc_id": pa.array([c.doc_id for c in rows], pa.string()),
        "split": pa.array([c.split for c in rows], pa.string()),
        "token_ids": pa.array([c.token_ids for c in rows], pa.list_(pa.int32())),
        "tokens": pa.array([token_strings(c.token_ids) for c in rows], pa.list_(pa.string())),
    })


def sink(con: duckdb.DuckDBPyConnection, dict_id: int, shard: tuple[int, int], parquet: Optional[str],
         dictionary: dict[str, Any]) -> DbContexts | ParquetContexts:
    if parquet:
        return ParquetContexts(con, dict_id, shard, Path(parquet), dictionary)
    return DbContexts(con, dict_id, shard)


class Pending:
    """Contexts rows waiting for the next checkpoint, and where they go (DB table or Parquet)."""

    def __init__(self, contexts: DbContexts | ParquetContexts, token_strings: Callable[[list[int]], list[str]]) -> None:
        self.contexts, self.token_strings = contexts, token_strings
        self.rows: list[Context] = []

    def write(self) -> None:
        if self.rows:
            self.contexts.write(pending_table(self.rows, self.token_strings))
        self.rows = []
