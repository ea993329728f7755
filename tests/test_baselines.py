"""The comparison table: TERACON and the baselines on the same backbone (`--method`).

Every training run goes through `cli.main(argv, task=N)` in-process, on tiny models
(`--channels 16 --dilations 1 2` on task 1; later tasks take the checkpoint's), tiny data and
the CPU. Runs are cached per module so that several tests read the same checkpoints.

Two data set-ups:
- "small": the helpers' cycle-walk task 1 and a click-like ranking task 2, a couple of epochs:
  enough to check what a method writes and what it keeps fixed.
- "disrupt": task 1 learned well, then a task 2 whose fine-tuning rewrites the backbone (its
  target is the item at the *first* position of a task-1-like source, so the last position's
  representation has to change). Used for the forgetting comparisons.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
import statistics
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (NUM_ITEMS, SEQ_LEN, file_hashes, in_process_runner, raw_item, run_script_in_process,
                     write_task1, write_task_ranking)
import prepare_data
import cli
import reproduce
from checkpoint import load_checkpoint, smax_of
from evaluate import evaluate_checkpoint
from methods import METHODS, Conure, weights_of_task
from nextitnet import NextItNet
from utils import UserError

ALL_METHODS = sorted(METHODS)
TINY = ["--channels", "16", "--dilations", "1", "2"]
PRUNE = 0.6  # conure's --prune_ratio in these runs (not the default, so the flag is exercised)
SMALL_T1 = ["--epochs", "2", "--lr", "1e-2", *TINY]
SMALL_T2 = ["--epochs", "2", "--lr", "1e-3", "--batch", "32", "--retrain_epochs", "2"]
RANKING_METRICS = ("hit@1", "mrr@5", "hr@5", "ndcg@5", "mrr@20", "hr@20", "ndcg@20")


def train(folder: Path, task: int, datafile: Path, method: str, *flags: str, seed: int = 0,
          paths: Path | None = None, name: str | None = None, index: Path | None = None) -> dict:
    """One task through `cli.main`; writes folder/<name or taskN>.pt/.json; returns the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["--datapath", str(datafile), "--datapath_index", str(index or folder / "index.json"),
            "--savepath", str(folder / (name or f"task{task}")), "--method", method, "--seed", str(seed),
            "--prune_ratio", str(PRUNE), "--quiet", "--device", "cpu", *flags]
    if paths is not None:
        argv += ["--paths", str(paths)]
    return cli.main(argv, task=task)


def task_metrics(ckpt_path: Path) -> list[dict]:
    """`now` metrics of every task of a checkpoint, evaluated by evaluate.py's routine."""
    return [r["now"] for r in evaluate_checkpoint(ckpt_path, "cpu")]


def write_first_item_task(path: Path, lines: int, seed: int = 7) -> Path:
    """Task-n file: a task-1-like source (left-padded cycle walk) whose first position holds a
    random item; the target is that item. The last position's representation must carry
    position 0, which the next-item backbone of task 1 does not: fine-tuning rewrites it."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(lines):
        pad = int(rng.integers(0, 3))
        start = int(rng.integers(0, NUM_ITEMS))
        seq = [0] * pad + [raw_item((start + j) % NUM_ITEMS) for j in range(SEQ_LEN - pad)]
        seq[0] = raw_item(int(rng.integers(0, NUM_ITEMS)))
        rows.append(",".join(map(str, seq)) + ",," + str(seq[0]))
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------ shared runs

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small data and a cache of (task 1, task 2) runs per method: folder/<method>/task{1,2}.pt."""
    d = tmp_path_factory.mktemp("small")
    t1, t2 = write_task1(d / "t1.csv", lines=200), write_task_ranking(d / "t2.csv", lines=200)
    cache: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in cache:
            folder = d / method
            train(folder, 1, t1, method, *SMALL_T1)
            train(folder, 2, t2, method, *SMALL_T2, paths=folder / "task1.pt")
            cache[method] = folder
        return cache[method]

    return types.SimpleNamespace(dir=d, t1=t1, t2=t2, run=run)


# The disruption set-up: task 1 to near-perfect next-item prediction, then task 2 with a large
# step (lr 1e-2), the paper's task-n batch of 1024 (one step per epoch here) and 40 epochs with no
# early stop. The batch matters for TERACON: its knowledge-retention subset of task 1 is
# floor(rho * B) rows with rho = 1 - mean sigmoid(6 cos(mask_1, mask_2)) ~ 0.003 here (the masks
# overlap almost fully), i.e. 2-3 rows at B = 1024 and none at all at B = 32.
DISRUPT_T1 = ["--epochs", "8", "--lr", "1e-2", *TINY]
DISRUPT_T2 = ["--epochs", "40", "--lr", "1e-2", "--batch", "1024", "--patience", "40"]
MAIN = ("mrr@5", "hr@5", "ndcg@5", "hit@1")


