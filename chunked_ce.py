"""Task 1's next-item cross-entropy over a large item set, chunked over the items (SPEC 3, 9).

`next_item_loss(hidden [P, C], head C -> N, targets [P])` is `F.cross_entropy(head(hidden),
targets)` (mean over the P positions, padding targets included, no ignore_index). When the
[P, N] logits are large (TTL: 3,168 x 645,974 = 2.05G values, 8.2 GB in fp32), it never holds
them: `ChunkedLinearCrossEntropy` walks the head's rows (the items) in blocks of `block`
columns, each block one GEMM over all P positions,

    forward:   l = h W_j^T + b_j,      lse <- logaddexp(lse, logsumexp_row(l)),  z_t picked,
               loss = mean_p(lse_p - z_{p, t_p});
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


def _block_logits2(h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int,
                   gemm: torch.dtype, acc: torch.dtype, exact: bool) -> torch.Tensor:
    """Base-2 logits of items lo..hi-1, [P, hi - lo] = (h W[lo:hi]^T + b[lo:hi]) * log2 e, in `acc`;
    `h2` is h * log2 e when `exact` (GEMM in `acc`), else h in the GEMM dtype (scaled after)."""
    b = None if bias is None else (bias[lo:hi] * LOG2E if exact else bias[lo:hi]).to(gemm)
    out = F.linear(h2, weight[lo:hi].to(gemm), b).to(acc)
    return out if exact else out.mul_(LOG2E)


def _block_softmax(h2_shift: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   lse2: torch.Tensor, lo: int, hi: int, gemm: torch.dtype, acc: torch.dtype,
                   exact: bool) -> torch.Tensor:
    """exp(l - lse) of items lo..hi-1, [P, hi - lo], in `acc`. When `exact`, one GEMM gives the
    shifted base-2 logits, [h | 1 | -lse2 / log2 e] [W | b | 1]^T * log2 e (`h2_shift`), and one
    exp2 pass the softmax; otherwise the shift is a pass in `acc`."""
    if not exact:
        return _block_logits2(h, weight, bias, lo, hi, gemm, acc, exact).sub_(lse2[:, None]).exp2_()
    ones = torch.ones(hi - lo, dtype=weight.dtype, device=weight.device)
    b = torch.zeros_like(ones) if bias is None else bias[lo:hi]
    return (h2_shift @ _columns(weight[lo:hi], b, ones).t()).exp2_()


def _target_in_block(targets: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each row's target inside the block, clamped into it; whether it lies there)."""
    inside = (targets >= lo) & (targets < hi)
    return (targets - lo).clamp(0, hi - lo - 1), inside


def _logsumexp2_(logits2: torch.Tensor) -> torch.Tensor:
    """Row-wise log2-sum-exp2 m + log2 sum 2^(l - m), m the row max; overwrites `logits2` (in-place
    shift and exp2: fewer passes than torch.logsumexp's, which dominated the CPU forward)."""
    top = logits2.amax(dim=1)
    return top + logits2.sub_(top[:, None]).exp2_().sum(dim=1).log2_()


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

    Logits are kept in base 2 (l * log2 e, exp2 instead of exp). When the GEMM runs in the
    accumulation dtype (fp32, fp64), the scale, the bias and, in backward, the shift by the
    row's log-sum-exp enter the GEMM as extra columns ([h | 1 | -lse] [W | b | 1]^T), so a
    block's softmax is one GEMM and one exp2; under bf16 autocast (a bf16 -lse would lose the
    softmax) only the bias does, and the scale and shift are applied in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, block: int) -> torch.Tensor:
        device = hidden.device
        gemm, acc = _compute_dtypes(device, hidden.dtype)
        exact = gemm == acc
        rows, items = hidden.shape[0], weight.shape[0]
        with torch.autocast(device.type, enabled=False):
            h2 = hidden.to(acc) * LOG2E if exact else hidden.to(gemm)
            lse2 = torch.full((rows,), float("-inf"), dtype=acc, device=device)
            picked2 = torch.zeros(rows, dtype=acc, device=device)
            for lo in range(0, items, block):
                hi = min(lo + block, items)
                logits2 = _block_logits2(h2, weight, bias, lo, hi, gemm, acc, exact)
                col, inside = _target_in_block(targets, lo, hi)
                picked2 += torch.where(inside, logits2.gather(1, col[:, None]).squeeze(1), 0.0)
                lse2 = torch.logaddexp2(lse2, _logsumexp2_(logits2))
            loss = (lse2 - picked2).mean() * LN2
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
        rows, items = hidden.shape[0], weight.shape[0]
        scale = grad.to(acc) / rows
        with torch.autocast(device.type, enabled=False):
            h32 = hidden.to(acc)
            h = h32.to(gemm)
            h2_shift = _columns(h32, torch.ones_like(lse2), -lse2 / LOG2E).mul_(LOG2E) if exact else None
            h_scaled = (h32 * scale).to(gemm)  # grad_W_j = (softmax - onehot)^T h * grad / P
            grad_h = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_w else None
            grad_b = torch.empty(items, dtype=acc, device=device) if need_b and bias is not None else None
            for lo in range(0, items, block):
                hi = min(lo + block, items)
                g = _block_softmax(h2_shift, h, weight, bias, lse2, lo, hi, gemm, acc, exact)
                col, inside = _target_in_block(targets, lo, hi)
                g.scatter_add_(1, col[:, None], -inside.to(acc)[:, None])    # - onehot(t)
                if grad_b is not None:
                    grad_b[lo:hi] = g.sum(0)
                g = g.to(gemm)
                if grad_h is not None:
                    _mm_into(grad_h, g, weight[lo:hi].to(gemm), accumulate=True)
                if grad_w is not None:
                    _mm_into(grad_w[lo:hi], g.t(), h_scaled, accumulate=False)
            if grad_h is not None:
                grad_h = (grad_h * scale).to(hidden.dtype)
            if grad_b is not None:
                grad_b = (grad_b * scale).to(bias.dtype)
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
    blocks of budget // P items, with the same loss and gradients up to rounding."""
    items = head.out_features
    block = chunk_block(hidden.shape[0], items, hidden.device, chunk_elements)
    if block is None:
        return F.cross_entropy(head(hidden), targets)
    if not hidden.is_cuda and len(targets) and (targets.min() < 0 or targets.max() >= items):
        raise IndexError(f"next_item_loss: targets outside [0, {items})")
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, block)
