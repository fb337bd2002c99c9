"""Explanations made elsewhere, imported as `explanations` rows so `score` and `labels` treat them as ours.

Sources: a CSV, JSONL or Parquet table with columns latent and explanation (optional: source,
model); a delphi explanations folder (one file per latent, named `<hookpoint>_latent<N>.txt`,
holding the explanation as a JSON string); a Neuronpedia export (a JSON list of objects with
`index` and `description`, or `explanations: [...]` each with a `description`, and
`explanationModelName`). The whole file is read and checked before anything is written, then
the rows go in one transaction: a bad line leaves the DB as it was.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import duckdb

from explainer.errors import ExplainerError
from explainer.results import StageResult
from explainer.store import db as store
from explainer.store.rows import StageRows, explanation_row

EXPLAINER = "import"
UNKNOWN_MODEL = "unknown"  # a file that does not say which model wrote it
# delphi names each file str(Latent): f"{module_name}_latent{latent_index}"; older versions wrote .json.
_DELPHI_NAME = re.compile(r"^(?P<module>.+)_latent(?P<latent>\d+)\.(txt|json)$")


@dataclass
class ImportResult(StageResult):
    run_id: int
    dict_id: int
    path: str
    format: str
    rows_read: int = 0
    imported: int = 0
    skipped: int = 0  # identical (latent, text, source) already in the DB or repeated in the file
    latents: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"file": self.path, "format": self.format, "rows read": self.rows_read,
                "imported": self.imported, "skipped (already imported)": self.skipped,
                "latents": self.latents}


@dataclass
class Entry:
    """One explanation read from a file, with where it was (for error messages)."""

    where: str  # "line 3", "row 3", "item 3" or a delphi file name
    latent: Any
    text: Any
    source: Any = None
    model: Any = None


def run(con: duckdb.DuckDBPyConnection, path: Path, dict_id: int, *, source: Optional[str] = None,
        model: Optional[str] = None) -> ImportResult:
    """Import the explanations in `path` for dictionary `dict_id` as one recorded run (stage
    "import"). `source` and `model` override what the file records (the default source names the
    format and file, e.g. 'csv:labels.csv'; the default model is the file's, else 'unknown')."""
    t0 = time.perf_counter()
    fmt, default_source, entries = read(path)
    d_sae = store.one_row(con.execute("SELECT d_sae FROM dictionaries WHERE id = ?", [dict_id]))[0]
    rows = [_checked(path, e, d_sae, source or _text(e.source) or default_source, model or _text(e.model))
            for e in entries]
    if not rows:
        raise ExplainerError(f"{path}: holds no explanations (expected columns latent and explanation)")
    present = set(con.execute(
        "SELECT latent, text, template FROM explanations WHERE dict_id = ? AND explainer = ?",
        [dict_id, EXPLAINER]).fetchall())
    run_id = store.start_run(con, "import", {"import": {"path": str(path), "format": fmt, "source": source,
                                                        "model": model}})
    result = ImportResult(run_id, dict_id, str(path), fmt, rows_read=len(rows))
    with store.recorded_run(con, run_id, result, t0):
        stage = StageRows()
        for latent, text, template, row_model in rows:
            if (latent, text, template) in present:
                result.skipped += 1
                continue
            present.add((latent, text, template))
            stage.add("explanations", explanation_row(
                dict_id=dict_id, latent=latent, explainer=EXPLAINER, model=row_model or UNKNOWN_MODEL,
                template=template, template_hash=None, status="ok", text=text, run_id=run_id,
                prompt_tokens=None, completion_tokens=None, cost=0.0))
        result.imported = len(stage)
        result.latents = len({r["latent"] for r in stage.tables.get("explanations", [])})
        stage.commit(con)
    return result


def read(path: Path) -> tuple[str, str, list[Entry]]:
    """(format, default source, entries) of a file or delphi folder; raises ExplainerError on a
    file that cannot be read as any of them."""
    if path.is_dir():
        return "delphi", "delphi", list(_delphi(path))
    if not path.is_file():
        raise ExplainerError(f"{path}: no such file or folder (pass a CSV, JSONL, Parquet or Neuronpedia JSON "
                             "file, or a delphi explanations folder)")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet", f"parquet:{path.name}", list(_parquet(path))
    if name.endswith(".csv"):
        return "csv", f"csv:{path.name}", list(_csv(path, _decoded(path, path.read_bytes())))
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        entries = _jsonl(path, _decoded(path, _raw(path)))
        if any(e.source is _NEURONPEDIA for e in entries):
            return "neuronpedia", "neuronpedia", [_unmarked(e) for e in entries]
        return "jsonl", f"jsonl:{path.name}", entries
    if name.endswith(".json"):
        return "neuronpedia", "neuronpedia", list(_neuronpedia(path, _decoded(path, path.read_bytes())))
    raise ExplainerError(f"{path}: unknown file type (use .csv, .jsonl, .parquet, a Neuronpedia .json, "
                         "or a delphi explanations folder)")


def _checked(path: Path, e: Entry, d_sae: int, template: str,
             model: Optional[str]) -> tuple[int, str, str, Optional[str]]:
    """(latent, text, template, model) of an entry, or the one error naming its file and place."""
    latent = e.latent
    if isinstance(latent, float) and latent.is_integer():
        latent = int(latent)
    elif isinstance(latent, str) and re.fullmatch(r"\s*-?\d+\s*", latent):
        latent = int(latent)
    if not isinstance(latent, int) or isinstance(latent, bool):
        raise ExplainerError(f"{path} {e.where}: latent {latent!r} is not an integer (latents are 0-based indices)")
    if not 0 <= latent < d_sae:
        raise ExplainerError(f"{path} {e.where}: latent {latent} is outside the dictionary (0..{d_sae - 1}); "
                             "import into the dictionary it belongs to with --dict NAME")
    if e.text is not None and not isinstance(e.text, str):
        raise ExplainerError(f"{path} {e.where}: explanation {e.text!r} is not text")
    text = (e.text or "").strip()
    if not text:
        raise ExplainerError(f"{path} {e.where}: empty explanation for latent {latent} "
                             "(remove that row or fill it in)")
    return latent, text, template, model


def _text(value: Any) -> Optional[str]:
    """An optional column's value: None when missing or blank."""
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _raw(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ExplainerError(f"{path}: not a readable gzip file ({e})") from None
    return data


def _decoded(path: Path, data: bytes) -> str:
    """UTF-8 text (a BOM allowed), or an error naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ExplainerError(f"{path} line {line}: not UTF-8 text (save the file as UTF-8)") from None


def _missing(path: Path, found: list[str]) -> ExplainerError:
    return ExplainerError(f"{path}: needs columns latent and explanation (found: {', '.join(found) or 'none'})")


def _csv(path: Path, text: str) -> Iterator[Entry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    if "latent" not in fields or "explanation" not in fields:
        raise _missing(path, fields)
    try:
        for row in reader:
            yield Entry(f"line {reader.line_num}", row.get("latent"), row.get("explanation"),
                        row.get("source"), row.get("model"))
    except csv.Error as e:
        raise ExplainerError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None


_NEURONPEDIA = object()  # marks an entry read under Neuronpedia's field names


def _jsonl(path: Path, text: str) -> list[Entry]:
    """Our columns, or Neuronpedia's bulk-export field names (those entries carry the
    _NEURONPEDIA mark as their source, so the caller can name the format)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExplainerError(f"{path} line {n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ExplainerError(f"{path} line {n}: not a JSON object")
        if "latent" in obj and "explanation" in obj:
            out.append(Entry(f"line {n}", obj["latent"], obj["explanation"], obj.get("source"), obj.get("model")))
        elif "index" in obj and "description" in obj:
            out.append(Entry(f"line {n}", obj["index"], obj["description"], _NEURONPEDIA,
                             obj.get("explanationModelName")))
        else:
            raise _missing(path, list(obj))
    return out


def _unmarked(e: Entry) -> Entry:
    if e.source is _NEURONPEDIA:
        e.source = None
    return e


def _neuronpedia(path: Path, text: str) -> Iterator[Entry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExplainerError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("latents"), list):
        data = data["latents"]  # our own `explainer export` JSON
    if not isinstance(data, list):
        raise ExplainerError(f"{path}: expected a Neuronpedia export, a JSON list of objects with index and description")
    for n, obj in enumerate(data, 1):
        if not isinstance(obj, dict) or "index" not in obj:
            raise ExplainerError(f"{path} item {n}: expected an object with index and description")
        nested = obj.get("explanations")
        if isinstance(nested, list):  # a feature with its explanations
            for item in nested:
                item = item if isinstance(item, dict) else {"description": item}
                yield Entry(f"item {n}", obj["index"], item.get("description"), None,
                            item.get("explanationModelName") or item.get("model"))
        else:
            yield Entry(f"item {n}", obj["index"], obj.get("description"), None, obj.get("explanationModelName"))


def _parquet(path: Path) -> Iterator[Entry]:
    import pyarrow as pa  # ~0.5 s to import: only a Parquet import pays it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ExplainerError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if "latent" not in table.column_names or "explanation" not in table.column_names:
        raise _missing(path, table.column_names)
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("latent", "explanation", "source", "model")}
    for i in range(table.num_rows):
        yield Entry(f"row {i + 1}", cols["latent"][i], cols["explanation"][i], cols["source"][i], cols["model"][i])


def _delphi(folder: Path) -> Iterator[Entry]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    modules = set()
    for p in files:
        m = _DELPHI_NAME.match(p.name)
        if m is None:
            raise ExplainerError(f"{p}: not a delphi explanation file (named <hookpoint>_latent<N>.txt); "
                                 "pass a folder that holds only delphi's explanations")
        modules.add(m.group("module"))
        if len(modules) > 1:
            raise ExplainerError(f"{folder}: holds explanations of several hookpoints ({', '.join(sorted(modules))}); "
                                 "copy one hookpoint's files into a folder of their own and import that")
        text = _decoded(p, p.read_bytes())
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExplainerError(f"{p} line {e.lineno}: not a JSON string ({e.msg})") from None
        if isinstance(value, dict):  # early delphi saved {"explanation": ..., "response": ...}
            value = value.get("explanation")
        yield Entry(p.name, int(m.group("latent")), value)
