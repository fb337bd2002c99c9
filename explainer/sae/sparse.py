"""The hot path of a TopK SAE step, written so nothing dense in d_sae is built in backward.

A TopK step is dominated by one dense matmul, `(x - b_dec) @ W_enc` ([N, d_in] x [d_in, d_sae]).
Everything after it touches only the k selected latents per token, so:
  * `topk_rows` finds the row-wise top-k in two cheap stages instead of one full sort pass;
  * `sparse_forward` is one autograd Function for encoder, TopK, AuxK, Multi-TopK and decoder whose
    backward builds every gradient from the selected (token, latent) pairs alone: no [N, d_sae]
    gradient matrix, no second dense matmul, one sort of the pairs shared by W_enc and W_dec.
  * `sparse_decode` (inference) is `F.embedding_bag` with per-sample weights: it reads only the
    k active decoder rows, and its autograd backward touches only those.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

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


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def topk_rows(pre: Tensor, k: int, *, strided: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Top-k of each row of a 2-D float tensor (unsorted), faster than torch.topk on CPU.

    Exact for the non-negative entries, which are all a ReLU keeps: on CPU the floats are
    compared as integers of the same bits (an IEEE float >= 0 orders like its bit pattern, and
    integer max/top-k vectorise where bf16 ones do not), so negative entries, which all compare
    below every non-negative one, fill leftover slots in no particular order.

    Two stages: split a row into blocks; the k largest entries all lie in the k blocks with the
    largest maxima (a block holding one of them has a maximum at least the k-th value, and at
    most k blocks can), so a top-k over block maxima leaves k * block candidates for a second
    top-k. Blocks are contiguous runs, or with `strided` every n_blocks-th column, whose maxima
    reduce element-wise (faster for 16-bit types). Ties may resolve to other indices than
    torch.topk's.
    """
    if pre.device.type != "cpu" or pre.dtype not in _BITS:
        return pre.topk(k, dim=1, sorted=False)
    if strided is None:
        strided = pre.element_size() < 4
    values, indices = _topk_keys(pre.view(_BITS[pre.dtype]), k, strided)
    return values.view(pre.dtype), indices


