"""TERACON training pieces: annealing, rho, knowledge retention, the grouped pass, the step
and the training loop (SPEC 4-6)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers  # noqa: F401  (puts the repository root on sys.path)
import data_loader as dl
import teracon
import trainer
from nextitnet import NextItNet
from utils import UserError
from teracon import (NewTaskStep, RetentionStep, Step, anneal_s, knowledge_retention_loss, sample_subsets,
                     update_rho)
from trainer import TrainConfig, evaluate

N_ITEMS = 17
L = 6


def tiny_model(head_sizes, seed=0, relation=True) -> NextItNet:
    torch.manual_seed(seed)
    return NextItNet(N_ITEMS, list(head_sizes), channels=8, dilations=(1, 2), relation=relation)


def grown_pair(num_past: int, new_classes: int = 5, seed: int = 0):
    """(teacher with `num_past` tasks, student = teacher + one new task), as methods.Teracon.build makes them."""
    heads = [N_ITEMS] + [4 + i for i in range(num_past - 1)]
    teacher = tiny_model(heads, seed=seed)
    with torch.no_grad():  # spread the embeddings so that masks differ between tasks
        teacher.task_masks.task_embedding.uniform_(-2.0, 2.0)
        teacher.task_masks.relation_weight.normal_(0.0, 0.5)
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    student.add_task(new_classes)
    return teacher, student


def make_taskdata(task: int, n_examples: int, num_classes: int, seed: int = 0) -> dl.TaskData:
    g = torch.Generator().manual_seed(seed)
    sources = torch.randint(0, N_ITEMS, (n_examples, L), generator=g)
    targets = torch.randint(0, num_classes, (n_examples,), generator=g)
    if task == 1:
        targets = torch.full((n_examples,), -1)
    data = dl.TaskData(task, f"task{task}", "synthetic", sources, targets, torch.arange(n_examples),
                       num_classes, np.arange(num_classes))
    data.splits = dl.split_examples(np.arange(n_examples), seed)
    return data


def train_args(**kw) -> TrainConfig:
    base = dict(lr=1e-3, seed=0, batch=32, epochs=1, smax=50.0, quiet=True, eval_batch=64, patience=5,
                amp="fp32", select_by="hit@1")
    base.update(kw)
    return TrainConfig(**base)


def test_train_config_from_args_takes_its_fields_only():
    """TrainConfig.from_args reads exactly its own fields from a Namespace; other flags are ignored."""
    want = dict(lr=2e-3, batch=16, epochs=3, smax=40.0, patience=2, select_by="mrr@5", eval_batch=8,
                amp="bf16", seed=9, quiet=False)
    fields = dataclasses.fields(TrainConfig)
    assert set(want) <= {f.name for f in fields}
    values = {f.name: want.get(f.name, f.default) for f in fields}  # fields added later: their defaults
    config = TrainConfig.from_args(argparse.Namespace(**values, alpha=0.7, method="hat"))
    assert config == TrainConfig(**values)
    assert {k: getattr(config, k) for k in want} == want


# ---------------------------------------------------------------------------- annealing

def test_anneal_s_first_middle_last_batch():
    """eq. 19: s = 1/smax + (smax - 1/smax) * b / B with B = n_train / batch a float."""
    smax = 50.0
    B = 100 / 32  # 3.125 batches: not an integer
    assert anneal_s(0, B, smax) == pytest.approx(1 / smax)
    assert anneal_s(B / 2, B, smax) == pytest.approx((1 / smax + smax) / 2)
    assert anneal_s(3, B, smax) == pytest.approx(1 / smax + (smax - 1 / smax) * 3 / 3.125)
    assert anneal_s(3, B, smax) < smax


class RecordingStep(Step):
    """A training step that records the s of every batch; its loss is a harmless function of
    the parameters."""

    def __init__(self, model):
        self.model, self.s = model, []

    def loss(self, src, tgt, s):
        self.s.append(s)
        return self.model.heads[0].bias.sum() * 0.0 + self.model.masks(s).mean()


def test_train_anneals_s_per_batch_and_evaluates_at_smax(monkeypatch):
    """trainer.train gives batch b of every epoch s = anneal_s(b, n_train/batch, smax), keeps
    the partial last batch, and evaluation runs the model's masks at s = smax."""
    data = make_taskdata(2, 125, 4)  # split 100/7/18; 100/32 = 3.125 batches
    assert len(data.splits["train"]) == 100
    model = tiny_model([N_ITEMS, 4])
    step = RecordingStep(model)
    smax = 50.0
    eval_s = []
    real_evaluate = trainer.evaluate

    def spy_evaluate(m, d, split, s, device, *rest, **kw):
        calls_before = len(step.s)
        orig_masks = m.masks

        def masks(s_):
            eval_s.append(s_)
            return orig_masks(s_)
        m.masks = masks
        try:
            return real_evaluate(m, d, split, s, device, *rest, **kw)
        finally:
            del m.masks
            assert len(step.s) == calls_before

    monkeypatch.setattr(trainer, "evaluate", spy_evaluate)
    trainer.train(model, step, data, train_args(epochs=2, smax=smax), torch.device("cpu"),
                  lambda summary, checkpoint=True: None)
    per_epoch = [anneal_s(b, 100 / 32, smax) for b in range(4)]
    assert step.s == pytest.approx(per_epoch * 2)
    assert step.s[0] == pytest.approx(1 / smax)
    assert eval_s and all(s == smax for s in eval_s)


