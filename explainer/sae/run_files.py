"""Files of a training run: the --out lock, the resumable checkpoint, and the guard that keeps a
diverged run from writing anything."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from explainer.errors import ExplainerError

CHECKPOINT = Path("checkpoint") / "state.pt"
METRICS = "metrics.json"


def _check_out(out: Path, resume: bool) -> Optional[dict[str, Any]]:
    """The checkpoint to resume from, None for a fresh run; refuse to overwrite another run."""
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        if not resume:
            state = "a finished" if (out / METRICS).is_file() else "an unfinished"
            raise ExplainerError(
                f"{out} already holds {state} training run; pass --resume to continue it or choose another --out")
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a truncated or garbled pickle
            raise ExplainerError(
                f"checkpoint {ckpt} is unreadable ({type(e).__name__}); delete {ckpt.parent} to start over") from None
    if out.exists() and not out.is_dir():
        raise ExplainerError(f"--out {out} is a file; choose a folder path for the dictionary")
    if out.is_dir() and any(out.iterdir()):
        what = "a dictionary" if (out / "cfg.json").exists() else "other files"
        raise ExplainerError(f"{out} already holds {what} but no resumable run; choose another --out")
    return None


def _save_checkpoint(out: Path, trainer: Any, identity: dict, scale: float, position: dict, meta: dict,
                     outliers: dict, name: Path = CHECKPOINT) -> None:
    _check_finite(trainer)  # never checkpoint weights a resume could not train on
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": 1, "identity": json.dumps(identity, sort_keys=True), "trainer": trainer.state_dict(),
        "scale": scale, "position": position, "meta": json.dumps(meta), "rng": torch.get_rng_state(),
        "outliers": outliers,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def _check_finite(trainer: Any, loss: float = 0.0) -> None:
    """A diverged run (NaN/inf loss or weights, e.g. from a huge --lr) stops instead of saving garbage."""
    bad = [name for name, p in trainer.sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if math.isfinite(loss) and not bad:
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"non-finite weights ({', '.join(bad)})"
    raise ExplainerError(f"training diverged at step {trainer.steps}: {what} with lr {trainer.lr:g}; "
                         "lower --lr and start again with another --out")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on --out for the whole run: a second run on the same folder fails at once.

    The lock file sits beside the folder, not in it, because saving replaces the folder by rename.
    flock is released by the kernel when the process ends, however it ends.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: run unlocked
        yield
        return
    path = out.parent / f".{out.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ExplainerError(f"cannot create the lock file {path} for --out {out} ({e.strerror}); "
                             "choose an --out in a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise ExplainerError(f"{out} is in use by another training run ({holder}); wait for it to end "
                                 "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}".encode(), 0)
        yield
    finally:
        os.close(fd)
