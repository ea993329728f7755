"""Task 1's next-item cross-entropy over a large item set, chunked over the items (SPEC 3, 9).

`next_item_loss(hidden [P, C], head C -> N, targets [P])` is `F.cross_entropy(head(hidden),
targets)` (mean over the P positions, padding targets included, no ignore_index). When the
[P, N] logits are large (TTL: 3,168 x 645,974 = 2.05G values, 8.2 GB in fp32), it never holds
them: `ChunkedLinearCrossEntropy` walks the head's rows (the items) in blocks of `block`
columns, each block one GEMM over all P positions,

    forward:   l = h W_j^T + b_j,      m_j = max_row(l),  s_j = sum_row exp(l - m_j),
               lse = log sum_j s_j exp(m_j),           loss = mean_p(lse_p - z_{p, t_p});
    backward:  l recomputed once,      G = (exp(l - lse) - onehot(t)) * grad / P,
               grad_h += G W_j,        grad_W_j = G^T h,        grad_b_j = sum_p G,

so it saves only hidden, W, b, targets and lse [P]. The GEMMs run in the autocast dtype when
autocast is on (bf16), the log-sum-exp, softmax and every accumulation in fp32 (fp64 inputs
stay fp64). Blocks: CE_BLOCK_ELEMENTS logits on a CPU (L3-sized; TTL: 1,280 items), the
CE_CHUNK_ELEMENTS budget on CUDA. With 4 head GEMMs for the 3 of the unchunked step (the
recomputation), the chunked step reaches at most 3/4 of the matmul rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CE_CHUNK_ELEMENTS = 1 << 26  # logits the plain cross-entropy may hold: 256 MB in fp32 (ml-100k's 3,168 x 1.6k stay plain)
CE_BLOCK_ELEMENTS = 1 << 22  # logits of one block on a CPU: 16 MB in fp32, within the L3 cache (1,323 items at 3,168 positions)
CUDA_FULL_COPIES = 3         # unchunked CE on CUDA holds about 3 [P, N] fp32 tensors: logits, log-softmax, gradient
BLOCK_ALIGN = 128            # blocks of a multiple of 128 items: an odd width (1,323) halved the CPU GEMM rate
LOG2E = 1.4426950408889634   # exp(x) = exp2(x * log2(e)): exp2 is the cheaper of the two on a CPU
LN2 = 0.6931471805599453


def _compute_dtypes(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, accumulation dtype): the autocast dtype if autocast is on for the device,
    else the input's; accumulation in at least fp32."""
    gemm = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    return gemm, torch.promote_types(dtype, torch.float32)


def _columns(x: torch.Tensor, *cols: torch.Tensor) -> torch.Tensor:
    """[x | c1 | c2 ...]: x [R, K] with each column [R] appended."""
    return torch.cat([x, *(c[:, None].to(x.dtype) for c in cols)], dim=1)


def _block_logits2(h2: torch.Tensor, weight: torch.Tensor, b2: torch.Tensor | None, lo: int, hi: int,
                   gemm: torch.dtype, acc: torch.dtype, exact: bool) -> torch.Tensor:
    """Base-2 logits of items lo..hi-1, [P, hi - lo] = (h W[lo:hi]^T + b[lo:hi]) * log2 e, in `acc`.
    `exact`: h2, b2 are h, b * log2 e in `acc` (= the GEMM dtype); else h, b in the GEMM dtype,
    the scale applied in `acc`."""
    out = F.linear(h2, weight[lo:hi].to(gemm), None if b2 is None else b2[lo:hi])
    return out if exact else out.to(acc).mul_(LOG2E)


