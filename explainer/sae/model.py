"""TopK sparse autoencoder (Gao et al. 2024), and the ReLU and JumpReLU dictionaries it loads as.

    z     = ReLU(TopK((x - b_dec) @ W_enc + b_enc))      b_dec doubles as b_pre
    x_hat = z @ W_dec + b_dec

Its on-disk formats (ours is the SAELens layout) are sae_formats.py's.
Training happens on activations scaled by s = sqrt(d_in) / mean ||x||; the saved weights have s
folded in, so a loaded dictionary maps raw activations and its latents equal the trained ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainer.errors import ExplainerError
from explainer.sae.sparse import Workspace, select_latents, sparse_decode, sparse_forward


@dataclass
class SAEOutput:
    x_hat: Tensor  # [N, d_in]
    values: Tensor  # [N, k] post-ReLU activations of the TopK latents
    indices: Tensor  # [N, k]
    aux_values: Tensor  # [N, k_aux] top dead latents (AuxK); [N, 0] when none are dead
    aux_indices: Tensor
    aux_x_hat: Optional[Tensor]  # their decoding without b_dec (predicts the residual; b_dec still gets gradient)
    multi_x_hat: Optional[Tensor]  # reconstruction from the top multi_k latents (Multi-TopK)


ACTIVATIONS = ("topk", "relu", "jumprelu")
NORMALIZATIONS = ("none", "layer_norm")  # SAELens' normalize_activations values we apply at run time
LN_EPS = 1e-5


def layer_norm(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """OpenAI's and SAELens' per-token LN: ((x - mu) / (std + eps), mu, std), std with Bessel's correction."""
    mu = x.mean(dim=-1, keepdim=True)
    centered = x - mu
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + LN_EPS), mu, std


INIT_BLOCK = 4096  # decoder rows per generator block of the random init


