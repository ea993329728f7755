"""Data parallelism under torchrun (issue 18): 2 gloo ranks of one thread on a CPU give the
one-process run's weights, rank 0 alone writes, and a killed rank ends the run with one error
line after which `--resume` continues it bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers import ROOT

import cli
from distributed import Shard

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FLAGS = ["--device", "cpu", "--seed", "0", "--quiet", "--lr", "1e-3"]
TASK1 = ["--channels", "16", "--dilations", "1", "2", "--epochs", "2", "--batch", "32"]
TASK2 = ["--epochs", "12", "--patience", "100", "--batch", "48", "--save_every", "1"]
ENV = {"OMP_NUM_THREADS": "1"}


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def task(folder: Path, number: int, ranks: int, paths: Path | None = None) -> str:
    """Train task `number` into `folder`: on 2 ranks under torchrun, or in this process with one
    thread (cli.main; saves an interpreter start); returns the log."""
    args = ["--datapath", str(folder.parent / f"t{number}.csv"), "--datapath_index", str(folder / "index.json"),
            "--savepath", str(folder / f"task{number}"), *FLAGS, *(TASK1 if number == 1 else TASK2)]
    if paths:
        args += ["--paths", str(paths)]
    if ranks == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cli.main(args, task=number)
        finally:
            torch.set_num_threads(threads)
        return ""
    p = run([*TORCHRUN, str(ROOT / ("train_task1.py" if number == 1 else f"train_teracon_t{number}.py")), *args])
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over every tensor of the two state dicts together, in float64."""
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    return float((num / sum((a[k].double() ** 2).sum() for k in a)).sqrt())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Task 1 and task 2 (TERACON, knowledge retention) in one process and on 2 ranks; each
    task starts from its own side's previous checkpoint."""
    root = tmp_path_factory.mktemp("ddp")
    helpers.write_task1(root / "t1.csv", lines=200)
    helpers.write_task_ranking(root / "t2.csv", lines=200)
    out = {}
    for name, ranks in (("one", 1), ("two", 2)):
        folder = root / name
        logs = (task(folder, 1, ranks), task(folder, 2, ranks, paths=folder / "task1.pt"))
        out[name] = {"dir": folder, "logs": logs}
    out["root"] = root
    return out


def test_two_ranks_give_the_one_process_weights(runs):
    """torchrun --nproc_per_node 2 (gloo, one thread each) trains task 1 and task 2 to the
    weights of one process within 1e-4 relative (float32 reductions in another order)."""
    for t in (1, 2):
        one, two = weights(runs["one"]["dir"] / f"task{t}.pt"), weights(runs["two"]["dir"] / f"task{t}.pt")
        assert relative_difference(one, two) < 1e-4, t
        assert relative_difference(one, two) > 0 or t == 1  # really two processes' reductions, not a copy


def test_two_ranks_record_world_size_and_only_rank0_writes(runs):
    """PREFIX.json and the checkpoint say world_size 2 (1 in one process); the two-rank folder
    holds exactly the files of the one-process folder (no resumable state left, nothing else);
    the log lines come from rank 0 alone: one "done" line per task."""
    for name, world in (("one", 1), ("two", 2)):
        folder = runs[name]["dir"]
        for t in (1, 2):
            assert json.loads((folder / f"task{t}.json").read_text())["world_size"] == world
            assert torch.load(folder / f"task{t}.pt", map_location="cpu", weights_only=True)["world_size"] == world
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(runs["two"]["dir"]) == names(runs["one"]["dir"]) == [
        "index.json", "task1.json", "task1.pt", "task2.json", "task2.pt"]
    for log in runs["two"]["logs"]:
        assert sum(" done in " in line for line in log.splitlines()) == 1
        assert "2 ranks (torchrun)" in log


def test_a_rank_other_than_0_writes_nothing():
    """TaskRun.save and .snapshot do nothing on rank 1 (what keeps the two ranks from writing
    the same files)."""
    fake = types.SimpleNamespace(shard=Shard(rank=1, world=2))
    cli.TaskRun.save(fake, {"epochs": []})          # would raise on the missing attributes if it wrote
    cli.TaskRun.snapshot(fake, None, None)