def test_evaluate_uses_smax_masks_and_matches_manual_computation():
    """evaluate(model, data, split, smax) == metrics of heads[t](encode(src, masks(smax)[t])[:, -1])
    over the whole split."""
    model = tiny_model([N_ITEMS, 25])
    with torch.no_grad():
        model.task_masks.task_embedding.uniform_(-1, 1)
    data = make_taskdata(2, 90, 25)
    idx = data.splits["test"]
    src, tgt = data.batch(idx, torch.device("cpu"))
    with torch.no_grad():
        logits = model.heads[1](model.encode(src, model.masks(50.0)[1:2])[:, -1])
        ranks = (logits > logits.gather(1, tgt[:, None])).sum(1)
        expected = {"hit@1": (ranks < 1).double().mean().item(), "hr@20": (ranks < 20).double().mean().item()}
    got = evaluate(model, data, "test", 50.0, torch.device("cpu"), batch_size=7)
    assert got["hit@1"] == pytest.approx(expected["hit@1"])
    assert got["hr@20"] == pytest.approx(expected["hr@20"])
    assert "mrr@5" in got and "accuracy" not in got


# ---------------------------------------------------------------------------------- rho

def test_update_rho_hand_cases():
    """rho_i = 1 - mean_layers sigmoid(6 cos(teacher_i, new)): identical -> 1 - sigmoid(6),
    orthogonal -> 0.5, opposite -> 1 - sigmoid(-6); shape [T-1]."""
    M, C = 4, 6
    new = torch.rand(M, C) + 0.1
    orth_a = torch.zeros(M, C)
    orth_a[:, 0] = 1.0
    orth_b = torch.zeros(M, C)
    orth_b[:, 1] = 2.0
    teacher = torch.stack([new * 3.0, -new])  # same direction, opposite direction
    rho = update_rho(teacher, new)
    assert isinstance(rho, np.ndarray) and rho.shape == (2,)
    sig6 = 1 / (1 + math.exp(-6))
    assert rho[0] == pytest.approx(1 - sig6, abs=1e-6)
    assert rho[1] == pytest.approx(sig6, abs=1e-6)
    rho = update_rho(orth_a[None], orth_b)
    assert rho.shape == (1,) and rho[0] == pytest.approx(0.5, abs=1e-7)
    # mean over layers: half the layers identical, half orthogonal
    mixed = orth_b.clone()
    mixed[: M // 2] = orth_a[: M // 2]
    rho = update_rho(orth_a[None], mixed)
    assert rho[0] == pytest.approx(1 - (sig6 + 0.5) / 2, abs=1e-6)


def test_update_rho_clamps_small_norms_at_the_authors_eps():
    """The authors' cosine is nn.CosineSimilarity(dim=1, eps=1e-6): x.y / (max(|x|, 1e-6) *
    max(|y|, 1e-6)). A teacher mask of norm 5e-8 in the new mask's direction has true cosine 1,
    but by hand 25e-8 / (1e-6 * 5) = 0.05 with their eps (torch's default 1e-8 would give 1)."""
    new = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    teacher = torch.tensor([[[3e-8, 4e-8]]], dtype=torch.float64)
    rho = update_rho(teacher, new)
    assert rho[0] == pytest.approx(1 - 1 / (1 + math.exp(-6 * 0.05)), rel=1e-12)


# ---------------------------------------------------------------------------- KR loss

def test_knowledge_retention_loss_weights_and_empty_subsets():
    """KR = sum_i rho_i / sum_j rho_j * MSE(student_i, teacher_i); an empty subset (None or
    length 0) adds nothing but its rho still counts in the normaliser."""
    s0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t0 = torch.tensor([[0.0, 2.0], [3.0, 6.0]])  # squared errors 1, 0, 0, 4 -> mean 1.25
    s2 = torch.tensor([[1.0, 1.0, 1.0]])
    t2 = torch.tensor([[4.0, 1.0, 1.0]])          # mean 3
    rho = np.array([0.6, 0.3, 0.1])
    got = knowledge_retention_loss([s0, None, s2], [t0, None, t2], rho)
    assert got.item() == pytest.approx(0.6 / 1.0 * 1.25 + 0.1 / 1.0 * 3.0)
    empty = torch.zeros(0, 5)
    got = knowledge_retention_loss([s0, empty, s2], [t0, empty, t2], rho)
    assert got.item() == pytest.approx(0.6 * 1.25 + 0.1 * 3.0)
    rho = np.array([0.2, 0.6])
    got = knowledge_retention_loss([s0, None], [t0, None], rho)
    assert got.item() == pytest.approx(0.2 / 0.8 * 1.25)
    assert knowledge_retention_loss([None, empty], [None, empty], rho).item() == 0.0


# ---------------------------------------------------------------------------- subsets

def test_sample_subsets_sizes_distinct_and_independent():
    """floor(rho_i * B) distinct rows in [0, B) per past task, drawn independently per task."""
    rng = np.random.default_rng(0)
    rho = np.array([0.9, 0.5, 0.33, 0.05, 0.0, 1.0])
    B = 50
    not_nested = same = 0
    for _ in range(30):
        subs = sample_subsets(rho, B, rng)
        assert len(subs) == len(rho)
        for r, sub in zip(rho, subs):
            assert len(sub) == math.floor(r * B)
            assert len(np.unique(sub)) == len(sub)
            assert ((0 <= sub) & (sub < B)).all()
        not_nested += not set(subs[1]).issubset(set(subs[0]))
        same += set(subs[1]) == set(subs[0][:25])
    assert not_nested > 0  # subset 2 is not the prefix/subset of one shared permutation
    assert same == 0
    subs = sample_subsets(np.array([0.5, 0.5]), B, rng)
    assert set(subs[0]) != set(subs[1])


# --------------------------------------------------------------- grouped pass and the step

def per_task_logits(model, masks, src, subsets):
    """Reference: one backbone pass per past task; task 1 reads src[:, :-1]."""
    out = []
    for i, sub in enumerate(subsets):
        if len(sub) == 0:
            out.append(None)
            continue
        rows = src[torch.as_tensor(sub, dtype=torch.long)]
        if i == 0:
            rows = rows[:, :-1]
        out.append(model.heads[i](model.encode(rows, masks[i:i + 1])[:, -1]))
    return out


@pytest.mark.parametrize("num_past", [1, 2, 3])
def test_task_logits_grouped_pass_equals_per_task(num_past):
    """The grouped pass of NextItNet.task_logits (per-row masks, task 1 at position -2) gives
    the same logits as one pass per past task, and the new task's group (all rows) equals its
    own pass on the last position."""
    _, model = grown_pair(num_past)
    src = torch.randint(0, N_ITEMS, (12, L))
    rng = np.random.default_rng(1)
    rho = np.array([0.9, 0.4, 0.0][:num_past]) if num_past > 1 else np.array([0.75])
    subsets = sample_subsets(rho, len(src), rng)
    masks = model.masks(7.0)
    *got, new = model.task_logits(src, list(enumerate(subsets)) + [(model.num_tasks - 1, None)], masks)
    assert len(got) == num_past
    ref = per_task_logits(model, masks, src, subsets)
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            assert g is None
        else:
            assert g.shape == r.shape
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-5), f"task {i}"
    ref_new = model.heads[-1](model.encode(src, masks[-1:])[:, -1])
    assert torch.allclose(new, ref_new, atol=1e-5, rtol=1e-5)
    got2 = model.task_logits(src, list(enumerate(subsets)), masks)
    assert len(got2) == num_past
    for g, g2 in zip(got, got2):
        assert (g is None and g2 is None) or torch.allclose(g, g2, atol=1e-5)


