"""--resume: a task-2 run killed with SIGKILL at a random moment, then resumed, ends with weights
bit-identical to an uninterrupted run; a resumable state refuses other flags or changed inputs."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import helpers
from helpers import ROOT, run_script


def _prepare(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    t1 = helpers.write_task1(d / "t1.csv", lines=150)
    t2 = helpers.write_task_ranking(d / "t2.csv", lines=600)
    common = ["--device", "cpu", "--seed", "1", "--quiet", "--datapath_index", str(d / "index.json")]
    rc, _, err = run_script("train_task1.py", "--datapath", t1, "--savepath", tmp_path / "task1", "--channels", "8",
                            "--dilations", "1", "2", "--epochs", "1", "--batch", "16", *common)
    assert rc == 0, err
    return t2, common


def _task2(t2, common, out, *extra):
    return [sys.executable, str(ROOT / "train_teracon_t2.py"), "--datapath", str(t2), "--savepath", str(out),
            "--paths", str(out.parent / "task1.pt"), "--epochs", "6", "--batch", "16", "--save_every", "2",
            *common, *extra]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("trial", [0, 1])
def test_kill_9_then_resume_is_bit_identical(tmp_path, trial):
    t2, common = _prepare(tmp_path)
    straight = tmp_path / "straight" / "task2"
    straight.parent.mkdir()
    for f in ("task1.pt", "task1.json"):
        (straight.parent / f).write_bytes((tmp_path / f).read_bytes())
    (tmp_path / "killed").mkdir()
    killed = tmp_path / "killed" / "task2"
    for f in ("task1.pt", "task1.json"):
        (killed.parent / f).write_bytes((tmp_path / f).read_bytes())
    proc = subprocess.run(_task2(t2, common, straight), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    state = killed.parent / "task2.resume.pt"
    proc = subprocess.Popen(_task2(t2, common, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    proc = subprocess.run(_task2(t2, common, killed, "--resume"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming train phase at epoch {progress['epoch']}, batch {progress['batch']}" in proc.stderr
    a, b = _weights(straight.parent / "task2.pt"), _weights(killed.parent / "task2.pt")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    summary = json.loads((killed.parent / "task2.json").read_text())
    assert summary["finished"] is True and not state.exists()  # a finished run leaves no state behind
    want = json.loads((straight.parent / "task2.json").read_text())
    assert [e["valid"] for e in summary["epochs"]] == [e["valid"] for e in want["epochs"]]
    assert summary["test"] == want["test"]


def test_resume_refuses_other_flags_changed_inputs_and_a_missing_state(tmp_path):
    t2, common = _prepare(tmp_path)
    out = tmp_path / "task2"
    rc, _, err = run_script("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths",
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
    rc, _, err = run_script("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "32", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "written by a run with --batch 16, not 32" in err, err
    with open(t2, "a") as f:
        f.write(open(t2).readline())  # one more line: the task file changed
    rc, _, err = run_script("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "16", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "the file of --datapath changed" in err, err
    assert state.read_bytes() == before  # a refused resume leaves the state as it was