def _target_logits2(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, gemm: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """z_t * log2 e [P], each row's target logit from its own dot product, in `acc` (inputs cast
    through the GEMM dtype and the result rounded to it, as the block GEMM does)."""
    z = (hidden.to(gemm).to(acc) * weight[targets].to(gemm).to(acc)).sum(dim=1)
    if bias is not None:
        z = z + bias[targets].to(gemm).to(acc)
    return z.to(gemm).to(acc) * LOG2E


def _combine_lse2(tops: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """log2 sum_j 2^(l_j) of every row from each block k's row max m_k and sum_j 2^(l_j - m_k), [K, P]:
    M + log2 sum_k s_k 2^(m_k - M), M = max_k m_k."""
    top = tops.amax(dim=0)
    return top + (sums * torch.exp2(tops - top)).sum(dim=0).log2()


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b, in place (BLAS writes `out` directly when the dtypes agree)."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight^T + bias` against `targets`, over item blocks of
    `block` columns with an online log-sum-exp (the module docstring gives the recurrences).

    Few passes and few operations per block (each one costs a pass over [P, block] or, on a
    shared CPU, a wait for its threads): logits in base 2 (l * log2 e, exp2 instead of exp); a
    block's row max and sum of 2^(l - max) kept per block and combined once at the end; the
    target logits and the onehot(t) terms of the gradients (-W_t, -h per target, -1 per
    target) computed once, outside the blocks. When the GEMM runs in the accumulation dtype
    (fp32, fp64), the backward's GEMM gives the shifted logits directly, [h | 1 | -lse2/log2 e]
    [W | b | 1]^T * log2 e, so a block's softmax is one GEMM and one exp2; under bf16 autocast
    (a bf16 lse would spoil the softmax) the scale and shift are applied in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, block: int) -> torch.Tensor:
        device = hidden.device
        gemm, acc = _compute_dtypes(device, hidden.dtype)
        exact = gemm == acc
        rows, items = hidden.shape[0], weight.shape[0]
        with torch.autocast(device.type, enabled=False):
            h2 = hidden.to(acc) * LOG2E if exact else hidden.to(gemm)
            b2 = None if bias is None else (bias.to(acc) * LOG2E if exact else bias).to(gemm)
            blocks = -(-items // block)
            tops = torch.empty(blocks, rows, dtype=acc, device=device)
            sums = torch.empty(blocks, rows, dtype=acc, device=device)
            for k, lo in enumerate(range(0, items, block)):
                logits2 = _block_logits2(h2, weight, b2, lo, min(lo + block, items), gemm, acc, exact)
                torch.amax(logits2, dim=1, out=tops[k])
                torch.sum(logits2.sub_(tops[k][:, None]).exp2_(), dim=1, out=sums[k])
            lse2 = _combine_lse2(tops, sums)
            loss = (lse2 - _target_logits2(hidden, weight, bias, targets, gemm, acc)).mean() * LN2
        ctx.save_for_backward(hidden, weight, bias, targets, lse2)
        ctx.block, ctx.gemm = block, gemm
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, bias, targets, lse2 = ctx.saved_tensors
        block, gemm = ctx.block, ctx.gemm
        device, acc = hidden.device, lse2.dtype
        exact = gemm == acc
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows, items, channels = hidden.shape[0], weight.shape[0], hidden.shape[1]
        scale = grad.to(acc) / rows
        with torch.autocast(device.type, enabled=False):
            h32 = hidden.to(acc)
            if exact:  # the GEMM of [h | 1 | -lse2/log2 e] * log2 e with w_buf = [W_j | b_j | 1]
                h2 = _columns(h32, torch.ones_like(lse2), -lse2 / LOG2E).mul_(LOG2E)
                w_buf = torch.zeros(min(block, items), channels + 2, dtype=acc, device=device)
                w_buf[:, channels + 1] = 1.0
            else:
                h2, b2 = hidden.to(gemm), None if bias is None else bias.to(gemm)
            h_scaled = (h32 * scale).to(gemm)  # grad_W_j = softmax_j^T h * grad / P
            grad_h = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_w else None
            sum_b = torch.empty(items, dtype=acc, device=device) if need_b and bias is not None else None
            for lo in range(0, items, block):
                hi = min(lo + block, items)
                if exact:
                    w_buf[:hi - lo, :channels].copy_(weight[lo:hi])
                    if bias is not None:
                        w_buf[:hi - lo, channels].copy_(bias[lo:hi])
                    g = (h2 @ w_buf[:hi - lo].t()).exp2_()                   # softmax of the block
                else:
                    g = _block_logits2(h2, weight, b2, lo, hi, gemm, acc, exact).sub_(lse2[:, None]).exp2_()
                if sum_b is not None:
                    torch.sum(g, dim=0, out=sum_b[lo:hi])
                g = g.to(gemm)
                if grad_h is not None:
                    _mm_into(grad_h, g, weight[lo:hi].to(gemm), accumulate=True)
                if grad_w is not None:
                    _mm_into(grad_w[lo:hi], g.t(), h_scaled, accumulate=False)
            # the - onehot(t) part of (softmax - onehot), once for all blocks
            if grad_h is not None:
                grad_h = ((grad_h - weight[targets].to(acc)) * scale).to(hidden.dtype)
            if grad_w is not None:
                grad_w.index_add_(0, targets, (h32 * -scale).to(grad_w.dtype))
            grad_b = None
            if sum_b is not None:
                sum_b.index_add_(0, targets, torch.full((rows,), -1.0, dtype=acc, device=device))
                grad_b = (sum_b * scale).to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _fits_on_cuda(rows: int, items: int, device: torch.device) -> bool:
    """Whether unchunked logits of [rows, items] (CUDA_FULL_COPIES fp32 copies) fit in free CUDA memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return CUDA_FULL_COPIES * rows * items * 4 <= free


def chunk_block(rows: int, items: int, device: torch.device, chunk_elements: int | None = None) -> int | None:
    """Items per block of the chunked loss for [rows, items] logits, or None for the plain
    cross-entropy: None when the logits fit in the budget (`chunk_elements`, default
    CE_CHUNK_ELEMENTS; on CUDA without an explicit budget, when they fit in free memory)."""
    budget = CE_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if max(1, budget // items) >= rows:
        return None
    if chunk_elements is None and device.type == "cuda" and _fits_on_cuda(rows, items, device):
        return None
    if chunk_elements is None and device.type != "cuda":
        budget = min(budget, CE_BLOCK_ELEMENTS)  # cache-sized blocks on a CPU: the passes over them stay in L3
    block = max(1, budget // rows)
    return block - block % BLOCK_ALIGN if block >= 2 * BLOCK_ALIGN else block


def next_item_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                   chunk_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` [P, N] against `targets` [P] (F.cross_entropy).

    Plain `F.cross_entropy(head(hidden), targets)` when the P x N logits fit in the element budget
    (`chunk_elements`, default CE_CHUNK_ELEMENTS; on CUDA, without an explicit budget, when they
    and their gradient fit in free device memory); otherwise `ChunkedLinearCrossEntropy` over
    blocks of `chunk_block` items (CE_BLOCK_ELEMENTS // P on a CPU, budget // P otherwise), with
    the same loss and gradients up to rounding."""
    items = head.out_features
    block = chunk_block(hidden.shape[0], items, hidden.device, chunk_elements)
    if block is None:
        return F.cross_entropy(head(hidden), targets)
    if not hidden.is_cuda and len(targets) and (targets.min() < 0 or targets.max() >= items):
        raise IndexError(f"next_item_loss: targets outside [0, {items})")
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, block)