def reference_loss(model, teacher, src, tgt, s, subsets, rho, alpha):
    """CE on the new task + alpha * KR, one pass per task (written independently of teracon)."""
    with torch.no_grad():
        t_masks = teacher.masks(s)
        teacher_logits = per_task_logits(teacher, t_masks, src, subsets)
    masks = model.masks(s)
    student_logits = per_task_logits(model, masks, src, subsets)
    new = model.heads[-1](model.encode(src, masks[-1:])[:, -1])
    loss = F.cross_entropy(new, tgt)
    total_rho = float(np.sum(rho))
    kr = 0.0
    for r, st, te in zip(rho, student_logits, teacher_logits):
        if st is not None:
            kr = kr + (r / total_rho) * ((st - te) ** 2).mean()
    return loss + alpha * kr


@pytest.mark.parametrize("num_past,rho", [(1, [0.9]), (2, [0.9, 0.6]), (3, [0.9, 0.05, 0.5])])
def test_task_n_step_loss_and_gradients_match_per_task_reference(num_past, rho):
    """RetentionStep.loss (grouped pass) equals CE + alpha*KR computed task by task, and so do
    its gradients w.r.t. every parameter (float64; rho 0.05 of 10 rows is an empty subset)."""
    teacher, model = grown_pair(num_past)
    teacher, model = teacher.double(), model.double()
    torch.manual_seed(4)
    src = torch.randint(0, N_ITEMS, (10, L))
    tgt = torch.randint(0, 5, (10,))
    s = 3.3
    step = RetentionStep(model, teacher, 0.7, np.random.default_rng(7))
    step.rho = np.array(rho)
    subsets = sample_subsets(np.array(rho), len(src), np.random.default_rng(7))
    assert any(len(x) == 0 for x in subsets) == (num_past == 3)

    ref_model = copy.deepcopy(model)
    loss = step.loss(src, tgt, s)
    loss.backward()
    ref = reference_loss(ref_model, teacher, src, tgt, s, subsets, np.array(rho), 0.7)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if q.grad is None:
            assert p.grad is None or torch.all(p.grad == 0), name
            continue
        assert p.grad is not None, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name
    assert all(p.grad is None for p in teacher.parameters())


