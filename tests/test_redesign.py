"""Behaviour unchanged by the redesign (issue 9): the same seed and flags give the task-3
checkpoint of every method that the code before it (commit a7139dd) gave.

`tests/data/pre_redesign.pt` holds, per method, the task-3 state_dict made before the redesign
(plus `hat_cumulative` for hat; CONURE's owners, then conv buffers, as the state_dict keys
`blocks.{b}.conv{1,2}.owner`) and `cpu_capability`, the torch CPU capability of the machine
that made it, with one CPU thread (OMP_NUM_THREADS=1: float reductions depend on the number of
threads). The recipe is run again here through the real scripts, each run as `__main__` in this
process (`helpers.run_script_in_process`: the same argv, `run_cli` and exit status as a new
interpreter, without its torch import), with one thread too (`torch.set_num_threads(1)`,
restored afterwards).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_script_in_process, write_task1, write_task_classes, write_task_ranking
from checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "data" / "pre_redesign.pt"
METHODS = ("teracon", "teracon-nokr", "teracon-norel", "fineall", "sinmo", "hat", "conure")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("redesign_data")
    return {"dir": d, "t1": write_task1(d / "t1.csv", lines=120), "t2": write_task_ranking(d / "t2.csv", lines=120),
            "t3": write_task_classes(d / "t3.csv", lines=120)}


def run_recipe(data: dict, method: str, out: Path) -> dict:
    """The fixture's recipe with the current code: tasks 1-3 through the task scripts."""
    d = data["dir"]
    common = ["--device", "cpu", "--seed", "3", "--quiet", "--epochs", "2", "--batch", "16",
              "--datapath_index", d / f"index_{method}.json", "--method", method]
    if method == "conure":
        common += ["--retrain_epochs", "1"]
    steps = [("train_task1.py", ["--datapath", data["t1"], "--savepath", out / "task1", "--channels", "8",
                                 "--dilations", "1", "2"]),
             ("train_teracon_t2.py", ["--datapath", data["t2"], "--savepath", out / "task2", "--paths",
                                      out / "task1.pt", "--min_retention_rows", "0"]),
             ("train_teracon_t3.py", ["--datapath", data["t3"], "--savepath", out / "task3", "--paths",
                                      out / "task2.pt"])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made (OMP_NUM_THREADS=1)
    try:
        for script, flags in steps:
            rc, _, err = run_script_in_process(script, *common, *flags)
            assert rc == 0, f"{script} --method {method}: {err}"
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(out / "task3.pt")


def current_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the fixture's (pre-redesign) names."""
    out = dict(ckpt["state_dict"])
    if ckpt["method"] == "hat":
        out["hat_cumulative"] = ckpt["hat_cumulative"]
    if ckpt["method"] == "conure":
        blocks = len(ckpt["config"]["dilations"])
        names = [f"blocks.{b}.conv{i}.owner" for b in range(blocks) for i in (1, 2)]
        assert len(ckpt["conure_owner"]) == len(names)
        out.update(zip(names, ckpt["conure_owner"]))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_task3_checkpoint_equals_the_pre_redesign_one(fixture, data, method, tmp_path):
    """Every tensor of the task-3 checkpoint is bit-identical to the pre-redesign fixture (same
    names, shapes and dtypes; CONURE's owners compared in convs() order, HAT's cumulative mask
    too). On a machine whose CPU capability differs from the fixture's, float kernels may differ
    in the last bits: compared with allclose(rtol=1e-4, atol=1e-6) there instead."""
    want = fixture[method]
    ckpt = run_recipe(data, method, tmp_path)
    assert ckpt["method"] == method and len(ckpt["tasks"]) == 3
    got = current_tensors(ckpt)
    assert sorted(got) == sorted(want)
    here, there = torch.backends.cpu.get_cpu_capability(), fixture["cpu_capability"]
    exact = here == there
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if exact:
            assert torch.equal(a, b), f"{method} {key}: differs from the pre-redesign checkpoint"
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (
                f"{method} {key}: not close to the pre-redesign checkpoint (CPU capability {here} here, "
                f"{there} in the fixture: compared with allclose(rtol=1e-4, atol=1e-6), not bit for bit)")
