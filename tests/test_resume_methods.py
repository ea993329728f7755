"""--resume for every method and phase the kill test (test_resume.py, TERACON task 2) leaves out:
task 1, HAT, SinMo, fine-tuning, MTL, PeterRec, Piggyback (its scores restored, its stored masks
equal), and CONURE both in its training and in its retraining phase. Each run is stopped right after the
resumable state of a chosen epoch is written (Ctrl-C at that point), then continued with
`--resume`; its checkpoint must equal the uninterrupted run's tensor for tensor, bit for bit, and
its per-epoch record (losses, metrics) must be the same."""
from __future__ import annotations

import json

import pytest
import torch

import cli
import helpers

# (method, task, phase the stop lands in, extra flags of that task)
CASES = [("teracon", 1, "train", []), ("hat", 2, "train", []), ("sinmo", 2, "train", []),
         ("fineall", 2, "train", []), ("mtl", 2, "train", []), ("peterrec", 2, "train", []),
         ("piggyback", 2, "train", []),
         ("conure", 2, "train", ["--retrain_epochs", "3"]), ("conure", 2, "retrain", ["--retrain_epochs", "3"])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_methods")
    return d, helpers.write_task1(d / "t1.csv", lines=60), helpers.write_task_ranking(d / "t2.csv", lines=60)


def _state(path) -> dict:
    """The checkpoint, less what names the run itself (its --savepath, --resume)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in ("savepath", "resume")}
    return ckpt


def _without_timing(epochs: list[dict]) -> list[dict]:
    """Per-epoch records less their wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in e.items() if k not in ("seconds", "timing")} for e in epochs]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method,task,phase,extra", CASES, ids=[f"{m}-task{t}-{p}" for m, t, p, _ in CASES])
def test_a_run_stopped_after_an_epoch_resumes_bit_for_bit(data, tmp_path, monkeypatch, method, task, phase, extra):
    d, t1, t2 = data
    common = ["--datapath_index", str(tmp_path / "index.json"), "--device", "cpu", "--seed", "0", "--quiet",
              "--method", method, "--eval_batch", "64", "--batch", "16"]
    task1 = ["--datapath", str(t1), "--channels", "8", "--dilations", "1", "2", *common]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions depend on the thread count; the claim is about resuming
    try:
        if task == 1:
            args, savepath = [*task1, "--epochs", "3"], "task1"
        else:
            cli.main([*task1, "--epochs", "1", "--savepath", str(tmp_path / "task1")], task=1)
            args = ["--datapath", str(t2), "--paths", str(tmp_path / "task1.pt"), "--epochs", "3", "--lr", "1e-2",
                    "--patience", "10", *extra, *common]
            savepath = "task2"
        cli.main([*args, "--savepath", str(tmp_path / f"whole_{savepath}")], task=task)
        real, stops = cli.TaskRun.snapshot, []

        def stop_after_an_epoch(self, progress, optimizer):
            real(self, progress, optimizer)  # the resumable state is on disk before the stop
            if progress.phase == phase and progress.epoch == progress.first_epoch + 1 and progress.batch == 0:
                stops.append((progress.phase, progress.epoch))
                raise KeyboardInterrupt

        monkeypatch.setattr(cli.TaskRun, "snapshot", stop_after_an_epoch)
        cut = str(tmp_path / f"cut_{savepath}")
        with pytest.raises(KeyboardInterrupt):
            cli.main([*args, "--savepath", cut], task=task)
        monkeypatch.setattr(cli.TaskRun, "snapshot", real)
        assert stops and stops[0][0] == phase
        assert not json.loads((tmp_path / f"cut_{savepath}.json").read_text())["finished"]  # it had not finished
        cli.main([*args, "--savepath", cut, "--resume"], task=task)
    finally:
        torch.set_num_threads(threads)
    whole, resumed = (json.loads((tmp_path / f"{n}_{savepath}.json").read_text()) for n in ("whole", "cut"))
    phases = [e["phase"] for e in whole["epochs"]]
    assert phase in phases and len(whole["epochs"]) >= 2
    assert _without_timing(resumed["epochs"]) == _without_timing(whole["epochs"])
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["test"] == whole["test"]
    a, b = _state(tmp_path / f"whole_{savepath}.pt"), _state(tmp_path / f"cut_{savepath}.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert _equal(a[key], b[key]), key


def test_reproduce_continues_an_interrupted_stage_bit_for_bit(tmp_path, monkeypatch):
    """reproduce.py interrupted inside task 2 (Ctrl-C right after the resumable state of its
    second epoch is written), then the same command again: task 1 is skipped, task 2 continues
    with --resume, task 3 runs, and every checkpoint, run summary and matrix.json equals those
    of an uninterrupted reproduce.py run, bit for bit."""
    import types

    import prepare_data
    import reproduce
    manifest = prepare_data.make_synthetic(tmp_path / "data", users=40, items=40, seq_len=6, num_tasks=3, seed=0)
    def reproduce_into(name: str) -> list[list[str]]:
        calls: list[list[str]] = []
        monkeypatch.setattr(reproduce, "subprocess",
                            types.SimpleNamespace(run=helpers.in_process_runner(calls, ["--channels", "8", "--dilations", "1", "2"])))
        reproduce.main(["--dataset", str(manifest), "--methods", "teracon", "--seeds", "0", "--max_epochs", "3",
                        "--out", str(tmp_path / name), "--device", "cpu", "--no_plots"])
        return calls

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reproduce_into("whole")
        real, stops = cli.TaskRun.snapshot, []

        def stop_in_task2(self, progress, optimizer):
            real(self, progress, optimizer)
            if self.args.task == 2 and progress.epoch == progress.first_epoch + 1 and progress.batch == 0:
                stops.append(progress.epoch)
                raise KeyboardInterrupt

        monkeypatch.setattr(cli.TaskRun, "snapshot", stop_in_task2)
        with pytest.raises(KeyboardInterrupt):
            reproduce_into("cut")
        monkeypatch.setattr(cli.TaskRun, "snapshot", real)
        assert stops == [2]
        calls = reproduce_into("cut")
    finally:
        torch.set_num_threads(threads)
    assert [c[c.index("--task") + 1] if "--task" in c else "1" for c in calls] == ["2", "3"]  # task 1 skipped
    assert "--resume" in calls[0] and "--resume" not in calls[1]
    whole, cut = (tmp_path / n / "synthetic" / "teracon" / "seed0" for n in ("whole", "cut"))
    for task in (1, 2, 3):
        a, b = _state(whole / f"task{task}.pt"), _state(cut / f"task{task}.pt")
        assert a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a if k != "args"), task
        differ = {k for k in a["args"] if a["args"][k] != b["args"].get(k)}
        assert differ <= {"paths", "datapath_index"}, differ  # the two runs' folders
        sa, sb = (json.loads((f / f"task{task}.json").read_text()) for f in (whole, cut))
        assert _without_timing(sa["epochs"]) == _without_timing(sb["epochs"]) and sa["test"] == sb["test"], task
    assert json.loads((whole / "matrix.json").read_text()) == json.loads((cut / "matrix.json").read_text())
