"""Streaming readers for file corpora: text, folders, JSONL, Parquet, datasets.

Every reader is a generator of (doc_id, text) that holds at most one bounded piece of its
input: a file is read in blocks, a record or a run of text without paragraph breaks longer
than MAX_DOC_CHARS is cut into documents of at most that many characters. (A 50 MB line
used to reach the tokenizer whole and cost gigabytes.) Any bad record raises ExplainerError
naming the file and the line or row; nothing else escapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from explainer.errors import ExplainerError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
# ~25k tokens: long enough that ordinary documents are never cut, short enough that one
# tokenizer call stays in megabytes.
MAX_DOC_CHARS = 100_000
PARAGRAPH_CHARS = 2000  # a single text file is grouped into documents of whole paragraphs this long
READ_CHARS = 1 << 20

Doc = tuple[str, str]


def cut(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at whitespace where there is some
    in the last tenth of a piece, so words survive."""
    pieces = []
    while len(text) > limit:
        at = max(text.rfind(" ", limit - limit // 10, limit), text.rfind("\n", limit - limit // 10, limit))
        at = at + 1 if at > 0 else limit
        pieces.append(text[:at])
        text = text[at:]
    pieces.append(text)
    return pieces


def _pieces(name: str, text: str) -> Iterator[Doc]:
    """One record's text as documents: its own id when it fits, `id.k` for the pieces when not."""
    if len(text) <= MAX_DOC_CHARS:
        yield name, text
    else:
        for k, piece in enumerate(cut(text)):
            yield f"{name}.{k}", piece


def _open_text(path: Path, shown: str) -> Any:
    try:
        return path.open(encoding="utf-8")
    except OSError as e:
        raise ExplainerError(
            f"corpus file {shown} cannot be read ({e.strerror or e}); fix its permissions or remove it") from None


def _not_utf8(shown: str, e: UnicodeDecodeError) -> ExplainerError:
    return ExplainerError(f"corpus file {shown} is not UTF-8 text ({e.reason}); convert it or pass another --corpus")


def _blocks(path: Path, shown: str) -> Iterator[str]:
    with _open_text(path, shown) as f:
        try:
            while block := f.read(READ_CHARS):
                yield block
        except UnicodeDecodeError as e:
            raise _not_utf8(shown, e) from None
        except OSError as e:
            raise ExplainerError(f"corpus file {shown} cannot be read ({e.strerror or e})") from None


def paragraphs(blocks: Iterable[str]) -> Iterator[str]:
    """The text of `blocks` split on blank lines ("\\n\\n") as str.split would split the whole,
    with any paragraph longer than MAX_DOC_CHARS cut into pieces."""
    pending = ""
    for block in blocks:
        parts = (pending + block).split("\n\n")
        pending = parts.pop()
        for p in parts:
            yield from cut(p)
        if len(pending) > MAX_DOC_CHARS:
            *whole, pending = cut(pending)
            yield from whole
    yield pending


def text_file(path: Path, name: str) -> Iterator[Doc]:
    """A single text file becomes documents of whole paragraphs, so it can still be split."""
    return _grouped(paragraphs(_blocks(path, str(path))), name)


def _grouped(paras: Iterable[str], name: str) -> Iterator[Doc]:
    cur: list[str] = []
    size, n = 0, 0
    for para in paras:
        cur.append(para)
        size += len(para)
        if size >= PARAGRAPH_CHARS:
            yield f"{name}#{n}", "\n\n".join(cur)
            n += 1
            cur, size = [], 0
    if cur and "".join(cur).strip():
        yield f"{name}#{n}", "\n\n".join(cur)


def folder(root: Path) -> Iterator[Doc]:
    """Every .txt/.md/.rst file under `root` (any case of suffix) is a document, named by its path."""
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    except OSError as e:
        raise ExplainerError(f"corpus folder {root} cannot be listed ({e.strerror or e})") from None
    for p in files:
        rel = p.relative_to(root).as_posix()
        head, rest = "", _blocks(p, str(p))
        for block in rest:  # a file that fits is one document with its old id; a longer one is cut
            head += block
            if len(head) > MAX_DOC_CHARS:
                break
        if len(head) <= MAX_DOC_CHARS:
            yield rel, head
            continue
        yield from _grouped(paragraphs(_chain(head, rest)), rel)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _text_of(rec: Any, field: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise ExplainerError(f"{where} is a JSON {type(rec).__name__}, not an object with a {field!r} field; "
                             "write one JSON object per line")
    if field not in rec:
        keys = ", ".join(sorted(map(str, rec))[:8])
        raise ExplainerError(f"{where} has no field {field!r} (it has: {keys or 'nothing'}); pass --text-field")
    text = rec[field]
    if not isinstance(text, str):
        raise ExplainerError(f"{where}: field {field!r} is {_kind(text)}, not a string; fix the record or pass --text-field")
    return _encodable(text, where)


def _encodable(text: str, where: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer rejects with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ExplainerError(f"{where}: the text holds a lone surrogate ({text[e.start:e.end]!a}), which is not "
                             "Unicode text; fix the record") from None
    return text


def _kind(v: Any) -> str:
    return "null" if v is None else f"a {type(v).__name__}"


def jsonl(path: Path, field: str) -> Iterator[Doc]:
    """One JSON object per line; blank lines are skipped (and do not count as records)."""
    shown = str(path)
    i = 0
    with _open_text(path, shown) as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise ExplainerError(f"corpus file {shown} line {lineno + 1} is not UTF-8 text ({e.reason}); "
                                     "convert it or pass another --corpus") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, deep nesting
                raise ExplainerError(f"corpus file {shown} line {lineno} is not valid JSON "
                                     f"({str(e)[:120] or type(e).__name__}); fix it or remove the line") from None
            text = _text_of(rec, field, f"corpus file {shown} line {lineno}")
            if text.strip():
                yield from _pieces(f"{path.name}#{i}", text)
            i += 1


def parquet(path: Path, field: str) -> Iterator[Doc]:
    """The `field` column, read a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = str(path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ExplainerError(f"corpus file {shown} is not a readable Parquet file ({str(e)[:160]}); "
                             "rewrite it or pass another --corpus") from None
    if field not in names:
        raise ExplainerError(f"corpus file {shown} has no column {field!r} (columns: {', '.join(names)}); pass --text-field")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise ExplainerError(f"corpus file {shown} row {row}: column {field!r} is {_kind(text)}, "
                                         "not a string; fix the row or pass --text-field")
                if text.strip():
                    yield from _pieces(f"{path.name}#{row}", _encodable(text, f"corpus file {shown} row {row}"))
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ExplainerError(f"corpus file {shown} is damaged near row {row} ({str(e)[:160]}); "
                             "rewrite it or pass another --corpus") from None


def records(name: str, recs: Iterable[Any], field: str) -> Iterator[Doc]:
    """Records of a datasets dataset (dicts), named `name#index`."""
    for i, rec in enumerate(recs):
        text = _text_of(rec, field, f"{name} record {i}")
        if text.strip():
            yield from _pieces(f"{name}#{i}", text)
