"""Mechanism diagnostics (issue 12): retention subset sizes with --min_retention_rows, the
per-epoch retention statistics, mask sparsity at s = smax, and the `diagnostics` record every
epoch of a real run writes into PREFIX.json."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch

from helpers import run_script_in_process, write_task1, write_task_ranking
from nextitnet import NextItNet
from teracon import NewTaskStep, RetentionStats, RetentionStep, sample_subsets
from trainer import epoch_diagnostics, mask_diagnostics

SMAX = 50.0


# ------------------------------------------------------------------------ sample_subsets

@pytest.mark.parametrize("batch, min_rows, want", [
    # floor(rho * B) for rho 0.0025, 0.5, 0.9 at B = 256: 0, 128, 230
    (256, 0, [0, 128, 230]),     # the paper's rule (the default): a tiny rho labels no row
    (256, 16, [16, 128, 230]),   # raised to 16 only where floor(rho * B) is below it
    (256, 200, [200, 200, 230]),
    # B = 10: floor gives 0, 5, 9; min(min_rows, B) caps the floor at the batch itself
    (10, 16, [10, 10, 10]),
    (10, 6, [6, 6, 9]),
    (1, 3, [1, 1, 1]),
])
def test_sample_subsets_sizes_with_min_rows(batch, min_rows, want):
    """Each past task's subset has max(floor(rho_i * B), min(min_rows, B)) distinct rows of the
    batch; min_rows = 0 is the paper's floor(rho_i * B)."""
    rho = np.array([0.0025, 0.5, 0.9])
    subsets = sample_subsets(rho, batch, np.random.default_rng(0), min_rows)
    assert [len(s) for s in subsets] == want
    for s in subsets:
        assert len(np.unique(s)) == len(s) and (s.min(initial=0) >= 0) and s.max(initial=0) < batch


def test_sample_subsets_default_is_the_paper_rule():
    """Without min_rows the sizes are floor(rho_i * B), identical draws to min_rows = 0."""
    rho = np.array([0.003, 0.375, 1.0])
    a = sample_subsets(rho, 300, np.random.default_rng(5))
    b = sample_subsets(rho, 300, np.random.default_rng(5), 0)
    assert [len(s) for s in a] == [0, 112, 300]  # floor(0.9), floor(112.5), 300
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------ RetentionStats

def test_retention_stats_means_and_reset():
    """pop() gives, per past task, the mean rho and the mean number of labelled rows over the
    steps since the last pop (rho to 6 decimals, rows to 3), then starts over; reset() clears."""
    stats = RetentionStats(2)
    stats.add(np.array([0.2, 0.8]), [np.arange(3), np.arange(5)])
    stats.add(np.array([0.4, 0.6]), [np.arange(1), np.arange(0)])
    stats.add(np.array([0.3, 0.1]), [np.arange(0), np.arange(0)])
    # rho: (0.2 + 0.4 + 0.3) / 3 = 0.3, (0.8 + 0.6 + 0.1) / 3 = 0.5; rows (3 + 1 + 0) / 3 = 1.333,
    # (5 + 0 + 0) / 3 = 1.667
    assert stats.pop() == {"rho_mean": [0.3, 0.5], "retention_rows_mean": [1.333, 1.667]}
    assert stats.steps == 0
    assert stats.pop() == {"rho_mean": [0.0, 0.0], "retention_rows_mean": [0.0, 0.0]}  # no step: zeros
    stats.add(np.array([0.5, 0.5]), [np.arange(4), np.arange(2)])
    stats.reset()
    stats.add(np.array([0.25, 0.75]), [np.arange(2), np.arange(6)])
    assert stats.pop() == {"rho_mean": [0.25, 0.75], "retention_rows_mean": [2.0, 6.0]}


def grown_pair(channels: int = 8):
    """(teacher with one task, student = teacher + a 5-class task), as methods.Teracon.build makes them."""
    torch.manual_seed(0)
    teacher = NextItNet(17, [17], channels=channels, dilations=(1,))
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    student.add_task(5)
    return teacher, student


