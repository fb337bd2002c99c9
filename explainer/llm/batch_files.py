"""`--batch --batch-dir DIR`: the Batch API's files and batches calls served by a folder.

For offline batch engines that read and write the Batch API's JSONL, above all
`vllm run-batch -i IN -o OUT --model M`. The batch step (batch.py) runs unchanged against
this client: a created batch is DIR/<id>.input.jsonl; it counts as completed once
DIR/<id>.output.jsonl answers every input line, and is then ingested like an OpenAI batch
(the cache, the ledger, resume by batch id). The user runs the engine between two runs of
the same command, or while a waiting run polls.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from explainer.errors import ExplainerError
from explainer.llm.batch_wire import Refused


def _lines(path: Path) -> list[bytes]:
    try:
        return [x for x in path.read_bytes().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


class _Files:
    def __init__(self, folder: Path):
        self.folder = folder

    def create(self, *, file: tuple[str, bytes, str], purpose: str) -> Any:
        fid = f"file-{uuid.uuid4().hex[:16]}"
        tmp = self.folder / f"{fid}.tmp"
        tmp.write_bytes(file[1])
        os.replace(tmp, self.folder / f"{fid}.jsonl")
        return SimpleNamespace(id=fid)

    def content(self, fid: str) -> Any:
        return SimpleNamespace(content=b"\n".join(_lines(self.folder / f"{fid}.jsonl")))


class _Batches:
    def __init__(self, folder: Path):
        self.folder = folder

    def create(self, *, input_file_id: str, endpoint: str, completion_window: str, metadata: dict) -> Any:
        bid = f"batch-{uuid.uuid4().hex[:16]}"
        src = self.folder / f"{input_file_id}.jsonl"
        if not src.exists():
            raise Refused(404, f"no input file {src}")
        os.replace(src, self.folder / f"{bid}.input.jsonl")
        meta = {"endpoint": endpoint, "created_at": int(time.time()), "metadata": metadata}
        (self.folder / f"{bid}.json").write_text(json.dumps(meta))
        return SimpleNamespace(id=bid, status="in_progress")

    def list(self, limit: int = 100) -> Any:
        """Every batch of the folder, newest first, as one page (batch.py looks for an unrecorded one)."""
        found = []
        for meta_path in self.folder.glob("batch-*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            b = self.retrieve(meta_path.stem)
            b.metadata, b.created_at = meta.get("metadata") or {}, meta.get("created_at") or 0
            b.input_file_id = f"{meta_path.stem}.input"
            found.append(b)
        found.sort(key=lambda b: -b.created_at)
        return SimpleNamespace(data=found, has_next_page=lambda: False)

    def retrieve(self, bid: str) -> Any:
        if not (self.folder / f"{bid}.json").exists():
            raise Refused(404, f"batch {bid} is not in {self.folder}")
        n_in = len(_lines(self.folder / f"{bid}.input.jsonl"))
        out = _lines(self.folder / f"{bid}.output.jsonl")
        ok = sum(1 for x in out if _answered(x))
        done = len(out) >= n_in
        counts = SimpleNamespace(total=n_in, completed=ok, failed=len(out) - ok)
        # The output file is its own "file id": files.content reads DIR/<id>.jsonl.
        return SimpleNamespace(id=bid, status="completed" if done else "in_progress", request_counts=counts,
                               output_file_id=f"{bid}.output" if done else None, error_file_id=None, errors=None)


def _answered(raw: bytes) -> bool:
    try:
        rec = json.loads(raw)
        return not rec.get("error") and (rec.get("response") or {}).get("status_code") == 200
    except (ValueError, AttributeError):
        return False


class FolderClient:
    """The subset of openai.OpenAI that batch.py uses (files, batches), over a folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExplainerError(f"--batch-dir {folder}: cannot create it ({e.strerror}); choose a writable folder") from None
        self.files, self.batches = _Files(self.folder), _Batches(self.folder)

    @property
    def base_url(self) -> str:
        return f"file://{self.folder}"


def instructions(folder: Path, batch_ids: list[str], model: str) -> str:
    """What to run so the waiting batches get answers."""
    runs = [f"vllm run-batch -i {folder / (b + '.input.jsonl')} -o {folder / (b + '.output.jsonl')} "
            f"--model HF_MODEL --served-model-name {model}" for b in batch_ids]
    return ("answer the batch with an offline engine that reads and writes Batch API JSONL, e.g. "
            + "; ".join(runs) + ", then rerun the same command (the batch is resumed, not resent)")
