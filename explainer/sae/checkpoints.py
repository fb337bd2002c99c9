"""Dictionaries other tools save as PyTorch checkpoints, mapped exactly onto TopKSAE:

* OpenAI sparse_autoencoder: one `.pt` state dict (pre_bias, encoder.weight [n, d], latent_bias,
  decoder.weight [d, n]). Its TopK ones normalise each token with LN first and undo it after the
  decoder, which is TopKSAE's normalize="layer_norm"; its ReLU ones take raw activations.
* saprmarks dictionary_learning: a folder with ae.pt + config.json whose trainer.dict_class names
  the architecture (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder).

Both are read with weights_only=True, so a checkpoint can hold tensors and plain values but no code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.hooks import ATTN, MLP, Hook
from explainer.sae.model import TopKSAE, build_sae

DL_WEIGHTS_FILE = "ae.pt"
DL_CONFIG_FILE = "config.json"
# Where OpenAI's GPT-2 dictionaries read the model, as hooks (hooks.py). Their README maps them to
# TransformerLens: resid_post_mlp = hook_resid_post, resid_delta_attn = hook_attn_out, resid_delta_mlp =
# hook_mlp_out, resid_post_attn = hook_resid_mid (the residual between attention and MLP, which in
# HF's GPT-2 is ln_2's input; not mlp:input, which is after ln_2), mlp_post_act = mlp.hook_post (the GELU's output).
OPENAI_LOCATIONS: dict[str, tuple[str, str]] = {
    "resid_post_mlp": ("", "output"),
    "resid_post_attn": ("ln_2", "input"),
    "resid_delta_attn": (ATTN, "output"),
    "resid_delta_mlp": (MLP, "output"),
    "mlp_post_act": ("mlp.act", "output"),
}
DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors for truncated, garbled or code-holding files
        first = (str(e).splitlines() or [""])[0][:200]
        raise ExplainerError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
                             "re-download it") from None
    if not isinstance(sd, dict):
        raise ExplainerError(f"{path} holds a {type(sd).__name__}, not a state dict; save model.state_dict()")
    return sd


def _tensor(sd: dict[str, Any], path: Path, name: str, shape: Optional[tuple[int, ...]], what: str) -> Tensor:
    """sd[name] as float32, checked for presence, shape (None = any 2-D) and finiteness."""
    t = sd.get(name)
    if not isinstance(t, Tensor):
        held = ", ".join(sorted(k for k, v in sd.items() if isinstance(v, Tensor))) or "no tensors"
        raise ExplainerError(f"{path} has no tensor {name!r} (it holds {held}); it is not {what}")
    if (shape is None and t.dim() != 2) or (shape is not None and tuple(t.shape) != shape):
        expected = "a matrix" if shape is None else str(shape)
        raise ExplainerError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected} for {what}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ExplainerError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    return t


def _layer_from_name(path: Path) -> Optional[int]:
    """OpenAI names a checkpoint by its layer (autoencoders/6.pt); also layer_6.pt, layers.6.pt."""
    if path.stem.isdigit():
        return int(path.stem)
    m = re.search(r"(?:layers?|blocks|h)[._-]?(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def load_openai(path: Path, max_active: int) -> TopKSAE:
    """An OpenAI sparse_autoencoder state dict; the layer comes from the file name, else the model's --layer."""
    what = "an OpenAI sparse_autoencoder checkpoint (or a dictionary_learning ae.pt without its config.json)"
    sd = read_checkpoint(path)
    W_enc = _tensor(sd, path, "encoder.weight", None, what)
    d_sae, d_in = W_enc.shape
    pre_bias = _tensor(sd, path, "pre_bias", (d_in,), what)
    latent_bias = _tensor(sd, path, "latent_bias", (d_sae,), what)
    W_dec = _tensor(sd, path, "decoder.weight", (d_in, d_sae), what)
    activation = sd.get("activation", "ReLU")  # what their from_state_dict assumes when the key is absent
    if activation == "TopK":
        act_sd = sd.get("activation_state_dict") or {}
        k = act_sd.get("k")
        if isinstance(k, Tensor) and k.numel() == 1:
            k = int(k.item())
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < d_sae:
            raise ExplainerError(f"{path}: activation_state_dict['k'] must be an integer in 1..{d_sae - 1}, found {k!r}")
        if act_sd.get("postact_fn", "ReLU") != "ReLU":
            raise ExplainerError(f"{path}: TopK postact_fn {act_sd.get('postact_fn')!r} is not supported (only ReLU)")
        kind, keep, normalize = "topk", k, "layer_norm"  # their loader turns LN on exactly for TopK
    elif activation == "ReLU":
        kind, keep, normalize = "relu", min(max_active, d_sae), "none"
    else:
        raise ExplainerError(f"{path}: activation {activation!r} is not supported; TopK and ReLU checkpoints load")
    layer = _layer_from_name(path)
    location = next((loc for loc in OPENAI_LOCATIONS if loc in str(path)), None)
    hook = str(Hook(layer, *OPENAI_LOCATIONS[location])) if location and layer is not None else None
    cfg = {"format": "openai", **({"hook_layer": layer} if layer is not None else {}),
           **({"openai_location": location} if location else {}), **({"hook": hook} if hook else {})}
    return build_sae(d_in, d_sae, keep, W_enc.t(), latent_bias, W_dec.t(), pre_bias, cfg, kind, normalize=normalize)


