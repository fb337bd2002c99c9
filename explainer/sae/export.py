"""Writing a dictionary in EleutherAI sparsify's layout, so sparsify and delphi users load ours.

The exact inverse of formats._load_sparsify: a folder per hookpoint holding cfg.json (sparsify's
SparseCoderConfig fields plus d_in) and sae.safetensors with encoder.weight [d_sae, d_in] (our
W_enc transposed), encoder.bias, W_dec [d_sae, d_in] and b_dec. sparsify encodes
TopK(ReLU(encoder(x - b_dec))), as ours does, so the weights carry over unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from explainer.errors import ExplainerError
from explainer.hooks import dictionary_hook
from explainer.sae.files import CFG_FILE, recover_folder, save_siblings, swap_in
from explainer.sae.formats import SPARSIFY_WEIGHTS_FILE, load_dictionary
from explainer.sae.model import TopKSAE

# A hookpoint names one folder, as sparsify's do: layers.6, layers.6.mlp, embed_tokens.
HOOKPOINT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
UNIT_NORM_TOL = 1e-4


def sparsify_cfg(sae: TopKSAE) -> dict:
    """sparsify's SparseCoderConfig for `sae`, plus d_in (as SparseCoder.save_to_disk writes it).

    No d_sae key: our loader reads a cfg.json holding one as SAELens'."""
    norms = sae.W_dec.detach().float().norm(dim=1)
    return {
        "activation": "topk",
        "expansion_factor": max(sae.d_sae // sae.d_in, 1),  # ignored by sparsify while num_latents is set
        # A training flag in sparsify (rows renormalised after each step); true only if ours already are,
        # since a folded activation scale leaves rows of norm 1/scale.
        "normalize_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_TOL)),
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
    }


def default_hookpoint(sae: TopKSAE, src: str | Path) -> str:
    """The dictionary's own hook (hooks.py names them as sparsify does: layers.6, layers.6.mlp)."""
    hook = dictionary_hook(sae.cfg)
    if hook is None:
        raise ExplainerError(f"dictionary {src} does not record its layer; name the folder with --hookpoint, "
                             "e.g. --hookpoint layers.6")
    return str(hook)


def check_exportable(sae: TopKSAE, src: str | Path) -> None:
    """sparsify is TopK on raw activations only; anything else would load there as a different dictionary."""
    if sae.activation != "topk":
        raise ExplainerError(f"dictionary {src} is a {sae.activation} dictionary; sparsify holds TopK SAEs only, "
                             "so it cannot be exported there (keep it in our SAELens layout)")
    if sae.normalize != "none":
        raise ExplainerError(f"dictionary {src} normalises its input ({sae.normalize}) per token, which sparsify "
                             "cannot represent; export a dictionary trained without --normalize layernorm")


def export_sparsify(src: str | Path, out: str | Path, hookpoint: Optional[str] = None) -> Path:
    """Write the dictionary at `src` (any format load_dictionary reads) to out/<hookpoint>/ in
    sparsify's layout, atomically: a kill mid-write leaves the previous export or the new one.
    `hookpoint` defaults to the dictionary's hook (layers.6, layers.6.mlp). Returns the hookpoint folder."""
    sae = load_dictionary(src)
    check_exportable(sae, src)
    hookpoint = hookpoint if hookpoint is not None else default_hookpoint(sae, src)
    if not HOOKPOINT.match(hookpoint) or hookpoint in (".", ".."):
        raise ExplainerError(f"hookpoint {hookpoint!r} must be one folder name such as layers.6 "
                             "(letters, digits, '.', '_', '-')")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExplainerError(f"--out {out} is a file; choose a folder")
    folder = out / hookpoint
    if folder.parent.is_dir():
        recover_folder(folder)
    if folder.exists():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in (CFG_FILE, SPARSIFY_WEIGHTS_FILE)) \
            if folder.is_dir() else [folder.name]
        if foreign:
            raise ExplainerError(f"{folder} exists and holds {', '.join(foreign[:3])}, not a sparsify export; "
                                 "choose another --out or --hookpoint")
    folder.parent.mkdir(parents=True, exist_ok=True)
    saving = save_siblings(folder)[0]
    saving.mkdir()
    try:
        save_file({
            "encoder.weight": sae.W_enc.detach().float().t().contiguous().cpu(),
            "encoder.bias": sae.b_enc.detach().float().contiguous().cpu(),
            "W_dec": sae.W_dec.detach().float().contiguous().cpu(),
            "b_dec": sae.b_dec.detach().float().contiguous().cpu(),
        }, str(saving / SPARSIFY_WEIGHTS_FILE))
        (saving / CFG_FILE).write_text(json.dumps(sparsify_cfg(sae), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(saving, ignore_errors=True)
        raise
    return swap_in(folder)
