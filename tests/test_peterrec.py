"""PeterRec (`--method peterrec`, issue 19): the task-1 model stays frozen, each later task
trains only its own model patches and head, and serving a task uses its own patches."""
from __future__ import annotations

import math

import pytest
import torch

import helpers

import cli
from evaluate import evaluate_checkpoint
from nextitnet import ModelPatch

def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def train_chain(d, method: str, *taskn: str) -> None:
    """Tasks 1-3 of `method` into folder `d` (C 8, dilations 1 2, one thread): task 1 one epoch,
    tasks 2 and 3 with the `taskn` flags."""
    t1, t2, t3 = (helpers.write_task1(d / "t1.csv", lines=60), helpers.write_task_ranking(d / "t2.csv", lines=60),
                  helpers.write_task_classes(d / "t3.csv", lines=60))
    common = ["--datapath_index", str(d / "index.json"), "--device", "cpu", "--seed", "0", "--quiet",
              "--method", method, "--eval_batch", "64"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(["--datapath", str(t1), "--savepath", str(d / "task1"), "--channels", "8", "--dilations", "1", "2",
                  "--epochs", "1", "--batch", "16", *common], task=1)
        for task, data in ((2, t2), (3, t3)):
            cli.main(["--datapath", str(data), "--savepath", str(d / f"task{task}"), "--paths",
                      str(d / f"task{task - 1}.pt"), "--batch", "16", "--lr", "1e-2", *taskn, *common], task=task)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tasks 1-3 with peterrec, patches of width 3."""
    d = tmp_path_factory.mktemp("peterrec")
    train_chain(d, "peterrec", "--epochs", "2", "--patch_size", "3")
    return d


def test_model_patch_is_the_bottleneck_residual_by_hand():
    """x + W_up GELU(W_down x) + biases, with hand-set weights: C 2 -> k 1 -> C 2."""
    patch = ModelPatch(2, 1)
    with torch.no_grad():
        patch.down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        patch.down.bias.fill_(0.5)
        patch.up.weight.copy_(torch.tensor([[2.0], [3.0]]))
        patch.up.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[[2.0, 0.5]]], dtype=torch.float32)  # down: 2 - 0.5 + 0.5 = 2
    gelu2 = 2.0 * 0.5 * (1.0 + math.erf(2.0 / math.sqrt(2.0)))
    expected = torch.tensor([[[2.0 + 2.0 * gelu2, 0.5 + 3.0 * gelu2 + 1.0]]])
    assert torch.allclose(patch(x), expected, atol=1e-6)


def test_a_fresh_patch_is_close_to_the_identity():
    """weights ~ N(0, 0.02) truncated at 2 sd, biases 0: |patch(x) - x| is small beside x."""
    torch.manual_seed(0)
    patch, x = ModelPatch(64, 16), torch.randn(4, 10, 64)
    assert (patch(x) - x).abs().max() < 0.05 * x.abs().max()
    assert patch.down.weight.abs().max() <= 0.04 and patch.down.bias.abs().max() == 0


def test_the_backbone_and_earlier_patches_stay_bit_identical(chain):
    """Across tasks 2 and 3 every weight of the task-1 model and of earlier tasks' patches and
    heads is unchanged, bit for bit; task 3 adds its own patches."""
    w1, w2, w3 = (weights(chain / f"task{t}.pt") for t in (1, 2, 3))
    for key, value in w1.items():
        if not key.startswith("heads.") and not key.startswith("task_masks."):
            assert torch.equal(w2[key], value) and torch.equal(w3[key], value), key
    assert torch.equal(w2["heads.0.weight"], w1["heads.0.weight"])
    for key in w2:
        if key.startswith(("patches.1.", "heads.1.")):
            assert torch.equal(w3[key], w2[key]), key
    assert sorted({k.split(".")[1] for k in w3 if k.startswith("patches.")}) == ["1", "2"]
    assert not any(k.startswith("patches.2.") for k in w2)


def test_each_task_is_served_through_its_own_patches_and_nothing_is_forgotten(chain):
    """evaluate.py on the task-3 checkpoint: every task's test metrics equal those right after it
    was trained (the patches and heads of a task never change later); the checkpoint config
    records the patch width and which tasks have patches."""
    ckpt = torch.load(chain / "task3.pt", weights_only=True)
    assert ckpt["config"]["patch_size"] == 3 and ckpt["config"]["patched_tasks"] == [1, 2]
    rows = evaluate_checkpoint(chain / "task3.pt", "cpu")
    assert [r["task"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["now"] == pytest.approx(row["after_training"], abs=1e-12), row["task"]


def test_only_the_new_tasks_patches_and_head_train(chain):
    """PeterRec's task 3, built from the task-2 checkpoint: the parameters that require a
    gradient are exactly task 3's patches and head."""
    import argparse

    from checkpoint import load_checkpoint
    from methods import PeterRec
    args = argparse.Namespace(alpha=0.7, paths=str(chain / "task2.pt"), patch_size=0, channels=8, dilations=[1, 2])
    method = PeterRec(args, 3, load_checkpoint(chain / "task2.pt"), torch.device("cpu"))
    model, teacher = method.build(10, 3)
    method.prepare(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert teacher is None and trainable and all(n.startswith(("patches.2.", "heads.2.")) for n in trainable)
    assert len(trainable) == 2 * 2 * 4 + 2  # 4 convs x (down, up) x (weight, bias) + the head
