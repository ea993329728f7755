"""NextItNet backbone and TERACON task masks (SPEC 3-4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import argparse

import helpers  # noqa: F401  (puts the repository root on sys.path)
from methods import Conure, weights_of_task
from nextitnet import CausalConv1d, NextItNet, TaskMasks

N_ITEMS = 23


def tiny_model(head_sizes=(N_ITEMS,), relation=True, seed=0) -> NextItNet:
    torch.manual_seed(seed)
    return NextItNet(N_ITEMS, list(head_sizes), channels=8, dilations=(1, 2), relation=relation)


# ------------------------------------------------------------------------------ masks

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_relation_mask_matches_hand_computation_for_three_tasks():
    """Relation-aware mask, T=3: E_t = [e_t; e_j; -e_j for j != t in increasing j],
    h = tanh(s*E_t), a = w_t . h + b_t per channel, m = sigmoid(s*a) (s applied twice)."""
    T, M, C, s = 3, 2, 4, 1.7
    rng = np.random.default_rng(5)
    emb = rng.uniform(-1.5, 1.5, size=(T, M, C))
    w = rng.normal(0.0, 0.8, size=(T, M, 2 * T - 1))
    b = rng.normal(0.0, 0.5, size=(T, M))
    tm = TaskMasks(T, M, C).double()
    with torch.no_grad():
        tm.task_embedding.copy_(torch.from_numpy(emb))
        tm.relation_weight.copy_(torch.from_numpy(w))
        tm.relation_bias.copy_(torch.from_numpy(b))
    got = tm(s, relation=True).detach().numpy()
    assert got.shape == (T, M, C)

    expected = np.zeros((T, M, C))
    for t in range(T):
        rows = [(t, 1.0)]
        for j in range(T):
            if j != t:
                rows += [(j, 1.0), (j, -1.0)]
        assert len(rows) == 2 * T - 1
        for m in range(M):
            for c in range(C):
                a = b[t, m]
                for k, (j, sign) in enumerate(rows):
                    a += w[t, m, k] * math.tanh(s * sign * emb[j, m, c])
                expected[t, m, c] = _sigmoid(s * a)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # the relation path really differs from the plain one here (the test can tell them apart)
    assert not np.allclose(got, 1.0 / (1.0 + np.exp(-s * emb)))


def test_plain_mask_is_sigmoid_of_scaled_embedding():
    """Plain mask m = sigmoid(s * e_t), for every task, layer and channel."""
    tm = TaskMasks(2, 3, 5)
    s = 2.5
    expected = torch.sigmoid(s * tm.task_embedding.detach())
    assert torch.allclose(tm.plain_mask(s), expected)
    assert torch.allclose(tm(s, relation=False), expected)


def test_one_task_model_uses_plain_masks_even_with_relation():
    """A one-task model (task 1) always uses plain masks, whatever `relation` says."""
    model = tiny_model(relation=True)
    s = 3.0
    expected = torch.sigmoid(s * model.task_masks.task_embedding.detach())
    assert model.masks(s).shape == (1, 4, 8)
    assert torch.allclose(model.masks(s), expected)


def test_relation_false_model_uses_plain_masks_for_several_tasks():
    """`relation=False` gives plain masks sigmoid(s * e_t) for T>1; `relation=True` gives the
    relation-aware masks of eq. 12-13, computed by hand from the model's own embeddings and
    relation MLPs (spread out so that every term shows), and they are not the plain ones."""
    plain = tiny_model((N_ITEMS, 4, 3), relation=False)
    s = 3.0
    e = plain.task_masks.task_embedding.detach().double()
    np.testing.assert_allclose(plain.masks(s).detach().double(), 1.0 / (1.0 + torch.exp(-s * e)), atol=1e-6)
    rel = tiny_model((N_ITEMS, 4, 3), relation=True)
    with torch.no_grad():
        rel.task_masks.task_embedding.uniform_(-1.0, 1.0)
        rel.task_masks.relation_weight.normal_(0.0, 0.5)
        rel.task_masks.relation_bias.normal_(0.0, 0.3)
    got = rel.masks(s)
    assert got.shape == (3, 4, 8) and got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().double(), helpers.relation_masks_by_hand(rel, s), rtol=0, atol=1e-6)
    assert not torch.allclose(got, torch.sigmoid(s * rel.task_masks.task_embedding.detach()), atol=1e-2)


def test_clamp_keeps_task_embeddings_in_range():
    """clamp_ puts every task embedding in [-6, 6] and leaves values inside untouched."""
    tm = TaskMasks(2, 2, 3)
    values = torch.tensor([-100.0, -6.5, -6.0, -1.0, 0.0, 2.0, 5.99, 6.0, 6.01, 1e9, -1e9, 3.0])
    with torch.no_grad():
        tm.task_embedding.copy_(values.view(2, 2, 3))
    tm.clamp_()
    got = tm.task_embedding.detach().flatten()
    assert torch.equal(got, values.clamp(-6.0, 6.0))
    assert got.min() == -6.0 and got.max() == 6.0


def test_initialisation_follows_spec():
    """Task embeddings U(0, 2); relation w ~ N(0, 0.01), b = 0.1; heads N(0, 0.01), bias 0.1;
    item embedding U(-sqrt(1/N), sqrt(1/N))."""
    torch.manual_seed(0)
    n = 500
    model = NextItNet(n, [n, 300, 7], channels=64, dilations=(1, 4, 1, 4))
    tm = model.task_masks
    emb = tm.task_embedding.detach()
    assert emb.shape == (3, 8, 64)
    assert emb.min() >= 0.0 and emb.max() <= 2.0
    assert emb.min() < 0.05 and emb.max() > 1.95 and abs(emb.mean().item() - 1.0) < 0.05
    w = tm.relation_weight.detach()
    assert w.shape == (3, 8, 5)
    assert abs(w.std().item() - 0.01) < 0.0015 and abs(w.mean().item()) < 0.002
    assert torch.all(tm.relation_bias == 0.1)
    for head in model.heads:
        assert torch.all(head.bias == 0.1)
        assert abs(head.weight.std().item() - 0.01) < 0.001
    bound = math.sqrt(1.0 / n)
    item = model.item_embedding.weight.detach()
    assert item.abs().max() <= bound
    assert item.abs().max() > 0.95 * bound
    assert [h.out_features for h in model.heads] == [n, 300, 7]


# ------------------------------------------------------------------------------ convs

@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("kernel", [2, 3])
def test_causal_conv_equals_left_padded_conv1d(dilation, kernel):
    """CausalConv1d on [B, L, C] == F.conv1d on [B, C, L] left-padded with (k-1)*d zeros."""
    torch.manual_seed(1)
    conv = CausalConv1d(5, 6, kernel, dilation=dilation)
    x = torch.randn(3, 11, 5)
    got = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), ((kernel - 1) * dilation, 0)), conv.weight, conv.bias,
                   dilation=dilation).transpose(1, 2)
    assert got.shape == (3, 11, 6)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def _conv_reference(x, weight, bias, dilation):
    """F.conv1d on [B, C, L] left-padded with (k-1)*d zeros, back to [B, L, C]."""
    k = weight.shape[-1]
    return F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) * dilation, 0)), weight, bias,
                    dilation=dilation).transpose(1, 2)


def _taps_gemm_reference(x, weight, bias, dilation):
    """The earlier formulation: the k shifted copies of x side by side, one GEMM."""
    k, length = weight.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, (k - 1) * dilation, 0))
    taps = torch.cat([xp[:, j * dilation: j * dilation + length] for j in range(k)], dim=-1)
    return F.linear(taps, weight.permute(0, 2, 1).reshape(weight.shape[0], -1), bias)


@pytest.mark.parametrize("length", [3, 11])
@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
@pytest.mark.parametrize("kernel", [2, 3])
def test_causal_conv_float64_values_and_gradients(kernel, dilation, length):
    """float64: output and gradients (input, weight, bias) equal both references within 1e-6
    relative, also when the padding is longer than the sequence."""
    torch.manual_seed(2)
    conv = CausalConv1d(5, 6, kernel, dilation=dilation).double()
    x = torch.randn(4, length, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, length, 6, dtype=torch.float64)
    got = conv(x)
    grads = torch.autograd.grad(got, (x, conv.weight, conv.bias), g)
    for reference in (_conv_reference, _taps_gemm_reference):
        w = conv.weight.detach().clone().requires_grad_()
        b = conv.bias.detach().clone().requires_grad_()
        xr = x.detach().clone().requires_grad_()
        ref = reference(xr, w, b, dilation)
        ref_grads = torch.autograd.grad(ref, (xr, w, b), g)
        assert got.shape == ref.shape == (4, length, 6)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-12)


def test_conure_weights_of_task_masks_weights_of_later_tasks():
    """CONURE: serving task t (methods.weights_of_task) uses free weights (owner 0) and those of
    tasks <= t; the weights of later tasks do not contribute, and every weight is back bit for
    bit afterwards (also when the body raises)."""
    torch.manual_seed(3)
    model = NextItNet(N_ITEMS, [N_ITEMS], channels=4, dilations=(2,), masked=False).double()
    convs = model.convs()
    owner = [torch.randint(0, 4, conv.weight.shape, dtype=torch.int16) for conv in convs]
    before = [conv.weight.detach().clone() for conv in convs]
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    for task in range(4):
        with weights_of_task(model, owner, task):
            for conv, o, w in zip(convs, owner, before):
                assert torch.equal(conv.weight.detach(), w * (o <= task))
                ref = _conv_reference(x, w * (o <= task).double(), conv.bias.detach(), conv.dilation[0])
                torch.testing.assert_close(conv(x), ref, rtol=1e-6, atol=1e-12)
        for conv, w in zip(convs, before):
            assert torch.equal(conv.weight.detach(), w)
    with pytest.raises(RuntimeError, match="inside"):
        with weights_of_task(model, owner, 1):
            raise RuntimeError("inside")
    for conv, w in zip(convs, before):
        assert torch.equal(conv.weight.detach(), w)


@pytest.mark.parametrize("task", [2, 3])
def test_conure_trains_free_weights_then_its_own_only(task):
    """CONURE's hook: while training task t only free weights (owner 0) receive gradient; after
    pruning (retraining) only task t's own; the weights of other tasks neither change nor
    receive gradient. Owners come from the previous checkpoint's `conure_owner`."""
    torch.manual_seed(3)
    model = NextItNet(N_ITEMS, [N_ITEMS] + [4] * (task - 1), channels=4, dilations=(1, 2), masked=False).double()
    owner = [torch.randint(0, task + 1, conv.weight.shape, dtype=torch.int16) for conv in model.convs()]
    args = argparse.Namespace(prune_ratio=0.5)
    conure = Conure(args, task, {"conure_owner": owner}, torch.device("cpu"))
    conure.prepare(model)
    assert [o.dtype for o in conure.owner] == [torch.int16] * len(owner)
    assert all(torch.equal(a, b) for a, b in zip(conure.owner, owner))
    x = torch.randint(0, N_ITEMS, (3, 6))
    for phase, trainable in (("train", 0), ("retrain", task)):
        conure.phase = phase
        model.zero_grad(set_to_none=True)
        [logits] = model.task_logits(x, [(task - 1, None)], model.masks(1.0))
        logits.pow(2).sum().backward()
        raw = [conv.weight.grad.clone() for conv in model.convs()]
        assert all((g[o != trainable] != 0).any() for g, o in zip(raw, owner))  # something to block
        conure.before_step(1.0)
        for conv, o, g in zip(model.convs(), owner, raw):
            assert torch.all(conv.weight.grad[o != trainable] == 0), phase
            assert torch.equal(conv.weight.grad[o == trainable], g[o == trainable]), phase