@pytest.fixture(scope="module")
def disrupt(tmp_path_factory):
    d = tmp_path_factory.mktemp("disrupt")
    t1 = write_task1(d / "t1.csv", lines=600)
    t2 = write_first_item_task(d / "t2.csv", lines=1500)
    cache: dict[tuple[str, int], dict] = {}

    def run(method: str, seed: int) -> dict:
        """Task 1's metrics right after task 1 and after task 2, task 2's metrics, the folder."""
        key = (method, seed)
        if key not in cache:
            folder = d / f"{method}_seed{seed}"
            train(folder, 1, t1, method, *DISRUPT_T1, seed=seed)
            train(folder, 2, t2, method, *DISRUPT_T2, seed=seed, paths=folder / "task1.pt")
            before = task_metrics(folder / "task1.pt")[0]
            after, second = task_metrics(folder / "task2.pt")
            cache[key] = {"before": before, "after": after, "task2": second, "dir": folder,
                          "drop": {k: before[k] - after[k] for k in MAIN}}
        return cache[key]

    return run


# --------------------------------------------------------------------------- fineall

@pytest.mark.parametrize("seed", [0, 1])
def test_fineall_forgets_task1_more_than_teracon(disrupt, seed):
    """Fine-tuning everything on a disruptive task 2 loses most of task 1, TERACON's knowledge
    retention keeps most of it: task 1's MRR@5 (evaluate_checkpoint, after task 2 vs after
    task 1) drops by at least 0.3 more under fineall than under teracon, for two seeds."""
    fine, tera = disrupt("fineall", seed), disrupt("teracon", seed)
    # the set-up is what it claims: task 1 learned well, task 2 learnable and learned by fineall
    assert fine["before"]["mrr@5"] > 0.9 and tera["before"]["mrr@5"] > 0.9
    assert fine["task2"]["mrr@5"] > 0.5
    assert fine["drop"]["mrr@5"] > tera["drop"]["mrr@5"] + 0.3, (fine["drop"], tera["drop"])
    assert fine["drop"]["hr@5"] > tera["drop"]["hr@5"] + 0.3, (fine["drop"], tera["drop"])
    # teracon did not keep task 1 by not training: task 2 is above chance (MRR@5 ~ 0.076 over 30)
    assert tera["task2"]["mrr@5"] > 0.15


# ----------------------------------------------------------------------------- conure

def test_conure_keeps_task1_metrics_exactly(small):
    """CONURE freezes task 1's weights: evaluating task 1 with the task-1 checkpoint and with
    the task-2 checkpoint gives exactly the same metrics."""
    folder = small.run("conure")
    r1, r2 = evaluate_checkpoint(folder / "task1.pt", "cpu"), evaluate_checkpoint(folder / "task2.pt", "cpu")
    assert len(r1) == 1 and len(r2) == 2
    assert r2[0]["now"] == r1[0]["now"]
    assert r2[0]["after_training"] == r1[0]["after_training"]


def conv_weight_keys(ckpt: dict) -> list[str]:
    """State-dict keys of the conv weights in `NextItNet.convs()` order (CONURE's owner order)."""
    return [f"blocks.{b}.conv{i}.weight" for b in range(len(ckpt["config"]["dilations"])) for i in (1, 2)]