def test_task_n_step_float32_finite_and_updates_rho():
    """On a float32 tiny model the loss is finite, rho starts at 0.9 and after the call equals
    update_rho(teacher masks, student new-task mask) at that batch's s."""
    teacher, model = grown_pair(2)
    step = RetentionStep(model, teacher, 0.7, np.random.default_rng(0))
    assert np.array_equal(step.rho, [0.9, 0.9])
    src = torch.randint(0, N_ITEMS, (16, L))
    tgt = torch.randint(0, 5, (16,))
    loss = step.loss(src, tgt, 2.0)
    assert torch.isfinite(loss) and loss.requires_grad
    expected = update_rho(teacher.masks(2.0), model.masks(2.0)[-1])
    assert step.rho.shape == (2,)
    np.testing.assert_allclose(step.rho, expected, rtol=1e-6)
    assert not np.allclose(step.rho, 0.9)


def test_task_n_step_alpha_zero_is_plain_cross_entropy():
    """With alpha = 0 the loss is the new task's cross-entropy on the last position only."""
    teacher, model = grown_pair(2)
    step = RetentionStep(model, teacher, 0.0, np.random.default_rng(0))
    src = torch.randint(0, N_ITEMS, (16, L))
    tgt = torch.randint(0, 5, (16,))
    loss = step.loss(src, tgt, 4.0)
    ref = F.cross_entropy(model.heads[-1](model.encode(src, model.masks(4.0)[-1:])[:, -1]), tgt)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert not np.allclose(step.rho, 0.9)  # rho is still updated


