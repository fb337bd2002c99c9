"""The output side of a dictionary: logit lens and decoder-cosine neighbours, computed in blocks.

Logit lens. A latent's decoder row d (in the model's activation space at the hook) is read
through the final norm and the unembedding as W_U (gamma * d'), the logit-lens convention
of Neuronpedia/SAEDashboard: gamma is the final norm's elementwise weight (Gemma's 1 + w
included, measured by probing the norm module, not read from a parameter name), and d' is d
itself for an RMSNorm or d minus its mean for a LayerNorm (the centring is linear; its
per-token 1/std is not, so it is left out, as is the 1/rms of an RMSNorm). So a value is the
logit change per unit step along d for a residual of unit RMS; the unembedding bias is
constant along d and left out. Gemma's final-logit softcapping is monotone and does not
change the ranking: it is ignored too. Only a residual-stream hook (`layers.N` or
`layers.N:input`) feeds the final norm directly; for any other hook (an MLP or attention
output) the lens is skipped, since the row would first pass the rest of the block.

A dictionary trained on layer-normed inputs (normalize layer_norm) has rows in normalised
space; their lens is the same up to a per-token scale, so it is computed the same way.

Both computations take a block of latents against everything (vocab or all latents) and
keep a top-k per block, so memory is O(block x columns), never [latents x vocab] or
[latents x latents]: 1M latents x 49,152 tokens fit in a few hundred MB.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from explainer.errors import ExplainerError
from explainer.lm import first_attribute

N_LENS = 10           # top and bottom tokens kept per latent
N_NEIGHBOURS = 10     # nearest latents kept per latent
BLOCK_ELEMENTS = 2**25  # ~128 MiB of float32 scores per lens block
# Neighbour blocks are larger: at 1M latents 32 query rows per pass over W_dec ran at 14.5
# latents/s and 256 rows (1 GiB of scores) at 28.5 on 2 CPU cores, the pass being the cost.
NEIGHBOUR_BLOCK_ELEMENTS = 2**28
FINAL_NORMS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm", "model.final_layernorm", "transformer.norm_f", "backbone.norm_f")
_RESIDUAL = re.compile(r"layers\.\d+(:input)?")


def is_residual_hook(hook: str) -> bool:
    """Whether a dictionary's hook reads the residual stream (`layers.N`, `layers.N:input`)."""
    return _RESIDUAL.fullmatch(hook) is not None


def final_norm(model: Any) -> Any:
    """The model's final norm module, found by the names the common architectures use."""
    norm = first_attribute(model, FINAL_NORMS, torch.nn.Module)
    if norm is not None:
        return norm
    raise ExplainerError(f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(FINAL_NORMS)}); "
                         "the logit lens needs one: turn it off with --no-lens")


class NormMap(NamedTuple):
    """The linear part of the final norm on a direction: gamma * (d - mean(d) if centred else d)."""
    gamma: Tensor   # [d] float32
    centred: bool


def norm_map(norm: Any, d: int) -> NormMap:
    """Measure gamma and centring by probing the module, so every norm flavour is read the same way.

    A mean-zero probe v of unit RMS gives norm(v) - norm(-v) = 2 gamma v (bias and centring
    cancel); a constant probe is mapped to its bias only when the norm centres."""
    p = next(iter(norm.parameters()), None)
    dev, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return norm(x.to(device=dev, dtype=dtype)).float().cpu()

    alt = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d)])
    if d % 2:
        alt[-1] = 0.0  # keep the probe's mean at zero
    probes = torch.stack([alt, alt.roll(1)])  # every position is nonzero in one of them
    probes = probes / probes.pow(2).mean(1, keepdim=True).sqrt()
    diff = (run(probes) - run(-probes)) / 2
    use = (probes[0] != 0).float()
    gamma = use * diff[0] / probes[0].where(probes[0] != 0, 1.0) + (1 - use) * diff[1] / probes[1].where(probes[1] != 0, 1.0)
    ones = torch.ones(1, d)
    centred = bool(((run(ones) - run(-ones)).abs().max() < 1e-3 * gamma.abs().max().clamp(min=1e-12)).item())
    return NormMap(gamma, centred)


def unembedding(model: Any) -> Tensor:
    """W_U [vocab, d] (tied or not: the output embedding's weight either way)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
        raise ExplainerError(f"{type(model).__name__} has no output embedding (lm_head) for the logit lens; "
                             "turn it off with --no-lens")
    return out.weight


def block_size(n_cols: int, elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block so that a block's [rows, n_cols] scores stay near `elements`."""
    return max(1, elements // max(n_cols, 1))


def _blocks(n: int, block: int) -> Iterator[slice]:
    for lo in range(0, n, block):
        yield slice(lo, min(n, lo + block))


class LensResult(NamedTuple):
    top_values: Tensor     # [n, N_LENS] largest logits, descending
    top_ids: Tensor
    bottom_values: Tensor  # [n, N_LENS] smallest logits, ascending
    bottom_ids: Tensor


def logit_lens(W_dec: Tensor, W_U: Tensor, nm: NormMap, *, k: int = N_LENS, block: Optional[int] = None) -> LensResult:
    """Top and bottom k tokens of every decoder row through the final norm and unembedding.

    W_dec [n, d], W_U [vocab, d]; computed in float32 on W_U's device, `block` rows at a time."""
    dev = W_U.device
    W = W_U.float() if W_U.dtype != torch.float32 else W_U
    gamma = nm.gamma.to(dev)
    k = min(k, W.shape[0])
    block = block or block_size(W.shape[0])
    parts: list[tuple[Tensor, ...]] = []
    for sl in _blocks(W_dec.shape[0], block):
        d = W_dec[sl].to(dev, torch.float32)
        if nm.centred:
            d = d - d.mean(1, keepdim=True)
        logits = (d * gamma) @ W.T
        top = logits.topk(k, dim=1)
        bot = logits.topk(k, dim=1, largest=False)
        parts.append((top.values.cpu(), top.indices.cpu(), bot.values.cpu(), bot.indices.cpu()))
    if not parts:
        empty = torch.zeros(0, k)
        return LensResult(empty, empty.long(), empty, empty.long())
    return LensResult(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def decoder_neighbours(W_dec: Tensor, *, rows: Optional[Tensor] = None, k: int = N_NEIGHBOURS,
                       block: Optional[int] = None, device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """(cosines, ids) [len(rows), k] of the nearest other decoder rows of each of `rows` (default:
    all), exact, among all rows of W_dec, `block` query rows at a time. A zero row (a dead or
    pruned latent) has cosine 0 with everything."""
    dev = device or W_dec.device
    W = W_dec.to(dev, torch.float32)  # no copy when it already is: 1M x 576 floats are 2.4 GB
    inv = 1 / W.norm(dim=1).clamp(min=1e-12)
    n = W.shape[0]
    query = torch.arange(n) if rows is None else rows.long().cpu()
    k = min(k, max(n - 1, 0))
    block = block or block_size(n, NEIGHBOUR_BLOCK_ELEMENTS)
    vals, ids = [], []
    for sl in _blocks(len(query), block):
        q = query[sl].to(dev)
        cos = (W[q] * inv[q, None]) @ W.T
        cos *= inv
        cos[torch.arange(len(q), device=dev), q] = -torch.inf  # a latent is not its own neighbour
        top = cos.topk(k, dim=1)
        vals.append(top.values.cpu())
        ids.append(top.indices.cpu())
    if not vals:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(ids)
