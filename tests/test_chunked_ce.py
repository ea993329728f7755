"""Task 1's item-chunked next-item cross-entropy (`chunked_ce`, SPEC 3 and 9): the same loss and
gradients as the full F.cross_entropy, the small-N path bit for bit, and inside Task1Step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import helpers  # noqa: F401  (puts the repository root on sys.path)
import chunked_ce
import teracon
from chunked_ce import ChunkedLinearCrossEntropy, chunk_block, next_item_loss
from nextitnet import NextItNet

ROWS, CHANNELS, ITEMS = 29, 8, 23
TIGHT = dict(rtol=1e-12, atol=1e-14)


def problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    """(hidden [ROWS, CHANNELS] requiring grad, head C -> ITEMS, targets with 0 and repeats)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(CHANNELS, ITEMS).to(dtype)
    hidden = torch.randn(ROWS, CHANNELS, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, ITEMS, (ROWS,))
    targets[:4] = 0                       # padding targets are trained on (SPEC 3)
    targets[4:9] = 7                      # one item repeated
    targets[9] = ITEMS - 1                # the last column
    return hidden, head, targets


def loss_and_grads(loss: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear):
    return (loss.detach(), *torch.autograd.grad(loss, [hidden, head.weight, head.bias]))


@pytest.mark.parametrize("block", [1, 5, ITEMS, ITEMS + 10])  # 5 does not divide 23
def test_function_equals_full_cross_entropy_float64(block):
    hidden, head, targets = problem()
    want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
    got = loss_and_grads(ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, block),
                         hidden, head)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.allclose(g, w, **TIGHT), (g - w).abs().max()


@pytest.mark.parametrize("block", [1, 4])
def test_next_item_loss_chunks_by_budget(block):
    """A budget of block * ROWS logits chunks into blocks of `block` items, same results."""
    hidden, head, targets = problem()
    want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
    got = loss_and_grads(next_item_loss(hidden, head, targets, chunk_elements=block * ROWS), hidden, head)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, **TIGHT)


def test_upstream_gradient_scales_and_partial_needs():
    """d(3 * loss) is 3 * d(loss); with hidden frozen only weight and bias get gradients."""
    hidden, head, targets = problem()
    full = 3.0 * F.cross_entropy(head(hidden.detach()), targets)
    chunked = 3.0 * ChunkedLinearCrossEntropy.apply(hidden.detach(), head.weight, head.bias, targets, 6)
    for g, w in zip(torch.autograd.grad(chunked, [head.weight, head.bias]),
                    torch.autograd.grad(full, [head.weight, head.bias])):
        assert torch.allclose(g, w, **TIGHT)


def test_without_bias_and_with_frozen_weight():
    """A head without bias, and a frozen weight (only the bias trained), as F.cross_entropy."""
    hidden, head, targets = problem()
    want = torch.autograd.grad(F.cross_entropy(F.linear(hidden, head.weight), targets), [hidden, head.weight])
    got = torch.autograd.grad(ChunkedLinearCrossEntropy.apply(hidden, head.weight, None, targets, 4),
                              [hidden, head.weight])
    assert all(torch.allclose(g, w, **TIGHT) for g, w in zip(got, want))
    weight = head.weight.detach()
    [want_b] = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight, head.bias), targets), [head.bias])
    [got_b] = torch.autograd.grad(ChunkedLinearCrossEntropy.apply(hidden, weight, head.bias, targets, 4),
                                  [head.bias])
    assert torch.allclose(got_b, want_b, **TIGHT)


def test_repeatable_bit_for_bit():
    """Two calls give identical loss and gradients (a seeded run stays reproducible on CPU)."""
    hidden, head, targets = problem(torch.float32)
    first, second = (loss_and_grads(ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, 6),
                                    hidden, head) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_chunk_block_sizes():
    """Plain when the logits fit the budget (today's rule); CPU blocks of CE_BLOCK_ELEMENTS, a
    multiple of 128 items; an explicit budget sets the block."""
    cpu = torch.device("cpu")
    assert chunk_block(3168, 1682, cpu) is None                       # ml-100k: plain
    assert chunk_block(3168, 645974, cpu) == 1280                     # TTL: 2^22 // 3168 = 1323 -> 1280
    assert chunk_block(10, 7, cpu, chunk_elements=70) is None         # 70 // 7 = 10 rows fit
    assert chunk_block(10, 7, cpu, chunk_elements=69) == 6            # 9 rows do not: blocks of 69 // 10 items
    assert chunk_block(1, 10, cpu, chunk_elements=3) is None          # one row always fits (as before)


