"""--resume: a task-2 run killed with SIGKILL between two snapshots, then resumed, ends with weights
bit-identical to an uninterrupted run; a resumable state refuses other flags or changed inputs.

Only the run that is killed needs a process of its own (a real SIGKILL). It is the script run by a
small wrapper (STOPPED_AFTER_STEP) that counts `trainer.train_step` calls and stops the process
(SIGSTOP) right after the step the test chose; the test waits for the stop and kills it there, so
the kill never comes too late on a fast machine and the state it leaves is known. The task-1 run, the
uninterrupted run (shared by both trials) and the resumed and refused runs are the scripts run
as `__main__` in this process (`helpers.run_script_in_process`). Every task-2 run uses one thread
(the killed one OMP_NUM_THREADS=1, the others torch.set_num_threads(1)): float reductions depend
on the thread count, and the claim is about resuming, not threads.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys

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


# The training script as `__main__`, unchanged but for `trainer.train_step`, which counts its calls
# and stops the process (SIGSTOP) right after call number STEPS has returned; `kill_after_step`
# then kills it.
STOPPED_AFTER_STEP = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import trainer
real_step, calls = trainer.train_step, [0]
def train_step(*args, **kwargs):
    loss = real_step(*args, **kwargs)
    calls[0] += 1
    if calls[0] == {steps}:
        os.kill(os.getpid(), signal.SIGSTOP)
    return loss
trainer.train_step = train_step
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def kill_after_step(steps, args, log, env=None):
    """Run train_teracon_t2.py with `args` (stderr to `log`), SIGKILL it right after its
    training step number `steps` (1-based, over all epochs); fails if it ended before that step."""
    script = str(ROOT / "train_teracon_t2.py")
    code = STOPPED_AFTER_STEP.format(root=str(ROOT), steps=steps, script=script)
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=err, env=env)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops (or ends)
    stopped = os.WIFSTOPPED(status)
    if stopped:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert stopped, f"the run ended (status {status}) before step {steps}: {log.read_text()}"


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
    """Killed with SIGKILL one step after a --save_every 2 snapshot (trial 0: step 5, in epoch
    1, before any summary; trial 1: step 3 of epoch 3), the run has not finished: its state holds
    the snapshot before the kill (epoch 1 batch 4; epoch 3 batch 2), the summary (from epoch 1's
    end on) says finished: false with the epochs done. Resumed, it redoes the lost step and ends
    with the uninterrupted run's weights bit for bit, its validation and test metrics, and no state."""
    t2, straight = straight
    common = task1[1]
    killed = tmp_path / "killed" / "task2"
    _prepare(tmp_path, task1, killed.parent)
    want = json.loads((straight.parent / "task2.json").read_text())
    per_epoch = math.ceil(want["task"]["split_sizes"]["train"] / 16)  # batches of 16, the last one partial
    assert len(want["epochs"]) == 6 and per_epoch > 5
    steps, (epoch, batch) = [(5, (1, 4)), (2 * per_epoch + 3, (3, 2))][trial]

    state = killed.parent / "task2.resume.pt"
    kill_after_step(steps, _args(t2, common, killed), tmp_path / "killed.log", env=ONE_THREAD)
    progress = torch.load(state, weights_only=True)["progress"]
    assert (progress["epoch"], progress["batch"]) == (epoch, batch)
    if epoch == 1:
        assert not (killed.parent / "task2.json").exists() and not (killed.parent / "task2.pt").exists()
    else:
        summary = json.loads((killed.parent / "task2.json").read_text())
        assert summary["finished"] is False and [e["epoch"] for e in summary["epochs"]] == [1, 2]

    rc, _, err = one_thread("train_teracon_t2.py", *_args(t2, common, killed, "--resume"))
    assert rc == 0, err
    assert f"resuming train phase at epoch {progress['epoch']}, batch {progress['batch']}" in err
    a, b = _weights(straight.parent / "task2.pt"), _weights(killed.parent / "task2.pt")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    summary = json.loads((killed.parent / "task2.json").read_text())
    assert summary["finished"] is True and not state.exists()  # a finished run leaves no state behind
    assert [e["valid"] for e in summary["epochs"]] == [e["valid"] for e in want["epochs"]]
    assert summary["test"] == want["test"]


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_resume_refuses_other_flags_changed_inputs_and_a_missing_state(task1, tmp_path):
    """--resume without a state, with a flag that differs from the state's (--batch), or after
    the task file changed: exit status 2, one error line naming the state file and the problem,
    no traceback, and no file written or changed (the state kept byte for byte)."""
    t2, common = _prepare(tmp_path, task1)
    out = tmp_path / "task2"
    state = tmp_path / "task2.resume.pt"
    before = helpers.file_hashes(tmp_path)
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths",
                            tmp_path / "task1.pt", "--epochs", "1", "--batch", "16", "--resume", *common)
    assert rc == 2 and "Traceback" not in err
    assert _error_lines(err) == [f"error: {state}: no resumable state here (the run never finished an epoch or a "
                                 "--save_every interval, or it finished and removed it); run without --resume"]
    assert helpers.file_hashes(tmp_path) == before
    # a state left by an interrupted run: killed right after step 3, past the snapshot of step 2
    kill_after_step(3, _args(t2, common, out), tmp_path / "killed.log")
    assert torch.load(state, weights_only=True)["progress"]["batch"] == 2
    before = helpers.file_hashes(tmp_path)
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "32", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "Traceback" not in err
    assert _error_lines(err) == [f"error: {state}: written by a run with --batch 16, not 32; resume with the same "
                                 "flags, or delete this file to start over"]
    assert helpers.file_hashes(tmp_path) == before
    with open(t2, "a") as f:
        f.write(open(t2).readline())  # one more line: the task file changed
    before = helpers.file_hashes(tmp_path)
    rc, _, err = one_thread("train_teracon_t2.py", "--datapath", t2, "--savepath", out, "--paths", tmp_path / "task1.pt",
                            "--epochs", "3", "--batch", "16", "--save_every", "2", "--resume", *common)
    assert rc == 2 and "Traceback" not in err
    assert _error_lines(err) == [f"error: {state}: the file of --datapath changed since this state was written; "
                                 "delete this file and run without --resume"]
    assert helpers.file_hashes(tmp_path) == before  # a refused resume leaves the state as it was
