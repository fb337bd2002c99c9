"""A trained dictionary's held-out metrics: FVU (ordinary tokens and all tokens), L0, firing, ΔCE.

The headline numbers are computed on the tokens the dictionary is meant for: outlier tokens
(outliers.py) are excluded from `fvu`, L0 and firing and reported beside them (`fvu_all`,
`n_outlier_tokens`, their positions). ΔCE splices the reconstruction in at every ordinary
token and passes outlier tokens through unchanged; its 95% interval is a t-interval over
contexts of the paired per-context difference (spliced - clean), since contexts, not tokens,
are the independent units. `computed_on` in the metrics says what each number was computed on.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from explainer.sae.model import TopKSAE
from explainer.sae.outliers import OutlierRule, mean_ci95, position_histogram
from explainer.settings import Settings


def _eval_contexts(lm: Any, settings: Settings, documents: Iterable[tuple[str, str]], n_ctx: int) -> tuple[str, list[list[int]]]:
    """The first n_ctx held-out contexts (validation ones when the corpus has no held-out split)."""
    from explainer.corpus.contexts import iter_contexts

    split, rows = "heldout", []  # type: tuple[str, list[list[int]]]
    for split in ("heldout", "validation"):
        rows = []
        for ctx in iter_contexts(settings.corpus, lm.tokenizer, splits=(split,), documents=documents):
            rows.append(ctx.token_ids)
            if len(rows) >= n_ctx:
                break
        if rows:
            break
    return split, rows


class _Sums:
    """Streaming sum of squared errors and of x's first two moments, for an FVU over many batches."""

    def __init__(self, d: int) -> None:
        self.sse, self.sq, self.n = 0.0, 0.0, 0
        self.total = torch.zeros(d, dtype=torch.float64)

    def add(self, x: Tensor, x_hat: Tensor) -> None:
        self.sse += float((x_hat - x).double().pow(2).sum())
        self.sq += float(x.double().pow(2).sum())
        self.total += x.double().sum(0).cpu()
        self.n += x.shape[0]

    def fvu(self) -> float:
        variance = self.sq - float(self.total.pow(2).sum()) / max(self.n, 1)
        return self.sse / variance if self.n and variance > 0 else float("nan")


@torch.no_grad()
def evaluate(lm: Any, sae: TopKSAE, settings: Settings, documents: Iterable[tuple[str, str]],
             rule: Optional[OutlierRule] = None) -> tuple[dict[str, Any], Tensor, int]:
    """FVU, L0 and firing on held-out tokens; CE increase of splicing x_hat vs zero-ablating the layer.

    Returns (metrics, per-latent fire counts on ordinary tokens, ordinary tokens evaluated).
    """
    ts, ctx_len, bs = settings.train, settings.corpus.ctx_len, settings.model.batch_size
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    n_ctx = math.ceil(ts.eval_tokens / ctx_len)
    if n_ctx == 0:
        return {}, counts, 0
    split, rows = _eval_contexts(lm, settings, documents, n_ctx)
    if not rows:
        return {"eval_split": None}, counts, 0
    ids = torch.tensor(rows, dtype=torch.long)
    ordinary, every = _Sums(sae.d_in), _Sums(sae.d_in)
    l0, masks = 0.0, []
    for i in range(0, len(ids), bs):
        acts = lm.activations(ids[i : i + bs]).to(sae.device)
        outlier = rule.mask(acts) if rule is not None else torch.zeros(acts.shape[:-1], dtype=torch.bool)
        masks.append(outlier.cpu())
        x, keep = acts.reshape(-1, sae.d_in), ~outlier.reshape(-1).to(acts.device)
        values, indices, x_hat = sae.encode_decode(x)
        every.add(x, x_hat)
        ordinary.add(x[keep], x_hat[keep])
        active = (values > 0) & keep[:, None]
        l0 += float(active.sum())
        counts += torch.bincount(indices[active].cpu(), minlength=sae.d_sae)
    outliers = torch.cat(masks)
    n_out = int(outliers.sum())
    rule_text = (f"norm > {rule.factor:g} x median norm {rule.median_norm:.4g} = {rule.threshold:.4g}"
                 if rule is not None and math.isfinite(rule.threshold) else "no outlier rule")
    metrics: dict[str, Any] = {
        "fvu": ordinary.fvu(), "fvu_all": every.fvu(), "n_outlier_tokens": n_out,
        "outlier_positions": position_histogram(outliers), "eval_split": split, "eval_contexts": len(rows),
        "eval_tokens": ordinary.n, "eval_tokens_all": every.n, "l0": l0 / max(ordinary.n, 1),
        "never_fired_eval_fraction": float((counts == 0).float().mean()),
    }
    where = f"{split} split, first {len(rows)} contexts"
    computed_on = {
        "fvu, l0, never_fired_eval_fraction, sparsity.safetensors":
            f"{where}: {ordinary.n} ordinary tokens ({n_out} outlier tokens excluded; rule: {rule_text})",
        "fvu_all": f"{where}: all {every.n} tokens, outliers included",
        "n_outlier_tokens, outlier_positions": f"{where}: positions are 0-based within a context of {ctx_len} tokens",
    }
    n_ce = min(len(ids), math.ceil(ts.ce_tokens / ctx_len))
    if n_ce:
        metrics.update(_ce_metrics(lm, sae, ids[:n_ce], bs, rule))
        computed_on["ce_*"] = (
            f"{split} split, first {n_ce} contexts ({n_ce * ctx_len} tokens, a prefix of the eval contexts): spliced = "
            "the reconstruction at every ordinary token, outlier tokens passed through unchanged; ce_increase_ci95 "
            "is a 95% t-interval over contexts of the paired per-context difference spliced - clean")
    metrics["computed_on"] = computed_on
    return metrics, counts, ordinary.n


def _ce_metrics(lm: Any, sae: TopKSAE, ids: Tensor, bs: int, rule: Optional[OutlierRule]) -> dict[str, Any]:
    def spliced(h: Tensor) -> Tensor:
        x_hat = sae.reconstruct(h.to(sae.device)).to(h.device)
        return torch.where(rule.mask(h)[..., None], h, x_hat) if rule is not None else x_hat

    splices = {"clean": None, "spliced": spliced, "zero": torch.zeros_like}
    per_ctx = {key: torch.cat([lm.ce_losses(ids[i : i + bs], splice=fn) for i in range(0, len(ids), bs)])
               for key, fn in splices.items()}
    inc, lo, hi = mean_ci95(per_ctx["spliced"] - per_ctx["clean"])
    zero_inc, zlo, zhi = mean_ci95(per_ctx["zero"] - per_ctx["clean"])
    return {
        "ce_contexts": len(ids), "ce_tokens": int(ids.numel()), "ce_clean": float(per_ctx["clean"].mean()),
        "ce_spliced": float(per_ctx["spliced"].mean()), "ce_zero_ablation": float(per_ctx["zero"].mean()),
        "ce_increase": inc, "ce_increase_ci95": [lo, hi], "ce_increase_zero_ablation": zero_inc,
        "ce_increase_zero_ablation_ci95": [zlo, zhi],
        "ce_recovered": 1 - inc / zero_inc if zero_inc > 0 else None,
    }