def test_small_item_count_takes_the_plain_path_bit_for_bit():
    """When the logits fit in the budget (ml-100k's 1.6k items), the result is F.cross_entropy's, exactly."""
    hidden, head, targets = problem(torch.float32)
    want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
    got = loss_and_grads(next_item_loss(hidden, head, targets), hidden, head)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    at_limit = loss_and_grads(next_item_loss(hidden, head, targets, chunk_elements=ROWS * ITEMS), hidden, head)
    assert all(torch.equal(g, w) for g, w in zip(at_limit, want))


def test_float32_close_to_full():
    hidden, head, targets = problem(torch.float32)
    want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
    got = loss_and_grads(next_item_loss(hidden, head, targets, chunk_elements=3 * ROWS), hidden, head)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_autocast_plain_path():
    """Under bf16 autocast the block GEMMs run in bf16 and the rest in fp32: loss fp32, gradients
    in the parameters' dtype, close to the plain autocast cross-entropy."""
    hidden, head, targets = problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
        got = loss_and_grads(next_item_loss(hidden, head, targets, chunk_elements=4 * ROWS), hidden, head)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert torch.allclose(g, w, rtol=2e-2, atol=2e-3), (g - w).abs().max()


def test_targets_outside_the_items_are_refused():
    hidden, head, targets = problem()
    targets[3] = ITEMS
    with pytest.raises(IndexError, match="targets outside"):
        next_item_loss(hidden, head, targets, chunk_elements=2 * ROWS)


def test_task1_step_with_chunked_loss_equals_unchunked(monkeypatch):
    """Task1Step on a tiny float64 NextItNet: forcing a budget of 3 items per block (the chunked
    path) gives the loss and every parameter's gradient of the unchunked step."""
    torch.manual_seed(0)
    model = NextItNet(ITEMS, [ITEMS], channels=CHANNELS, dilations=(1, 2)).double()
    src = torch.randint(0, ITEMS, (4, 9))
    src[:, :3] = 0                                   # left padding: targets 0 included
    step = teracon.Task1Step(model, mask_reg=0.75)

    def run():
        model.zero_grad(set_to_none=True)
        loss = step.backward(src, torch.full((4,), -1), 3.0)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full_grads = run()
    positions = src.shape[0] * (src.shape[1] - 1)
    monkeypatch.setattr(chunked_ce, "CE_CHUNK_ELEMENTS", 3 * positions)
    calls = []
    original = ChunkedLinearCrossEntropy.forward
    monkeypatch.setattr(ChunkedLinearCrossEntropy, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[-1]) or original(ctx, *a)))
    chunk_loss, chunk_grads = run()
    assert calls == [3]                              # the chunked path ran, 3 items a block
    assert torch.allclose(chunk_loss, full_loss, **TIGHT)
    assert chunk_grads.keys() == full_grads.keys() and "heads.0.weight" in chunk_grads
    for name, g in chunk_grads.items():
        assert torch.allclose(g, full_grads[name], **TIGHT), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunked_and_memory_rule():
    """On CUDA: the chunked function matches the full loss; without a budget, logits that fit in
    free memory take the plain path even above CE_CHUNK_ELEMENTS."""
    hidden, head, targets = problem()
    hidden = hidden.detach().cuda().requires_grad_()
    head, targets = head.cuda(), targets.cuda()
    want = loss_and_grads(F.cross_entropy(head(hidden), targets), hidden, head)
    got = loss_and_grads(next_item_loss(hidden, head, targets, chunk_elements=5 * ROWS), hidden, head)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, **TIGHT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked_ce, "CE_CHUNK_ELEMENTS", 1)
        plain = loss_and_grads(next_item_loss(hidden, head, targets), hidden, head)
    assert all(torch.equal(g, w) for g, w in zip(plain, want))