def test_conure_owner_buffers(small):
    """Task 1's owned conv weights are bit-identical in the task-2 checkpoint and still owned by
    task 1; each task takes round((1 - prune_ratio) * free) of the free weights (+-1); pruned
    (free) weights are zero; the frozen parts (item embedding, layer norms, conv biases, task 1's
    head) are bit-identical. The owners are the checkpoint's `conure_owner` (int16, one per conv
    in convs() order, shaped like its weight), not a part of the model's config or weights."""
    folder = small.run("conure")
    c1, c2 = load_checkpoint(folder / "task1.pt"), load_checkpoint(folder / "task2.pt")
    s1, s2 = c1["state_dict"], c2["state_dict"]
    assert "owned" not in c1["config"] and not [k for k in s1 if k.endswith(".owner")]
    weights = conv_weight_keys(c1)
    assert len(c1["conure_owner"]) == len(c2["conure_owner"]) == len(weights) == 2 * len(c1["config"]["dilations"])
    for w, o1, o2 in zip(weights, c1["conure_owner"], c2["conure_owner"]):
        key = w
        assert o1.dtype == o2.dtype == torch.int16 and o1.shape == o2.shape == s1[w].shape, key
        n = o1.numel()
        own1 = o1 == 1
        assert set(o1.unique().tolist()) <= {0, 1} and set(o2.unique().tolist()) <= {0, 1, 2}
        assert abs(int(own1.sum()) - (1 - PRUNE) * n) <= 1, key
        assert torch.equal(o2 == 1, own1), key
        assert torch.equal(s2[w][own1], s1[w][own1]), key
        free1 = int((o1 == 0).sum())
        assert abs(int((o2 == 2).sum()) - (1 - PRUNE) * free1) <= 1, key
        assert not s1[w][o1 == 0].any() and not s2[w][o2 == 0].any(), key
    frozen = [k for k in s1 if k.startswith(("item_embedding", "heads.0."))
              or re.search(r"\.(ln[12]\.(weight|bias)|conv[12]\.bias)$", k)]
    assert len(frozen) == 3 + 6 * len(c1["config"]["dilations"])
    for k in frozen:
        assert torch.equal(s1[k], s2[k]), k


def test_conure_serve_uses_the_weights_of_tasks_up_to_each(small):
    """Conure.serve on the task-2 checkpoint yields (model, head) per task: task t sees the free
    weights and those owned by tasks <= t (later tasks' zero), and once served the model's conv
    weights are the checkpoint's again; weights_of_task(model, owner, 2) changes nothing."""
    ckpt = load_checkpoint(small.run("conure") / "task2.pt")
    keys, owner = conv_weight_keys(ckpt), ckpt["conure_owner"]
    assert any((o == 2).any() for o in owner)  # task 1 must hide something
    served = []
    for model, head in Conure.serve(ckpt, torch.device("cpu")):
        served.append(head)
        for key, conv, o in zip(keys, model.convs(), owner):
            assert torch.equal(conv.weight.detach(), ckpt["state_dict"][key] * (o <= head + 1)), (head, key)
    assert served == [0, 1]
    for key, conv in zip(keys, model.convs()):
        assert torch.equal(conv.weight.detach(), ckpt["state_dict"][key]), key
    with weights_of_task(model, owner, 2):
        for key, conv in zip(keys, model.convs()):
            assert torch.equal(conv.weight.detach(), ckpt["state_dict"][key]), key


# -------------------------------------------------------------------------------- hat

# Not exact, for two reasons: a LayerNorm normalises over all channels, so the channels left free
# for task 2 change the statistics task 1's channels are normalised with; and a cumulative mask
# strictly between 0 and 1 only damps its weights' updates. A HAT whose blocking survives the
# optimiser moves task 1's metrics here by <= 0.09 (seeds 0-7, measured); fineall by 0.75-0.99.
HAT_TOL = 0.15


@pytest.mark.parametrize("seed", [0, 1])
def test_hat_keeps_task1_nearly_unchanged(disrupt, seed):
    """HAT blocks the gradients of the weights task 1 uses, so on the disruptive task 2 every
    task-1 metric moves by at most HAT_TOL (see above why it is not exact), and HAT loses far
    less than fineall (at least 0.3 less MRR@5)."""
    hat, fine = disrupt("hat", seed), disrupt("fineall", seed)
    assert hat["before"]["mrr@5"] > 0.9
    moved = {k: abs(hat["after"][k] - hat["before"][k]) for k in hat["before"]}
    assert max(moved.values()) <= HAT_TOL, moved
    assert fine["drop"]["mrr@5"] > hat["drop"]["mrr@5"] + 0.3, (fine["drop"], hat["drop"])


def test_hat_checkpoint_carries_cumulative_mask(small):
    """Every HAT checkpoint stores `hat_cumulative` [masked layers, channels] in [0, 1]; after
    task 2 it is the element-wise max of task 1's and task 2's masks, so it never decreases."""
    folder = small.run("hat")
    c1, c2 = load_checkpoint(folder / "task1.pt"), load_checkpoint(folder / "task2.pt")
    shape = (2 * len(c1["config"]["dilations"]), c1["config"]["channels"])
    for c in (c1, c2):
        a = c["hat_cumulative"]
        assert tuple(a.shape) == shape
        assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert (c2["hat_cumulative"] >= c1["hat_cumulative"]).all()
    # task 1's cumulative mask is task 1's plain mask at s = smax
    model = NextItNet.from_checkpoint(c1)
    assert torch.allclose(c1["hat_cumulative"], model.masks(smax_of(c1))[0], atol=1e-6)


