"""End to end through the scripts (CPU, tiny synthetic data, a small model).

Sequence A: train_task1.py -> train_teracon_t2.py -> train_teracon_t3.py -> evaluate.py, each a
real subprocess (the one end-to-end run of each script through a new interpreter).
Sequence B: the same flags and seed in another folder, task 2 through the general entry point
`train_teracon.py --task 2`, each script run as `__main__` in this process
(`helpers.run_script_in_process`): its results must equal A's (determinism on CPU, across
processes, and the general entry point runs the same training). Both sequences use one CPU
thread (A: OMP_NUM_THREADS=1, B: torch.set_num_threads(1)): float reductions depend on the
thread count, and the claim is about seeds, not threads.

The bad-input cases run the scripts as `__main__` in this process too: `utils.run_cli`'s
`error:` line and exit status are the same code either way, and every script keeps one run in a
new interpreter (sequence A; `reproduce.py --max_epochs 0` here, an error line through a real
process; train_teracon.py in test_baselines' reproduce test; prepare_data.py in
test_prepare_data).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (file_hashes, run_script, run_script_in_process, write_task1, write_task_classes,
                     write_task_ranking)
import data_loader as dl

LINES = 80
FAST = ["--epochs", "2", "--batch", "32", "--eval_batch", "64", "--quiet", "--device", "cpu", "--seed", "0"]
SMALL = ["--channels", "16", "--dilations", "1", "2"]  # task 1's model; later tasks take the checkpoint's
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    files = {"t1": write_task1(d / "t1.csv", lines=LINES), "t2": write_task_ranking(d / "t2.csv", lines=LINES),
             "t3": write_task_classes(d / "t3.csv", lines=LINES)}
    # another task-1 file (other raw ids) and its item index
    other = d / "t1_other.csv"
    other.write_text("\n".join(",".join(str(5 + i + j) for j in range(8)) for i in range(20)) + "\n")
    dl.save_item_index(d / "other_index.json", dl.build_item_index(dl.read_sequence_file(other)), other)
    files["other_index"] = d / "other_index.json"
    files["dir"] = d
    return files


def run_sequence(data, out: Path, task2_script: str, task2_extra: tuple = (), evaluate: bool = True,
                 in_process: bool = False) -> dict:
    """Tasks 1-3 (and evaluate.py) in `out`, one thread: subprocesses, or (`in_process`) each
    script run as `__main__` in this process."""
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.json"
    res = {"dir": out, "index": index}
    if in_process:
        def run(script, *args, cwd):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return run_script_in_process(script, *args, cwd=cwd)
            finally:
                torch.set_num_threads(threads)
    else:
        def run(script, *args, cwd):
            return run_script(script, *args, cwd=cwd, env=ONE_THREAD)
    rc, so, se = run("train_task1.py", "--datapath", data["t1"], "--datapath_index", index,
                     "--savepath", out / "task1", *FAST, *SMALL, cwd=out)
    assert rc == 0, se
    rc, so, se = run(task2_script, *task2_extra, "--datapath", data["t2"], "--datapath_index", index,
                     "--savepath", out / "task2", "--paths", out / "task1.pt", *FAST, cwd=out)
    assert rc == 0, se
    rc, so, se = run("train_teracon_t3.py", "--datapath", data["t3"], "--datapath_index", index,
                     "--savepath", out / "task3", "--paths", out / "task2.pt", *FAST, cwd=out)
    assert rc == 0, se
    if evaluate:
        rc, so, se = run("evaluate.py", "--paths", out / "task3.pt", "--json", out / "eval.json",
                         "--device", "cpu", "--eval_batch", "64", cwd=out)
        assert rc == 0, se
        res["eval_stdout"] = so
        res["eval"] = json.loads((out / "eval.json").read_text())
    for t in (1, 2, 3):
        res[f"summary{t}"] = json.loads((out / f"task{t}.json").read_text())
    return res


@pytest.fixture(scope="module")
def seq_a(data, tmp_path_factory):
    return run_sequence(data, tmp_path_factory.mktemp("seq_a"), "train_teracon_t2.py")


@pytest.fixture(scope="module")
def seq_b(data, tmp_path_factory):
    return run_sequence(data, tmp_path_factory.mktemp("seq_b"), "train_teracon.py", ("--task", "2"), evaluate=False,
                        in_process=True)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ happy path

def test_sequence_writes_checkpoints_and_summaries(seq_a):
    """Tasks 1-3 write PREFIX.pt and PREFIX.json; a summary holds per-epoch train loss and
    valid metrics, the best epoch and the test metrics at that epoch; the checkpoint grows by
    one task and head each time; task 1 writes the JSON item index."""
    out = seq_a["dir"]
    index = json.loads(seq_a["index"].read_text())
    assert index["num_items"] == 31 and len(index["items"]) == 30
    kinds = {1: "ranking", 2: "ranking", 3: "accuracy"}
    for t in (1, 2, 3):
        assert (out / f"task{t}.pt").is_file()
        s = seq_a[f"summary{t}"]
        assert s["finished"] is True
        assert [e["epoch"] for e in s["epochs"]] == [1, 2]
        for e in s["epochs"]:
            assert np.isfinite(e["train_loss"]) and e["train_loss"] > 0
            assert "hit@1" in e["valid"]
            assert ("mrr@5" in e["valid"]) == (kinds[t] == "ranking")
            assert ("accuracy" in e["valid"]) == (kinds[t] == "accuracy")
        hits = [e["valid"]["hit@1"] for e in s["epochs"]]
        assert s["best_epoch"] == 1 + int(np.argmax(hits))
        assert s["valid"] == s["epochs"][s["best_epoch"] - 1]["valid"]
        assert set(s["test"]) == set(s["valid"])
        ckpt = load_ckpt(out / f"task{t}.pt")
        assert len(ckpt["tasks"]) == t and ckpt["config"]["num_items"] == 31
        assert len(ckpt["config"]["head_sizes"]) == t and ckpt["config"]["head_sizes"][0] == 31
        assert ckpt["tasks"][-1]["test"] == s["test"]
        assert ckpt["tasks"][-1]["metric"] == kinds[t]
        assert ckpt["item_index"]["checksum"] == index["checksum"]
    ckpt3 = load_ckpt(out / "task3.pt")
    assert ckpt3["config"]["head_sizes"][2] == 3
    assert ckpt3["state_dict"]["task_masks.relation_weight"].shape[-1] == 5
    # training does something: the task-1 loss falls from epoch 1 to epoch 2
    losses = [e["train_loss"] for e in seq_a["summary1"]["epochs"]]
    assert losses[1] < losses[0]


def test_evaluate_reports_all_tasks_and_matches_best_epoch_test(seq_a):
    """evaluate.py --json reports tasks 1-3 of the final checkpoint; for the last task it
    reproduces the test metrics recorded at its best epoch (the checkpoint is that epoch's)."""
    rows = seq_a["eval"]["rows"]
    assert [r["task"] for r in rows] == [1, 2, 3]
    assert [r["metric"] for r in rows] == ["ranking", "ranking", "accuracy"]
    for r, t in zip(rows, (1, 2, 3)):
        assert r["after_training"] == seq_a[f"summary{t}"]["test"]
        assert set(r["now"]) == set(r["after_training"])
    assert rows[2]["now"] == pytest.approx(seq_a["summary3"]["test"], abs=1e-12)
    assert len([ln for ln in seq_a["eval_stdout"].splitlines() if ln.strip()]) == 4  # header + 3 tasks


def test_same_seed_gives_identical_metrics_and_general_entry_point(seq_a, seq_b):
    """Running the sequence again with the same seed (task 2 via `train_teracon.py --task 2`,
    in this process rather than in new ones) gives identical per-epoch losses, validation and
    test metrics on CPU."""
    for t in (1, 2, 3):
        a, b = seq_a[f"summary{t}"], seq_b[f"summary{t}"]
        assert b["task"]["task"] == t and b["task"]["num_classes"] == a["task"]["num_classes"]
        assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
        assert [e["valid"] for e in a["epochs"]] == [e["valid"] for e in b["epochs"]]
        assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


@pytest.mark.parametrize("task", [1, 2, 3])
def test_same_seed_gives_bit_identical_weights(seq_a, seq_b, task):
    """Same seed, same data, CPU: every saved weight of every task is bit-identical between
    the two runs (metrics on tiny data can hide small run-to-run drift; weights cannot)."""
    sa = load_ckpt(seq_a["dir"] / f"task{task}.pt")["state_dict"]
    sb = load_ckpt(seq_b["dir"] / f"task{task}.pt")["state_dict"]
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------ bad input

def assert_user_error(rc: int, stderr: str, *needles: str) -> str:
    """Exit 2, exactly one stderr line, starting with `error:`, no traceback, naming `needles`."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]
    return lines[0]


def bad_cases(data, out) -> dict:
    """case -> (script, arguments, strings the error line must contain); outputs go to the
    existing prefixes of sequence A, so any write would change a file."""
    d = data["dir"]
    bad3 = d / "t3_bad.csv"
    lines = data["t3"].read_text().splitlines()
    lines[6] = lines[6].replace(",,", ",x,,", 1)  # a non-integer token on line 7
    bad3.write_text("\n".join(lines) + "\n")
    bad1 = d / "t1_bad.csv"
    lines = data["t1"].read_text().splitlines()
    lines[4] = lines[4] + ",17"  # line 5 is one item longer than the others
    bad1.write_text("\n".join(lines) + "\n")
    idx = out / "index.json"

    def t3(datapath=data["t3"], index=idx, paths=out / "task2.pt", *extra):
        return ["--datapath", datapath, "--datapath_index", index, "--savepath", out / "task3",
                "--paths", paths, *FAST, *extra]
    return {
        "checkpoint_of_wrong_task_count": ("train_teracon_t3.py", t3(paths=out / "task1.pt"), [out / "task1.pt"]),
        "item_index_of_other_task1_file": ("train_teracon_t3.py", t3(index=data["other_index"]),
                                           [data["other_index"]]),
        "missing_data_file": ("train_teracon_t3.py", t3(datapath=d / "missing.csv"), [d / "missing.csv"]),
        "malformed_task3_line": ("train_teracon_t3.py", t3(datapath=bad3), [bad3, "line 7"]),
        "malformed_task1_line": ("train_task1.py", ["--datapath", bad1, "--datapath_index", idx,
                                 "--savepath", out / "task1", *FAST], [bad1, "line 5"]),
        "device_cuda": ("train_teracon_t3.py", t3(data["t3"], idx, out / "task2.pt", "--device", "cuda"), ["cuda"]),
        "evaluate_device_cuda": ("evaluate.py", ["--paths", out / "task3.pt", "--device", "cuda"], ["cuda"]),
        "savepath_is_paths_prefix": ("train_teracon_t2.py", ["--datapath", data["t2"], "--datapath_index", idx,
                                     "--savepath", out / "task1", "--paths", out / "task1.pt", *FAST],
                                     ["--savepath"]),
        # issue 11: flags that name themselves, outputs over inputs, folders that cannot be written
        "lr_inf": ("train_task1.py", ["--datapath", data["t1"], "--datapath_index", idx, "--savepath",
                   out / "task1", *FAST, "--lr", "inf"], ["--lr inf: must be a finite number"]),
        "smax_nan": ("train_teracon_t3.py", t3(data["t3"], idx, out / "task2.pt", "--smax", "nan"), ["--smax nan"]),
        "alpha_inf": ("train_teracon_t3.py", t3(data["t3"], idx, out / "task2.pt", "--alpha", "inf"), ["--alpha inf"]),
        "seed_negative": ("train_teracon_t3.py", t3(data["t3"], idx, out / "task2.pt", "--seed", "-1"), ["--seed -1"]),
        "seed_too_large": ("train_task1.py", ["--datapath", data["t1"], "--datapath_index", idx, "--savepath",
                           out / "task1", *FAST, "--seed", "1099511627776"], ["--seed 1099511627776"]),
        "summary_over_item_index": ("train_teracon_t3.py", ["--datapath", data["t3"], "--datapath_index", idx,
                                    "--savepath", out / "index", "--paths", out / "task2.pt", *FAST],
                                    ["--savepath", "index.json", "--datapath_index"]),
        "item_index_over_task_file": ("train_task1.py", ["--datapath", data["t1"], "--datapath_index", data["t1"],
                                      "--savepath", out / "task1", *FAST], ["--datapath_index", "--datapath"]),
        "savepath_below_a_file": ("train_teracon_t3.py", ["--datapath", data["t3"], "--datapath_index", idx,
                                  "--savepath", out / "task2.pt" / "task3", "--paths", out / "task2.pt", *FAST],
                                  ["--savepath", "is a file, not a folder"]),
        "unfinished_previous_run": ("train_teracon_t3.py", t3(paths=out / "unfinished.pt"),
                                    ["unfinished.pt", "did not finish", "--accept_unfinished"]),
        "evaluate_json_over_checkpoint": ("evaluate.py", ["--paths", out / "task3.pt", "--json", out / "task3.pt"],
                                          ["--json", "--paths"]),
    }


BAD = ["checkpoint_of_wrong_task_count", "item_index_of_other_task1_file", "missing_data_file",
       "malformed_task3_line", "malformed_task1_line", "device_cuda", "evaluate_device_cuda",
       "savepath_is_paths_prefix", "lr_inf", "smax_nan", "alpha_inf", "seed_negative", "seed_too_large",
       "summary_over_item_index", "item_index_over_task_file", "savepath_below_a_file", "unfinished_previous_run",
       "evaluate_json_over_checkpoint"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_leaves_files_untouched(seq_a, data, case):
    """Wrong checkpoint, other item index, missing or malformed data, absent CUDA, --savepath
    equal to the --paths prefix: exit 2, one `error:` line naming the problem, no traceback,
    and every earlier checkpoint, summary and the index byte-identical (nothing new written)."""
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    out = seq_a["dir"]
    if case == "unfinished_previous_run" and not (out / "unfinished.pt").exists():
        # a task-2 checkpoint whose run summary says the run was killed before it finished
        (out / "unfinished.pt").write_bytes((out / "task2.pt").read_bytes())
        summary = json.loads((out / "task2.json").read_text())
        (out / "unfinished.json").write_text(json.dumps(dict(summary, finished=False)))
    script, args, needles = bad_cases(data, out)[case]
    before = file_hashes(out)
    assert {"task1.pt", "task1.json", "task2.pt", "task3.pt", "index.json"} <= set(before)
    rc, so, se = run_script_in_process(script, *args, cwd=out)
    assert_user_error(rc, se, *needles)
    assert file_hashes(out) == before


def test_too_few_examples_error_states_a_sufficient_minimum(tmp_path):
    """A file with too few examples for the 80/5/15 split is refused (exit 2, error line naming
    the file); a file with as many examples as the message asks for then trains."""
    small = write_task1(tmp_path / "small.csv", lines=4)
    rc, so, se = run_script_in_process("train_task1.py", "--datapath", small, "--datapath_index", tmp_path / "i.json",
                                       "--savepath", tmp_path / "task1", *FAST, *SMALL, cwd=tmp_path)
    last = se.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error:") and "Traceback" not in se and str(small) in last
    assert not (tmp_path / "task1.pt").exists()
    m = re.search(r"at least (\d+)", last)
    assert m, last
    need = int(m.group(1))
    enough = write_task1(tmp_path / "enough.csv", lines=need)
    rc, so, se = run_script_in_process("train_task1.py", "--datapath", enough, "--datapath_index",
                                       tmp_path / "i.json", "--savepath", tmp_path / "task1", *FAST, *SMALL,
                                       "--epochs", "1", cwd=tmp_path)
    assert rc == 0, f"{need} examples, as the error asked, are refused: {se.strip().splitlines()[-1]}"


def test_a_diverging_run_is_an_error_not_a_score(tmp_path):
    """--lr 1e30 drives the weights to inf/NaN: training ends with one error line naming the
    epoch, never with a finished run whose NaN scores would count as hits (a checkpoint of an
    earlier, finite epoch stays marked unfinished, so the next task refuses it)."""
    t1 = write_task1(tmp_path / "t1.csv", lines=60)
    rc, so, se = run_script_in_process("train_task1.py", "--datapath", t1, "--datapath_index", tmp_path / "i.json",
                                       "--savepath", tmp_path / "task1", *FAST, *SMALL, "--lr", "1e30", "--epochs", "2",
                                       cwd=tmp_path)
    line = se.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in se, se
    assert re.match(r"error: task 1 epoch \d+: .*non-finite", line), line
    if (tmp_path / "task1.pt").exists():
        assert json.loads((tmp_path / "task1.json").read_text())["finished"] is False


@pytest.mark.parametrize("runner, args, needle", [
    (run_script, ["--max_epochs", "0"], "--max_epochs 0: must be an integer of at least 1"),  # a real process
    (run_script_in_process, ["--max_epochs", "-1"], "--max_epochs -1"),
    (run_script_in_process, ["--seeds", "0", "-1"], "--seeds -1")], ids=["max_epochs_0", "max_epochs_-1", "seeds_-1"])
def test_reproduce_flags_name_themselves(tmp_path, runner, args, needle):
    rc, so, se = runner("reproduce.py", "--out", tmp_path, *args, cwd=tmp_path)
    assert_user_error(rc, se, needle)
    assert list(tmp_path.iterdir()) == []
