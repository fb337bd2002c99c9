"""The one exception type a user ever sees as a message instead of a traceback, and the
environment failures (full disk, unwritable folder, damaged DB file) shown the same way."""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional


class ExplainerError(Exception):
    """A user-facing problem: bad input, a locked file, an unreachable endpoint.

    The message names the input and the fix. `cli.main` prints it on one line and
    exits 2; any other exception is a bug and keeps its traceback.
    """


def environment_message(err: BaseException) -> Optional[str]:
    """One line for a failure of the machine rather than of explainer (a full disk, an unwritable
    folder, a DuckDB file damaged under us), or None for anything else, which stays a traceback.

    Writers (DuckDB, torch, safetensors, plain files) report these in their own words; all of them
    end up here through `cli.main`, so a full disk is one line wherever it strikes.
    """
    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:  # the cause may sit under a wrapper's exception
        seen.add(id(e))
        msg = _one(e)
        if msg is not None:
            return msg
        e = e.__cause__ or e.__context__
    return None


_TORCH_WRITE = ("file write failed", "iostream error", "unexpected pos")  # torch's zip writer on a full disk


def _one(e: BaseException) -> Optional[str]:
    text = str(e)
    first = text.splitlines()[0] if text else type(e).__name__
    path = getattr(e, "filename", None) or _quoted_path(text) or _path_in_frames(e)
    where = f" {path}" if path else " a file"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text:
        return (f"disk full writing{where}: it needed more than the {free_space(path)} left on its device; "
                "free space (or write to another disk) and rerun")
    if isinstance(e, RuntimeError) and any(t in text for t in _TORCH_WRITE):
        return (f"writing{where} failed ({first}) with {free_space(path)} left on its device, the usual cause "
                "being a full disk; free space (or write to another disk) and rerun")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot access{where}: {e.strerror}; fix its permissions or choose another location"
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return (f"cannot write{where}: {e.strerror} (a file or folder of that name is in the way); "
                "move it or choose another location")
    if _out_of_memory(e, text):
        first = re.sub(r"^\[enforce fail at [^\]]*\] err == 0\. ", "", first)  # torch's CPU allocator prefix
        return (f"out of memory ({first}); lower the batch (--batch-size for model passes, --batch-tokens for "
                "training), or split the dictionary over more processes (--latent-shards under torchrun), and rerun: "
                "checkpoints resume")
    if isinstance(e, RuntimeError) and any(t in text for t in _PEER_GONE):
        return ("another torchrun rank stopped while this one waited for it in a collective; its own error is "
                "above: fix that and rerun (checkpoints resume)")
    if type(e).__module__.startswith(("duckdb", "_duckdb")) and (
            "Corrupt database file" in text or "Could not read enough bytes" in text):
        return f"a DuckDB file{where} is damaged ({first}); restore it from a copy or pass another --db"
    return None


# gloo's and NCCL's words for a peer process that exited mid-collective
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "NCCL communicator was aborted")


def _out_of_memory(e: BaseException, text: str) -> bool:
    import torch

    return (isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(e, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                                 or "CUDA out of memory" in text or "MPS backend out of memory" in text)))


def _path_in_frames(e: BaseException) -> Optional[str]:
    """The file a writer was given (torch.save's `f`, safetensors' `filename`), innermost frame first:
    their exceptions do not carry it."""
    import traceback

    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):
        for name in ("f", "filename", "path", "file"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                return str(value)
    return None


def _quoted_path(text: str) -> Optional[str]:
    m = re.search(r'file "([^"]+)"', text) or re.search(r"file '([^']+)'", text)
    return m.group(1) if m else None


def free_space(path: Optional[str]) -> str:
    """Free space on the device holding `path` (its nearest existing folder), for messages."""
    folder = os.path.dirname(os.path.abspath(path)) if path else "."
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        n = float(shutil.disk_usage(folder or ".").free)
    except OSError:
        return "little space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"