def _topk_keys(keys: Tensor, k: int, strided: bool) -> tuple[Tensor, Tensor]:
    """The two-stage top-k of topk_rows on integer keys [n, d]. The top-k over block maxima
    is itself a top-k of a wide row, so it recurses (16k latents: 1024 maxima -> 128 -> plain),
    which costs less than one torch.topk over the 1024."""
    n, d_sae = keys.shape
    block = _block_size(d_sae, k, 32 if strided else 16)
    if block is None:
        return keys.topk(k, dim=1, sorted=False)
    n_blocks = d_sae // block
    if strided:
        blocks = keys.view(n, block, n_blocks)
        _, best = _topk_keys(blocks.amax(dim=1), k, strided)
        candidates = blocks.gather(2, best.unsqueeze(1).expand(n, block, k)).view(n, block * k)
        values, where = candidates.topk(k, dim=1, sorted=False)
        indices = torch.div(where, k, rounding_mode="floor") * n_blocks + best.gather(1, where % k)
        return values, indices
    blocks = keys.view(n, n_blocks, block)
    _, best = _topk_keys(blocks.amax(dim=2), k, strided)
    rows = (torch.arange(n, device=keys.device).unsqueeze(1) * n_blocks + best).flatten()
    candidates = keys.view(n * n_blocks, block).index_select(0, rows).view(n, k * block)
    values, where = candidates.topk(k, dim=1, sorted=False)
    return values, best.gather(1, where // block) * block + where % block


class Workspace:
    """Keeps the step's large scratch tensors (pre-activations: 256 MB at 4k x 16k) between steps.

    Allocating them afresh every step costs page faults comparable to the top-k itself; none of
    them escapes a step (only values and indices are returned), so reusing them is safe.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < size:
            self._bufs.pop(name, None)  # free the old one before allocating its successor
            buf = self._bufs[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)

    def clear(self) -> None:
        self._bufs.clear()


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


def _encoder_matmul(centered: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype, ws: Workspace) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc in `dtype`, into a reused buffer."""
    (n, d_in), d_sae = centered.shape, W_enc.shape[1]
    pre = ws.get("pre", (n, d_sae), dtype, centered.device)
    if dtype == W_enc.dtype:
        return torch.addmm(b_enc, centered, W_enc, out=pre)
    # Low precision: the cast copies W_enc anyway, so append b_enc as an extra input column
    # (and a column of ones to x) and let the matmul add it, instead of a broadcast pass over pre.
    weight = ws.get("weight", (d_sae, d_in + 1), dtype, centered.device)
    weight[:, :d_in].copy_(encoder_rows(W_enc))
    weight[:, d_in].copy_(b_enc)
    inputs = ws.get("inputs", (n, d_in + 1), dtype, centered.device)
    inputs[:, :d_in].copy_(centered)
    inputs[:, d_in].fill_(1.0)
    return torch.mm(inputs, weight.t(), out=pre)


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


def _empty(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, 0, dtype=like.dtype, device=like.device)


class _SparseSAE(torch.autograd.Function):
    """Encoder + TopK (+ AuxK, Multi-TopK) + sparse decoder, with one shared sparse backward.

    Outputs per latent set (main, aux, multi): (decoded [N, d] or [N, 0], values, indices). The aux
    set decodes without b_dec (it predicts a residual) but passes its gradient to b_dec. Backward
    sorts all selected (token, latent) pairs by latent once and builds the W_enc and W_dec gradients
    from that one order.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, multi_k, mm_dtype, workspace, unit_decoder):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.unit_decoder = unit_decoder
        # Under bf16 autocast the weight-gradient reductions also run in bf16 (as AMP's backward
        # matmuls would), which on CPU is also ~3x faster for these gathers than fp32.
        ctx.grad_dtype = mm_dtype if mm_dtype is not None and mm_dtype != x.dtype else None
        centered = x - b_dec
        pre = _encoder_matmul(centered, W_enc, b_enc, mm_dtype or x.dtype, workspace or Workspace())
        # ReLU is applied to the winners only: ReLU(TopK(.)) has the same non-zeros as TopK(ReLU(.))
        # and skips a full pass over [N, d_sae].
        n, d_sae = pre.shape
        # The decoder's gathers follow the same precision as the weight-gradient reductions.
        W_gather = W_dec.to(ctx.grad_dtype) if W_dec is not None and ctx.grad_dtype else W_dec
        outs, saved = [], []
        for s, (values, indices) in enumerate(select_latents(pre, k, dead, k_aux, multi_k)):
            values = values.to(x.dtype).clamp(min=0)
            if W_dec is None or indices.shape[1] == 0:
                decoded = _empty(n, x)
            else:
                decoded = F.embedding_bag(indices, W_gather, mode="sum", per_sample_weights=values.to(W_gather.dtype))
                decoded = decoded.to(x.dtype) + b_dec if s != 1 else decoded.to(x.dtype)
            outs += [decoded, values, indices]
            saved += [values, indices]
            ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(centered, W_enc, W_dec, W_gather, *saved)
        ctx.d_sae = d_sae
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        centered, W_enc, W_dec, W_gather, *saved = ctx.saved_tensors
        n, d_in = centered.shape
        sets = []  # (values, indices, grad of decoded, set id)
        grad_pre_parts, along_parts = [], []
        for s in range(3):
            values, indices = saved[2 * s], saved[2 * s + 1]
            g_dec, g_val = grads[3 * s], grads[3 * s + 1]
            if indices.shape[1] == 0 or (g_dec is None and g_val is None):
                continue
            g = g_val.clone() if g_val is not None else torch.zeros_like(values)
            along = torch.zeros_like(values)
            if g_dec is not None:
                dots = _psw_grad(g_dec.to(W_gather.dtype), W_gather, indices).to(values.dtype)
                g += dots
                along = values * dots  # this pair's share of <grad W_dec[latent], W_dec[latent]>
            grad_pre_parts.append(g * (values > 0))  # ReLU's gradient
            along_parts.append(along)
            sets.append((values, indices, g_dec, s))
        if not sets:
            return (None,) * 12
        indices = torch.cat([st[1] for st in sets], dim=1)
        grad_pre = torch.cat(grad_pre_parts, dim=1).to(centered.dtype)
        width = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat)
        tokens = torch.div(order, width, rounding_mode="floor")
        offsets = torch.zeros(ctx.d_sae, dtype=torch.long, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=ctx.d_sae)[:-1], dim=0, out=offsets[1:])

        def rows(table: Tensor, bag_tokens: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
            low = ctx.grad_dtype or dtype
            out = F.embedding_bag(bag_tokens, table.to(low), offsets, mode="sum",
                                  per_sample_weights=weights.reshape(-1)[order].to(low))
            return out.to(dtype)

        need_x, need_wenc, need_benc, need_wdec, need_bdec = ctx.needs_input_grad[:5]
        grad_x = grad_wenc = grad_benc = grad_wdec = grad_bdec = None
        if need_x:
            grad_x = F.embedding_bag(indices, encoder_rows(W_enc), mode="sum", per_sample_weights=grad_pre)
        if need_benc or need_bdec:
            grad_benc = torch.zeros(ctx.d_sae, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_benc.index_add_(0, flat, grad_pre.reshape(-1))
        if need_bdec:
            # Through x - b_dec: -sum_t grad_centered[t] = -grad_b_enc @ W_enc^T, one pass over W_enc
            # instead of gathering k encoder rows per token.
            grad_bdec = -(W_enc @ grad_benc)
            # Every decoding feeds b_dec's gradient, the AuxK one included: as in OpenAI's reference,
            # the aux reconstruction is decode(aux) + b_dec against the target resid + b_dec.detach(),
            # the same value as the bias-free decoding against resid, but with b_dec on the path.
            for _, _, g_dec, _ in sets:
                if g_dec is not None:
                    grad_bdec = grad_bdec + g_dec.sum(0)
        if not need_benc:
            grad_benc = None
        if need_wenc:
            # A transposed view matching W_enc's storage, so autograd keeps it without a copy.
            grad_wenc = rows(centered, tokens, grad_pre, W_enc.dtype).t()
        if need_wdec and any(st[2] is not None for st in sets):
            # One table holding each set's output gradient; a pair reads the block of its own set.
            tables, weights, block_of_column = [], [], []
            for block, (values, _, g_dec, _) in enumerate(sets):
                tables.append(g_dec if g_dec is not None else centered.new_zeros(n, d_in))
                weights.append(values if g_dec is not None else torch.zeros_like(values))
                block_of_column += [block] * values.shape[1]
            column_block = torch.tensor(block_of_column, device=flat.device)
            table_rows = tokens + n * column_block[order % width]
            grad_wdec = rows(torch.cat(tables), table_rows, torch.cat(weights, dim=1), W_dec.dtype)
            if ctx.unit_decoder:
                # Drop each row's component along itself (rows are unit norm), as
                # TopKSAE.remove_gradient_parallel_to_decoder_directions would, but from the
                # per-pair dot products already at hand instead of a pass over [d_sae, d_in].
                along = torch.zeros(ctx.d_sae, dtype=grad_wdec.dtype, device=grad_wdec.device)
                along.index_add_(0, flat, torch.cat(along_parts, dim=1).reshape(-1).to(grad_wdec.dtype))
                grad_wdec.addcmul_(along.unsqueeze(1), W_dec, value=-1.0)
        return grad_x, grad_wenc, grad_benc, grad_wdec, grad_bdec, None, None, None, None, None, None, None


class SparseForward(NamedTuple):
    """What sparse_forward returns; unrequested parts are [N, 0]."""
    x_hat: Tensor          # the decoding of the top-k (with b_dec)
    values: Tensor         # [N, k] of the top-k latents, after ReLU
    indices: Tensor        # [N, k]
    aux_x_hat: Tensor      # AuxK: the top k_aux among the `dead` latents, decoded without b_dec
    aux_values: Tensor
    aux_indices: Tensor
    multi_x_hat: Tensor    # Multi-TopK: the top multi_k, decoded
    multi_values: Tensor
    multi_indices: Tensor


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
    unit_decoder: bool = False,
) -> SparseForward:
    """ReLU(TopK((x - b_dec) @ W_enc + b_enc)) and its decoding, with a sparse backward.

    The AuxK set is the top k_aux among the `dead` latent ids, decoded without b_dec; Multi-TopK
    decodes the top multi_k. With W_dec None nothing is decoded (encoding only). `mm_dtype` runs
    only the encoder matmul in that dtype (bf16 autocast). With `unit_decoder`, W_dec's gradient
    comes back without its components along the (unit) rows.
    """
    return SparseForward(*_SparseSAE.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, multi_k, mm_dtype, workspace,
                                           unit_decoder))


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: touches k decoder rows per token, both ways."""
    if indices.shape[1] == 0:
        return W_dec.new_zeros(indices.shape[0], W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
