"""--resume: a task-2 run killed with SIGKILL at a random moment, then resumed, ends with weights
bit-identical to an uninterrupted run; a resumable state refuses other flags or changed inputs.

Only the run that is killed needs a process of its own (a real SIGKILL); the task-1 run, the
uninterrupted run (shared by both trials) and the resumed and refused runs are the scripts run
as `__main__` in this process (`helpers.run_script_in_process`). Every task-2 run uses one thread
(the killed one OMP_NUM_THREADS=1, the others torch.set_num_threads(1)): float reductions depend
on the thread count, and the claim is about resuming, not threads.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import helpers
from helpers import ROOT, run_script_in_process

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def one_thread(script, *args):
    """`script` as `__main__` in this process with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_script_in_process(script, *map(str, args))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task1(tmp_path_factory):
    """The task-1 run every test starts from, and its item index: (folder, common flags)."""
    d = tmp_path_factory.mktemp("resume_task1")
    t1 = helpers.write_task1(d / "t1.csv", lines=150)
    common = ["--device", "cpu", "--seed", "1", "--quiet", "--datapath_index", str(d / "index.json")]
    rc, _, err = one_thread("train_task1.py", "--datapath", t1, "--savepath", d / "task1", "--channels", "8",
                            "--dilations", "1", "2", "--epochs", "1", "--batch", "16", *common)
    assert rc == 0, err
    return d, common


def _prepare(tmp_path, task1, *folders):
    """This test's task-2 file, and a copy of the task-1 run in tmp_path and in each of `folders`."""
    d = tmp_path / "data"
    d.mkdir()
    t2 = helpers.write_task_ranking(d / "t2.csv", lines=600)
    for folder in (tmp_path, *folders):
        folder.mkdir(exist_ok=True)
        for f in ("task1.pt", "task1.json"):
            shutil.copyfile(task1[0] / f, folder / f)
    return t2, task1[1]


def _args(t2, common, out, *extra):
    return ["--datapath", str(t2), "--savepath", str(out), "--paths", str(out.parent / "task1.pt"), "--epochs", "6",
            "--batch", "16", "--save_every", "2", *common, *extra]


def _task2(t2, common, out, *extra):
    return [sys.executable, str(ROOT / "train_teracon_t2.py"), *_args(t2, common, out, *extra)]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight(task1, tmp_path_factory):
    """The uninterrupted task-2 run both trials compare with, and its task-2 file."""
    tmp = tmp_path_factory.mktemp("resume_straight")
    out = tmp / "straight" / "task2"
    t2, common = _prepare(tmp, task1, out.parent)
    rc, _, err = one_thread("train_teracon_t2.py", *_args(t2, common, out))
    assert rc == 0, err
    return t2, out


@pytest.mark.parametrize("trial", [0, 1])
def test_kill_9_then_resume_is_bit_identical(task1, straight, tmp_path, trial):
    t2, straight = straight
    common = task1[1]
    killed = tmp_path / "killed" / "task2"
    _prepare(tmp_path, task1, killed.parent)

    state = killed.parent / "task2.resume.pt"
    proc = subprocess.Popen(_task2(t2, common, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ONE_THREAD)
    deadline = time.time() + 120
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(trial).uniform(0.0, 0.3))  # a random moment after the first snapshot
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not state.is_file():
        pytest.skip("the run finished before it could be killed (machine too fast for this trial)")
    progress = torch.load(state, weights_only=True)["progress"]
    if progress["epoch"] > 1:  # the run summary exists from the end of epoch 1 on, unfinished
        assert json.loads((killed.parent / "task2.json").read_text())["finished"] is False

    rc, _, err = one_thread("train_teracon_t2.py", *_args(t2, common, killed, "--resume"))
    assert rc == 0, err
    assert f"resuming train phase at epoch {progress['epoch']}, batch {progress['batch']}" in err
    a, b = _weights(straight.parent / "task2.pt"), _weights(killed.parent / "task2.pt")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    summary = json.loads((killed.parent / "task2.json").read_text())
    assert summary["finished"] is True and not state.exists()  # a finished run leaves no state behind
    want = json.loads((straight.parent / "task2.json").read_text())
    assert [e["valid"] for e in summary["epochs"]] == [e["valid"] for e in want["epochs"]]
    assert summary["test"] == want["test"]


def test_resume_refuses_other_flags_changed_inputs_and_a_missing_state(task1, tmp_path):
    t2, common = _prepare(tmp_path, task1)
    out = tmp_path / "task2"
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths",
                            tmp_path / "task1.pt", "--epochs", "1", "--batch", "16", "--resume", *common)
    assert rc == 2 and "task2.resume.pt: no resumable state here" in err and "Traceback" not in err
    # a state left by an interrupted run: keep the one written at the end of epoch 1 of a 2-epoch run
    proc = subprocess.Popen(_task2(t2, common, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "task2.resume.pt"
    while not state.is_file() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not state.is_file():
        pytest.skip("the run finished before it could be killed")
    before = state.read_bytes()
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "32", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "written by a run with --batch 16, not 32" in err, err
    with open(t2, "a") as f:
        f.write(open(t2).readline())  # one more line: the task file changed
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "16", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "the file of --datapath changed" in err, err
    assert state.read_bytes() == before  # a refused resume leaves the state as it was
