"""The README's claims about flags and runs, one test per claim (issue 20).

Each test would fail if its claim broke: expected values are worked out by hand (in the
comments) or read from an independent source (the task files themselves, a scripted validation
sequence), never recomputed with the code under test. Every run is a tiny CPU model
(`--channels 8 --dilations 1 2`) driven through the scripts' `main` in this process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers import NUM_ITEMS, ROOT, SEQ_LEN, raw_item

import checkpoint
import cli
import plot_tasks
import trainer
from nextitnet import NextItNet
from utils import UserError

TINY = ["--channels", "8", "--dilations", "1", "2", "--device", "cpu", "--seed", "0", "--quiet"]
RUN = ["--device", "cpu", "--seed", "0", "--quiet", "--eval_batch", "64"]


# ------------------------------------------------------------------------------ helpers

def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def first_argmax(values: list[float]) -> int:
    """1-based epoch of the first strict maximum (later ties are no improvement), by hand."""
    best, best_epoch = -math.inf, None
    for epoch, v in enumerate(values, 1):
        if v > best:
            best, best_epoch = v, epoch
    return best_epoch


def task_n(task: int, datapath: Path, index: Path, prev: Path, out: Path, *extra: str, entry: int | None = None,
           epochs: int = 1) -> dict:
    """One task-n run through cli.main (`entry=None`: the generic entry point with --task)."""
    argv = ["--datapath", str(datapath), "--datapath_index", str(index), "--paths", str(prev),
            "--savepath", str(out), "--epochs", str(epochs), "--batch", "16", "--lr", "1e-3", *RUN, *extra]
    if entry is None:
        return cli.main(["--task", str(task), *argv], task=None)
    return cli.main(argv, task=entry)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("claims_data")
    return {"t1": helpers.write_task1(d / "t1.csv", lines=80),
            "rank": helpers.write_task_ranking(d / "t2.csv", lines=80),    # 100 examples, ~30 classes
            "classes": helpers.write_task_classes(d / "t3.csv", lines=80)}  # 80 examples, 3 classes


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """One fp32 task-1 run (1 epoch, batch 16): task1.pt, task1.json, index.json in one folder."""
    folder = tmp_path_factory.mktemp("claims_base")
    summary = cli.main(["--datapath", str(data["t1"]), "--datapath_index", str(folder / "index.json"),
                        "--savepath", str(folder / "task1"), "--epochs", "1", "--batch", "16", *TINY], task=1)
    index = read_json(folder / "index.json")
    assert index["num_items"] == NUM_ITEMS + 1  # every cycle item occurs in the 80 task-1 lines
    return {"dir": folder, "pt": folder / "task1.pt", "json": folder / "task1.json", "index": folder / "index.json",
            "summary": summary}


@pytest.fixture(scope="module")
def task2_run(data, base, tmp_path_factory):
    """A successful task-2 run (default flags, --chunk_rows auto) from `base`, with the sha256 of
    the files it starts from before and after it."""
    inputs = [base["pt"], base["json"], base["index"], data["rank"]]
    before = {str(p): sha(p) for p in inputs}
    out = tmp_path_factory.mktemp("claims_task2") / "task2"
    summary = task_n(2, data["rank"], base["index"], base["pt"], out, entry=2)
    after = {str(p): sha(p) for p in inputs}
    return {"out": out, "summary": summary, "before": before, "after": after}


class ScriptedValid:
    """Runs the real evaluation, then replaces the validation metrics of epoch k by the k-th
    scripted values, so the best epoch is known by hand; records every test evaluation."""

    def __init__(self, mp: pytest.MonkeyPatch, script: list[dict[str, float]]):
        self.script, self.real_valid, self.tests = list(script), [], []
        real = trainer.evaluate

        def evaluate(model, data, split, *a, **kw):
            out = real(model, data, split, *a, **kw)
            if split == "valid":
                self.real_valid.append(dict(out))
                out = {**out, **self.script.pop(0)}
            elif split == "test":
                self.tests.append(dict(out))
            return out

        mp.setattr(trainer, "evaluate", evaluate)


# ------------------------------------------------------------------ 1. --select_by mrr@5

def test_select_by_mrr5_picks_best_validation_mrr5_on_a_ranking_task(data, base, tmp_path, monkeypatch):
    """`--select_by mrr@5` on a ranking task: the best epoch is the first epoch with the
    largest validation MRR@5. Scripted over 4 epochs: mrr@5 0.10, 0.30, 0.30, 0.20 -> epoch 2
    (epoch 3 only ties: no improvement); hit@1 0.50, 0.05, 0.60, 0.70 would pick epoch 4."""
    spy = ScriptedValid(monkeypatch, [{"mrr@5": 0.10, "hit@1": 0.50}, {"mrr@5": 0.30, "hit@1": 0.05},
                                      {"mrr@5": 0.30, "hit@1": 0.60}, {"mrr@5": 0.20, "hit@1": 0.70}])
    out = tmp_path / "task2"
    task_n(2, data["rank"], base["index"], base["pt"], out, "--select_by", "mrr@5", "--patience", "10",
           entry=2, epochs=4)
    assert all("mrr@5" in v for v in spy.real_valid)  # a ranking task: the metric exists
    summary = read_json(out.with_suffix(".json"))
    assert summary["args"]["select_by"] == "mrr@5"
    mrr = [e["valid"]["mrr@5"] for e in summary["epochs"]]
    assert mrr == [0.10, 0.30, 0.30, 0.20]
    assert summary["best_epoch"] == first_argmax(mrr) == 2
    assert summary["valid"]["mrr@5"] == 0.30 and summary["valid"]["hit@1"] == 0.05
    # the test metrics are those evaluated after epoch 2 (tests ran after epochs 1 and 2 only)
    assert len(spy.tests) == 2 and summary["test"] == spy.tests[1]
    ckpt = torch.load(out.with_suffix(".pt"), map_location="cpu", weights_only=True)
    assert ckpt["tasks"][-1]["best_epoch"] == 2 and ckpt["tasks"][-1]["test"] == spy.tests[1]


def test_select_by_mrr5_falls_back_to_accuracy_on_a_classification_task(data, base, tmp_path, monkeypatch):
    """`--select_by mrr@5` on a 3-class task (no MRR): selection by hit@1 = accuracy.
    Scripted over 3 epochs: accuracy 0.40, 0.60, 0.50 -> epoch 2."""
    spy = ScriptedValid(monkeypatch, [{"hit@1": a, "accuracy": a} for a in (0.40, 0.60, 0.50)])
    out = tmp_path / "task2"
    task_n(2, data["classes"], base["index"], base["pt"], out, "--select_by", "mrr@5", "--patience", "10",
           entry=2, epochs=3)
    assert all(set(v) == {"hit@1", "accuracy"} for v in spy.real_valid)  # no mrr@5 to select by
    summary = read_json(out.with_suffix(".json"))
    accuracy = [e["valid"]["accuracy"] for e in summary["epochs"]]
    assert accuracy == [0.40, 0.60, 0.50]
    assert summary["best_epoch"] == first_argmax(accuracy) == 2
    assert len(spy.tests) == 2 and summary["test"] == spy.tests[1]


# ------------------------------------------------------------------ 2. --split_by source

def test_split_by_source_keeps_every_source_line_in_one_split(base, tmp_path, monkeypatch):
    """`--split_by source` through the command line: a file of 43 distinct source lines with 3
    targets each (129 examples). By source: int(0.2 * 43) = 8 held out, int(8 * 0.75) = 6 test,
    so lines 35/2/6 -> examples 105/6/18. By example it would be int(0.2 * 129) = 25 held out,
    int(25 * 0.75) = 18 test: 104/7/18. No source sequence is fed in two splits."""
    rows = []
    for i in range(43):  # line i: cycle start i % 30, i // 30 padding zeros: all 43 sources distinct
        start, pad = i % NUM_ITEMS, i // NUM_ITEMS
        ks = [(start + j) % NUM_ITEMS for j in range(SEQ_LEN - pad)]
        targets = [raw_item((ks[-1] + d) % NUM_ITEMS) for d in (1, 2, 3)]
        rows.append(",".join(map(str, [0] * pad + [raw_item(k) for k in ks])) + ",," + ",".join(map(str, targets)))
    assert len(set(r.partition(",,")[0] for r in rows)) == 43
    path = tmp_path / "three_targets.csv"
    path.write_text("\n".join(rows) + "\n")

    seen = {}
    real_train = cli.train

    def train(model, step, data, *a, **kw):
        for split, idx in data.splits.items():  # the sources the model is fed for each split
            src, _ = data.batch(np.asarray(idx), torch.device("cpu"))
            seen[split] = [tuple(r) for r in src.tolist()]
        return real_train(model, step, data, *a, **kw)

    monkeypatch.setattr(cli, "train", train)
    out = tmp_path / "task2"
    task_n(2, path, base["index"], base["pt"], out, "--split_by", "source", entry=2)
    summary = read_json(out.with_suffix(".json"))
    assert summary["task"]["split_by"] == "source"
    assert summary["task"]["split_sizes"] == {"train": 105, "valid": 6, "test": 18}
    assert {k: len(v) for k, v in seen.items()} == {"train": 105, "valid": 6, "test": 18}
    sets = {k: set(v) for k, v in seen.items()}
    assert len(sets["train"]) == 35 and len(sets["valid"]) == 2 and len(sets["test"]) == 6
    assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"] and not sets["valid"] & sets["test"]
    for split, sources in seen.items():  # each line's 3 examples together
        assert all(sources.count(s) == 3 for s in sets[split]), split


# ------------------------------------------------------------------ 3. --chunk_rows

class RowSpy:
    """Rows of every backbone pass that builds a graph (the training passes)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.rows: list[int] = []
        real = NextItNet.encode

        def encode(model, seqs, *a, **kw):
            if torch.is_grad_enabled():
                self.rows.append(len(seqs))
            return real(model, seqs, *a, **kw)

        mp.setattr(NextItNet, "encode", encode)


