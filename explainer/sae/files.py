"""Reading dictionary files: safetensors with checks, cfg.json, and Hugging Face hub folders.

Kept apart from sae_formats.py (which formats hold what) so its loaders of our own and
other tools' formats read files one way, with one set of error messages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import Tensor

from explainer.errors import ExplainerError

CFG_FILE = "cfg.json"
GEMMA_SCOPE_FILE = "params.npz"


def read_tensors(path: Path, wanted: dict[str, Optional[tuple[int, ...]]]) -> dict[str, Tensor]:
    """Read the named tensors, checking presence, shape and finiteness; shape None = any."""
    if not path.is_file():
        raise ExplainerError(f"{path} is missing; the dictionary folder is incomplete (re-train or re-download it)")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name in wanted:
                if name not in keys:
                    raise ExplainerError(
                        f"{path} has no tensor {name!r} (it holds {', '.join(sorted(keys)) or 'nothing'}); "
                        "it is not a TopK SAE in a supported format"
                    )
                out[name] = f.get_tensor(name)
    except ExplainerError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ExplainerError(f"{path} is not a readable safetensors file ({e}); re-train or re-download it") from None
    for name, shape in wanted.items():
        t = out[name]
        if shape is not None and tuple(t.shape) != shape:
            raise ExplainerError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, cfg.json implies {shape}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ExplainerError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    return out


def read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    if not path.is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / CFG_FILE).is_file()) if folder.is_dir() else []
        hint = f"; it has dictionaries in subfolders: {', '.join(subs)}" if subs else ""
        raise ExplainerError(
            f"{folder} is not a dictionary folder: no {CFG_FILE}{hint} "
            "(expected SAELens cfg.json + sae_weights.safetensors, sparsify cfg.json + sae.safetensors, "
            "dictionary_learning config.json + ae.pt, or an OpenAI sparse_autoencoder .pt file)"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExplainerError(f"{path} is not valid JSON ({e}); re-train or re-download the dictionary") from None
    if not isinstance(cfg, dict):
        raise ExplainerError(f"{path} must hold a JSON object")
    return cfg


def positive_int(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ExplainerError(f"{path}: {key!r} must be a positive integer, found {value!r}")
    return value


def hub_id(path: str | Path) -> Optional[tuple[str, str]]:
    """(repo id, folder inside it) when `path` names no local folder but reads as owner/repo[/folder]."""
    text = str(path)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_dictionary(path: str | Path) -> Path:
    """The local folder of a dictionary: `path` itself, or a Hugging Face hub folder fetched into
    the hub cache, e.g. EleutherAI/sae-pythia-70m-32k/layers.3 (sparsify) or a SAELens release
    repo and folder. Offline (HF_HUB_OFFLINE=1) only the cache is read."""
    hub = hub_id(path)
    if hub is None:
        return Path(path).expanduser()
    repo, sub = hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except LocalEntryNotFoundError:
        raise ExplainerError(
            f"dictionary folder {path} does not exist (train one with `explainer train`), and the hub repository "
            f"{repo} is not in the Hugging Face cache (offline, or the hub is unreachable)"
        ) from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise ExplainerError(f"dictionary folder {path} does not exist (train one with `explainer train`), "
                             f"and there is no hub repository {repo} ({type(e).__name__})") from None
    except Exception as e:  # gated repos, HTTP errors, network failures: the hub client's own types
        first = (str(e).splitlines() or [""])[0][:200]
        raise ExplainerError(f"dictionary {path}: fetching {repo} from the Hugging Face hub failed "
                             f"({type(e).__name__}: {first}); check the id, your network and HF_TOKEN") from None
    folder = Path(root) / sub
    if not (folder / CFG_FILE).is_file() and not (folder / GEMMA_SCOPE_FILE).is_file():
        raise ExplainerError(f"dictionary {path}: hub repository {repo} has no {sub or '.'}/{CFG_FILE}; "
                             "name the folder holding the dictionary, e.g. owner/repo/layers.6")
    return folder


# --- atomic saves (sae_formats.save_dictionary) ----------------------------------------------


def carry_over(src: Path, dst: Path, written: set[str]) -> None:
    """Hard-link (copy where links fail) what `src` holds besides the new dictionary's files into `dst`."""
    for entry in src.iterdir():
        if entry.name in written:
            continue
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            target.mkdir()
            carry_over(entry, target, set())
            continue
        try:
            os.link(entry, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry, target, follow_symlinks=False)


def save_siblings(folder: Path) -> tuple[Path, Path, Path]:
    """The temporary folders of a save: being written, complete, and the replaced one."""
    return tuple(folder.parent / f".{folder.name}.{what}" for what in ("saving", "ready", "old"))  # type: ignore[return-value]


def swap_in(folder: Path) -> Path:
    """Replace `folder` by its complete `.saving` sibling, in renames that recover_folder can finish or undo."""
    saving, ready, old = save_siblings(folder)
    os.rename(saving, ready)  # complete: from here on recover_folder prefers it
    if folder.exists():
        os.rename(folder, old)
    os.rename(ready, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_folder(folder: Path) -> None:
    """Finish or undo a save that was killed: afterwards `folder` is the old or the new dictionary, whole."""
    folder = Path(folder)
    saving, ready, old = save_siblings(folder)
    if not folder.exists():
        for candidate in (ready, old):  # the new one if it was complete, else the one it replaced
            if candidate.is_dir():
                os.rename(candidate, folder)
                break
    for leftover in (saving, ready, old):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
