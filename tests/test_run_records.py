"""What a run records about itself, and the rehearsal limits.

- `--limit_batches N` / `--limit_eval_batches M`: an epoch runs exactly N batches with eq. 19's s
  annealed over those N; evaluation scores only the first M batches of a split, and the metrics
  are averages over those examples only.
- rehearsal marks: PREFIX.json and the checkpoint say `rehearsal`; a real task-n run refuses a
  rehearsal checkpoint; evaluate.py says REHEARSAL.
- precision and code records (PREFIX.json and the checkpoint), `utils.code_version`.
- `--resume` may change --chunk_rows (with a warning) but not --lr.
- `results.provenance`, `results.placement` and `format_placement` on hand-made inputs.
- `reproduce.py` writes into runs/<dataset>/ by default and never into results/.

Every expected number is worked out by hand in the comments; every run is a tiny CPU model
through `cli.main` in this process.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

import helpers
from helpers import ROOT, file_hashes

import cli
import evaluate
import reproduce
import results
import trainer
import utils
from utils import UserError

SMAX = 50.0
TINY = ["--channels", "8", "--dilations", "1", "2", "--device", "cpu", "--seed", "0", "--quiet"]
CPU_FP32 = {"amp": "fp32", "device": "cpu", "autocast_dtype": None, "matmul_tf32": False, "cudnn_tf32": False,
            "deterministic": False}


# ------------------------------------------------------------------------------ helpers

def git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=60)


def git_head() -> str:
    return git("rev-parse", "HEAD").stdout.strip()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Spy:
    """Records, without changing them, what `trainer.train` does: the s of every training step
    and, for every `trainer.evaluate` call, its split, the split's indices, the example indices
    it fed to the model and the ranks it scored."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.steps: list[float] = []
        self.evals: list[dict] = []
        self._active: dict | None = None
        step, ev, sums, batch = trainer.train_step, trainer.evaluate, trainer.metric_sums, trainer.dl.TaskData.batch

        def train_step(model, st, optimizer, src, tgt, s, *a, **kw):
            self.steps.append(s)
            return step(model, st, optimizer, src, tgt, s, *a, **kw)

        def evaluate_(model, data, split, *a, **kw):
            self._active = {"split": split, "split_idx": [int(i) for i in data.splits[split]], "fed": [],
                            "ranks": []}
            self.evals.append(self._active)
            try:
                return ev(model, data, split, *a, **kw)
            finally:
                self._active = None

        def metric_sums(ranks, kind):
            if self._active is not None:
                self._active["ranks"] += [int(r) for r in ranks]
            return sums(ranks, kind)

        def data_batch(data, idx, *a, **kw):
            if self._active is not None:
                self._active["fed"] += [int(i) for i in idx]
            return batch(data, idx, *a, **kw)

        mp.setattr(trainer, "train_step", train_step)
        mp.setattr(trainer, "evaluate", evaluate_)
        mp.setattr(trainer, "metric_sums", metric_sums)
        mp.setattr(trainer.dl.TaskData, "batch", data_batch)


def by_hand(ranks: list[int]) -> dict[str, float]:
    """hit@1, mrr@5, hr@5 and hr@20 of 0-based ranks, averaged over exactly these examples."""
    n = len(ranks)
    return {"hit@1": sum(r == 0 for r in ranks) / n, "mrr@5": sum(1 / (r + 1) for r in ranks if r < 5) / n,
            "hr@5": sum(r < 5 for r in ranks) / n, "hr@20": sum(r < 20 for r in ranks) / n}


