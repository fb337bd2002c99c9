"""One SAE training step (`Trainer`): Gao et al. 2024's TopK recipe on already scaled
activations [N, d_in]; AuxK on dead latents, optional Multi-TopK, unit-norm decoder rows with
the parallel gradient removed, Adam (eps 6.25e-10). train.py streams activations into it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from explainer.sae.model import TopKSAE
from explainer.settings import TrainSettings


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling (2e-4 at 16k latents, shrinking with the square root of the width), times 4.

    x4 because the demo trains for ~400 steps of 1,024 tokens where Gao et al. train for millions:
    on the default run's first 131k train tokens (bench/train_sweep.py, fvu on the validation split)
    batch 1024 reached fvu 0.370 at x1, 0.304 at x2, 0.265 at x4, 0.251 at x8 (but 9% of latents
    never fired on the eval tokens and fvu_all swung 0.30-0.38); batch 4096 at x1 reached 0.534.
    """
    return 4 * 2e-4 / math.sqrt(n_latents / 2**14)


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        moved = (new - y).norm()
        y = new
        if moved <= tol * max(float(y.norm()), 1e-12):
            break
    return y.float()


def _sum_sq(a: Tensor, b: Tensor) -> Tensor:
    """sum((a - b)^2) in one fused pass."""
    return torch.nn.functional.mse_loss(a, b.expand_as(a), reduction="sum")


def _adam(params: Any, lr: float, eps: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)  # one kernel over all params
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, eps=eps)


class Trainer:
    """One optimizer step per call on a batch of already scaled activations [N, d_in].

    Knows nothing of the LM. For data parallelism, wrap `all_reduce` (identity here) around
    torch.distributed's: it sums the gradients and the fired-latent counts over ranks, so every
    rank applies the same update and agrees on which latents are dead; rank 0 alone writes files.
    """

    def __init__(self, sae: TopKSAE, settings: TrainSettings, all_reduce: Optional[Callable[[Tensor], Tensor]] = None,
                 rank: int = 0, world: int = 1):
        self.sae = sae
        self.settings = settings
        self.k_aux = settings.k_aux or max(1, sae.d_in // 2)
        self.multi_k = min(4 * sae.k, sae.d_sae) if settings.multi_topk else 0
        self.mm_dtype = torch.bfloat16 if settings.autocast == "bfloat16" else None
        self.dense = settings.decoder == "dense"
        self.lr = settings.lr or default_lr(sae.d_sae)
        # Adam sees W_enc through its latent-major view, which is contiguous (W_enc is stored
        # transposed): the fused kernel would otherwise copy it out and back every step.
        self._enc_rows = torch.nn.Parameter(sae.W_enc.detach().t())
        self.opt = _adam([self._enc_rows, sae.b_enc, sae.W_dec, sae.b_dec], self.lr, settings.adam_eps)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
        self.fire_counts = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
        self.steps = 0
        self.tokens = 0
        self.all_reduce = all_reduce or (lambda t: t)
        self.rank, self.world = rank, world

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.settings.dead_tokens

    def step(self, x: Tensor) -> dict[str, float]:
        """x is the global batch; with world > 1 this rank encodes only its rows of it."""
        sae, s = self.sae, self.settings
        dead = self.dead_mask().nonzero().flatten() if s.auxk_coef > 0 else None
        n_global = x.shape[0]
        # The global variance normalises every rank's share, so summed gradients equal one process's.
        total_var = _sum_sq(x, x.mean(0))
        if self.world > 1:
            x = x[self.rank :: self.world]
        out = sae(x, dead=dead, k_aux=self.k_aux, multi_k=self.multi_k, dense=self.dense, mm_dtype=self.mm_dtype,
                  project_decoder_grad=not self.dense)
        fvu = _sum_sq(out.x_hat, x) / total_var
        loss = fvu
        if out.multi_x_hat is not None:
            loss = loss + _sum_sq(out.multi_x_hat, x) / total_var / 8
        auxk = torch.zeros((), device=x.device)
        if out.aux_x_hat is not None:
            # Dead latents learn to predict what the live ones missed; normalised by that residual's variance.
            resid = (x - out.x_hat).detach()
            if self.world > 1:
                sums = self.all_reduce(torch.cat([resid.sum(0), (resid * resid).sum().view(1)]))
                resid_var = sums[-1] - (sums[:-1] * sums[:-1]).sum() / n_global
            else:
                resid_var = _sum_sq(resid, resid.mean(0))
            auxk = _sum_sq(out.aux_x_hat, resid) / resid_var
            auxk = torch.nan_to_num(auxk, nan=0.0, posinf=0.0)
            loss = loss + s.auxk_coef * auxk
        self.opt.zero_grad(set_to_none=True)
        sae.zero_grad(set_to_none=True)
        loss.backward()
        for p in sae.parameters():
            if p.grad is not None:
                p.grad = self.all_reduce(p.grad)
        if self.dense:  # the sparse backward already did this
            sae.remove_gradient_parallel_to_decoder_directions()
        if sae.W_enc.grad is not None:
            self._enc_rows.grad = sae.W_enc.grad.t().contiguous()  # a view, unless the dense path ran
        self.opt.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.bincount(out.indices[out.values > 0], minlength=sae.d_sae)
            fired = self.all_reduce(fired)
            self.since_fired += n_global
            self.since_fired[fired > 0] = 0
            self.fire_counts += fired
        self.steps += 1
        self.tokens += n_global
        parts = torch.stack([loss.detach(), fvu.detach(), auxk.detach()])
        if self.world > 1:
            parts = self.all_reduce(parts)  # each rank holds its share of the global sums
        loss_v, fvu_v, aux_v = parts.tolist()
        dead_v = float(self.dead_mask().float().mean())
        return {"loss": loss_v, "fvu": fvu_v, "auxk": aux_v, "dead": dead_v}

    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
            "since_fired": self.since_fired, "fire_counts": self.fire_counts,
            "steps": self.steps, "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])
        self.fire_counts.copy_(state["fire_counts"])
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