def test_hat_regulariser_weights_hat_reg_and_task1_mask_term_mask_reg():
    """HAT's regulariser (Serra et al. eq. 5) is sum m (1 - a_<t) / sum (1 - a_<t), weighted by
    --hat_reg on tasks >= 2 (not by --mask_reg); task 1's mean-of-masks term (teracon.mask_mean)
    is weighted by --mask_reg alone, and the methods' task-2 steps carry no mask_reg."""
    from methods import HAT, hat_penalty
    from teracon import NewTaskStep, Task1Step, mask_mean
    mask = torch.tensor([[0.2, 0.8], [1.0, 0.4]])
    cum = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    # free = 0, 0.5, 1, 0.75: (0 + 0.4 + 1.0 + 0.3) / 2.25
    assert hat_penalty(mask, cum).item() == pytest.approx(1.7 / 2.25)
    assert hat_penalty(mask, torch.ones(2, 2)).item() == 0.0  # nothing free: no division by zero
    assert mask_mean(mask).item() == pytest.approx(0.6)
    args = types.SimpleNamespace(mask_reg=0.3, hat_reg=2.0, smax=50.0, alpha=0.7, seed=0, min_retention_rows=0)
    torch.manual_seed(0)
    model = NextItNet(NUM_ITEMS, [NUM_ITEMS, 4], channels=4, dilations=(1,), relation=False)
    hat = HAT(args, 2, {"hat_cumulative": cum}, torch.device("cpu"))
    hat.prepare(model)
    masks = torch.stack([mask, mask.flip(0)])
    assert hat.penalty(masks).item() == pytest.approx(2.0 * hat_penalty(mask.flip(0), cum).item())
    step = hat.step(model, None)
    assert isinstance(step, NewTaskStep) and step.penalty == hat.penalty
    first = HAT(args, 1, None, torch.device("cpu"))
    step1 = first.step(NextItNet(NUM_ITEMS, [NUM_ITEMS], channels=4, dilations=(1,), relation=False), None)
    assert isinstance(step1, Task1Step) and step1.mask_reg == 0.3
    for name in ("teracon-nokr", "fineall", "sinmo", "conure"):
        method = METHODS[name](args, 2, None, torch.device("cpu"))
        step = method.step(model, None)
        assert isinstance(step, NewTaskStep) and step.penalty is None, name


HAT_LR = 1e-3
HAT_LEVELS = (1.0, 1.0 - 1e-4, 0.5, 0.0)  # cumulative values, one per quarter of the channels


