"""TopK sparse autoencoder (Gao et al. 2024) and its on-disk formats.

    z     = ReLU(TopK((x - b_dec) @ W_enc + b_enc))      b_dec doubles as b_pre
    x_hat = z @ W_dec + b_dec

Saved in the SAELens layout (cfg.json + sae_weights.safetensors + sparsity.safetensors) so other
tools read our dictionaries; EleutherAI sparsify folders (cfg.json + sae.safetensors) load too.
Training happens on activations scaled by s = sqrt(d_in) / mean ||x||; the saved weights have s
folded in, so a loaded dictionary maps raw activations and its latents equal the trained ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from explainer.errors import ExplainerError
from explainer.sae_files import (  # noqa: F401  (hub_id, resolve_dictionary: used through this module)
    CFG_FILE, GEMMA_SCOPE_FILE, carry_over, hub_id, positive_int, read_cfg, read_tensors, recover_folder,
    resolve_dictionary, save_siblings,
)
from explainer.sparse_ops import Workspace, select_latents, sparse_decode, sparse_forward

WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"


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
SAELENS_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}


class TopKSAE(nn.Module):
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

    W_enc is stored transposed (latent-major) so the sparse backward reads contiguous encoder
    rows; its shape and the saved layout are SAELens'.

    Trained here: TopK. Loaded for sampling only: ReLU ("standard") and JumpReLU dictionaries
    (SAELens, Gemma Scope), whose number of active latents varies by token; for those `k` is
    how many active latents per token the sparse codes keep, and encode() refuses a token with
    more, so the codes are never silently truncated.
    """

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
        rows = torch.randn(self.d_sae, self.d_in, generator=generator).to(self.device)
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
    def folded(self, scale: float) -> "TopKSAE":
        """A copy that takes raw activations x where this one took x * scale; latents unchanged."""
        out = TopKSAE(self.d_in, self.d_sae, self.k, device=self.device, cfg=self.cfg, normalize=self.normalize)
        out.W_enc.copy_(self.W_enc * scale)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / scale)
        out.b_dec.copy_(self.b_dec / scale)
        return out


# --- files ------------------------------------------------------------------------------------