def _trainer_config(folder: Path) -> dict[str, Any]:
    path = folder / DL_CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExplainerError(f"{path} is not valid JSON ({e}); re-download the dictionary") from None
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    if not isinstance(trainer, dict):
        raise ExplainerError(f"{path} has no 'trainer' object; it is not a dictionary_learning config")
    return trainer


def _unit_decoder(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dictionary_learning's AutoEncoder.from_pretrained default: unit-norm decoder rows, the
    norms moved into the encoder, so latents are scaled as in that library; reconstructions are unchanged."""
    norms = W_dec.norm(dim=1)
    if torch.allclose(norms, torch.ones_like(norms)):
        return W_enc, b_enc, W_dec
    return W_enc * norms, b_enc * norms, W_dec / norms[:, None]


def load_dictionary_learning(folder: Path, max_active: int) -> TopKSAE:
    """A dictionary_learning folder (ae.pt + config.json); the config's trainer.layer is the layer."""
    trainer, path = _trainer_config(folder), folder / DL_WEIGHTS_FILE
    cls = trainer.get("dict_class")
    if cls not in DL_CLASSES:
        raise ExplainerError(f"{folder / DL_CONFIG_FILE}: trainer.dict_class {cls!r} is not supported; "
                             f"these load: {', '.join(DL_CLASSES)}")
    what = f"a dictionary_learning {cls}"
    sd = read_checkpoint(path)
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):  # nn.Parameter weights, [d, F] encoder
        W_enc = _tensor(sd, path, "W_enc", None, what)
        d_in, d_sae = W_enc.shape
        b_enc, W_dec = _tensor(sd, path, "b_enc", (d_sae,), what), _tensor(sd, path, "W_dec", (d_sae, d_in), what)
        b_dec = _tensor(sd, path, "b_dec", (d_in,), what)
    else:  # nn.Linear encoder and decoder
        W_enc = _tensor(sd, path, "encoder.weight", None, what).t()
        d_in, d_sae = W_enc.shape
        b_enc = _tensor(sd, path, "encoder.bias", (d_sae,), what)
        W_dec = _tensor(sd, path, "decoder.weight", (d_in, d_sae), what).t()
        b_dec = _tensor(sd, path, "bias" if cls == "AutoEncoder" else "b_dec", (d_in,), what)
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key, value) != value:
            raise ExplainerError(f"{folder / DL_CONFIG_FILE}: trainer.{key}={trainer[key]!r} but {path} holds "
                                 f"{value}; the config belongs to another dictionary")
    layer = trainer.get("layer")
    cfg = {"format": "dictionary_learning", "dict_class": cls,
           **({"hook_layer": layer} if isinstance(layer, int) and not isinstance(layer, bool) else {}),
           **({"model_name": trainer["lm_name"]} if isinstance(trainer.get("lm_name"), str) else {}),
           **({"submodule_name": trainer["submodule_name"]} if "submodule_name" in trainer else {})}
    keep = min(max_active, d_sae)
    if cls == "AutoEncoder":
        W_enc, b_enc, W_dec = _unit_decoder(W_enc, b_enc, W_dec)
        return build_sae(d_in, d_sae, keep, W_enc, b_enc, W_dec, b_dec, cfg, "relu")
    if cls == "AutoEncoderTopK":  # ReLU then TopK there, TopK then ReLU here: the same codes
        k = _tensor(sd, path, "k", (), what)
        return build_sae(d_in, d_sae, int(k.item()), W_enc, b_enc, W_dec, b_dec, cfg)
    if cls == "JumpReluAutoEncoder":  # b_dec is not subtracted before encoding there
        threshold = _tensor(sd, path, "threshold", (d_sae,), what)
        return build_sae(d_in, d_sae, keep, W_enc, b_enc + b_dec @ W_enc, W_dec, b_dec, cfg, "jumprelu", threshold)
    # BatchTopK at inference: one threshold on the post-ReLU codes, a JumpReLU with that threshold
    # everywhere (a negative, never-trained threshold keeps every positive code in both).
    threshold = _tensor(sd, path, "threshold", (), what)
    return build_sae(d_in, d_sae, keep, W_enc, b_enc, W_dec, b_dec, cfg, "jumprelu", threshold.expand(d_sae))