def init_rows(generator: Optional[torch.Generator], start: int, stop: int, d_in: int) -> Tensor:
    """Rows start..stop of the random init [n, d_in]: standard normal, each block of INIT_BLOCK rows
    from its own generator, seeded from one draw of `generator`. A latent shard (sharded.py) then
    draws only the blocks its rows lie in, not every row before them (minutes at 16M x 4096), and
    gets exactly the rows one process would."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    parts = []
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
        g = torch.Generator().manual_seed((base + block * 0x9E3779B97F4A7C15) % 2**63)
        rows = torch.randn(INIT_BLOCK, d_in, generator=g)  # whole blocks: the same rows whatever the slice
        at = block * INIT_BLOCK
        parts.append(rows[max(start, at) - at : min(stop, at + INIT_BLOCK) - at])
    return torch.cat(parts) if parts else torch.empty(0, d_in)


class TopKSAE(nn.Module):
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

    W_enc is stored transposed (latent-major) so the sparse backward reads contiguous encoder
    rows; its shape and the saved layout are SAELens'.

    Trained here: TopK. Loaded for sampling only: ReLU ("standard") and JumpReLU dictionaries
    (SAELens, Gemma Scope), whose number of active latents varies by token; for those `k` is
    how many active latents per token the sparse codes keep, and encode() refuses a token with
    more, so the codes are never silently truncated.
    """

    threshold: Optional[Tensor]  # a buffer (JumpReLU only); declared so its type is not Module's

    def __init__(self, d_in: int, d_sae: int, k: int, *, device: Any = None, cfg: Optional[dict] = None,
                 activation: str = "topk", normalize: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ExplainerError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if normalize not in NORMALIZATIONS:
            raise ExplainerError(f"normalize_activations {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        # layer_norm: encode() normalises each token first and reconstruct() undoes it with the same mu/std.
        self.normalize = normalize
        if not 1 <= k < d_sae and not (activation != "topk" and k == d_sae):
            raise ExplainerError(f"k={k} must be at least 1 and below the number of latents ({d_sae}); lower --k")
        self.d_in, self.d_sae, self.k, self.activation = d_in, d_sae, k, activation
        # JumpReLU's per-latent threshold; a buffer, since these dictionaries are never trained here.
        self.register_buffer("threshold", torch.zeros(d_sae, device=device) if activation == "jumprelu" else None)
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_in, device=device).t())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.cfg: dict[str, Any] = dict(cfg or {})
        self.workspace = Workspace()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @torch.no_grad()
    def init_tied(self, generator: Optional[torch.Generator] = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transposed, zero biases."""
        rows = init_rows(generator, 0, self.d_sae, self.d_in).to(self.device)
        self.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()

    # --- forward ---------------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k]) of the active latents of activations x [..., d_in]."""
        flat = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        if self.normalize == "layer_norm":
            flat = layer_norm(flat)[0]
        if self.activation == "topk":
            out = sparse_forward(flat, self.W_enc, self.b_enc, None, self.b_dec, self.k)
            values, indices = out.values, out.indices
        else:
            values, indices = self._encode_thresholded(flat)
        return values.view(*x.shape[:-1], self.k), indices.view(*x.shape[:-1], self.k)

    def _encode_thresholded(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.addmm(self.b_enc, flat - self.b_dec, self.W_enc)
        z = F.relu(pre)
        if self.activation == "jumprelu":
            assert self.threshold is not None  # registered for every JumpReLU dictionary
            z = z * (pre > self.threshold)
        active = int((z > 0).sum(1).max()) if z.numel() else 0
        if active > self.k:
            raise ExplainerError(
                f"{active} latents of this {self.activation} dictionary are active on one token, more than the "
                f"{self.k} kept per token; raise --max-active to at least {active} (and pass --restart)"
            )
        # Unsorted, like the TopK path; slots past a token's active latents hold zeros.
        return z.topk(self.k, dim=1, sorted=False)

    def dense_latents(self, x: Tensor) -> Tensor:
        """All latent activations [..., d_sae] (zeros outside the top k)."""
        values, indices = self.encode(x)
        dense = values.new_zeros(*values.shape[:-1], self.d_sae)
        return dense.scatter_(-1, indices, values)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse decoder: only the k active rows of W_dec are read (and get gradient)."""
        flat_v, flat_i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        out = sparse_decode(flat_v, flat_i, self.W_dec) + self.b_dec
        return out.view(*values.shape[:-1], self.d_in)

    def decode_dense(self, latents: Tensor) -> Tensor:
        """Reference decoder: a dense [.., d_sae] x [d_sae, d_in] matmul."""
        return latents @ self.W_dec + self.b_dec

    def encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values, indices, x_hat) for activations x [..., d_in]; x_hat in x's space and dtype.

        With layer_norm the decoding is de-normalised by each token's own mu and std."""
        with torch.no_grad():
            values, indices = self.encode(x)
            x_hat = self.decode(values, indices)
            if self.normalize == "layer_norm":
                _, mu, std = layer_norm(x.to(x_hat.dtype))
                x_hat = x_hat * std + mu
            return values, indices, x_hat.to(x.dtype)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_hat for activations of any leading shape, in x's dtype (used to splice into the LM)."""
        return self.encode_decode(x)[2]

    def forward(
        self,
        x: Tensor,
        *,
        dead: Optional[Tensor] = None,
        k_aux: int = 0,
        multi_k: int = 0,
        dense: bool = False,
        mm_dtype: Optional[torch.dtype] = None,
        project_decoder_grad: bool = False,
    ) -> SAEOutput:
        """Training forward on x [N, d_in]; `dead` holds the ids of latents AuxK may use.

        project_decoder_grad (sparse path only): W_dec's gradient arrives already without its
        components along the rows, as remove_gradient_parallel_to_decoder_directions leaves it.
        """
        if self.activation != "topk":
            raise ExplainerError(f"training supports TopK dictionaries only; this one is {self.activation}")
        if dense:
            return self._forward_dense(x, dead, k_aux, multi_k, mm_dtype)
        f = sparse_forward(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
            dead=dead, k_aux=k_aux, multi_k=multi_k, mm_dtype=mm_dtype, workspace=self.workspace,
            unit_decoder=project_decoder_grad,
        )
        return SAEOutput(f.x_hat, f.values, f.indices, f.aux_values, f.aux_indices,
                         f.aux_x_hat if f.aux_x_hat.shape[1] else None, f.multi_x_hat if f.multi_x_hat.shape[1] else None)

    def _forward_dense(self, x, dead, k_aux, multi_k, mm_dtype) -> SAEOutput:
        dtype, centered = mm_dtype or x.dtype, x - self.b_dec
        if dtype == x.dtype:
            pre = torch.addmm(self.b_enc, centered, self.W_enc)
        else:  # the sparse path's low-precision layout (bias as an extra input column), through autograd
            inputs = torch.cat([centered, torch.ones_like(centered[:, :1])], dim=1).to(dtype)
            weight = torch.cat([self.W_enc.t(), self.b_enc[:, None]], dim=1).to(dtype)
            pre = (inputs @ weight.t()).to(x.dtype)
        # Same selection as the sparse path (ties resolve alike); everything after it is plain autograd.
        with torch.no_grad():
            sets = [indices for _, indices in select_latents(pre, self.k, dead, k_aux, multi_k)]

        def latents(indices: Tensor) -> tuple[Tensor, Tensor]:
            values = F.relu(pre.gather(1, indices))
            return values, torch.zeros_like(pre).scatter(1, indices, values)

        values, z = latents(sets[0])
        aux_values, z_aux = latents(sets[1])
        # + b_dec - b_dec.detach(): the value of the bias-free decoding, with b_dec's gradient path (see sparse_ops).
        aux = z_aux @ self.W_dec + self.b_dec - self.b_dec.detach() if sets[1].shape[1] else None
        multi = self.decode_dense(latents(sets[2])[1]) if sets[2].shape[1] else None
        return SAEOutput(self.decode_dense(z), values, sets[0], aux_values, sets[1], aux, multi)

    # --- decoder geometry (called every step) ------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min_(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Adam then cannot change a row's norm to first order; the norm is reset after the step."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = torch.linalg.vecdot(grad, self.W_dec, dim=1)
        grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1.0)

    @torch.no_grad()
    def folded(self, scale: float) -> TopKSAE:
        """A copy that takes raw activations x where this one took x * scale; latents unchanged."""
        out = TopKSAE(self.d_in, self.d_sae, self.k, device=self.device, cfg=self.cfg, normalize=self.normalize)
        out.W_enc.copy_(self.W_enc * scale)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / scale)
        out.b_dec.copy_(self.b_dec / scale)
        return out


def build_sae(d_in, d_sae, k, W_enc, b_enc, W_dec, b_dec, cfg, activation: str = "topk",
              threshold: Optional[Tensor] = None, normalize: str = "none") -> TopKSAE:
    """A TopKSAE holding these weights (W_enc [d_in, d_sae]); every loader of another format ends here."""
    if activation == "topk" and k >= d_sae:
        raise ExplainerError(f"dictionary config says k={k} with only {d_sae} latents; the config is corrupt")
    sae = TopKSAE(d_in, d_sae, k, cfg=cfg, activation=activation, normalize=normalize)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            assert sae.threshold is not None  # a threshold comes only with activation="jumprelu"
            sae.threshold.copy_(threshold)
    return sae