def test_task_step_records_rho_and_rows_of_every_step():
    """RetentionStep's stats see each step's rho (0.9 at first, then eq. 15's update) and the size of
    each subset it drew: max(floor(rho * B), min_rows)."""
    teacher, student = grown_pair()
    step = RetentionStep(student, teacher, 0.7, np.random.default_rng(0), min_rows=3)
    src = torch.randint(1, 17, (8, 6), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    step.loss(src, tgt, 1.0)
    rho1 = float(step.rho[0])
    step.loss(src, tgt, 2.0)
    rows = [math.floor(0.9 * 8), max(math.floor(rho1 * 8), 3)]
    got = step.stats.pop()
    assert got["rho_mean"] == pytest.approx([(0.9 + rho1) / 2], abs=1e-6)
    assert got["retention_rows_mean"] == pytest.approx([sum(rows) / 2], abs=1e-3)


# ------------------------------------------------------------------------ mask sparsity

def tiny(num_tasks: int, **kw) -> NextItNet:
    """One block (2 masked layers) of 4 channels: 8 mask channels per task."""
    torch.manual_seed(0)
    return NextItNet(11, [11] + [3] * (num_tasks - 1), channels=4, dilations=(1,), **kw)


def test_mask_share_one_task_plain_mask():
    """One task: the mask is sigmoid(smax * e), below 0.5 exactly where e < 0 (e = 0 gives 0.5,
    not below; e = -0.001 gives sigmoid(-0.05) = 0.49). Embeddings -1, 0, 2, -0.001 / 3, -2,
    0.5, 1: 3 of 8 channels."""
    model = tiny(1)
    with torch.no_grad():
        model.task_masks.task_embedding.copy_(torch.tensor([[[-1.0, 0.0, 2.0, -0.001], [3.0, -2.0, 0.5, 1.0]]]))
    assert mask_diagnostics(model, SMAX) == {"mask_share_below_half": [0.375]}


def test_mask_share_two_tasks_relation_masks_at_smax():
    """Two tasks use the relation-aware mask sigmoid(s * (w . tanh(s * E_t) + b)). With w = (1, 0,
    0) and b = -0.5 it is below 0.5 where tanh(s * e_t) < 0.5, i.e. e_t < atanh(0.5) / s.
    At s = smax = 50 the bound is 0.011: task 0's -1 and 0.005 are below, 0.02 (tanh 1 = 0.76)
    and 1 are not, layer 2 (all 0.02) none: 2/8. Task 1 (all 0): tanh 0 = 0 < 0.5: 8/8, where
    the plain mask sigmoid(0) = 0.5 would count none. At s = 10 the bound is 0.055: 0.02 is
    below too (tanh 0.2 = 0.20): task 0 has 7/8."""
    model = tiny(2)
    with torch.no_grad():
        tm = model.task_masks
        tm.task_embedding.copy_(torch.tensor([[[-1.0, 0.005, 0.02, 1.0], [0.02] * 4],
                                              [[0.0] * 4, [0.0] * 4]]))
        tm.relation_weight.zero_()
        tm.relation_weight[:, :, 0] = 1.0
        tm.relation_bias.fill_(-0.5)
    assert mask_diagnostics(model, SMAX) == {"mask_share_below_half": [0.25, 1.0]}
    assert mask_diagnostics(model, 10.0) == {"mask_share_below_half": [0.875, 1.0]}


def test_mask_share_plain_masks_and_unmasked_model():
    """relation=False (HAT, teracon-norel) counts plain masks: the same embeddings give task 0
    1/8 (only -1 is negative) and task 1 0/8; an unmasked model (fineall, sinmo, conure) has all
    masks 1: 0 for every task."""
    emb = torch.tensor([[[-1.0, 0.005, 0.02, 1.0], [0.02] * 4], [[0.0] * 4, [0.0] * 4]])
    plain = tiny(2, relation=False)
    with torch.no_grad():
        plain.task_masks.task_embedding.copy_(emb)
    assert mask_diagnostics(plain, SMAX) == {"mask_share_below_half": [0.125, 0.0]}
    unmasked = tiny(2, masked=False)
    with torch.no_grad():
        unmasked.task_masks.task_embedding.copy_(emb)
    assert mask_diagnostics(unmasked, SMAX) == {"mask_share_below_half": [0.0, 0.0]}


def test_epoch_diagnostics_record():
    """The per-epoch record: range and count of the s values used; for a step with past tasks
    also rho_mean, retention_rows_mean (which it consumes) and rho_end (the rho the next
    step would use); the mask shares. A step without past tasks (task 1) has no rho keys."""
    model = tiny(1)
    with torch.no_grad():
        model.task_masks.task_embedding.copy_(torch.tensor([[[-1.0, -1.0, 1.0, 1.0], [1.0] * 4]]))
    d = epoch_diagnostics(model, object(), [0.02, 30.0, 12.5], SMAX)
    assert d == {"s_min": 0.02, "s_max": 30.0, "steps": 3, "mask_share_below_half": [0.25]}

    teacher, student = grown_pair()
    # the step of a method without retention (NewTaskStep) has no rho keys either
    d = epoch_diagnostics(student, NewTaskStep(student), [1.0, 2.0], SMAX)
    assert not {"rho_mean", "retention_rows_mean", "rho_end"} & set(d) and len(d["mask_share_below_half"]) == 2
    step = RetentionStep(student, teacher, 0.7, np.random.default_rng(0))
    step.stats.add(np.array([0.4]), [np.arange(6)])
    step.stats.add(np.array([0.2]), [np.arange(2)])
    step.rho = np.array([0.1234567])
    d = epoch_diagnostics(student, step, [1.0, 2.0], SMAX)
    assert d["rho_mean"] == [0.3] and d["retention_rows_mean"] == [4.0] and d["rho_end"] == [0.123457]
    assert (d["s_min"], d["s_max"], d["steps"]) == (1.0, 2.0, 2)
    assert len(d["mask_share_below_half"]) == 2
    assert step.stats.steps == 0  # the next epoch starts from zero
    json.dumps(d)  # plain JSON types


# ------------------------------------------------------------------------ a real run

def test_real_two_task_run_writes_diagnostics(tmp_path):
    """train_task1.py then train_teracon_t2.py --min_retention_rows 3: every epoch of PREFIX.json
    carries `diagnostics` with s from 1/smax (first batch) up to below smax (eq. 19's last batch
    b = steps - 1 < B), steps = ceil(n_train / batch); task 2 also rho_mean, retention_rows_mean
    (>= 3 rows) and rho_end for its one past task, and mask shares for both tasks. The log shows
    the same figures. (The scripts run as `__main__` in this process: helpers.run_script_in_process
    gives their stderr, log lines included, as a new interpreter would.)"""
    t1 = write_task1(tmp_path / "t1.csv")
    t2 = write_task_ranking(tmp_path / "t2.csv")
    index, p1, p2 = tmp_path / "index.json", tmp_path / "task1", tmp_path / "task2"
    rc, _, err1 = run_script_in_process("train_task1.py", "--datapath", t1, "--datapath_index", index,
                                        "--savepath", p1, "--epochs", "2", "--batch", "16", "--channels", "8",
                                        "--dilations", "1", "--quiet", "--device", "cpu")
    assert rc == 0, err1
    rc, _, err2 = run_script_in_process("train_teracon_t2.py", "--datapath", t2, "--datapath_index", index,
                                        "--savepath", p2, "--paths", f"{p1}.pt", "--batch", "16", "--epochs", "2",
                                        "--min_retention_rows", "3", "--quiet", "--device", "cpu")
    assert rc == 0, err2

    for prefix, tasks, err in ((p1, 1, err1), (p2, 2, err2)):
        summary = json.loads(prefix.with_suffix(".json").read_text())
        n_train = summary["task"]["split_sizes"]["train"]
        steps = math.ceil(n_train / 16)
        assert steps >= 2
        assert len(summary["epochs"]) == 2
        for record in summary["epochs"]:
            d = record["diagnostics"]
            assert d["steps"] == steps
            assert d["s_min"] == pytest.approx(1 / SMAX)
            last_s = 1 / SMAX + (SMAX - 1 / SMAX) * (steps - 1) / (n_train / 16)
            assert d["s_max"] == pytest.approx(last_s) and d["s_max"] < SMAX
            assert len(d["mask_share_below_half"]) == tasks
            assert all(0.0 <= x <= 1.0 for x in d["mask_share_below_half"])
            if tasks == 1:
                assert not {"rho_mean", "retention_rows_mean", "rho_end"} & set(d)
            else:
                assert len(d["rho_mean"]) == len(d["retention_rows_mean"]) == len(d["rho_end"]) == 1
                assert 3 <= d["retention_rows_mean"][0] <= 16
                assert 0.0 <= d["rho_mean"][0] <= 1.0 and 0.0 <= d["rho_end"][0] <= 1.0
        logged = re.findall(rf"task {tasks} train epoch \d+  s 0\.02\.\.\S+ over {steps} steps", err)
        assert len(logged) == 2, err
        if tasks == 2:
            assert len(re.findall(r"retention rows \d+\.\d, mask<0\.5 \d\.\d\d/\d\.\d\d", err)) == 2, err
