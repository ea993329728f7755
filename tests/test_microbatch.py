"""Exact micro-batching of the task-n step with knowledge retention (--chunk_rows): the loss and
every gradient equal the one-pass step's (float64, same subsets) for any chunk size."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import helpers  # noqa: F401  (puts the repository root on sys.path)
from nextitnet import NextItNet
from teracon import RetentionStep, auto_chunk_rows, sample_subsets, subset_sizes


def _models(num_tasks: int = 4, items: int = 30, channels: int = 8):
    torch.manual_seed(0)
    teacher = NextItNet(items, [items] + [5] * (num_tasks - 2), channels=channels, dilations=(1, 2)).double()
    with torch.no_grad():  # masks away from saturation so that their gradients are not tiny
        teacher.task_masks.task_embedding.uniform_(-0.2, 0.2)
    model = copy.deepcopy(teacher)
    model.add_task(7)
    model.double()
    teacher.eval().requires_grad_(False)
    return model, teacher


def _step(model, teacher, chunk_rows: int, rho) -> RetentionStep:
    step = RetentionStep(model, teacher, alpha=0.7, rng=np.random.default_rng(5), min_rows=2, chunk_rows=chunk_rows)
    step.rho = np.array(rho, dtype=np.float64)
    return step


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 23])
def test_chunked_backward_equals_one_pass(chunk_rows):
    model, teacher = _models()
    src = torch.randint(1, 30, (20, 9))
    tgt = torch.randint(0, 7, (20,))
    rho = [0.5, 0.0, 0.3]  # the middle task gets only min_rows = 2 rows
    results = []
    for rows in (0, chunk_rows):
        m = copy.deepcopy(model)
        step = _step(m, teacher, rows, rho)
        loss = step.backward(src, tgt, s=3.0)
        results.append((loss.item(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None},
                        step.rho.copy(), step.rng.bit_generator.state))
    (loss0, grads0, rho0, rng0), (loss1, grads1, rho1, rng1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-10)
    assert grads0.keys() == grads1.keys() and "task_masks.task_embedding" in grads0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-6, atol=1e-12, msg=k)
    np.testing.assert_array_equal(rho1, rho0)   # the next batch's rho
    assert rng1 == rng0                         # the same subsets were drawn


def test_one_pass_when_the_rows_fit():
    """Chunking only starts when the stacked rows exceed chunk_rows; below, the step is the
    unchunked one, bit for bit."""
    model, teacher = _models()
    src = torch.randint(1, 30, (10, 9))
    tgt = torch.randint(0, 7, (10,))
    rho = [0.5, 0.2, 0.3]
    stacked = 10 + sum(subset_sizes(np.array(rho), 10, 2))
    grads = []
    for rows in (0, stacked):
        m = copy.deepcopy(model)
        _step(m, teacher, rows, rho).backward(src, tgt, s=3.0)
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_subset_sizes_is_sample_subsets_rule():
    rho = np.array([0.0, 0.004, 0.26, 0.9])
    assert subset_sizes(rho, 256) == [0, 1, 66, 230]
    assert subset_sizes(rho, 256, min_rows=16) == [16, 16, 66, 230]
    assert [len(s) for s in sample_subsets(rho, 256, np.random.default_rng(0), 16)] == [16, 16, 66, 230]


def test_auto_chunk_rows():
    """One fp32 activation [rows, L, C] within 8 MiB on a CPU (at least 16 rows); off on CUDA and for task 1."""
    assert auto_chunk_rows(torch.device("cpu"), 50, 256) == (8 << 20) // (50 * 256 * 4) == 163
    assert auto_chunk_rows(torch.device("cpu"), 1000, 1024) == 16
    assert auto_chunk_rows(torch.device("cuda"), 50, 256) == 0
    assert auto_chunk_rows(torch.device("cpu"), 50, 0) == 0
