"""A dictionary on disk: saved in the SAELens layout (cfg.json + sae_weights.safetensors +
sparsity.safetensors) so other tools read ours; loaded from that layout (TopK, ReLU, JumpReLU),
EleutherAI sparsify folders (cfg.json + sae.safetensors) and Gemma Scope params.npz folders,
local or on the Hugging Face hub; PyTorch checkpoints of other tools are sae/checkpoints.py's.
Reading the files themselves is sae_files.py's.
"""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.hooks import ATTN, MLP, Hook, parse_hook
from explainer.sae.checkpoints import DL_CONFIG_FILE, DL_WEIGHTS_FILE, load_dictionary_learning, load_openai
from explainer.sae.files import (CFG_FILE, GEMMA_SCOPE_FILE, carry_over, positive_int, read_cfg, read_tensors,
    recover_folder, resolve_dictionary, save_siblings, swap_in)
from explainer.sae.model import NORMALIZATIONS, TopKSAE, build_sae

WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
SAELENS_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}


def fingerprint(sae: TopKSAE) -> str:
    """Hash of k and the weights: the DB never files two different dictionaries under one id."""
    h = hashlib.blake2b(digest_size=16)
    tensors: list[Tensor] = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
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
                    extra: Optional[dict[str, str]] = None, weights_from: Optional[Path] = None) -> Path:
    """Write `sae` in the SAELens layout, atomically: a kill mid-save leaves the previous folder or the new one.

    The files are written into a sibling folder that then replaces `folder` by rename; what the old
    folder held besides the dictionary (a training checkpoint) is carried over as hard links.
    `sparsity` is the log10 firing frequency per latent (SAELens' sparsity.safetensors); `extra` maps
    further file names to their text (metrics.json), saved with the dictionary. `weights_from`: a
    weights file already written (a latent-sharded run's, shard by shard), moved in instead of
    writing `sae`'s tensors, which then serve only for cfg.json.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    if folder.exists() and not folder.is_dir():
        raise ExplainerError(f"{folder} is a file; choose a folder path for the dictionary")
    saving = save_siblings(folder)[0]
    saving.mkdir()
    if weights_from is not None:
        os.replace(weights_from, saving / WEIGHTS_FILE)
    tensors = {} if weights_from is not None else {
        "W_enc": sae.W_enc.detach().float().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().float().cpu(),
        "W_dec": sae.W_dec.detach().float().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().float().cpu(),
        **({"threshold": sae.threshold.detach().float().cpu()} if sae.threshold is not None else {}),
    }
    if tensors:
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
    return swap_in(folder)


def load_dictionary(path: str | Path, device: Any = "cpu", max_active: int = 256) -> TopKSAE:
    """Load a dictionary from a SAELens-layout folder (ours; TopK, ReLU or JumpReLU), an
    EleutherAI sparsify folder or a Gemma Scope params.npz folder, local or on the Hugging Face
    hub (owner/repo/folder), or from an OpenAI sparse_autoencoder .pt file or a dictionary_learning
    ae.pt + config.json folder (sae/checkpoints.py). `max_active`: codes kept per token for the
    dictionaries whose number of active latents varies (ReLU, JumpReLU, BatchTopK)."""
    folder = resolve_dictionary(path)
    if not folder.exists() and folder.parent.is_dir():
        recover_folder(folder)  # a save killed between its two renames
    if not folder.exists():
        raise ExplainerError(f"dictionary folder {folder} does not exist (train one with `explainer train`)")
    if folder.is_file():  # a lone checkpoint: OpenAI's, or a dictionary_learning ae.pt beside its config
        dl = folder.name == DL_WEIGHTS_FILE and (folder.parent / DL_CONFIG_FILE).is_file()
        sae = load_dictionary_learning(folder.parent, max_active) if dl else load_openai(folder, max_active)
        sae.cfg.setdefault("path", str(folder))
        return sae.to(device)
    if not (folder / CFG_FILE).is_file() and (folder / GEMMA_SCOPE_FILE).is_file():
        return _load_gemma_scope(folder, max_active).to(device)
    if not (folder / CFG_FILE).is_file() and (folder / DL_WEIGHTS_FILE).is_file():
        sae = load_dictionary_learning(folder, max_active)
        sae.cfg.setdefault("path", str(folder))
        return sae.to(device)
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
    return build_sae(d_in, d_sae, k, t["W_enc"].float(), b_enc, t["W_dec"], t["b_dec"], {**cfg, "format": "saelens"},
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
    cfg: dict[str, Any] = {"format": "gemma_scope", **({"hook_layer": int(layer.group(1))} if layer else {})}
    # The release names the site: gemma-scope-2b-pt-res (residual), -mlp (hook_mlp_out), -att (hook_z,
    # the heads' outputs before o_proj); the hub cache keeps the repo name in the path.
    site = re.search(r"gemma-scope-[^/]*?-(res|mlp|att)(?:-canonical)?(?:/|$)", str(folder).replace("--", "/"))
    if layer and site:
        parts = {"res": ("", "output"), "mlp": (MLP, "output"), "att": (f"{ATTN}.o_proj", "input")}[site.group(1)]
        cfg["hook"] = str(Hook(int(layer.group(1)), *parts))
    b_enc = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    return build_sae(d_in, d_sae, min(max_active, d_sae), arrays["W_enc"], b_enc, arrays["W_dec"], arrays["b_dec"], cfg,
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
    meta: dict[str, Any] = {"format": "sparsify", "sparsify_cfg": cfg}
    try:  # sparsify names the folder by its hookpoint: layers.6, layers.6.mlp, h.6
        meta["hook"] = str(parse_hook(folder.name))
    except ExplainerError:
        pass  # another name (embed_tokens, a renamed folder): the layer is unknown, as before
    return build_sae(d_in, d_sae, k, t["encoder.weight"].float().t(), t["encoder.bias"], t["W_dec"], t["b_dec"], meta)


def read_sparsity(folder: str | Path) -> Optional[Tensor]:
    """log10 firing frequency per latent from sparsity.safetensors, or None if the file is absent."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    return read_tensors(path, {"sparsity": None})["sparsity"]


def log10_frequency(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """SAELens' sparsity convention: log10(fraction of tokens a latent fired on + 1e-10)."""
    return torch.log10(fire_counts.double() / max(n_tokens, 1) + 1e-10).float()