def assert_weights_close(a: Path, b: Path, task: int, lr: float = 1e-3) -> None:
    """Equal up to float32 rounding: rtol 1e-5, atol 1e-6 (weights near zero). The past tasks'
    heads (heads.0 .. heads.{task-2}) get atol lr / 10: they learn from retention alone, and at a
    task's first step the student is the teacher, so their gradient is rounding noise that Adam
    turns into steps of lr * g / (|g| + eps), eps 1e-8 (measured: up to 1.1e-5 at task 3);
    a wrong chunking would move them by about lr every step."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    past_heads = {f"heads.{i}.{p}" for i in range(task - 1) for p in ("weight", "bias")}
    for k in wa:
        atol = lr / 10 if k in past_heads else 1e-6
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_chunk_rows_gives_the_same_weights_as_one_pass_and_auto_runs(data, base, task2_run, tmp_path, monkeypatch):
    """`--chunk_rows 8` with retention (batch 16 plus at least 4 retention rows per past task,
    so 20-30 rows at task 2 and 24-44 at task 3, run in chunks of at most 8) ends 2 epochs of task 2 and of task 3
    with the weights of `--chunk_rows 0` (one pass) up to float rounding. `--chunk_rows -1`
    (auto) ran end to end in `task2_run`: 8 MiB // (8 positions * 8 channels * 4 bytes) = 32768.
    One thread: with two, the reductions of the two runs round differently and two epochs of Adam
    compound it past these tolerances; the claim is about chunking, not threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _chunk_rows_runs(data, base, task2_run, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _chunk_rows_runs(data, base, task2_run, tmp_path, monkeypatch) -> None:
    common = ("--min_retention_rows", "4")
    spies = {}
    for task, prev in ((2, base["pt"]), (3, tmp_path / "c0" / "task2.pt")):
        datapath = data["rank"] if task == 2 else data["classes"]
        for chunk in ("0", "8"):
            with monkeypatch.context() as mp:
                spies[task, chunk] = RowSpy(mp)
                task_n(task, datapath, base["index"], prev, tmp_path / f"c{chunk}" / f"task{task}", *common,
                       "--chunk_rows", chunk, entry=task, epochs=2)
        assert_weights_close(tmp_path / "c0" / f"task{task}.pt", tmp_path / "c8" / f"task{task}.pt", task)
        one, chunked = spies[task, "0"].rows, spies[task, "8"].rows
        # one pass holds every stacked row: the first step labels floor(0.9 * 16) = 14 rows per past
        # task (rho starts at 0.9), the later ones the 4 of --min_retention_rows (rho is small)
        assert max(one) == 16 + 14 * (task - 1) and one[1] == 16 + 4 * (task - 1)
        assert max(chunked) <= 8 and len(chunked) > 2 * len(one)  # it really ran in chunks
        s0 = read_json(tmp_path / "c0" / f"task{task}.json")
        s8 = read_json(tmp_path / "c8" / f"task{task}.json")
        assert s8["args"]["chunk_rows"] == 8 and s0["args"]["chunk_rows"] == 0
        np.testing.assert_allclose([e["train_loss"] for e in s8["epochs"]], [e["train_loss"] for e in s0["epochs"]],
                                   rtol=1e-5)
    auto = read_json(task2_run["out"].with_suffix(".json"))
    assert auto["finished"] is True and auto["args"]["chunk_rows"] == (8 << 20) // (SEQ_LEN * 8 * 4) == 32768
    assert all(math.isfinite(v) for v in auto["test"].values())


# ------------------------------------------------------------------ 4. --accept_unfinished

def test_accept_unfinished_required_for_an_unfinished_previous_task(data, base, tmp_path, caplog):
    """A task-1 checkpoint whose PREFIX.json says finished: false is refused by task 2 with the
    full message of checkpoint.require_finished, nothing written; with --accept_unfinished the
    run goes ahead and logs a warning."""
    folder = tmp_path / "unfinished"
    folder.mkdir()
    for f in ("task1.pt", "index.json"):
        shutil.copyfile(base["dir"] / f, folder / f)
    summary = read_json(base["json"])
    summary["finished"] = False  # what a run killed after its first epoch leaves behind
    (folder / "task1.json").write_text(json.dumps(summary))
    ckpt, out = folder / "task1.pt", folder / "task2"
    with pytest.raises(UserError) as e:
        task_n(2, data["rank"], folder / "index.json", ckpt, out, entry=2)
    assert str(e.value) == (f"{ckpt}: its training run did not finish ({folder / 'task1.json'} says "
                            "finished: false); pass --accept_unfinished to use it anyway")
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "task1.json", "task1.pt"]

    with caplog.at_level(logging.WARNING, logger="teracon"):
        task_n(2, data["rank"], folder / "index.json", ckpt, out, "--accept_unfinished", entry=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{ckpt}: its training run did not finish; used anyway (--accept_unfinished)" in warnings
    assert read_json(out.with_suffix(".json"))["finished"] is True and out.with_suffix(".pt").is_file()


# ------------------------------------------------------------------ 5. inputs untouched

def test_a_run_never_modifies_the_checkpoint_it_starts_from(task2_run):
    """After a successful task-2 run, the task-1 .pt, its .json, the item index and the task
    file are byte for byte what they were before."""
    assert read_json(task2_run["out"].with_suffix(".json"))["finished"] is True
    assert len(task2_run["before"]) == 4
    assert task2_run["after"] == task2_run["before"]


# ------------------------------------------------------------------ 6. --task N

def test_task_beyond_six_needs_a_data_file_and_the_generic_entry_point_trains(data, base, task2_run, tmp_path,
                                                                            monkeypatch):
    """`train_teracon.py --task 7` without --datapath/--dataset: one UserError saying TTL has
    tasks 1-6 only, nothing written. `--task 2` through the generic entry point trains task 2
    with exactly the weights of `train_teracon_t2.py` (same flags, same seed, same process)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        cli.main(["--task", "7", "--device", "cpu"], task=None)
    assert str(e.value) == "--task 7: give --datapath or --dataset (TTL has tasks 1-6 only)"
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "generic" / "task2"
    summary = task_n(2, data["rank"], base["index"], base["pt"], out, entry=None)
    assert summary["finished"] is True
    saved = read_json(out.with_suffix(".json"))
    assert saved["task"]["task"] == 2 and saved["args"]["task"] == 2
    assert len(torch.load(out.with_suffix(".pt"), map_location="cpu", weights_only=True)["tasks"]) == 2
    a, b = weights(task2_run["out"].with_suffix(".pt")), weights(out.with_suffix(".pt"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# ------------------------------------------------------------------ 7. bf16

def test_bf16_runs_tasks_1_and_2_end_to_end(data, base, tmp_path):
    """`--amp bf16`: task 1 and task 2 complete with finite metrics, recorded as bf16; bf16 is in
    effect (task 1's weights are not the fp32 run's, same seed and data), and task 1's epoch-1
    training loss is within 1% (relative) of the fp32 run's. Why 1%: bf16 keeps 8 bits of
    mantissa (relative rounding 2**-9, about 0.2%, per operand) while the sums, the log-sum-exp
    and the masks stay fp32; in this tiny model's first epoch the logits are still small, so the
    mean loss sits near ln 31 = 3.4 and moves far less than one rounding step (measured: 1.5e-6
    relative on an AVX512-BF16 CPU). 1% keeps a wide margin for other CPUs' bf16 kernels and
    still fails a loss computed wrongly under autocast (a skipped term, a different scale)."""
    folder = tmp_path / "bf16"
    s1 = cli.main(["--datapath", str(data["t1"]), "--datapath_index", str(folder / "index.json"),
                   "--savepath", str(folder / "task1"), "--epochs", "1", "--batch", "16", "--amp", "bf16", *TINY],
                  task=1)
    s2 = task_n(2, data["rank"], folder / "index.json", folder / "task1.pt", folder / "task2", "--amp", "bf16",
                entry=2)
    for t, s in ((1, s1), (2, s2)):
        saved = read_json(folder / f"task{t}.json")
        assert saved["finished"] is True and saved["precision"]["amp"] == "bf16"
        assert saved["precision"]["autocast_dtype"] == "bfloat16"
        values = [e["train_loss"] for e in saved["epochs"]] + [v for e in saved["epochs"] for v in e["valid"].values()]
        values += list(saved["test"].values())
        assert values and all(math.isfinite(v) for v in values), (t, values)
    fp32 = read_json(base["json"])
    assert fp32["precision"]["amp"] == "fp32"
    loss32, loss16 = fp32["epochs"][0]["train_loss"], read_json(folder / "task1.json")["epochs"][0]["train_loss"]
    assert loss16 == pytest.approx(loss32, rel=0.01)
    w32, w16 = weights(base["pt"]), weights(folder / "task1.pt")
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # --amp bf16 changed the computation


# ------------------------------------------------------------------ 8. ml-100k protocol counts

ML100K = {1: ("watch", 3898, 3898, 1575, "ranking"), 2: ("next_watch", 3434, 6787, 1224, "ranking"),
          3: ("like", 3103, 5815, 1109, "ranking"), 4: ("genre", 3434, 3434, 14, "accuracy"),
          5: ("liked", 3412, 3412, 2, "accuracy"), 6: ("decade", 3412, 3412, 8, "accuracy")}


def test_readme_protocol_table_states_the_ml100k_counts():
    """The README's ml-100k protocol table (rows `| 1 | watch ...` to `| 6 | decade ...`) states
    these lines / examples / classes / metric per task."""
    text = (ROOT / "README.md").read_text()
    found = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*([1-6])\s*\|\s*(\w+):[^|]*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|", line)
        if m and m.group(2) == ML100K[int(m.group(1))][0]:
            found[int(m.group(1))] = (m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5)), m.group(6))
    assert found == ML100K


def test_prepared_ml100k_files_have_the_readme_counts():
    """Data/ml-100k as prepare_data.py writes it has the protocol's counts, counted from the task
    files here: lines; examples (targets after ',,'; task 1: one per line); classes (task 1: the
    distinct non-zero items plus the padding class 0; later tasks: distinct targets); and the
    manifest says the same classes and metric."""
    manifest_path = ROOT / "Data" / "ml-100k" / "tasks.json"
    if not manifest_path.is_file():
        pytest.skip("Data/ml-100k is not prepared here (run `python prepare_data.py ml-100k`; tests never download)")
    manifest = read_json(manifest_path)
    entries = {int(t["task"]): t for t in manifest["tasks"]}
    assert sorted(entries) == [1, 2, 3, 4, 5, 6]
    for task, (name, lines, examples, classes, metric) in ML100K.items():
        entry = entries[task]
        assert (entry["name"], entry["num_classes"], entry["metric"]) == (name, classes, metric)
        rows = (manifest_path.parent / entry["file"]).read_text().splitlines()
        if task == 1:
            items = {int(x) for row in rows for x in row.split(",")} - {0}
            got = (len(rows), len(rows), len(items) + 1)
        else:
            targets = [int(x) for row in rows for x in row.partition(",,")[2].split(",")]
            got = (len(rows), len(targets), len(set(targets)))
        assert got == (lines, examples, classes), (task, name)


# ------------------------------------------------------------------ 9. the forgetting plot

def _plot_run(folder: Path, after: list[list[float]]) -> None:
    """A run folder as reproduce.py leaves it: task1.pt, task2.pt, task3.pt (only the last is
    read when matrix.json covers them all) and matrix.json with every task's metric after each."""
    folder.mkdir()
    kinds = [("t_a", "ranking", "mrr@5"), ("t_b", "ranking", "mrr@5"), ("t_c", "accuracy", "accuracy")]
    torch.manual_seed(0)
    model = NextItNet(12, [12, 12, 3], channels=8, dilations=(1,))
    items = np.arange(1, 12)
    tasks = [{"task": t, "name": name, "file": f"{name}.csv", "file_sha256": "0" * 64, "num_classes": size,
              "metric": kind, "seed": 0, "split_by": "example"}
             for t, ((name, kind, _), size) in enumerate(zip(kinds, (12, 12, 3)), 1)]
    for t in (1, 2):
        (folder / f"task{t}.pt").write_bytes(b"")
    checkpoint.save_checkpoint(folder / "task3.pt", method="teracon", model=model, tasks=tasks, items=items,
                               args={"smax": 50.0}, extras={})
    rows = [[{"task": j + 1, "name": kinds[j][0], "metric": kinds[j][1], "now": {kinds[j][2]: v}}
             for j, v in enumerate(row)] for row in after]
    (folder / "matrix.json").write_text(json.dumps({"after": rows}))


def test_forgetting_plot_shows_the_relative_forgetting_matrix(tmp_path, monkeypatch):
    """plot_tasks draws, from a hand-made matrix.json, the matrix R[i][j] / R[j][j]: after task
    1 T_a 0.04; after task 2 T_a 0.03, T_b 0.02; after task 3 T_a 0.05, T_b 0.01, T_c 0.50 ->
    [[1, -, -], [0.75, 1, -], [1.25, 0.5, 1]]; colours span 1 -+ 0.5 (the largest |R - 1|), each
    cell writes the relative value and the raw one. Another matrix draws other pixels."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    import matplotlib.image as mpimg

    captured = []
    real_savefig = Figure.savefig

    def savefig(fig, *a, **kw):
        ax = fig.axes[0]
        captured.append({"title": ax.get_title(), "image": np.ma.filled(ax.images[0].get_array().astype(float), np.nan),
                         "clim": ax.images[0].get_clim(), "texts": [t.get_text() for t in ax.texts]})
        return real_savefig(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    first = tmp_path / "first"
    _plot_run(first, [[0.04], [0.03, 0.02], [0.05, 0.01, 0.50]])
    plot_tasks.main(["--run", str(first), "--device", "cpu"])
    [forgetting] = [c for c in captured if c["title"].startswith("forgetting")]
    nan = np.nan
    want = np.array([[1.0, nan, nan], [0.75, 1.0, nan], [1.25, 0.5, 1.0]])
    np.testing.assert_allclose(forgetting["image"], want, rtol=1e-12)  # NaN where NaN
    assert forgetting["clim"] == pytest.approx((0.5, 1.5))
    assert forgetting["texts"] == ["1.00\n(0.0400)", "0.75\n(0.0300)", "1.00\n(0.0200)",
                                   "1.25\n(0.0500)", "0.50\n(0.0100)", "1.00\n(0.5000)"]

    second = tmp_path / "second"  # T_a kept after task 3 instead of improving
    _plot_run(second, [[0.04], [0.03, 0.02], [0.04, 0.01, 0.50]])
    plot_tasks.main(["--run", str(second), "--device", "cpu"])
    a, b = mpimg.imread(first / "forgetting.png"), mpimg.imread(second / "forgetting.png")
    assert a.shape == b.shape and not np.array_equal(a, b)


# ------------------------------------------- the authors' batching (--drop_last, --select_on)

def authors_get_batch_sizes(n: int, batch: int) -> list[int]:
    """The sizes the authors' `getBatch` yields, by its rule: a batch [start, end) while end < n."""
    sizes, start, end = [], 0, batch
    while end < n:
        sizes.append(batch)
        start, end = end, end + batch
    return sizes


@pytest.mark.parametrize("n, batch", [(10, 4), (8, 4), (4, 4), (3, 4), (1025, 1024), (2048, 1024)])
def test_drop_last_yields_the_authors_batches(n, batch):
    """--drop_last keeps exactly the batches of the authors' `while end < len` batcher: 10 rows
    at batch 4 give 2 batches (the partial one dropped), 8 rows give 1 (the last full one
    dropped too), 4 or fewer rows give none."""
    import data_loader as dl
    got = list(dl.batches(np.arange(n), batch, np.random.default_rng(0), drop_last=True))
    assert [len(b) for b in got] == authors_get_batch_sizes(n, batch)
    assert len(np.unique(np.concatenate(got + [np.zeros(0, int)]))) == sum(len(b) for b in got)
    assert [len(b) for b in dl.batches(np.arange(n), batch)][-1] == n - batch * ((n - 1) // batch)


def test_drop_last_run_trains_one_batch_fewer_per_epoch(data, base, tmp_path):
    """Task 2 on 80 training examples at batch 16: 5 steps an epoch by default, 4 with
    --drop_last (80 = 5 x 16: the authors' batcher drops the last full batch too)."""
    kept = task_n(2, data["rank"], base["index"], base["pt"], tmp_path / "all", entry=2)
    dropped = task_n(2, data["rank"], base["index"], base["pt"], tmp_path / "drop", "--drop_last", entry=2)
    assert read_json(tmp_path / "all.json")["task"]["split_sizes"]["train"] == 80
    assert [e["timing"]["steps"] for e in kept["epochs"]] == [5]
    assert [e["timing"]["steps"] for e in dropped["epochs"]] == [4]
    assert read_json(tmp_path / "drop.json")["args"]["drop_last"] is True


def test_select_on_random_batches_is_a_fresh_subset_of_full_batches():
    """The authors' selection subset: 50 validation examples at batch 16 -> 3 full batches (48
    rows, end 48 < 50), distinct rows of the split; another epoch draws another subset, the same
    epoch and seed the same one; 48 examples give 2 batches (32 rows)."""
    class Split:
        def __init__(self, n, task=2):
            self.task, self.splits = task, {"valid": np.arange(1000, 1000 + n)}

    config = trainer.TrainConfig(lr=1e-3, batch=16, epochs=1, seed=3, select_on="random_batches")
    rows1, rows2 = trainer.validation_rows(Split(50), config, 1), trainer.validation_rows(Split(50), config, 2)
    assert len(rows1) == 48 and len(set(rows1.tolist())) == 48 and set(rows1.tolist()) <= set(range(1000, 1050))
    assert not np.array_equal(rows1, rows2)
    assert np.array_equal(rows1, trainer.validation_rows(Split(50), config, 1))
    assert len(trainer.validation_rows(Split(48), config, 1)) == 32
    assert trainer.validation_rows(Split(50), trainer.TrainConfig(lr=1e-3, batch=16, epochs=1), 1) is None
    # the authors' task-1 script evaluates in batches of 512, whatever --batch: 2 batches
    assert len(trainer.validation_rows(Split(1100, task=1), config, 1)) == 1024


def test_select_on_random_batches_with_a_small_validation_split_is_one_error(data, base, tmp_path):
    """A validation split of 5 examples has no batch of 16 inside it: the run stops before it
    writes anything, with an error naming the file, the flag and the sizes."""
    with pytest.raises(UserError, match=r"t2\.csv: --select_on random_batches .* valid split, and its 5 "
                                        r"examples are not more than one batch \(16\)"):
        task_n(2, data["rank"], base["index"], base["pt"], tmp_path / "t2", "--select_on", "random_batches", entry=2)
    assert list(tmp_path.iterdir()) == []