@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_new_task_step_is_cross_entropy_plus_optional_penalty(reg):
    """NewTaskStep (no teacher: the baselines): the new task's cross-entropy on the last
    position, plus `penalty(masks)` when one is given (HAT's regulariser), with the masks at s."""
    _, model = grown_pair(2)
    src = torch.randint(0, N_ITEMS, (16, L))
    tgt = torch.randint(0, 5, (16,))
    ref = F.cross_entropy(model.heads[-1](model.encode(src, model.masks(4.0)[-1:])[:, -1]), tgt)
    assert NewTaskStep(model).loss(src, tgt, 4.0).item() == pytest.approx(ref.item(), rel=1e-5)
    seen = []

    def penalty(masks):
        seen.append(masks.detach().clone())
        return reg * masks[-1].mean()
    loss = NewTaskStep(model, penalty).loss(src, tgt, 4.0)
    assert loss.item() == pytest.approx((ref + reg * model.masks(4.0)[-1].mean()).item(), rel=1e-5)
    assert len(seen) == 1 and torch.equal(seen[0], model.masks(4.0).detach())
    assert not hasattr(NewTaskStep(model), "stats")  # no retention diagnostics


def test_teacher_of_task_two_uses_plain_task1_mask():
    """Training task 2: the teacher (one task) uses the plain mask sigmoid(s * e_1); the student
    the relation-aware masks of both tasks (eq. 12-13, computed by hand from its own parameters,
    its fresh relation MLPs spread out so that every term shows)."""
    teacher, model = grown_pair(1)
    e = teacher.task_masks.task_embedding.detach().double()
    np.testing.assert_allclose(teacher.masks(5.0).detach().double(), 1.0 / (1.0 + torch.exp(-5.0 * e)), atol=1e-6)
    with torch.no_grad():
        model.task_masks.relation_weight.normal_(0.0, 0.5)
        model.task_masks.relation_bias.normal_(0.0, 0.3)
    got = model.masks(5.0)
    assert got.shape == (2, 4, 8)
    np.testing.assert_allclose(got.detach().double(), helpers.relation_masks_by_hand(model, 5.0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- the loop

class NanStep(Step):
    def __init__(self, model):
        self.model, self.calls = model, 0

    def loss(self, src, tgt, s):
        self.calls += 1
        return sum(p.sum() for p in self.model.parameters()) * float("nan")


def test_non_finite_loss_skips_step_but_clamps():
    """A non-finite loss: no optimiser step (all weights unchanged), the clamp still runs; an
    epoch whose every step was skipped is an error, never a checkpoint."""
    model = tiny_model([N_ITEMS, 4])
    with torch.no_grad():
        model.task_masks.task_embedding[0, 0, :4] = torch.tensor([9.0, -8.0, 6.5, -100.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_taskdata(2, 60, 4)
    step = NanStep(model)
    saved = []
    with pytest.raises(UserError, match="task 2 epoch 1: every step had a non-finite loss"):
        trainer.train(model, step, data, train_args(epochs=1, batch=16), torch.device("cpu"),
                      lambda summary, checkpoint=True: saved.append(checkpoint))
    assert saved == []
    n_batches = math.ceil(len(data.splits["train"]) / 16)
    assert step.calls == n_batches
    after = model.state_dict()
    for k, v in before.items():
        if k == "task_masks.task_embedding":
            assert torch.equal(after[k], v.clamp(-6, 6))
        else:
            assert torch.equal(after[k], v), k


def test_finite_loss_steps_and_clamps():
    """Counterpart: a finite loss changes the weights and the embeddings stay in [-6, 6]."""
    model = tiny_model([N_ITEMS, 4])
    with torch.no_grad():
        model.task_masks.task_embedding[0, 0, :2] = torch.tensor([9.0, -8.0])
    before = model.heads[1].weight.detach().clone()
    data = make_taskdata(2, 60, 4)

    class CEStep(Step):
        def loss(self, src, tgt, s):
            return F.cross_entropy(model.heads[1](model.encode(src, model.masks(s)[1:2])[:, -1]), tgt)
    summary = trainer.train(model, CEStep(), data, train_args(epochs=1, batch=16), torch.device("cpu"),
                            lambda summary, checkpoint=True: None)
    assert summary["epochs"][0]["skipped_steps"] == 0
    assert not torch.equal(model.heads[1].weight, before)
    assert model.task_masks.task_embedding.abs().max() <= 6.0


def test_train_early_stopping_and_best_epoch_checkpoint():
    """Early stopping on validation hit@1 with patience; the checkpoint is saved at the first
    epoch and at every strict improvement, and the summary keeps the best epoch's test."""
    model = tiny_model([N_ITEMS, 4])
    data = make_taskdata(2, 60, 4)
    scores = iter([0.5, 0.5, 0.7, 0.6, 0.7, 0.2, 0.9])
    tests = iter(range(100))
    saves = []

    def fake_evaluate(m, d, split, smax, device, *rest, **kw):
        if split == "valid":
            return {"hit@1": next(scores)}
        return {"hit@1": float(next(tests))}

    orig = trainer.evaluate
    trainer.evaluate = fake_evaluate
    try:
        summary = trainer.train(model, RecordingStep(model), data, train_args(epochs=10, patience=3),
                                torch.device("cpu"),
                                lambda summary, checkpoint=True: saves.append((checkpoint, summary["best_epoch"])))
    finally:
        trainer.evaluate = orig
    assert [e["valid"]["hit@1"] for e in summary["epochs"]] == [0.5, 0.5, 0.7, 0.6, 0.7, 0.2]
    assert summary["best_epoch"] == 3
    assert summary["valid"] == {"hit@1": 0.7} and summary["test"] == {"hit@1": 1.0}
    assert [b for c, b in saves if c] == [1, 3]


# ---------------------------------------------------------------------------- task 1

def test_task1_step_is_next_item_ce_on_every_position_plus_mask_term():
    """Task 1: CE of heads[0](encode(seq[:-1])) against seq[1:] on every position (padding
    targets included) + mask_reg * mean of all masks (plain masks)."""
    model = tiny_model([N_ITEMS])
    src = torch.randint(0, N_ITEMS, (6, L))
    src[:, :2] = 0  # left padding: padding targets count too
    s = 3.0
    masks = torch.sigmoid(s * model.task_masks.task_embedding)
    logits = model.heads[0](model.encode(src[:, :-1], masks))
    ce = F.cross_entropy(logits.reshape(-1, N_ITEMS), src[:, 1:].reshape(-1))
    for reg in (0.0, 0.75):
        got = teracon.Task1Step(model, reg).loss(src, torch.full((6,), -1), s)
        assert got.item() == pytest.approx((ce + reg * masks.mean()).item(), rel=1e-6)


def test_chunked_next_item_loss_equals_full_cross_entropy():
    """The chunked task-1 cross-entropy gives the full loss and the same gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, N_ITEMS).double()
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, N_ITEMS, (23,))
    full = F.cross_entropy(head(hidden), targets)
    g_full = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    chunked = teracon.next_item_loss(hidden, head, targets, chunk_elements=5 * N_ITEMS)  # 5 rows a chunk
    g_chunk = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    assert chunked.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_task_n_step_gradients_are_deterministic():
    """Same model, batch, subsets and s: the RetentionStep gradients are bit-identical from call to
    call on CPU (full-size backbone, default thread count), so a seeded run is reproducible."""
    torch.manual_seed(0)
    teacher = NextItNet(31, [31])
    model = copy.deepcopy(teacher)
    model.add_task(30)
    teacher.requires_grad_(False)
    src = torch.randint(0, 31, (32, 8))
    tgt = torch.randint(0, 30, (32,))

    def grads():
        model.zero_grad(set_to_none=True)
        RetentionStep(model, teacher, 0.7, np.random.default_rng(0)).loss(src, tgt, 3.0).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    first = grads()
    for _ in range(5):
        again = grads()
        differ = [k for k in first if not torch.equal(first[k], again[k])]
        assert not differ, f"gradients of {differ} change between identical calls"
