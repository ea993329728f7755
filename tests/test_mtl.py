"""MTL (`--method mtl`, issue 19): the multi-task reference restarts every task n from the
task-1 model and trains tasks 1..n jointly, seeing every task's training examples each epoch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers

import cli
import data_loader as dl
from checkpoint import load_checkpoint
from evaluate import evaluate_checkpoint
from teracon import next_item_loss
from utils import UserError

TINY = ["--device", "cpu", "--seed", "0", "--quiet", "--method", "mtl", "--eval_batch", "64"]


def run_chain(d, record: list | None = None, monkeypatch=None) -> None:
    t1, t2, t3 = (helpers.write_task1(d / "t1.csv", lines=60), helpers.write_task_ranking(d / "t2.csv", lines=60),
                  helpers.write_task_classes(d / "t3.csv", lines=40))
    common = ["--datapath_index", str(d / "index.json"), *TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(["--datapath", str(t1), "--savepath", str(d / "task1"), "--channels", "8", "--dilations", "1", "2",
                  "--epochs", "1", "--batch", "16", *common], task=1)
        cli.main(["--datapath", str(t2), "--savepath", str(d / "task2"), "--paths", str(d / "task1.pt"),
                  "--epochs", "2", "--batch", "16", "--lr", "1e-2", *common], task=2)
        if record is not None:  # every batch task 3's run gathers, by task
            real = dl.TaskData.batch

            def batch(self, rows, device):
                record.append((self.task, np.asarray(rows).copy()))
                return real(self, rows, device)
            monkeypatch.setattr(dl.TaskData, "batch", batch)
        cli.main(["--datapath", str(t3), "--savepath", str(d / "task3"), "--paths", str(d / "task2.pt"),
                  "--epochs", "1", "--batch", "16", "--lr", "1e-2", *common], task=3)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtl")
    run_chain(d)
    return d


def test_every_task_restarts_from_the_task1_model(chain):
    """The checkpoints of tasks 2 and 3 carry the task-1 weights they started from, bit for bit
    those of task1.pt; the task-3 model knows three heads and was trained (its backbone moved)."""
    c1, c2, c3 = (load_checkpoint(chain / f"task{t}.pt") for t in (1, 2, 3))
    for c in (c2, c3):
        assert c["mtl_start"]["config"] == c1["config"]
        assert all(torch.equal(c["mtl_start"]["state_dict"][k], v) for k, v in c1["state_dict"].items())
    assert len(c3["config"]["head_sizes"]) == 3
    assert not torch.equal(c3["state_dict"]["blocks.0.conv1.weight"], c1["state_dict"]["blocks.0.conv1.weight"])


def test_an_epoch_sees_every_tasks_training_examples(tmp_path, monkeypatch):
    """Task 3's one epoch (40 lines of 3 classes, batch 16) is lengthened to the largest earlier
    split (task 1: 48 training sequences, 3 batches; task 2: 60 examples, 4 batches), and the
    rows it gathers cover the training split of tasks 1, 2 and 3."""
    record: list = []
    run_chain(tmp_path, record, monkeypatch)
    datas = {1: dl.load_task1(tmp_path / "t1.csv", 0)[0]}
    items = dl.load_item_index(tmp_path / "index.json")
    datas[2] = dl.load_task(2, tmp_path / "t2.csv", items, 0)
    datas[3] = dl.load_task(3, tmp_path / "t3.csv", items, 0)
    for task, data in datas.items():
        train = set(data.splits["train"].tolist())
        seen = set(np.concatenate([rows for t, rows in record if t == task]).tolist())
        assert train <= seen, task
    summary = json.loads((tmp_path / "task3.json").read_text())
    steps = max(-(-len(d.splits["train"]) // 16) for d in datas.values())
    assert summary["epochs"][0]["timing"]["steps"] == steps > -(-len(datas[3].splits["train"]) // 16)


def test_joint_step_sums_every_tasks_loss():
    """JointStep's loss = the newest task's cross-entropy + task 1's next-item loss on its next
    batch + task 2's cross-entropy on its next batch (one model, all masks ones)."""
    from methods import JointStep
    from nextitnet import NextItNet
    torch.manual_seed(0)
    model = NextItNet(12, [12, 4, 3], channels=8, dilations=(1, 2), masked=False)

    def task_data(task, n, classes):
        return dl.TaskData(task=task, name=str(task), path="-", sources=torch.randint(1, 12, (n, 6)),
                           targets=torch.randint(0, classes, (n,)) if task > 1 else torch.full((n,), -1),
                           line_of_example=torch.arange(n), num_classes=classes, labels=np.arange(classes),
                           splits={"train": np.arange(n)})

    t1, t2 = task_data(1, 10, 12), task_data(2, 9, 4)
    step = JointStep(model, [t1, t2], np.random.default_rng(5), batch=4)
    src, tgt = torch.randint(1, 12, (4, 6)), torch.randint(0, 3, (4,))
    loss = step.loss(src, tgt, 50.0)
    rng = np.random.default_rng(5)
    rows1, rows2 = rng.permutation(10)[:4], rng.permutation(9)[:4]
    with torch.no_grad():
        def last(seqs):
            return model.encode(seqs, torch.ones(1, 4, 8))[:, -1]
        expected = F.cross_entropy(model.heads[2](last(src)), tgt)
        s1 = t1.sources[rows1]
        hidden = model.encode(s1[:, :-1], torch.ones(1, 4, 8))
        expected += next_item_loss(hidden.reshape(-1, 8), model.heads[0], s1[:, 1:].reshape(-1))
        expected += F.cross_entropy(model.heads[1](last(t2.sources[rows2])), t2.targets[rows2])
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_mtl_evaluates_every_task_with_the_final_model(chain):
    rows = evaluate_checkpoint(chain / "task3.pt", "cpu")
    assert [r["task"] for r in rows] == [1, 2, 3] and all(np.isfinite(list(r["now"].values())).all() for r in rows)