def fingerprint(sae: TopKSAE) -> str:
    """Hash of k and the weights: the DB never files two different dictionaries under one id."""
    h = hashlib.blake2b(digest_size=16)
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    if sae.activation == "topk":
        h.update(f"topk:{sae.d_in}:{sae.d_sae}:{sae.k}".encode())
    else:  # k is only how many codes per token are kept, not part of the dictionary
        h.update(f"{sae.activation}:{sae.d_in}:{sae.d_sae}".encode())
        tensors += [sae.threshold] if sae.threshold is not None else []
    if sae.normalize != "none":  # the same weights map other inputs; "none" keeps earlier fingerprints
        h.update(f"normalize:{sae.normalize}".encode())
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_dictionary(sae: TopKSAE, folder: Path, *, sparsity: Optional[Tensor] = None, cfg: Optional[dict] = None,
                    extra: Optional[dict[str, str]] = None) -> Path:
    """Write `sae` in the SAELens layout, atomically: a kill mid-save leaves the previous folder or the new one.

    The files are written into a sibling folder that then replaces `folder` by rename; what the old
    folder held besides the dictionary (a training checkpoint) is carried over as hard links.
    `sparsity` is the log10 firing frequency per latent (SAELens' sparsity.safetensors); `extra` maps
    further file names to their text (metrics.json), saved with the dictionary.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    if folder.exists() and not folder.is_dir():
        raise ExplainerError(f"{folder} is a file; choose a folder path for the dictionary")
    saving, ready, old = save_siblings(folder)
    saving.mkdir()
    tensors = {
        "W_enc": sae.W_enc.detach().float().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().float().cpu(),
        "W_dec": sae.W_dec.detach().float().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().float().cpu(),
        **({"threshold": sae.threshold.detach().float().cpu()} if sae.threshold is not None else {}),
    }
    save_file(tensors, str(saving / WEIGHTS_FILE))
    written = {WEIGHTS_FILE, CFG_FILE, SPARSITY_FILE, *(extra or {})}  # never carried over from the old folder
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().float().cpu().contiguous()}, str(saving / SPARSITY_FILE))
    meta = {**sae.cfg, **(cfg or {})}
    full = {
        "architecture": SAELENS_ARCH[sae.activation],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"k": sae.k} if sae.activation == "topk" else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        # Any constant input scale is already folded into the weights; layer_norm is per token, applied at run time.
        "normalize_activations": sae.normalize,
        "reshape_activations": "none",
        **{key: meta.get(key) for key in ("model_name", "hook_name", "hook_layer", "context_size")},
        "prepend_bos": True,
        "metadata": {key: meta.get(key) for key in ("model_name", "hook_name", "hook_layer", "context_size")},
    }
    for key, value in meta.items():  # our own keys; never override the layout keys above
        full.setdefault(key, value)
    (saving / CFG_FILE).write_text(json.dumps(full, indent=2) + "\n")
    for name, text in (extra or {}).items():
        (saving / name).write_text(text)
    if folder.is_dir():
        carry_over(folder, saving, written)
    os.rename(saving, ready)  # complete: from here on recover_folder prefers it
    if folder.exists():
        os.rename(folder, old)
    os.rename(ready, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_dictionary(path: str | Path, device: Any = "cpu", max_active: int = 256) -> TopKSAE:
    """Load a dictionary from a SAELens-layout folder (ours; TopK, ReLU or JumpReLU), an
    EleutherAI sparsify folder or a Gemma Scope params.npz folder, local or on the Hugging Face
    hub (owner/repo/folder). `max_active`: codes kept per token for ReLU and JumpReLU ones."""
    folder = resolve_dictionary(path)
    if not folder.exists() and folder.parent.is_dir():
        recover_folder(folder)  # a save killed between its two renames
    if not folder.exists():
        raise ExplainerError(f"dictionary folder {folder} does not exist (train one with `explainer train`)")
    if not (folder / CFG_FILE).is_file() and (folder / GEMMA_SCOPE_FILE).is_file():
        return _load_gemma_scope(folder, max_active).to(device)
    cfg = read_cfg(folder)
    cfg_path = folder / CFG_FILE
    if (folder / WEIGHTS_FILE).is_file() or "d_sae" in cfg:
        sae = _load_saelens(folder, cfg, cfg_path, max_active)
    elif (folder / SPARSIFY_WEIGHTS_FILE).is_file() or "num_latents" in cfg or "expansion_factor" in cfg:
        sae = _load_sparsify(folder, cfg, cfg_path)
    else:
        raise ExplainerError(f"{cfg_path}: neither a SAELens nor a sparsify config (no d_sae / num_latents key)")
    sae.cfg.setdefault("path", str(folder))
    return sae.to(device)


def _saelens_activation(cfg: dict, cfg_path: Path) -> str:
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch == "topk" or fn == "topk":  # older SAELens: architecture standard, activation_fn topk
        return "topk"
    if arch == "jumprelu":
        return "jumprelu"
    if arch == "standard" and fn in (None, "relu"):
        return "relu"
    raise ExplainerError(f"{cfg_path}: architecture {arch!r} (activation {fn!r}) is not supported; "
                         "TopK, standard ReLU and JumpReLU SAEs load here")


def _load_saelens(folder: Path, cfg: dict, cfg_path: Path, max_active: int) -> TopKSAE:
    activation = _saelens_activation(cfg, cfg_path)
    d_in, d_sae = positive_int(cfg, "d_in", cfg_path), positive_int(cfg, "d_sae", cfg_path)
    if activation == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        k = positive_int({"k": k}, "k", cfg_path)
    else:
        k = min(max_active, d_sae)
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in NORMALIZATIONS:
        raise ExplainerError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} needs a run-time scale this "
            "loader does not apply; fold the scale into the weights and set it to 'none' (layer_norm is supported)"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ExplainerError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    wanted: dict[str, Optional[tuple[int, ...]]] = {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if activation == "jumprelu":
        wanted["threshold"] = (d_sae,)
    t = read_tensors(folder / WEIGHTS_FILE, wanted)
    b_enc = t["b_enc"].float()
    if cfg.get("apply_b_dec_to_input", True) is False:
        # Ours always subtracts b_dec before encoding; compensate in the encoder bias.
        b_enc = b_enc + t["b_dec"].float() @ t["W_enc"].float()
    return _build(d_in, d_sae, k, t["W_enc"].float(), b_enc, t["W_dec"], t["b_dec"], {**cfg, "format": "saelens"},
                  activation, t.get("threshold"), normalize)


def _load_gemma_scope(folder: Path, max_active: int) -> TopKSAE:
    """Gemma Scope's params.npz (JumpReLU, b_dec not subtracted before encoding); the layer is
    read from the folder path, e.g. layer_20/width_16k/average_l0_71."""
    import numpy as np

    path = folder / GEMMA_SCOPE_FILE
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    try:
        with np.load(path) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise ExplainerError(f"{path} has no array {missing[0]!r} (it holds {', '.join(npz.files)}); "
                                     "it is not a Gemma Scope SAE")
            arrays = {n: torch.from_numpy(np.asarray(npz[n], dtype=np.float32)) for n in names}
    except (OSError, ValueError) as e:
        raise ExplainerError(f"{path} is not a readable .npz file ({e}); re-download it") from None
    d_in, d_sae = arrays["W_enc"].shape
    for name, shape in {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}.items():
        if tuple(arrays[name].shape) != shape:
            raise ExplainerError(f"{path}: array {name!r} has shape {tuple(arrays[name].shape)}, expected {shape}")
        if not torch.isfinite(arrays[name]).all():
            raise ExplainerError(f"{path}: array {name!r} holds NaN or infinite values; the file is corrupt")
    layer = re.search(r"layer_(\d+)", str(folder))
    cfg = {"format": "gemma_scope", **({"hook_layer": int(layer.group(1))} if layer else {})}
    b_enc = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    return _build(d_in, d_sae, min(max_active, d_sae), arrays["W_enc"], b_enc, arrays["W_dec"], arrays["b_dec"], cfg,
                  "jumprelu", arrays["threshold"])


def _load_sparsify(folder: Path, cfg: dict, cfg_path: Path) -> TopKSAE:
    d_in = positive_int(cfg, "d_in", cfg_path)
    d_sae = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 0)
    d_sae = positive_int({"num_latents": d_sae}, "num_latents", cfg_path)
    k = positive_int(cfg, "k", cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise ExplainerError(f"{cfg_path}: sparsify activation {cfg.get('activation')!r} is not supported (only topk)")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise ExplainerError(f"{cfg_path}: sparsify transcoders and skip connections are not supported (SAEs only)")
    t = read_tensors(folder / SPARSIFY_WEIGHTS_FILE, {
        "encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
    })
    meta = {"format": "sparsify", "sparsify_cfg": cfg}
    return _build(d_in, d_sae, k, t["encoder.weight"].float().t(), t["encoder.bias"], t["W_dec"], t["b_dec"], meta)


def _build(d_in, d_sae, k, W_enc, b_enc, W_dec, b_dec, cfg, activation: str = "topk",
           threshold: Optional[Tensor] = None, normalize: str = "none") -> TopKSAE:
    if activation == "topk" and k >= d_sae:
        raise ExplainerError(f"dictionary config says k={k} with only {d_sae} latents; the config is corrupt")
    sae = TopKSAE(d_in, d_sae, k, cfg=cfg, activation=activation, normalize=normalize)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae


def read_sparsity(folder: str | Path) -> Optional[Tensor]:
    """log10 firing frequency per latent from sparsity.safetensors, or None if the file is absent."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    return read_tensors(path, {"sparsity": None})["sparsity"]


def log10_frequency(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """SAELens' sparsity convention: log10(fraction of tokens a latent fired on + 1e-10)."""
    return torch.log10(fire_counts.double() / max(n_tokens, 1) + 1e-10).float()
