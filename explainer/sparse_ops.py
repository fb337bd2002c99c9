"""The two hot kernels of a TopK SAE step, written so nothing dense in d_sae is built in backward.

A TopK step is dominated by one dense matmul, `(x - b_dec) @ W_enc` ([N, d_in] x [d_in, d_sae]).
Everything after it touches only the k selected latents per token, so:
  * `topk_rows` finds an exact row-wise top-k in two cheap stages instead of one full sort pass;
  * `sparse_forward` is one autograd Function for encoder, TopK, AuxK, Multi-TopK and decoder whose
    backward builds every gradient from the selected (token, latent) pairs alone: no [N, d_sae]
    gradient matrix, no second dense matmul, one sort of the pairs shared by W_enc and W_dec.
  * `sparse_decode` (inference) is `F.embedding_bag` with per-sample weights: it reads only the
    k active decoder rows, and its autograd backward touches only those.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _block_size(d_sae: int, k: int, target_blocks: int) -> Optional[int]:
    """Block width for the two-stage top-k, or None where plain torch.topk is as good."""
    block = 8
    while d_sae // (block * 2) >= target_blocks * k:
        block *= 2
    if d_sae // block < 4 * k or d_sae % block:
        return None
    return block


def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of a 2-D tensor (unsorted), faster than torch.topk on CPU.

    Split a row into blocks; the k largest entries all lie in the k blocks with the largest
    maxima (a block holding one of them has a maximum at least the k-th value, and at most k
    blocks can), so a top-k over block maxima leaves k * block candidates for a second top-k.
    fp32 uses contiguous blocks (cheap candidate gather); bf16 uses strided blocks (column j,
    j + n_blocks, ...), whose maxima reduce element-wise, because a bf16 max over short
    contiguous runs is slow on CPU. Ties may resolve to other indices than torch.topk's.
    """
    n, d_sae = pre.shape
    strided = pre.dtype != torch.float32
    block = _block_size(d_sae, k, 32 if strided else 16) if pre.device.type == "cpu" else None
    if block is None:
        return pre.topk(k, dim=1, sorted=False)
    n_blocks = d_sae // block
    if strided:
        blocks = pre.view(n, block, n_blocks)
        _, best = blocks.amax(dim=1).topk(k, dim=1, sorted=False)
        candidates = blocks.gather(2, best.unsqueeze(1).expand(n, block, k)).view(n, block * k)
        values, where = candidates.topk(k, dim=1, sorted=False)
        return values, torch.div(where, k, rounding_mode="floor") * n_blocks + best.gather(1, where % k)
    blocks = pre.view(n, n_blocks, block)
    _, best = blocks.amax(dim=2).topk(k, dim=1, sorted=False)
    rows = (torch.arange(n, device=pre.device).unsqueeze(1) * n_blocks + best).flatten()
    candidates = pre.view(n * n_blocks, block).index_select(0, rows).view(n, k * block)
    values, where = candidates.topk(k, dim=1, sorted=False)
    return values, best.gather(1, where // block) * block + where % block


class Workspace:
    """Keeps the [N, d_sae] pre-activation buffer alive between steps.

    Allocating 256 MB afresh every step costs page faults comparable to the top-k itself; the
    buffer never escapes a step (only values and indices are returned), so reusing it is safe.
    """

    def __init__(self) -> None:
        self._buf: Optional[Tensor] = None

    def get(self, n: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buf
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n * d:
            buf = self._buf = None  # free the old one before allocating its successor
            buf = self._buf = torch.empty(n * d, dtype=dtype, device=device)
        return buf[: n * d].view(n, d)

    def clear(self) -> None:
        self._buf = None


def encoder_rows(W_enc: Tensor) -> Tensor:
    """W_enc [d_in, d_sae] as contiguous latent rows [d_sae, d_in] (free when stored transposed)."""
    rows = W_enc.t()
    return rows if rows.is_contiguous() else rows.contiguous()


def select_latents(pre: Tensor, k: int, dead: Optional[Tensor], k_aux: int, multi_k: int) -> list[tuple[Tensor, Tensor]]:
    """(values, indices) of the sets a step trains: TopK, AuxK over the `dead` ids, Multi-TopK.

    Values are pre-activations (ReLU not yet applied); an unused set is [N, 0].
    """
    n = pre.shape[0]
    none = (pre.new_empty(n, 0), torch.empty(n, 0, dtype=torch.long, device=pre.device))
    multi = none
    if multi_k > k:
        values, indices = topk_rows(pre, multi_k)
        values, order = values.sort(dim=1, descending=True)  # the first k are the TopK set
        multi = (values, indices.gather(1, order))
        main = (multi[0][:, :k].contiguous(), multi[1][:, :k].contiguous())
    else:
        main = topk_rows(pre, k)
    aux = none
    if dead is not None and dead.numel() > 0 and k_aux > 0:
        values, where = pre.index_select(1, dead).topk(min(k_aux, dead.numel()), dim=1, sorted=False)
        aux = (values, dead[where])
    return [main, aux, multi]


def _psw_grad(grad_out: Tensor, W_dec: Tensor, indices: Tensor) -> Tensor:
    """d(sum_j v[:, j] * W_dec[indices[:, j]]) / dv = <W_dec[indices[t, j]], grad_out[t]>, per (t, j)."""
    n, width = indices.shape
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None:
        # The kernel embedding_bag's own backward uses: dot products without gathering [N, k, d].
        offsets = torch.arange(0, n * width, width, device=indices.device)
        bags = torch.arange(n, device=indices.device).repeat_interleave(width)
        return op(grad_out, W_dec, indices.reshape(-1), offsets, bags, 0, -1).view(n, width)
    weights = torch.ones(n, width, dtype=W_dec.dtype, device=W_dec.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(indices, W_dec.detach(), mode="sum", per_sample_weights=weights)
        return torch.autograd.grad(out, weights, grad_out)[0]


def _empty(n: int, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(n, 0, dtype=dtype or like.dtype, device=like.device)


class _SparseSAE(torch.autograd.Function):
    """Encoder + TopK (+ AuxK, Multi-TopK) + sparse decoder, with one shared sparse backward.

    Outputs per latent set (main, aux, multi): (decoded [N, d] or [N, 0], values, indices). The aux
    set decodes without b_dec (it predicts a residual). Backward sorts all selected (token, latent)
    pairs by latent once and builds the W_enc and W_dec gradients from that one order.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, multi_k, mm_dtype, workspace):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        centered = x - b_dec
        n, d_sae = x.shape[0], W_enc.shape[1]
        dtype = mm_dtype or x.dtype
        pre = workspace.get(n, d_sae, dtype, x.device) if workspace is not None else None
        # ReLU is applied to the winners only: ReLU(TopK(.)) has the same non-zeros as TopK(ReLU(.))
        # and skips a full pass over [N, d_sae].
        pre = torch.addmm(b_enc.to(dtype), centered.to(dtype), W_enc.to(dtype), out=pre)
        outs, saved = [], []
        for s, (values, indices) in enumerate(select_latents(pre, k, dead, k_aux, multi_k)):
            values = values.to(x.dtype).clamp(min=0)
            if W_dec is None or indices.shape[1] == 0:
                decoded = _empty(n, x)
            else:
                decoded = F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
                if s != 1:
                    decoded = decoded + b_dec
            outs += [decoded, values, indices]
            saved += [values, indices]
            ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(centered, W_enc, W_dec, *saved)
        ctx.d_sae = d_sae
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        centered, W_enc, W_dec, *saved = ctx.saved_tensors
        n, d_in = centered.shape
        sets = []  # (values, indices, grad of decoded, set id)
        grad_pre_parts = []
        for s in range(3):
            values, indices = saved[2 * s], saved[2 * s + 1]
            g_dec, g_val = grads[3 * s], grads[3 * s + 1]
            if indices.shape[1] == 0 or (g_dec is None and g_val is None):
                continue
            g = g_val.clone() if g_val is not None else torch.zeros_like(values)
            if g_dec is not None:
                g += _psw_grad(g_dec, W_dec, indices)
            grad_pre_parts.append(g * (values > 0))  # ReLU's gradient
            sets.append((values, indices, g_dec, s))
        if not sets:
            return (None,) * 11
        indices = torch.cat([st[1] for st in sets], dim=1)
        grad_pre = torch.cat(grad_pre_parts, dim=1).to(centered.dtype)
        width = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat)
        tokens = torch.div(order, width, rounding_mode="floor")
        offsets = torch.zeros(ctx.d_sae, dtype=torch.long, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=ctx.d_sae)[:-1], dim=0, out=offsets[1:])

        def rows(table: Tensor, bag_tokens: Tensor, weights: Tensor) -> Tensor:
            return F.embedding_bag(bag_tokens, table, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])

        need_x, need_wenc, need_benc, need_wdec, need_bdec = ctx.needs_input_grad[:5]
        grad_x = grad_wenc = grad_benc = grad_wdec = grad_bdec = None
        if need_x or need_bdec:
            grad_centered = F.embedding_bag(indices, encoder_rows(W_enc), mode="sum", per_sample_weights=grad_pre)
            grad_x = grad_centered if need_x else None
            if need_bdec:
                grad_bdec = -grad_centered.sum(0)
                for _, _, g_dec, s in sets:
                    if g_dec is not None and s != 1:
                        grad_bdec = grad_bdec + g_dec.sum(0)
        if need_wenc:
            # A transposed view matching W_enc's storage, so autograd keeps it without a copy.
            grad_wenc = rows(centered, tokens, grad_pre).t()
        if need_benc:
            grad_benc = torch.zeros(ctx.d_sae, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_benc.index_add_(0, flat, grad_pre.reshape(-1))
        if need_wdec and any(st[2] is not None for st in sets):
            # One table holding each set's output gradient; a pair reads the block of its own set.
            tables, weights, block_of_column = [], [], []
            for block, (values, _, g_dec, _) in enumerate(sets):
                tables.append(g_dec if g_dec is not None else centered.new_zeros(n, d_in))
                weights.append(values if g_dec is not None else torch.zeros_like(values))
                block_of_column += [block] * values.shape[1]
            column_block = torch.tensor(block_of_column, device=flat.device)
            table_rows = tokens + n * column_block[order % width]
            grad_wdec = rows(torch.cat(tables).to(W_dec.dtype), table_rows, torch.cat(weights, dim=1).to(W_dec.dtype))
        return grad_x, grad_wenc, grad_benc, grad_wdec, grad_bdec, None, None, None, None, None, None


def sparse_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Optional[Tensor],
    b_dec: Tensor,
    k: int,
    *,
    dead: Optional[Tensor] = None,
    k_aux: int = 0,
    multi_k: int = 0,
    mm_dtype: Optional[torch.dtype] = None,
    workspace: Optional[Workspace] = None,
) -> tuple[Tensor, ...]:
    """ReLU(TopK((x - b_dec) @ W_enc + b_enc)) and its decoding, with a sparse backward.

    Returns (x_hat, values, indices, aux_x_hat, aux_values, aux_indices, multi_x_hat, multi_values,
    multi_indices): the AuxK set is the top k_aux among the `dead` latent ids, decoded without b_dec;
    Multi-TopK decodes the top multi_k. Unrequested parts are [N, 0]; with W_dec None nothing is
    decoded (encoding only). `mm_dtype` runs only the encoder matmul in that dtype (bf16 autocast).
    """
    return _SparseSAE.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, multi_k, mm_dtype, workspace)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: touches k decoder rows per token, both ways."""
    if indices.shape[1] == 0:
        return W_dec.new_zeros(indices.shape[0], W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
