"""Behaviour pinned bit for bit: the same seed and flags give the task-3 checkpoint of every
method that the fixture holds, and stay within rounding of what the code before the redesign
(issue 9, commit a7139dd) gave.

Each fixture holds, per method, the task-3 state_dict (plus `hat_cumulative` for hat; CONURE's
owners as the state_dict keys `blocks.{b}.conv{1,2}.owner`) and `cpu_capability`, the torch CPU
capability of the machine that made it, with one CPU thread (OMP_NUM_THREADS=1: float
reductions depend on the number of threads).
- `tests/data/task3_checkpoints.pt`: made by the current convolution (issue 16: F.conv2d over a
  channels-last view instead of F.conv1d on a transposed copy, which changed fp32 rounding and
  nothing else), with `python tests/test_redesign.py`. Compared bit for bit on a CPU of the same
  capability; elsewhere within ROUNDING of each tensor's scale.
- `tests/data/pre_redesign.pt`: made before the redesign, with F.conv1d. Always compared within
  ROUNDING of each tensor's scale: the two convolutions' rounding, amplified by three tasks of
  training, moved the task-3 weights by at most 5e-5 of their scale (teracon's heads.1.weight;
  3e-5 across CPU capabilities before the change, 3e-7 or less for the other methods).
The recipe is run here through the real scripts, each run as `__main__` in this process
(`helpers.run_script_in_process`: the same argv, `run_cli` and exit status as a new
interpreter, without its torch import), with one thread too (`torch.set_num_threads(1)`,
restored afterwards).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_script_in_process, write_task1, write_task_classes, write_task_ranking
from checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parent / "data"
FIXTURE, PRE_REDESIGN = DATA / "task3_checkpoints.pt", DATA / "pre_redesign.pt"
ROUNDING = 5e-4  # |got - want| <= ROUNDING * max|want| + 1e-6, per tensor
METHODS = ("teracon", "teracon-nokr", "teracon-norel", "fineall", "sinmo", "hat", "conure")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pre_redesign():
    return torch.load(PRE_REDESIGN, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_recipe_data(tmp_path_factory.mktemp("redesign_data"))


def write_recipe_data(d: Path) -> dict:
    """The recipe's three task files in `d`."""
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


def within_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a.double() - b.double()).abs() <= ROUNDING * b.double().abs().max() + 1e-6).all())


@pytest.mark.parametrize("method", METHODS)
def test_task3_checkpoint_equals_the_fixture(fixture, pre_redesign, data, method, tmp_path):
    """Every tensor of the task-3 checkpoint equals the fixture's (same names, shapes and
    dtypes; bit for bit where the CPU capability is the fixture's, else within ROUNDING), and
    lies within ROUNDING of the pre-redesign checkpoint."""
    ckpt = run_recipe(data, method, tmp_path)
    assert ckpt["method"] == method and len(ckpt["tasks"]) == 3
    got = current_tensors(ckpt)
    here = torch.backends.cpu.get_cpu_capability()
    for name, reference in (("fixture", fixture), ("pre-redesign checkpoint", pre_redesign)):
        want = reference[method]
        assert sorted(got) == sorted(want), name
        exact = reference is fixture and here == reference["cpu_capability"]
        for key in want:
            a, b = got[key], want[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
            if exact:
                assert torch.equal(a, b), f"{method} {key}: differs from the {name} (CPU capability {here})"
            else:
                assert within_rounding(a, b), (
                    f"{method} {key}: beyond rounding ({ROUNDING} of the tensor's scale) of the {name} "
                    f"(CPU capability {here} here, {reference['cpu_capability']} there)")


def regenerate(path: Path = FIXTURE) -> None:
    """Write the fixture from the current code: every method's recipe with one thread."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        data = write_recipe_data(Path(tmp))
        out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
        for method in METHODS:
            (data["dir"] / method).mkdir()
            out[method] = {k: v.clone() for k, v in current_tensors(run_recipe(data, method, data["dir"] / method)).items()}
    torch.save(out, path)
    print(f"wrote {path} ({out['cpu_capability']})")


if __name__ == "__main__":
    regenerate()