def test_causal_conv_bf16_autocast_close_to_fp32():
    torch.manual_seed(4)
    conv = CausalConv1d(16, 16, 3, dilation=4)
    x = torch.randn(3, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x)
    assert low.dtype == torch.bfloat16 and low.shape == (3, 20, 16)
    torch.testing.assert_close(low.float(), conv(x), rtol=0.05, atol=0.05)


def test_bf16_autocast_builds_the_masks_and_the_evaluation_heads_in_fp32():
    """Under bf16 autocast the masks of every task are the fp32 masks exactly (eq. 12-13: the
    relation MLPs are Linear layers, which autocast would run in bf16, and at s = 50 the sigmoid
    turns their bf16 rounding into a different mask), and `fp32_heads` gives fp32 logits that
    equal the fp32 head on the bf16 hidden state (evaluation: bf16 logits tie); without it the
    head runs in bf16."""
    model = tiny_model(head_sizes=(N_ITEMS, 5, 3))
    with torch.no_grad():
        for p in model.task_masks.parameters():
            p.uniform_(-2.0, 2.0)  # relation weights away from their init, so bf16 rounding shows
    exact = model.masks(50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks = model.masks(50.0)
        unguarded = model.task_masks(50.0, model.relation)  # the MLPs as autocast would run them
    assert masks.dtype == torch.float32 and torch.equal(masks, exact)
    assert not torch.equal(unguarded, exact)  # so the guard matters
    seq = torch.randint(1, N_ITEMS, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        [fp32_logits] = model.task_logits(seq, [(2, None)], masks, fp32_heads=True)
        [bf16_logits] = model.task_logits(seq, [(2, None)], masks)
        hidden = model.encode(seq, masks[2:3])[:, -1]
    assert fp32_logits.dtype == torch.float32 and bf16_logits.dtype == torch.bfloat16
    torch.testing.assert_close(fp32_logits, model.heads[2](hidden.float()), rtol=0, atol=0)


def test_encode_is_causal():
    """The hidden state at position p depends on items 0..p only (and does depend on item p)."""
    model = tiny_model()
    masks = model.masks(5.0)
    torch.manual_seed(3)
    seq = torch.randint(1, N_ITEMS, (4, 10))
    base = model.encode(seq, masks).detach()
    for p in range(seq.shape[1] - 1):
        changed = seq.clone()
        changed[:, p + 1:] = (changed[:, p + 1:] % (N_ITEMS - 1)) + 1  # a different item everywhere after p
        assert not torch.equal(changed[:, p + 1:], seq[:, p + 1:])
        out = model.encode(changed, masks).detach()
        assert torch.allclose(out[:, :p + 1], base[:, :p + 1], atol=1e-6, rtol=0), f"position {p} sees the future"
        assert not torch.allclose(out[:, p + 1:], base[:, p + 1:], atol=1e-4)
    changed = seq.clone()
    changed[:, 4] = (changed[:, 4] % (N_ITEMS - 1)) + 1
    assert not torch.allclose(model.encode(changed, masks)[:, 4], base[:, 4], atol=1e-4)


def test_task_logits_is_head_of_last_position_and_task1_of_position_minus_two():
    """task_logits(seq, [(t, None)], masks(s)) = heads[t](encode(seq, masks(s)[t])[:, -1]) for
    t >= 1 (0-based), and at position -2 for task 1 (the prediction of the last item); a model
    whose head 0 is a later task (`first_task` > 1, SinMo) reads its head 0 at the last position."""
    model = tiny_model((N_ITEMS, 4, 3))
    seq = torch.randint(0, N_ITEMS, (5, 7))
    masks = model.masks(2.0)
    for task in range(3):
        position = -2 if task == 0 else -1
        ref = model.heads[task](model.encode(seq, masks[task:task + 1])[:, position])
        [got] = model.task_logits(seq, [(task, None)], masks)
        assert torch.allclose(got, ref)
    ref0 = model.heads[0](model.encode(seq[:, :-1], masks[0:1])[:, -1])
    assert torch.allclose(model.task_logits(seq, [(0, None)], masks)[0], ref0, atol=1e-6)
    torch.manual_seed(0)
    later = NextItNet(N_ITEMS, [4], channels=8, dilations=(1, 2), first_task=3)
    assert later.config()["first_task"] == 3
    m = later.masks(2.0)
    [got] = later.task_logits(seq, [(0, None)], m)
    assert torch.allclose(got, later.heads[0](later.encode(seq, m[0:1])[:, -1]))


def test_task_logits_row_groups_and_empty_group():
    """Several (task, rows) groups in one pass: each group's logits equal that task's own pass
    on its rows (rows may repeat across groups); an empty group gives None."""
    model = tiny_model((N_ITEMS, 4, 3))
    with torch.no_grad():
        model.task_masks.task_embedding.uniform_(-2.0, 2.0)
    seq = torch.randint(0, N_ITEMS, (6, 7))
    masks = model.masks(3.0)
    groups = [(0, np.array([4, 1])), (1, np.array([], dtype=np.int64)), (2, np.array([1, 5, 0])), (1, None)]
    got = model.task_logits(seq, groups, masks)
    assert len(got) == 4 and got[1] is None
    for (t, rows), g in zip(groups, got):
        if g is None:
            continue
        sub = seq if rows is None else seq[torch.as_tensor(rows)]
        ref = model.heads[t](model.encode(sub, masks[t:t + 1])[:, -2 if t == 0 else -1])
        assert g.shape == ref.shape
        assert torch.allclose(g, ref, atol=1e-5, rtol=1e-5), t


# ------------------------------------------------------------------------- growth, I/O

def test_add_task_carries_weights_and_reinitialises_relation_mlps():
    """add_task: every carried weight bit-identical, relation MLPs fresh with width 2T+1,
    a new task embedding in [0, 2] and a new head of the requested size."""
    model = tiny_model((N_ITEMS, 4))
    with torch.no_grad():  # make the relation MLPs clearly not fresh
        model.task_masks.relation_weight.fill_(0.7)
        model.task_masks.relation_bias.fill_(-0.3)
        model.task_masks.task_embedding.mul_(-2.0)  # outside U(0, 2): the copy is detectable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_task(9)
    after = model.state_dict()

    assert model.num_tasks == 3
    for k, v in before.items():
        if k.startswith("task_masks."):
            continue
        assert torch.equal(after[k], v), k
    emb = model.task_masks.task_embedding.detach()
    assert emb.shape == (3, 4, 8)
    assert torch.equal(emb[:2], before["task_masks.task_embedding"])
    assert emb[2].min() >= 0.0 and emb[2].max() <= 2.0
    w = model.task_masks.relation_weight.detach()
    assert w.shape == (3, 4, 5)  # 2T+1 with the old T = 2
    assert torch.all(w.abs() < 0.1) and w.std() > 0
    assert torch.all(model.task_masks.relation_bias == 0.1)
    assert model.task_masks.relation_bias.shape == (3, 4)
    assert model.heads[2].out_features == 9 and model.heads[2].in_features == 8
    assert torch.all(model.heads[2].bias == 0.1)
    assert model.config()["head_sizes"] == [N_ITEMS, 4, 9]
    # the grown model runs and every parameter is trainable
    model.masks(3.0).sum().backward()
    assert all(p.requires_grad for p in model.parameters())
    assert model.task_masks.task_embedding.grad is not None


@pytest.mark.parametrize("grow", [False, True])
def test_checkpoint_round_trip_is_exact(grow):
    """config() + state_dict through NextItNet.from_checkpoint gives the same model bit for bit."""
    model = tiny_model((N_ITEMS, 4), relation=True)
    if grow:
        model.add_task(3)
    ckpt = {"config": model.config(), "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.manual_seed(123)  # a different init underneath, overwritten by the state dict
    loaded = NextItNet.from_checkpoint(ckpt)
    assert loaded.config() == model.config()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    seq = torch.randint(0, N_ITEMS, (3, 6))
    for task in range(model.num_tasks):
        assert torch.equal(model.task_logits(seq, [(task, None)], model.masks(50.0))[0],
                           loaded.task_logits(seq, [(task, None)], loaded.masks(50.0))[0])


def test_round_trip_keeps_relation_flag():
    """A relation=False model comes back as relation=False (plain masks for T>1)."""
    model = tiny_model((N_ITEMS, 4), relation=False)
    loaded = NextItNet.from_checkpoint({"config": model.config(), "state_dict": model.state_dict()})
    assert loaded.relation is False
    assert torch.equal(loaded.masks(4.0), model.masks(4.0))