@pytest.fixture(scope="module")
def hat_step(small, tmp_path_factory):
    """One HAT optimiser step on task 2 from a task-1 checkpoint whose cumulative mask is set by
    hand: per layer, channels in four quarters at 1, 1 - 1e-4, 0.5 and 0. Batch > training set
    and one epoch: exactly one step (the first epoch's checkpoint is always saved)."""
    d = tmp_path_factory.mktemp("hat_step")
    src = load_checkpoint(small.run("hat") / "task1.pt")
    m, c = src["hat_cumulative"].shape
    cum = torch.tensor(HAT_LEVELS).repeat_interleave(c // 4).expand(m, c).clone()
    torch.save(dict(src, hat_cumulative=cum), d / "task1.pt")
    summary = train(d, 2, small.t2, "hat", "--epochs", "1", "--batch", "100000", "--lr", str(HAT_LR),
                    paths=d / "task1.pt", index=small.run("hat") / "index.json")
    assert summary["epochs"][0]["skipped_steps"] == 0
    after = load_checkpoint(d / "task2.pt")
    return src["state_dict"], after["state_dict"], cum, len(src["config"]["dilations"])


def _hat_blocking(cum: torch.Tensor, blocks: int) -> dict[str, torch.Tensor]:
    """The cumulative value that blocks each backbone tensor entry (HAT: conv1 row o by a1[o],
    conv2 entry (o, i) by min(a2[o], a1[i]), biases and layer norms by their layer's a)."""
    out = {}
    for b in range(blocks):
        a1, a2 = cum[2 * b], cum[2 * b + 1]
        out[f"blocks.{b}.conv1.weight"] = a1[:, None, None].expand(-1, len(a1), 3)
        out[f"blocks.{b}.conv2.weight"] = torch.minimum(a2[:, None], a1[None, :])[..., None].expand(-1, -1, 3)
        for k in ("conv1.bias", "ln1.weight", "ln1.bias"):
            out[f"blocks.{b}.{k}"] = a1
        for k in ("conv2.bias", "ln2.weight", "ln2.bias"):
            out[f"blocks.{b}.{k}"] = a2
    return out


def test_hat_step_leaves_fully_blocked_weights_bit_identical(hat_step):
    """After a HAT step on task 2: the item embedding, task 1's head and task 1's task
    embedding have no update; backbone entries whose cumulative mask is exactly 1 are
    bit-identical, while entries with cumulative 0 did move (a step happened)."""
    before, after, cum, blocks = hat_step
    for k in ("item_embedding.weight", "heads.0.weight", "heads.0.bias"):
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(before["task_masks.task_embedding"][0], after["task_masks.task_embedding"][0])
    moved_free = 0
    for k, a in _hat_blocking(cum, blocks).items():
        delta = (after[k] - before[k]).abs()
        assert not delta[a == 1].any(), k
        moved_free += int((delta[a == 0] > 0).sum())
    assert moved_free > 0


def test_hat_step_leaves_nearly_blocked_weights_unchanged(hat_step):
    """Entries whose cumulative mask is ~1 (1 - 1e-4) are (nearly) unchanged by a HAT step:
    their gradient is scaled by 1 - a = 1e-4, so the step may move them by at most
    1e-3 * lr. (An optimiser that renormalises the scaled gradient, like Adam, moves them by
    ~lr, as if they were free: the blocking then only holds for masks saturated to exactly 1.)"""
    before, after, cum, blocks = hat_step
    worst = {}
    for k, a in _hat_blocking(cum, blocks).items():
        near = (a >= 1 - 1e-3) & (a < 1)
        if near.any():
            worst[k] = (after[k] - before[k]).abs()[near].max().item()
    assert worst and max(worst.values()) <= 1e-3 * HAT_LR, worst


# ------------------------------------------------------------------------------ sinmo

def test_sinmo_task2_does_not_depend_on_task1(small, tmp_path):
    """SinMo trains every task from scratch: task 2 after two different task-1 runs (other seed
    and epochs) gives identical task-2 metrics and bit-identical task-2 weights."""
    a = small.run("sinmo")
    b = tmp_path / "sinmo_b"
    train(b, 1, small.t1, "sinmo", "--epochs", "1", "--lr", "3e-3", *TINY, seed=5)
    assert not torch.equal(load_checkpoint(b / "task1.pt")["state_dict"]["item_embedding.weight"],
                           load_checkpoint(a / "task1.pt")["state_dict"]["item_embedding.weight"])
    summary_b = train(b, 2, small.t2, "sinmo", *SMALL_T2, paths=b / "task1.pt")
    summary_a = reproduce.read_json(a / "task2.json")
    assert [e["train_loss"] for e in summary_b["epochs"]] == [e["train_loss"] for e in summary_a["epochs"]]
    assert [e["valid"] for e in summary_b["epochs"]] == [e["valid"] for e in summary_a["epochs"]]
    assert summary_b["test"] == summary_a["test"]
    sa, sb = load_checkpoint(a / "task2.pt")["state_dict"], load_checkpoint(b / "task2.pt")["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sinmo_evaluate_uses_each_tasks_own_model(small):
    """evaluate_checkpoint on a SinMo task-2 checkpoint reports both tasks; task 1 with its own
    model, so its metrics equal the task-1 checkpoint's evaluation; task 2's equal the test
    metrics recorded at its best epoch."""
    folder = small.run("sinmo")
    rows = evaluate_checkpoint(folder / "task2.pt", "cpu")
    assert [r["task"] for r in rows] == [1, 2]
    assert all(r["method"] == "sinmo" for r in rows)
    assert rows[0]["now"] == task_metrics(folder / "task1.pt")[0]
    assert rows[1]["now"] == pytest.approx(rows[1]["after_training"], abs=1e-12)


# --------------------------------------------------------------------- teracon ablations

def test_teracon_nokr_forces_alpha_zero(small, tmp_path):
    """`teracon-nokr` is TERACON without knowledge retention: alpha is 0 in the summary's
    (PREFIX.json) and the checkpoint's args, even when --alpha is given explicitly."""
    folder = small.run("teracon-nokr")
    for t in (1, 2):
        assert load_checkpoint(folder / f"task{t}.pt")["args"]["alpha"] == 0.0
        assert reproduce.read_json(folder / f"task{t}.json")["args"]["alpha"] == 0.0
    summary = train(tmp_path, 2, small.t2, "teracon-nokr", "--epochs", "1", "--alpha", "0.7",
                    paths=folder / "task1.pt", index=folder / "index.json")
    assert summary["finished"]
    assert reproduce.read_json(tmp_path / "task2.json")["args"]["alpha"] == 0.0
    assert load_checkpoint(tmp_path / "task2.pt")["args"]["alpha"] == 0.0


def test_teracon_norel_uses_plain_masks(small):
    """`teracon-norel` checkpoints record relation False, and the model's masks with two tasks
    are the plain masks sigmoid(s * e_t) of every task (no relation MLP involved)."""
    folder = small.run("teracon-norel")
    for t in (1, 2):
        ckpt = load_checkpoint(folder / f"task{t}.pt")
        assert ckpt["config"]["relation"] is False and ckpt["config"]["masked"] is True
        model = NextItNet.from_checkpoint(ckpt)
        e = ckpt["state_dict"]["task_masks.task_embedding"]
        for s in (0.5, 50.0):
            assert torch.allclose(model.masks(s), torch.sigmoid(s * e), atol=1e-7)
    # the teracon default uses relation-aware masks for two tasks: they differ from the plain ones
    ref = load_checkpoint(small.run("teracon") / "task2.pt")
    model = NextItNet.from_checkpoint(ref)
    assert ref["config"]["relation"] is True
    e = ref["state_dict"]["task_masks.task_embedding"]
    assert not torch.allclose(model.masks(50.0), torch.sigmoid(50.0 * e), atol=1e-3)


# ------------------------------------------------------------------------ every method

@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_records_itself_and_evaluates(small, method):
    """Each method's task-1 and task-2 checkpoints record `method`; evaluate_checkpoint on the
    task-2 checkpoint reports both tasks with that method, finite metrics in [0, 1], and task 2's
    metrics equal those recorded at its best epoch (the checkpoint is that epoch's model)."""
    folder = small.run(method)
    for t in (1, 2):
        ckpt = load_checkpoint(folder / f"task{t}.pt")
        assert ckpt["method"] == method and len(ckpt["tasks"]) == t
    rows = evaluate_checkpoint(folder / "task2.pt", "cpu")
    assert [r["task"] for r in rows] == [1, 2]
    for r in rows:
        assert r["method"] == method and r["metric"] == "ranking"
        assert set(r["now"]) == set(RANKING_METRICS)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r["now"].values())
    assert rows[1]["now"] == pytest.approx(rows[1]["after_training"], abs=1e-12)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_continuing_with_another_method_is_a_user_error(small, method, tmp_path):
    """Task 2 with a --method other than the task-1 checkpoint's: one UserError naming the
    checkpoint and both methods, raised before anything is written; the task-1 run is untouched."""
    other = ALL_METHODS[(ALL_METHODS.index(method) + 1) % len(ALL_METHODS)]
    folder = small.run(method)
    before = file_hashes(folder)
    with pytest.raises(UserError) as err:
        train(tmp_path, 2, small.t2, other, "--epochs", "1", paths=folder / "task1.pt",
              index=folder / "index.json")
    assert str(err.value) == f"{folder / 'task1.pt'}: made by --method {method}, not {other}"
    assert list(tmp_path.iterdir()) == [] and file_hashes(folder) == before


def test_method_mismatch_through_the_script_is_one_error_line(small, tmp_path):
    """Through the script (train_teracon_t2.py run as `__main__`, its `run_cli` included, in this
    process: helpers.run_script_in_process; test_cli runs it in a new interpreter): exit status
    2 and exactly one stderr line, `error: ...`, naming the checkpoint's method, no traceback,
    no output files."""
    folder = small.run("teracon")
    rc, out, err = run_script_in_process("train_teracon_t2.py", "--datapath", small.t2, "--datapath_index",
                                         folder / "index.json", "--paths", folder / "task1.pt", "--savepath",
                                         tmp_path / "task2", "--method", "fineall", "--device", "cpu", "--quiet",
                                         cwd=tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "teracon" in lines[0] and "fineall" in lines[0]
    assert not (tmp_path / "task2.pt").exists() and not (tmp_path / "task2.json").exists()


# --------------------------------------------------------------------------- reproduce

EXPECTED_METRICS = {"ranking": ("mrr@5", "ndcg@5", "hr@5"), "accuracy": ("accuracy",)}
CELL = re.compile(r"^(\d+\.\d+) ± (\d+\.\d+)$")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reproduce_table_two_methods_two_seeds_and_skips_when_done(tmp_path, monkeypatch, caplog):
    """reproduce.py --methods teracon fineall --seeds 0 1 --max_epochs 1 --no_plots on a 3-task
    synthetic data set: every (method, seed, task) stage runs once, in order, with its method,
    seed and previous checkpoint; each method/seed gets a matrix.json (method, seed, version,
    `after` = the evaluation rows of task1.pt..task3.pt, `reference` = test rows of every task);
    table.md, table.csv and the returned rows start with the reference rows of every task, then
    one row per method x task x reported metric (ranking: mrr@5, ndcg@5, hr@5; classification:
    accuracy); every numeric cell is a number; the CSV's per-seed columns equal matrix.json
    (after_task = R[j][j], after_last = R[T][j], the reference's test value for both) and its
    mean/std columns match them; summary.md/csv and reference_check.csv are written. A second
    call without --force runs no stage, logs every stage as skipped, rewrites no run file (no
    matrix.json either) and gives the same outputs."""
    manifest_path = prepare_data.make_synthetic(tmp_path / "data", users=40, items=40, seq_len=6,
                                                num_tasks=3, seed=0)
    manifest = reproduce.dl.load_manifest(str(manifest_path))
    kinds = {int(t["task"]): t["metric"] for t in manifest["tasks"]}
    names = {int(t["task"]): t["name"] for t in manifest["tasks"]}
    assert kinds[1] == "ranking" and "accuracy" in kinds.values()  # both row shapes are exercised
    calls: list[list[str]] = []
    monkeypatch.setattr(reproduce, "subprocess", types.SimpleNamespace(run=in_process_runner(calls, TINY)))
    methods, seeds = ["teracon", "fineall"], [0, 1]
    argv = ["--dataset", str(manifest_path), "--methods", *methods, "--seeds", "0", "1",
            "--max_epochs", "1", "--out", str(tmp_path / "results"), "--device", "cpu", "--no_plots"]
    rows = reproduce.main(argv)

    out = tmp_path / "results" / "synthetic"
    # every stage once, in order, with its method, seed and the previous task's checkpoint
    assert len(calls) == len(methods) * len(seeds) * 3
    for call, (method, seed, task) in zip(calls, [(m, s, t) for m in methods for s in seeds for t in (1, 2, 3)]):
        assert _flag(call, "--method") == method and _flag(call, "--seed") == str(seed)
        assert _flag(call, "--epochs") == "1"
        prefix = out / method / f"seed{seed}"
        assert Path(_flag(call, "--savepath")) == prefix / f"task{task}"
        if task == 1:
            assert call[0] == "train_task1.py" and "--paths" not in call
        else:
            assert call[0] == "train_teracon.py" and _flag(call, "--task") == str(task)
            assert Path(_flag(call, "--paths")) == prefix / f"task{task - 1}.pt"
        assert load_checkpoint(prefix / f"task{task}.pt")["method"] == method

    # matrix.json: the evaluation of every checkpoint, and the reference on the same split
    matrix = {(m, s): reproduce.read_json(out / m / f"seed{s}" / "matrix.json") for m in methods for s in seeds}
    for (method, seed), mx in matrix.items():
        assert set(mx) == {"method", "seed", "version", "commits", "dirty", "rehearsal", "after", "reference"}
        assert mx["rehearsal"] is False and len(mx["commits"]) == 1
        assert (mx["method"], mx["seed"], mx["version"]) == (method, seed, manifest.get("version"))
        assert [[r["task"] for r in rows_i] for rows_i in mx["after"]] == [[1], [1, 2], [1, 2, 3]]
        assert all(r["method"] == method for rows_i in mx["after"] for r in rows_i)
        assert [(r["task"], r["name"], r["metric"]) for r in mx["reference"]] == \
            [(t, names[t], kinds[t]) for t in (1, 2, 3)]
        for t in (1, 2, 3):
            # R[t][t] is the checkpoint's own test record of task t, re-evaluated
            diag = mx["after"][t - 1][t - 1]
            for metric in EXPECTED_METRICS[kinds[t]]:
                assert diag["now"][metric] == pytest.approx(diag["after_training"][metric], abs=1e-6)
    for seed in seeds:  # the reference depends on the seed's split, not on the method
        assert matrix["teracon", seed]["reference"] == matrix["fineall", seed]["reference"]

    expected = [(m, t, metric) for m in ["reference", *methods] for t in (1, 2, 3)
                for metric in EXPECTED_METRICS[kinds[t]]]
    assert [(r["method"], r["task"], r["metric"]) for r in rows] == expected
    assert all(r["seeds"] == seeds and r["name"] == names[r["task"]] for r in rows)

    md = (out / "table.md").read_text().splitlines()
    body = [ln for ln in md if ln.startswith("|")][2:]  # after the header and the |---| line
    assert len(body) == len(expected)
    for line, (method, task, metric) in zip(body, expected):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == method and cells[1] == str(task) and cells[3] == metric, line
        for cell in cells[4:]:
            m = CELL.match(cell)
            assert m, line
            assert all(0.0 <= float(x) <= 1.0 for x in m.groups())

    def want(method: str, seed: int, task: int, metric: str, phase: str) -> float:
        mx = matrix["teracon" if method == "reference" else method, seed]
        if method == "reference":
            return mx["reference"][task - 1]["test"][metric]
        checkpoint = task if phase == "after_task" else 3
        return mx["after"][checkpoint - 1][task - 1]["now"][metric]

    table = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert len(table) == len(expected)
    header = list(table[0])
    for s in seeds:
        assert f"after_task_seed{s}" in header and f"after_last_seed{s}" in header
    for row, r, (method, task, metric) in zip(table, rows, expected):
        assert (row["method"], row["task"], row["metric"]) == (method, str(task), metric)
        for k, v in row.items():
            if k not in ("method", "task", "name", "metric"):
                assert math.isfinite(float(v)), (k, v)
        for phase in ("after_task", "after_last"):
            per_seed = [float(row[f"{phase}_seed{s}"]) for s in seeds]
            values = [want(method, s, task, metric, phase) for s in seeds]
            assert per_seed == pytest.approx(values, abs=1e-6)
            assert r[phase] == pytest.approx(values, abs=1e-12)
            assert float(row[f"{phase}_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert float(row[f"{phase}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)

    summary = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert [r["method"] for r in summary] == methods
    assert {"avg_final_mean", "avg_final_std", "avg_forgetting_mean", "bwt_mean"} <= set(summary[0])
    check = list(csv.DictReader((out / "reference_check.csv").read_text().splitlines()))
    assert [int(r["task"]) for r in check] == [1, 2, 3]
    text = (out / "summary.md").read_text()
    assert all(f"| {m} |" in text for m in methods)
    assert not list(out.rglob("*.png"))  # --no_plots

    # second call: nothing retrained, every stage reported as skipped, the same outputs
    before = _files(out)
    top = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert set(top) == {"table.md", "table.csv", "summary.md", "summary.csv", "reference_check.csv"}
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="teracon"):
        rows2 = reproduce.main(argv)
    assert calls == []
    skipped = [r.getMessage() for r in caplog.records if "already done, skipped" in r.getMessage()]
    assert len(skipped) == len(methods) * len(seeds) * 3
    after = _files(out)
    runs = [k for k in before if "/" in k]  # every file of a method/seed folder, matrix.json included
    assert any(k.endswith("matrix.json") for k in runs)
    assert all(after[k] == before[k] for k in runs)
    assert rows2 == rows
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == top


def test_reproduce_spawns_the_real_scripts(tmp_path):
    """The real path, one method and seed on a 2-task data set: reproduce spawns
    train_task1.py and train_teracon.py as subprocesses (conure: with --retrain_epochs capped),
    and writes matrix.json (both checkpoints evaluated, the reference) and the table, whose rows
    are the reference's for every task, then conure's."""
    manifest_path = prepare_data.make_synthetic(tmp_path / "data", users=40, items=40, seq_len=6,
                                                num_tasks=2, seed=1)
    rows = reproduce.main(["--dataset", str(manifest_path), "--methods", "conure", "--seeds", "3",
                           "--max_epochs", "1", "--out", str(tmp_path / "results"), "--device", "cpu",
                           "--no_plots"])
    run = tmp_path / "results" / "synthetic" / "conure" / "seed3"
    for t in (1, 2):
        summary = reproduce.read_json(run / f"task{t}.json")
        assert summary["finished"] and summary["method"] == "conure" and summary["args"]["seed"] == 3
        assert [e["phase"] for e in summary["epochs"]] == ["train", "retrain"]
    kinds = [t["metric"] for t in reproduce.dl.load_manifest(str(manifest_path))["tasks"]]
    per_method = [t for t, k in enumerate(kinds, 1) for _ in EXPECTED_METRICS[k]]
    assert [(r["method"], r["task"]) for r in rows] == \
        [(m, t) for m in ("reference", "conure") for t in per_method]
    mx = reproduce.read_json(run / "matrix.json")
    assert (mx["method"], mx["seed"]) == ("conure", 3)
    assert [len(a) for a in mx["after"]] == [1, 2] and [r["task"] for r in mx["reference"]] == [1, 2]
    assert not (run / "final.json").exists()
    out = tmp_path / "results" / "synthetic"
    assert len((out / "table.csv").read_text().splitlines()) == 1 + len(rows)
    for name in ("table.md", "summary.md", "summary.csv", "reference_check.csv"):
        assert (out / name).is_file(), name
