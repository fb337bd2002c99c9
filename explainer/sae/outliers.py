"""Outlier tokens: residual-stream activations whose norm is a large multiple of the typical one.

Some models write a few huge activations (SmolLM2 layer 15: norm up to ~26,700 against a
median of ~168, all at the first position of a context). A handful of them carry most of the
variance of a batch, so they dominate both an SAE's training loss and its FVU, and latents get
spent on reconstructing them. The rule here marks a token whose norm exceeds `factor` times the
median norm measured once on the training sample; train, eval and sample all apply that same
absolute threshold, which the dictionary's cfg.json records, so every stage agrees on which
tokens are outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

RULE = "norm > factor * median_norm"


@dataclass(frozen=True)
class OutlierRule:
    factor: float  # 0 (or less) turns the rule off
    median_norm: float  # median L2 norm of raw activations, measured on the training sample

    @property
    def threshold(self) -> float:
        return self.factor * self.median_norm if self.factor > 0 else math.inf

    def mask(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """True where a token of x [..., d] (raw activations times `scale`) is an outlier."""
        if not math.isfinite(self.threshold):
            return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        return x.float().norm(dim=-1) > self.threshold * scale

    def cfg(self) -> dict[str, Any]:
        return {"outlier_rule": RULE, "outlier_factor": self.factor, "outlier_median_norm": self.median_norm,
                "outlier_threshold": self.threshold if math.isfinite(self.threshold) else None}

    @classmethod
    def measure(cls, factor: float, raw: Tensor) -> OutlierRule:
        return cls(float(factor), float(raw.float().norm(dim=-1).median()))

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> Optional[OutlierRule]:
        """The rule a dictionary was trained with; None for dictionaries trained without one."""
        factor, median = cfg.get("outlier_factor"), cfg.get("outlier_median_norm")
        if cfg.get("outlier_rule") != RULE or not isinstance(factor, (int, float)) or not isinstance(median, (int, float)):
            return None
        return cls(float(factor), float(median))


def position_histogram(mask: Tensor) -> dict[str, int]:
    """{position within its context: count} of the True entries of a [contexts, positions] mask."""
    counts = mask.reshape(-1, mask.shape[-1]).sum(0).cpu()
    return {str(p): int(c) for p, c in enumerate(counts.tolist()) if c}


def add_histograms(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, n in b.items():
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (Cornish-Fisher expansion; within 1e-3 for df >= 5)."""
    z = 1.959963984540054
    if df <= 0:
        return math.nan
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci95(values: Tensor) -> tuple[float, Optional[float], Optional[float]]:
    """Mean and 95% t-interval of independent values (e.g. one paired difference per context)."""
    v = values.double().flatten()
    n = v.numel()
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return mean, None, None
    half = t_quantile_975(n - 1) * float(v.std()) / math.sqrt(n)
    return mean, mean - half, mean + half
