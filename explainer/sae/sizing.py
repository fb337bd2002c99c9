"""Memory a training run needs, checked once the subject model's width is known and before
any tensor of the dictionary is allocated: `--n-latents 1e12` is one clear line, not an
allocator traceback (or the OOM killer hours later)."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from explainer.errors import ExplainerError
from explainer.settings import TrainSettings

F32 = 4


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where the state will live (None where it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable counts the page cache the kernel would give back; free pages alone do not
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def train_bytes(ts: TrainSettings, ctx_len: int, d_model: int) -> dict[str, int]:
    """A lower bound, by part, on the bytes one training process holds at once (float32)."""
    step_tokens = max(1, round(ts.batch_tokens / ctx_len)) * ctx_len
    params = 2 * ts.n_latents * d_model + ts.n_latents + d_model
    return {
        # weights, their gradients and Adam's two moments
        "dictionary weights, gradients and Adam state": 4 * F32 * params,
        # the dense encoder output of one step, and its gradient
        "one step's encoder pre-activations": 2 * F32 * step_tokens * ts.n_latents,
        # a shuffle block of activations and its permuted copy
        "the shuffled activation block": 2 * F32 * ts.shuffle_steps * step_tokens * d_model,
        "the geometric-median sample": F32 * ts.median_samples * d_model,
    }


def check_train_fits(ts: TrainSettings, ctx_len: int, d_model: int, device: Any) -> None:
    """Refuse a run whose dictionary cannot fit in the memory of `device` (torch.device)."""
    parts = train_bytes(ts, ctx_len, d_model)
    need = sum(parts.values())
    free = available_bytes(device)
    if free is None or need <= 0.8 * free:
        return
    name, biggest = max(parts.items(), key=lambda kv: kv[1])
    raise ExplainerError(
        f"training {ts.n_latents:,} latents on d_model {d_model} needs at least {_size(need)} "
        f"({_size(biggest)} for {name}), and {device.type} has {_size(free)} available; "
        "lower --n-latents (or --batch-tokens, --shuffle-steps), or use a larger machine"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"
