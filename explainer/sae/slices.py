"""One latent slice of a SAELens TopK dictionary, read without loading the whole matrices.

`sample --latent-shards` (sample/wide.py) gives each rank n/R latents; for a dictionary too wide
for one rank, a rank must not hold W_enc and W_dec whole even while loading. safetensors'
`get_slice` reads a column range of W_enc and a row range of W_dec. The fingerprint, which
hashes the whole weights, is computed from row blocks of the file, so the slice registers under
the same dictionary id as a whole load (formats.fingerprint) would.

Only the plain case is read here (our own and SAELens' TopK folders, b_dec applied to the
input, no run-time scale other than layer_norm); anything else returns None and the caller
loads the whole dictionary through formats.load_dictionary, which also says what is wrong.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from explainer.errors import ExplainerError
from explainer.sae.files import CFG_FILE, read_cfg
from explainer.sae.formats import WEIGHTS_FILE as WEIGHTS
from explainer.sae.model import NORMALIZATIONS, TopKSAE

BLOCK = 1 << 24  # elements per block the fingerprint reads (64 MiB of float32)


def _plain_topk(cfg: dict[str, Any]) -> Optional[tuple[int, int, int, str]]:
    """(d_in, d_sae, k, normalize) of a TopK config this module reads, else None."""
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    normalize = cfg.get("normalize_activations") or "none"
    plain = ((cfg.get("architecture") == "topk" or fn == "topk") and cfg.get("apply_b_dec_to_input", True) is not False
             and normalize in NORMALIZATIONS and not cfg.get("rescale_acts_by_decoder_norm"))
    dims = [cfg.get("d_in"), cfg.get("d_sae"), k]
    if not plain or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims):
        return None
    return int(dims[0]), int(dims[1]), int(dims[2]), normalize  # type: ignore[arg-type]


def topk_dims(folder: Path) -> Optional[tuple[int, int, int, str]]:
    """(d_in, d_sae, k, normalize) of a folder this module reads, else None."""
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS).is_file():
        return None
    return _plain_topk(read_cfg(folder))


def read_topk_slice(folder: Path, start: int, width: int) -> Optional[tuple[TopKSAE, str]]:
    """(latents start..start+width as a TopKSAE, the whole dictionary's fingerprint), or None."""
    dims = topk_dims(folder)
    if dims is None:
        return None
    cfg = read_cfg(folder)
    d_in, d_sae, k, normalize = dims
    shapes = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in]}
    path = folder / WEIGHTS
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if not set(shapes) <= set(f.keys()) or any(f.get_slice(n).get_shape() != s for n, s in shapes.items()):
                return None
            fp = _fingerprint(f, shapes, f"topk:{d_in}:{d_sae}:{k}", normalize)
            part = TopKSAE(d_in, width, k, cfg={**cfg, "format": "saelens", "path": cfg.get("path", str(folder))},
                           normalize=normalize)
            with torch.no_grad():
                part.W_enc.copy_(f.get_slice("W_enc")[:, start:start + width].float())
                part.b_enc.copy_(f.get_slice("b_enc")[start:start + width].float())
                part.W_dec.copy_(f.get_slice("W_dec")[start:start + width].float())
                part.b_dec.copy_(f.get_tensor("b_dec").float())
    except ExplainerError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ExplainerError(f"{path} is not a readable safetensors file ({e}); re-train or re-download it") from None
    return part, fp


def _fingerprint(f: Any, shapes: dict[str, list[int]], header: str, normalize: str) -> str:
    """formats.fingerprint of the whole dictionary, from row blocks; refuses non-finite weights as its loader does."""
    h = hashlib.blake2b(digest_size=16)
    h.update(header.encode())
    if normalize != "none":
        h.update(f"normalize:{normalize}".encode())
    for name, shape in shapes.items():
        sl = f.get_slice(name)
        rows = max(1, BLOCK // (shape[1] if len(shape) > 1 else 1))
        for lo in range(0, shape[0], rows):
            block = sl[lo:lo + rows].to(torch.float32).contiguous()
            if not torch.isfinite(block).all():
                raise ExplainerError(f"{name!r} in the dictionary holds NaN or infinite values; the file is corrupt")
            h.update(block.numpy().tobytes())
    return h.hexdigest()
