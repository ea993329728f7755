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
stay fp64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CE_CHUNK_ELEMENTS = 1 << 26  # logits held at once: 256 MB in fp32 (a block of 21k items at 3,168 positions)
CUDA_FULL_COPIES = 3         # unchunked CE on CUDA holds about 3 [P, N] fp32 tensors: logits, log-softmax, gradient


def _compute_dtypes(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, accumulation dtype): the autocast dtype if autocast is on for the device,
    else the input's; accumulation in at least fp32."""
    gemm = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    return gemm, torch.promote_types(dtype, torch.float32)


def _block_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int,
                  gemm: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """Logits of items lo..hi-1, [P, hi - lo] = h W[lo:hi]^T + b[lo:hi], a GEMM in `gemm`, returned in `acc`."""
    w = weight[lo:hi].to(gemm)
    out = F.linear(h, w, None if bias is None else bias[lo:hi].to(gemm))
    return out.to(acc)


def _target_in_block(targets: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each row's target inside the block, clamped into it; whether it lies there)."""
    inside = (targets >= lo) & (targets < hi)
    return (targets - lo).clamp(0, hi - lo - 1), inside


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
    `block` columns with an online log-sum-exp (the module docstring gives the recurrences)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, block: int) -> torch.Tensor:
        device = hidden.device
        gemm, acc = _compute_dtypes(device, hidden.dtype)
        rows, items = hidden.shape[0], weight.shape[0]
        with torch.autocast(device.type, enabled=False):
            h = hidden.to(gemm)
            lse = torch.full((rows,), float("-inf"), dtype=acc, device=device)
            picked = torch.zeros(rows, dtype=acc, device=device)
            for lo in range(0, items, block):
                hi = min(lo + block, items)
                logits = _block_logits(h, weight, bias, lo, hi, gemm, acc)
                col, inside = _target_in_block(targets, lo, hi)
                picked += torch.where(inside, logits.gather(1, col[:, None]).squeeze(1), 0.0)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            loss = (lse - picked).mean()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.block, ctx.gemm = block, gemm
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        block, gemm = ctx.block, ctx.gemm
        device, acc = hidden.device, lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows, items = hidden.shape[0], weight.shape[0]
        scale = grad.to(acc) / rows
        with torch.autocast(device.type, enabled=False):
            h = hidden.to(gemm)
            h_scaled = (hidden.to(acc) * scale).to(gemm)  # grad_W_j = (E - onehot)^T (h * grad / P)
            grad_h = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_w else None
            grad_b = torch.empty(items, dtype=acc, device=device) if need_b and bias is not None else None
            for lo in range(0, items, block):
                hi = min(lo + block, items)
                g = _block_logits(h, weight, bias, lo, hi, gemm, acc)
                g.sub_(lse[:, None]).exp_()                                  # softmax of the block
                col, inside = _target_in_block(targets, lo, hi)
                g.scatter_add_(1, col[:, None], -inside.to(acc)[:, None])    # - onehot(t)
                g_c = g.to(gemm)
                if grad_h is not None:
                    _mm_into(grad_h, g_c, weight[lo:hi].to(gemm), accumulate=True)
                if grad_w is not None:
                    _mm_into(grad_w[lo:hi], g_c.t(), h_scaled, accumulate=False)
                if grad_b is not None:
                    grad_b[lo:hi] = g.sum(0)
            if grad_h is not None:
                grad_h = (grad_h * scale).to(hidden.dtype)
            if grad_b is not None:
                grad_b = (grad_b * scale).to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _fits_on_cuda(rows: int, items: int, device: torch.device) -> bool:
    """Whether unchunked logits of [rows, items] (CUDA_FULL_COPIES fp32 copies) fit in free CUDA memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return CUDA_FULL_COPIES * rows * items * 4 <= free


def next_item_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                   chunk_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` [P, N] against `targets` [P] (F.cross_entropy).

    Plain `F.cross_entropy(head(hidden), targets)` when the P x N logits fit in the element budget
    (`chunk_elements`, default CE_CHUNK_ELEMENTS; on CUDA, without an explicit budget, when they
    and their gradient fit in free device memory); otherwise `ChunkedLinearCrossEntropy` over
    blocks of budget // P items, with the same loss and gradients up to rounding."""
    rows, items = hidden.shape[0], head.out_features
    budget = CE_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if max(1, budget // items) >= rows or (chunk_elements is None and hidden.is_cuda
                                   and _fits_on_cuda(rows, items, hidden.device)):
        return F.cross_entropy(head(hidden), targets)
    if not hidden.is_cuda and len(targets) and (targets.min() < 0 or targets.max() >= items):
        raise IndexError(f"next_item_loss: targets outside [0, {items})")
    block = max(1, budget // max(rows, 1))
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, block)