def task1(folder: Path, t1: Path, *extra: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return cli.main(["--datapath", str(t1), "--datapath_index", str(folder / "index.json"),
                     "--savepath", str(folder / "task1"), "--batch", "16", *TINY, *extra], task=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Task-1 runs on one 300-line file (split 240/15/45, 15 training batches of 16):
    `normal` (1 epoch, eval batch 8, started with both TF32 switches on), `rehearsal`
    (2 epochs, --limit_batches 3 --limit_eval_batches 2 --eval_batch 4, spied), `tf32`, and
    `bf16` (--amp bf16 --deterministic --limit_batches 1000, more than an epoch has)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "data"
    data.mkdir()
    t1 = helpers.write_task1(data / "t1.csv", lines=300)
    t2 = helpers.write_task_ranking(data / "t2.csv", lines=200)
    out = {"root": root, "t1": t1, "t2": t2}
    head_before = git_head()
    status_before = git("status", "--porcelain", "--untracked-files=no").stdout
    with pytest.MonkeyPatch.context() as mp:
        torch.backends.cuda.matmul.allow_tf32 = True   # an fp32 run must switch both off itself
        torch.backends.cudnn.allow_tf32 = True
        spy = Spy(mp)
        task1(root / "normal", t1, "--epochs", "1", "--eval_batch", "8")
        out["normal_spy"] = spy
        out["switches_after_fp32"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        task1(root / "rehearsal", t1, "--epochs", "2", "--limit_batches", "3", "--limit_eval_batches", "2",
              "--eval_batch", "4")
        out["rehearsal_spy"] = spy
    task1(root / "tf32", t1, "--epochs", "1", "--amp", "tf32")
    task1(root / "bf16", t1, "--epochs", "1", "--amp", "bf16", "--deterministic", "--limit_batches", "1000")
    out["heads"] = {head_before, git_head()}
    out["status_stable"] = status_before == git("status", "--porcelain", "--untracked-files=no").stdout
    out["status"] = status_before
    return out


# ------------------------------------------------------------------------------ 1. the limits

def test_split_sizes_of_the_fixture(runs):
    """The hand computations below assume this split: 80/5/15 of 300 sources."""
    for name in ("normal", "rehearsal"):
        assert read_json(runs["root"] / name / "task1.json")["task"]["split_sizes"] == \
            {"train": 240, "valid": 15, "test": 45}


def test_limit_batches_runs_n_batches_and_anneals_s_over_them(runs):
    """--limit_batches 3 of 15 batches: 3 steps an epoch with s_b = 1/smax + (smax - 1/smax) b / 3:
    0.02, 0.02 + 49.98 / 3 = 16.68 and 0.02 + 49.98 * 2 / 3 = 33.34 (not over 15 batches, which
    would give 0.02, 3.352, 6.684), in both epochs."""
    summary = read_json(runs["root"] / "rehearsal" / "task1.json")
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    for e in summary["epochs"]:
        d = e["diagnostics"]
        assert d["steps"] == 3
        assert d["s_min"] == pytest.approx(0.02, rel=1e-12)
        assert d["s_max"] == pytest.approx(33.34, rel=1e-12)
    assert runs["rehearsal_spy"].steps == pytest.approx([0.02, 16.68, 33.34] * 2, rel=1e-12)


def test_without_limit_every_batch_runs(runs):
    """240 training sources at batch 16: 15 steps, s_max = 0.02 + 49.98 * 14 / 15 = 46.668; a
    limit above the epoch's 15 batches (1000) changes neither the steps nor the annealing."""
    for name in ("normal", "bf16"):
        [e] = read_json(runs["root"] / name / "task1.json")["epochs"]
        assert e["diagnostics"]["steps"] == 15, name
        assert e["diagnostics"]["s_min"] == pytest.approx(0.02, rel=1e-12)
        assert e["diagnostics"]["s_max"] == pytest.approx(46.668, rel=1e-12), name
    assert runs["normal_spy"].steps == pytest.approx([0.02 + 49.98 * b / 15 for b in range(15)], rel=1e-12)


def test_limit_eval_batches_scores_the_first_m_batches_only(runs):
    """--limit_eval_batches 2 --eval_batch 4: every evaluation (valid after each epoch, test at
    each new best) feeds the split's first 8 examples, of 15 (valid) or 45 (test), in order;
    the recorded metrics are averages over those 8 ranks, worked out here from the ranks."""
    spy = runs["rehearsal_spy"]
    summary = read_json(runs["root"] / "rehearsal" / "task1.json")
    assert [ev["split"] for ev in spy.evals if ev["split"] == "valid"] == ["valid", "valid"]
    assert "test" in [ev["split"] for ev in spy.evals]
    for ev in spy.evals:
        assert len(ev["split_idx"]) > 8
        assert ev["fed"] == ev["split_idx"][:8]
        assert len(ev["ranks"]) == 8
    valid = [ev for ev in spy.evals if ev["split"] == "valid"]
    for ev, epoch in zip(valid, summary["epochs"]):
        want = by_hand(ev["ranks"])
        assert {k: epoch["valid"][k] for k in want} == pytest.approx(want, abs=1e-12)
    last_test = [ev for ev in spy.evals if ev["split"] == "test"][-1]
    want = by_hand(last_test["ranks"])
    assert {k: summary["test"][k] for k in want} == pytest.approx(want, abs=1e-12)
    # not a vacuous check: some example was scored within the top 20, so a wrong denominator shows
    assert any(r < 20 for ev in spy.evals for r in ev["ranks"])


def test_without_eval_limit_the_whole_split_is_scored(runs):
    spy = runs["normal_spy"]
    assert [ev["split"] for ev in spy.evals] == ["valid", "test"]
    for ev in spy.evals:
        assert ev["fed"] == ev["split_idx"] and len(ev["ranks"]) == len(ev["split_idx"])
    summary = read_json(runs["root"] / "normal" / "task1.json")
    want = by_hand(spy.evals[1]["ranks"])
    assert {k: summary["test"][k] for k in want} == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------ 2. rehearsal marks

def test_rehearsal_is_marked_in_the_summary_and_the_checkpoint(runs):
    for name, want in (("normal", False), ("tf32", False), ("rehearsal", True), ("bf16", True)):
        folder = runs["root"] / name
        assert read_json(folder / "task1.json")["rehearsal"] is want, name
        assert load_pt(folder / "task1.pt")["rehearsal"] is want, name


def test_a_real_task2_refuses_a_rehearsal_checkpoint_and_a_rehearsal_accepts_it(runs):
    """Without limits: one UserError naming the checkpoint, nothing written, inputs untouched.
    With --limit_eval_batches only (also a rehearsal): it runs and is marked."""
    folder = runs["root"] / "rehearsal"
    prev = folder / "task1.pt"
    before = file_hashes(folder)
    t2_before = runs["t2"].read_bytes()
    args = ["--datapath", str(runs["t2"]), "--datapath_index", str(folder / "index.json"), "--paths", str(prev),
            "--epochs", "1", "--batch", "16", "--eval_batch", "16", *TINY[5:]]
    with pytest.raises(UserError) as e:
        cli.main([*args, "--savepath", str(folder / "task2_real")], task=2)
    assert str(e.value) == (f"{prev}: a rehearsal checkpoint (trained with --limit_batches/--limit_eval_batches); "
                            "only a rehearsal may start from it (retrain the previous task without the limits)")
    assert file_hashes(folder) == before and runs["t2"].read_bytes() == t2_before
    assert not list(folder.glob("task2_real*"))

    summary = cli.main([*args, "--savepath", str(folder / "task2"), "--limit_eval_batches", "1"], task=2)
    assert summary["finished"] is True
    assert read_json(folder / "task2.json")["rehearsal"] is True
    assert load_pt(folder / "task2.pt")["rehearsal"] is True
    assert {k: v for k, v in file_hashes(folder).items() if not k.startswith("task2")} == before


def test_evaluate_says_rehearsal(runs, capsys):
    reh = runs["root"] / "rehearsal" / "task1.pt"
    rows = evaluate.main(["--paths", str(reh), "--device", "cpu", "--eval_batch", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"REHEARSAL: {reh} was trained with --limit_batches/--limit_eval_batches; "
                        "these numbers are not results")
    assert [r["rehearsal"] for r in rows] == [True]
    normal = runs["root"] / "normal" / "task1.pt"
    rows = evaluate.main(["--paths", str(normal), "--device", "cpu", "--eval_batch", "64"])
    assert "REHEARSAL" not in capsys.readouterr().out
    assert [r["rehearsal"] for r in rows] == [False]


# ------------------------------------------------------------------------------ 3. precision, code

def test_precision_records(runs):
    """fp32 on a CPU; tf32 on a CPU is fp32 (no TF32 there), recorded as asked; bf16 autocast."""
    want = {"normal": CPU_FP32, "tf32": dict(CPU_FP32, amp="tf32"),
            "bf16": dict(CPU_FP32, amp="bf16", autocast_dtype="bfloat16", deterministic=True)}
    for name, precision in want.items():
        folder = runs["root"] / name
        assert read_json(folder / "task1.json")["precision"] == precision, name
        assert load_pt(folder / "task1.pt")["precision"] == precision, name
        assert read_json(folder / "task1.json")["args"]["amp"] == precision["amp"]


def test_precision_switches_are_set_explicitly(runs):
    """An fp32 run turns off both TF32 switches even when they were on before it (cuDNN's
    default is on): fp32 means fp32 on CUDA too, whatever the process had set."""
    assert runs["switches_after_fp32"] == (False, False)


def test_code_record_is_the_repository_commit(runs):
    [head] = runs["heads"] if len(runs["heads"]) == 1 else [None]
    for name in ("normal", "rehearsal", "tf32", "bf16"):
        folder = runs["root"] / name
        for code in (read_json(folder / "task1.json")["code"], load_pt(folder / "task1.pt")["code"]):
            assert set(code) == {"commit", "dirty"}
            assert code["commit"] in runs["heads"] and len(code["commit"]) == 40
            if head:
                assert code["commit"] == head
            assert isinstance(code["dirty"], bool)
            if runs["status_stable"]:  # nobody changed the tree during the runs
                assert code["dirty"] == bool(runs["status"].strip())


def test_code_version_outside_and_inside_a_git_checkout(tmp_path):
    outside = tmp_path / "plain"
    outside.mkdir()
    if git("rev-parse", "HEAD", cwd=outside).returncode == 0:
        pytest.skip("the temporary folder lies inside a git checkout")
    assert utils.code_version(outside) == {"commit": None, "dirty": None}

    repo = tmp_path / "repo"
    repo.mkdir()
    assert git("init", "-q", cwd=repo).returncode == 0
    (repo / "a.txt").write_text("one\n")
    assert git("add", "a.txt", cwd=repo).returncode == 0
    assert git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "x",
               cwd=repo).returncode == 0
    commit = git("rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert utils.code_version(repo) == {"commit": commit, "dirty": False}
    (repo / "untracked.txt").write_text("new\n")  # untracked files do not make a tree dirty
    assert utils.code_version(repo) == {"commit": commit, "dirty": False}
    (repo / "a.txt").write_text("two\n")
    assert utils.code_version(repo) == {"commit": commit, "dirty": True}


# ------------------------------------------------------------------------------ 4. --resume

class Interrupted(Exception):
    pass


def test_resume_accepts_another_chunk_rows_with_a_warning_and_refuses_another_lr(runs, tmp_path, monkeypatch,
                                                                                caplog):
    base = runs["root"] / "normal"
    out = tmp_path / "task2"
    state = tmp_path / "task2.resume.pt"
    argv = ["--datapath", str(runs["t2"]), "--datapath_index", str(base / "index.json"), "--paths",
            str(base / "task1.pt"), "--savepath", str(out), "--epochs", "2", "--batch", "16", "--eval_batch", "64",
            "--save_every", "1", "--lr", "0.001", "--seed", "0", "--quiet"]
    original = cli.TaskRun.snapshot

    def snapshot_then_stop(self, progress, optimizer):
        original(self, progress, optimizer)
        raise Interrupted  # the run dies right after its first resumable state (epoch 1, batch 1)

    monkeypatch.setattr(cli.TaskRun, "snapshot", snapshot_then_stop)
    with pytest.raises(Interrupted):
        cli.main([*argv, "--device", "cpu", "--chunk_rows", "0"], task=2)
    monkeypatch.setattr(cli.TaskRun, "snapshot", original)
    assert state.is_file()
    assert torch.load(state, weights_only=True)["progress"]["batch"] == 1
    saved = state.read_bytes()

    with pytest.raises(UserError) as e:
        cli.main([*argv, "--device", "cpu", "--chunk_rows", "0", "--resume", "--lr", "0.002"], task=2)
    assert str(e.value) == (f"{state}: written by a run with --lr 0.001, not 0.002; resume with the same flags, "
                            "or delete this file to start over")
    assert state.read_bytes() == saved

    # another --chunk_rows and --device auto (the same CPU): one warning, for --chunk_rows only
    device = "cpu" if torch.cuda.is_available() else "auto"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="teracon"):
        summary = cli.main([*argv, "--device", device, "--chunk_rows", "16", "--resume"], task=2)
    warnings = [r.getMessage() for r in caplog.records if r.name == "teracon" and r.levelno == logging.WARNING]
    assert warnings == ["task 2: resuming with --chunk_rows 16 where the state was written with 0: the same loss "
                        "and gradients up to float rounding, so the run continues equivalently but not bit for bit"]
    assert any("resuming train phase at epoch 1, batch 1" in r.getMessage() for r in caplog.records)
    assert summary["finished"] is True and [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert not state.exists()
    assert read_json(tmp_path / "task2.json")["args"]["chunk_rows"] == 16


# ------------------------------------------------------------------------------ 5. provenance, placement

A = "a" * 8 + "0123456789abcdef0123456789abcdef"
B = "b" * 8 + "0123456789abcdef0123456789abcdef"


def test_provenance_lines():
    clean = {"commits": [A], "dirty": False, "rehearsal": False}
    assert results.provenance([clean]) == "code aaaaaaaa01"
    assert results.provenance([clean, dict(clean)]) == "code aaaaaaaa01"
    assert results.provenance([clean, dict(clean, commits=[B])]) == (
        "WARNING: the runs come from 2 code commits (aaaaaaaa01, bbbbbbbb01): rerun them at one commit to compare")
    assert results.provenance([clean, dict(clean, dirty=True)]) == \
        "code aaaaaaaa01; WARNING: some runs had uncommitted changes"
    rehearsal = results.provenance([dict(clean, rehearsal=True)])
    assert rehearsal.startswith("REHEARSAL")
    assert rehearsal == "REHEARSAL (--limit_batches/--limit_eval_batches): these numbers are not results; code aaaaaaaa01"
    assert results.provenance([{"method": "teracon"}]) == "code commit not recorded"  # an older matrix.json


def _row(task: int, name: str, kind: str, method: str, main: float) -> dict:
    now = {"hit@1": main / 2, "mrr@5": main, "hr@5": main, "ndcg@5": main} if kind == "ranking" else \
        {"hit@1": main, "accuracy": main}
    return {"task": task, "name": name, "metric": kind, "method": method, "now": now, "after_training": now}


def _run(method: str, seed: int, after1: float, final: tuple[float, float]) -> dict:
    """A matrix.json record of a 2-task run: task 1 (watch, ranking) is `after1` right after it
    and final[0] after task 2; task 2 (age, accuracy) is final[1]."""
    return {"method": method, "seed": seed, "version": "toy/1", "commits": [A], "dirty": False, "rehearsal": False,
            "after": [[_row(1, "watch", "ranking", method, after1)],
                      [_row(1, "watch", "ranking", method, final[0]), _row(2, "age", "accuracy", method, final[1])]],
            "reference": [{"task": 1, "name": "watch", "metric": "ranking", "test": {"mrr@5": 0.01}},
                          {"task": 2, "name": "age", "metric": "accuracy", "test": {"accuracy": 0.4}}]}


REF_COLUMNS = ["method", "task", "name", "metric", "after_task_mean", "after_task_std", "after_last_mean",
               "after_last_std", "after_task_seed0", "after_last_seed0", "after_task_seed1", "after_last_seed1",
               "after_task_seed2", "after_last_seed2"]


def _reference_csv(path: Path, rows: list[list]) -> Path:
    pd.DataFrame(rows, columns=REF_COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def placement_runs() -> list[dict]:
    # teracon final: T1 (0.25 + 0.375) / 2 = 0.3125, T2 (0.5 + 0.75) / 2 = 0.625 (two seeds);
    # sinmo final (one seed): T1 0.2, T2 0.6; fineall is not in the reference.
    return [_run("teracon", 0, 0.9, (0.25, 0.5)), _run("teracon", 1, 0.9, (0.375, 0.75)),
            _run("sinmo", 0, 0.2, (0.2, 0.6)), _run("fineall", 0, 0.9, (0.1, 0.1))]


def _reference_rows(t2_std: float) -> list[list]:
    """teracon with three reference seeds, sinmo with one."""
    nan = float("nan")
    return [
        ["reference", 1, "watch", "mrr@5", 0.01, 0.0, 0.01, 0.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        # after_task columns deliberately far off: placement uses after_last
        ["teracon", 1, "watch", "mrr@5", 0.9, 0.5, 0.25, 0.03125, 0.9, 0.22, 0.9, 0.25, 0.9, 0.28],
        ["teracon", 1, "watch", "ndcg@5", 0.9, 0.5, 0.9, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
        ["teracon", 2, "age", "accuracy", 0.9, 0.5, 0.5, t2_std, 0.9, 0.45, 0.9, 0.5, 0.9, 0.55],
        ["sinmo", 1, "watch", "mrr@5", 0.2, 0.0, 0.2, 0.0, 0.2, 0.2, nan, nan, nan, nan],  # one seed, std 0
        ["sinmo", 2, "age", "accuracy", 0.6, 0.0, 0.6, 0.0, 0.6, 0.6, nan, nan, nan, nan],
    ]


# two runs against three reference seeds: t_0.975(2) * sqrt(1/2 + 1/3) = 4.303 * 0.9128709 = 3.928083
HALF_WIDTH = 4.303 * math.sqrt(1 / 2 + 1 / 3)


def test_prediction_half_width_by_hand():
    """t_0.975 with n - 1 degrees of freedom times sqrt(1/k + 1/n): one run against three seeds
    4.303 * sqrt(4/3); against five 2.776 * sqrt(6/5); 2 runs against 3 seeds as above; no
    spread below two reference seeds; 1.96 beyond 31."""
    assert results.prediction_half_width(3, 1) == pytest.approx(4.303 * math.sqrt(4 / 3), rel=1e-12)
    assert results.prediction_half_width(5, 1) == pytest.approx(2.776 * math.sqrt(6 / 5), rel=1e-12)
    assert results.prediction_half_width(3, 2) == pytest.approx(3.928083, rel=1e-6)
    assert results.prediction_half_width(2, 1) == pytest.approx(12.706 * math.sqrt(3 / 2), rel=1e-12)
    assert results.prediction_half_width(31, 1) == pytest.approx(2.042 * math.sqrt(1 + 1 / 31), rel=1e-12)
    assert results.prediction_half_width(40, 4) == pytest.approx(1.96 * math.sqrt(1 / 4 + 1 / 40), rel=1e-12)
    assert results.prediction_half_width(1, 1) == 0.0 and results.prediction_half_width(0, 3) == 0.0


def test_placement_distances_and_the_prediction_interval(tmp_path, placement_runs):
    """teracon T1: (0.3125 - 0.25) / 0.03125 = 2.0 std, within +-3.928 (2 runs, 3 reference seeds);
    T2 with std 0.03: 0.125 / 0.03 = 4.167 std: outside. sinmo against a one-seed reference (std 0)
    must equal it: distance 0, within. fineall and the reference method are not placed."""
    csv = _reference_csv(tmp_path / "table.csv", _reference_rows(0.03))
    place = results.placement(results.long_frame(placement_runs), csv)
    got = {(r["method"], r["task"]): r for r in place.to_dict("records")}
    assert set(got) == {("teracon", 1), ("teracon", 2), ("sinmo", 1), ("sinmo", 2)}
    t1, t2, s1 = got["teracon", 1], got["teracon", 2], got["sinmo", 1]
    assert (t1["metric"], t1["value"], t1["seeds"], t1["reference_mean"], t1["reference_std"],
            t1["reference_seeds"]) == ("mrr@5", 0.3125, 2, 0.25, 0.03125, 3)
    assert t1["distance_in_std"] == pytest.approx(2.0, abs=1e-12) and t1["within"] is True
    assert t1["allowed_std"] == pytest.approx(HALF_WIDTH, rel=1e-12)
    assert (t2["metric"], t2["value"], t2["reference_std"]) == ("accuracy", 0.625, 0.03)
    assert t2["distance_in_std"] == pytest.approx(0.125 / 0.03, rel=1e-12) and t2["within"] is False
    assert (s1["value"], s1["seeds"], s1["reference_seeds"], s1["distance_in_std"], s1["allowed_std"],
            s1["within"]) == (0.2, 1, 1, 0.0, 0.0, True)
    assert got["sinmo", 2]["within"] is True

    text = results.format_placement(place, "results/toy/table.csv")
    lines = text.splitlines()
    assert lines[0] == "Your run against the committed reference results/toy/table.csv (final model, main metric):"
    assert "| teracon | 1 | watch | mrr@5 | 0.3125 | 0.2500 ± 0.0312 (3) | +2.00 | ±3.93 | ok |" in lines
    assert "| teracon | 2 | age | accuracy | 0.6250 | 0.5000 ± 0.0300 (3) | +4.17 | ±3.93 | OUTSIDE |" in lines
    assert "| sinmo | 1 | watch | mrr@5 | 0.2000 | 0.2000 ± 0.0000 (1) | +0.00 | ±0.00 | ok |" in lines
    assert lines[-1].startswith("NOT reproduced on 1 of 4 task(s): teracon T2 (+4.17 std) lie outside the "
                                "reference's 95% prediction interval. Likely causes: ")
    assert "Reproduced:" not in text


@pytest.mark.parametrize("factor, within", [(1 - 1e-6, True), (1 + 1e-6, False)])
def test_placement_boundary_is_the_interval(tmp_path, placement_runs, factor, within):
    """T2's distance just inside or just outside the interval's half-width."""
    std = 0.125 / (HALF_WIDTH * factor)
    place = results.placement(results.long_frame(placement_runs), _reference_csv(tmp_path / "t.csv",
                                                                                 _reference_rows(std)))
    assert place.set_index(["method", "task"]).loc[("teracon", 2), "within"] == within


def test_placement_reproduced_verdict(tmp_path, placement_runs):
    """T2 with std 0.125: (0.625 - 0.5) / 0.125 = 1.0, every task within: Reproduced."""
    csv = _reference_csv(tmp_path / "table.csv", _reference_rows(0.125))
    place = results.placement(results.long_frame(placement_runs), csv)
    assert place["within"].tolist() == [True] * 4
    assert place.set_index(["method", "task"]).loc[("teracon", 2), "distance_in_std"] == pytest.approx(1.0)
    text = results.format_placement(place, "ref.csv")
    assert text.splitlines()[-1] == "Reproduced: every task lies within the reference's 95% prediction interval."
    assert "NOT reproduced" not in text and "OUTSIDE" not in text


def test_placement_with_no_method_in_the_reference(tmp_path):
    csv = _reference_csv(tmp_path / "table.csv", _reference_rows(0.1)[:1])  # the reference rows only
    place = results.placement(results.long_frame([_run("teracon", 0, 0.3, (0.3, 0.5))]), csv)
    assert place.empty
    assert results.format_placement(place, "ref.csv") == \
        "No method of this run is in the reference ref.csv: nothing to place it against."


# ------------------------------------------------------------------------------ 6. reproduce.py

def _stat_tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reproduce_writes_runs_by_default_and_records_commit_and_rehearsal(tmp_path, monkeypatch, capsys):
    """Default --out: runs/synthetic/ under the current folder; results/ of the repository is
    left alone. A rehearsal (--limit_batches 2 --limit_eval_batches 1) passes both limits to
    every stage and is marked in matrix.json and the table's title; a rerun without the limits
    retrains every stage (a rehearsal's stage is no real stage) and is no rehearsal."""
    monkeypatch.chdir(tmp_path)
    import prepare_data  # imported here: its module is being reworked, only its command line is used
    prepare_data.main(["synthetic", "--out", str(tmp_path / "data"), "--users", "80", "--items", "20",
                       "--seq_len", "6", "--tasks", "2", "--seed", "0"])
    manifest = tmp_path / "data" / "tasks.json"
    assert manifest.is_file()
    results_dir = ROOT / "results"
    results_before = _stat_tree(results_dir)

    monkeypatch.setattr(reproduce, "PAPER", {"task1": {"epochs": 1, "lr": 1e-3, "batch": 16, "channels": 8},
                                             "taskn": {"epochs": 1, "lr": 1e-3, "batch": 16}})
    calls: list[list[str]] = []

    def run_in_process(cmd, *args, **kwargs):
        assert cmd[0] == sys.executable and not args and not kwargs
        calls.append(cmd[1:])
        try:
            if Path(cmd[1]).name == "train_task1.py":
                cli.main(cmd[2:], task=1)
            else:
                cli.main(cmd[2:])
        except UserError:
            return subprocess.CompletedProcess(cmd, 2)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(reproduce, "subprocess", types.SimpleNamespace(run=run_in_process))
    argv = ["--dataset", str(manifest), "--max_epochs", "1", "--no_plots", "--device", "cpu"]
    head_before = git_head()
    reproduce.main([*argv, "--limit_batches", "2", "--limit_eval_batches", "1"])
    heads = {head_before, git_head()}

    out = tmp_path / "runs" / "synthetic"
    run = out / "teracon" / "seed0"
    assert len(calls) == 2
    for call in calls:
        assert call[call.index("--limit_batches") + 1] == "2"
        assert call[call.index("--limit_eval_batches") + 1] == "1"
        assert Path(call[call.index("--savepath") + 1]).parent == Path("runs/synthetic/teracon/seed0")
    for t in (1, 2):
        s = read_json(run / f"task{t}.json")
        assert s["rehearsal"] is True and [e["diagnostics"]["steps"] for e in s["epochs"]] == [2]
    mx = read_json(run / "matrix.json")
    assert mx["rehearsal"] is True
    assert len(mx["commits"]) == 1 and mx["commits"][0] in heads
    codes = [read_json(run / f"task{t}.json")["code"] for t in (1, 2)]
    assert mx["commits"] == sorted({c["commit"] for c in codes})
    assert mx["dirty"] is any(c["dirty"] for c in codes)
    dirty = "; WARNING: some runs had uncommitted changes" if mx["dirty"] else ""
    title = (f"# teracon on synthetic, seeds 0 (REHEARSAL (--limit_batches/--limit_eval_batches): these numbers "
             f"are not results; code {mx['commits'][0][:10]}{dirty})")
    assert (out / "table.md").read_text().splitlines()[0] == title
    assert all(r["rehearsal"] is True for rows in mx["after"] for r in rows)
    for name in ("table.md", "table.csv", "summary.md", "summary.csv", "reference_check.csv"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "results").exists()

    # the same command without the limits: both stages retrained, not a rehearsal
    calls.clear()
    head_before = git_head()
    reproduce.main(argv)
    heads = {head_before, git_head()}
    assert len(calls) == 2 and not any("--limit_batches" in c or "--limit_eval_batches" in c for c in calls)
    for t in (1, 2):
        s = read_json(run / f"task{t}.json")
        assert s["rehearsal"] is False and load_pt(run / f"task{t}.pt")["rehearsal"] is False
    mx = read_json(run / "matrix.json")
    assert mx["rehearsal"] is False and len(mx["commits"]) == 1 and mx["commits"][0] in heads
    dirty = "; WARNING: some runs had uncommitted changes" if mx["dirty"] else ""
    assert (out / "table.md").read_text().splitlines()[0] == \
        f"# teracon on synthetic, seeds 0 (code {mx['commits'][0][:10]}{dirty})"
    assert "REHEARSAL" not in (out / "summary.md").read_text()

    assert _stat_tree(results_dir) == results_before
    assert not (results_dir / "synthetic").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]