def test_shard_parts_cover_a_batch_once_in_order():
    """The rank parts of n rows: contiguous, in rank order, sizes differing by at most one."""
    for n in (0, 1, 5, 48, 1024):
        for world in (1, 2, 3, 8):
            parts = [Shard(r, world).part(n) for r in range(world)]
            assert np.concatenate([np.arange(n)[p] for p in parts]).tolist() == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_a_killed_rank_ends_the_run_with_one_error_line_and_resume_continues_bit_for_bit(runs):
    """kill -9 of rank 1 in the middle of task 2: rank 0 stops with one error line naming the
    lost rank and --resume; the same torchrun command with --resume finishes with the weights of
    the uninterrupted two-rank run, bit for bit."""
    folder = runs["root"] / "killed"
    folder.mkdir()
    for name in ("index.json", "task1.json", "task1.pt"):
        (folder / name).write_bytes((runs["two"]["dir"] / name).read_bytes())
    script = str(ROOT / "train_teracon_t2.py")
    args = ["--datapath", str(runs["root"] / "t2.csv"), "--datapath_index", str(folder / "index.json"),
            "--savepath", str(folder / "task2"), "--paths", str(folder / "task1.pt"), *FLAGS, *TASK2]
    proc = subprocess.Popen([*TORCHRUN, script, *args], cwd=ROOT, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = folder / "task2.resume.pt"
    deadline = time.time() + 120
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the first resumable state"
    workers = subprocess.run(["pgrep", "-f", f"{script}.*{folder}/task2"], capture_output=True, text=True).stdout.split()
    workers = sorted(int(p) for p in workers if int(p) != proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # the later-started worker: rank 1
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: ") and "--resume" in errors[0], stderr[-2000:]
    assert state.is_file()
    summary = folder / "task2.json"
    assert not summary.is_file() or not json.loads(summary.read_text())["finished"]

    resumed = run([*TORCHRUN, script, *args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming train phase" in resumed.stderr
    final, reference = weights(folder / "task2.pt"), weights(runs["two"]["dir"] / "task2.pt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert not state.exists()


def test_bad_input_under_torchrun_is_one_error_line_per_rank_and_nothing_hangs(runs, tmp_path):
    """A missing task file: each of the 2 ranks stops with the same one error line naming the
    file, before any collective (so neither waits on the other), and nothing is written."""
    script = str(ROOT / "train_teracon_t2.py")
    p = run([*TORCHRUN, script, "--datapath", str(tmp_path / "missing.csv"), "--datapath_index",
             str(runs["two"]["dir"] / "index.json"), "--paths", str(runs["two"]["dir"] / "task1.pt"),
             "--savepath", str(tmp_path / "out" / "task2"), *FLAGS], timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0
    assert errors == [f"error: {tmp_path / 'missing.csv'}: file not found"] * 2, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_resuming_on_another_number_of_ranks_says_what_differs(runs, tmp_path, monkeypatch, caplog):
    """A resumable state written by 2 ranks, resumed in one process: the run continues and warns
    that it does so up to float rounding (the reductions run in another order), naming both
    numbers of ranks."""
    folder = runs["one"]["dir"]
    args = ["--datapath", str(runs["root"] / "t2.csv"), "--datapath_index", str(folder / "index.json"),
            "--paths", str(folder / "task1.pt"), "--savepath", str(tmp_path / "task2"), *FLAGS, *TASK2]
    real = cli.TaskRun.snapshot

    def written_by_two_ranks_then_stop(self, progress, optimizer):
        self.resume_args["world_size"] = 2  # as the state of a 2-rank run records it
        real(self, progress, optimizer)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.TaskRun, "snapshot", written_by_two_ranks_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args, task=2)
    monkeypatch.setattr(cli.TaskRun, "snapshot", real)
    with caplog.at_level("WARNING", logger="teracon"):
        summary = cli.main([*args, "--resume"], task=2)
    assert summary["finished"]
    assert any("resuming with ranks 1 where the state was written with 2" in r.getMessage()
               and "up to float rounding" in r.getMessage() for r in caplog.records)
