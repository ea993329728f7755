"""Issue 11: NaN models never score, flags are finite, outputs never overwrite inputs, hostile
files give one short error line, killed writes leave nothing behind, unfinished runs are refused."""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import helpers
import data_loader as dl
import evaluate
import utils
from utils import UserError

HUGE = "7" * 200_000  # a 200,000-digit token


# ----------------------------------------------------------------------- NaN never scores

def test_rank_of_target_finite_scores_unchanged():
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    assert utils.rank_of_target(logits, torch.tensor([0, 1])).tolist() == [0, 2]


def test_rank_of_target_nan_of_other_classes_does_not_beat_the_target():
    logits = torch.tensor([[1.0, math.nan, 0.5, math.nan]])
    assert utils.rank_of_target(logits, torch.tensor([2])).tolist() == [1]
    assert utils.rank_of_target(logits, torch.tensor([0])).tolist() == [0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rank_of_target_non_finite_target_ranks_last(bad):
    logits = torch.tensor([[1.0, 2.0, bad], [0.0, 0.0, 0.0]])
    logits[1, 2] = bad
    assert utils.rank_of_target(logits, torch.tensor([2, 2])).tolist() == [3, 3]


def test_an_all_nan_model_scores_zero():
    logits = torch.full((4, 25), math.nan)
    ranks = utils.rank_of_target(logits, torch.tensor([0, 1, 2, 3]))
    metrics = utils.metrics_from_ranks(ranks, "ranking")
    assert all(v == 0.0 for v in metrics.values()), metrics
    assert utils.metrics_from_ranks(utils.rank_of_target(logits[:, :3], torch.tensor([0, 1, 2, 0])),
                                    "accuracy")["accuracy"] == 0.0


def test_check_finite_model_passes_a_finite_model():
    utils.check_finite_model(torch.nn.Linear(3, 2), "task 2 epoch 1")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_check_finite_model_refuses_nan_or_inf(bad):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].bias[0] = bad
    with pytest.raises(UserError, match=r"^task 2 epoch 1: parameters became non-finite \(NaN or inf\), "
                                        r"first in 1\.bias; lower --lr$"):
        utils.check_finite_model(model, "task 2 epoch 1")


# ----------------------------------------------------------------------------- flag types

@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "1e400"])
def test_finite_float_refuses_non_finite_and_names_the_flag(text):
    with pytest.raises(UserError, match=rf"^--lr {text}: must be a finite number$"):
        utils.finite_float("--lr")(text)


def test_finite_float_bounds_and_garbage():
    assert utils.finite_float("--lr", positive=True)("1e-4") == 1e-4
    assert utils.finite_float("--alpha", nonnegative=True)("0") == 0.0
    with pytest.raises(UserError, match="^--smax 0: must be positive$"):
        utils.finite_float("--smax", positive=True)("0")
    with pytest.raises(UserError, match="^--alpha -0.5: must be non-negative$"):
        utils.finite_float("--alpha", nonnegative=True)("-0.5")
    with pytest.raises(UserError, match="^--mask_reg abc: not a number$"):
        utils.finite_float("--mask_reg")("abc")


def test_flag_types_raise_user_error_through_argparse():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=utils.finite_float("--lr"), default=1e-3)
    p.add_argument("--seed", type=utils.seed_int, default=0)
    assert p.parse_args([]).lr == 1e-3
    with pytest.raises(UserError, match="^--lr inf: must be a finite number$"):
        p.parse_args(["--lr", "inf"])
    with pytest.raises(UserError, match="^--seed -1: "):
        p.parse_args(["--seed", "-1"])


@pytest.mark.parametrize("text", ["-1", "4294967296", "1099511627776", "1.5", "abc", "", HUGE],
                         ids=["-1", "2**32", "2**40", "1.5", "abc", "empty", "huge"])
def test_seed_int_refuses_what_numpy_cannot_take(text):
    with pytest.raises(UserError, match="^--seed .*: must be an integer from 0 to 4294967295") as e:
        utils.seed_int(text)
    assert len(str(e.value)) < 300


def test_seed_int_accepts_the_whole_numpy_range():
    assert utils.seed_int("0") == 0 and utils.seed_int("4294967295") == 2**32 - 1
    np.random.RandomState(utils.seed_int("4294967295"))
    with pytest.raises(UserError, match="^--seeds -1: "):
        utils.seed_type("--seeds")("-1")


# -------------------------------------------------------------------- hostile input files

def test_item_index_with_a_huge_id_is_one_user_error(tmp_path):
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"items": [1, 2, 2**70]}))
    with pytest.raises(UserError, match=r"index.json: item id '1180591620717411303424' does not fit in 64 bits"):
        dl.load_item_index(path)


@pytest.mark.parametrize("items", [[1, 2.5], [1, "2"], [True, 2], "12", None])
def test_item_index_with_non_integer_ids_is_refused(tmp_path, items):
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"items": items}))
    with pytest.raises(UserError, match="index.json: not an item index"):
        dl.load_item_index(path)


def test_item_index_of_deeply_nested_brackets_is_one_user_error(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("[" * 200_000)
    with pytest.raises(UserError, match=r"index.json: not valid JSON \(nested too deeply\)"):
        dl.load_item_index(path)


def test_item_index_with_a_200000_digit_number_gives_a_short_error(tmp_path):
    path = tmp_path / "index.json"
    path.write_text('{"items": [' + HUGE + "]}")
    with pytest.raises(UserError, match="index.json: not valid JSON") as e:
        dl.load_item_index(path)
    assert len(str(e.value)) < 300


def test_a_directory_is_not_a_file(tmp_path):
    for read in (dl.read_sequence_file, dl.load_item_index, checkpoint.load_checkpoint,
                 lambda p: dl.load_task(2, p, np.array([1, 2]), seed=0)):
        with pytest.raises(UserError, match=f"^{tmp_path}: is a directory, not a file$"):
            read(tmp_path)


@pytest.mark.parametrize("content", [f"1,2,{HUGE}\n1,2,3\n", f"1,{HUGE},,5\n", f"1,2,,{HUGE}\n",
                                     f"1,2,,x{HUGE}\n"], ids=["task1", "source", "target", "x-target"])
def test_a_200000_digit_token_gives_an_error_line_under_300_characters(tmp_path, content):
    path = tmp_path / "t.csv"
    path.write_text(content)
    read = dl.read_sequence_file if ",," not in content else dl.read_task_file
    with pytest.raises(UserError, match=r"t.csv: line 1: .*'x?7777.*\.\.\. \(2000\d\d characters\)") as e:
        read(path)
    assert len(f"error: {e.value}") < 300


def test_a_task_with_one_class_is_refused(tmp_path):
    helpers.write_task1(tmp_path / "t1.csv")
    _, items = dl.load_task1(tmp_path / "t1.csv", seed=0)
    rows = [line.split(",,")[0] + ",,7" for line in
            helpers.write_task_classes(tmp_path / "t4.csv").read_text().splitlines()]
    (tmp_path / "t4.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"t4.csv: every example has the target 7: the task has only one class, "
                                        "nothing to learn"):
        dl.load_task(4, tmp_path / "t4.csv", items, seed=0)


def test_a_task1_file_of_one_item_is_refused(tmp_path):
    path = tmp_path / "t1.csv"
    path.write_text("0,5,5\n5,5,5\n")
    with pytest.raises(UserError, match="t1.csv: every item is 5: one item only, nothing to learn"):
        dl.load_task1(path, seed=0)


# --------------------------------------------------------------------------- checkpoints

def good_checkpoint() -> dict:
    task = {"task": 1, "name": "task1", "file": "t1.csv", "file_sha256": "0" * 64, "num_classes": 31,
            "metric": "ranking", "seed": 0, "split_by": "example", "split_sizes": {}, "test": None}
    return {"format": "teracon/1", "method": "teracon", "config": {}, "state_dict": {}, "tasks": [task],
            "item_index": {"checksum": "ab", "num_items": 31}, "args": {"smax": 50.0}}


def broken(change) -> dict:
    ckpt = good_checkpoint()
    change(ckpt)
    return ckpt


def test_a_well_formed_checkpoint_loads(tmp_path):
    torch.save(good_checkpoint(), tmp_path / "c.pt")
    assert checkpoint.load_checkpoint(tmp_path / "c.pt")["tasks"][0]["num_classes"] == 31


@pytest.mark.parametrize("change,problem", [
    (lambda c: c.update(tasks=5), "tasks is not a non-empty list"),
    (lambda c: c.update(tasks=[]), "tasks is not a non-empty list"),
    (lambda c: c.update(tasks=[5]), r"tasks\[0\] is a int, not a dict"),
    (lambda c: c["tasks"][0].pop("file_sha256"), r"tasks\[0\] has no file_sha256"),
    (lambda c: c["tasks"][0].update(num_classes="31"), r"tasks\[0\].num_classes is not a int"),
    (lambda c: c["tasks"][0].update(seed=True), r"tasks\[0\].seed is not a int"),
    (lambda c: c.update(item_index={}), "item_index has no checksum"),
    (lambda c: c["item_index"].update(checksum=5), "item_index.checksum is not a str"),
    (lambda c: c["item_index"].pop("num_items"), "item_index has no num_items"),
    (lambda c: c.update(item_index=[]), "item_index is a list, not a dict"),
    (lambda c: c.update(config=[1]), "config is a list, not a dict"),
    (lambda c: c.update(state_dict=3), "state_dict is a int, not a dict"),
    (lambda c: c.update(args={}), "args.smax is not a finite number"),
    (lambda c: c.update(args={"smax": "50"}), "args.smax is not a finite number"),
    (lambda c: c.update(args={"smax": math.inf}), "args.smax is not a finite number"),
    (lambda c: c.update(members=[5]), "members is not a list of"),
])
def test_checkpoint_with_a_wrong_nested_structure_is_refused(tmp_path, change, problem):
    torch.save(broken(change), tmp_path / "c.pt")
    with pytest.raises(UserError, match=rf"c.pt: not a TERACON checkpoint \({problem}"):
        checkpoint.load_checkpoint(tmp_path / "c.pt")


def test_require_finished(tmp_path, caplog):
    ckpt = tmp_path / "task2.pt"
    ckpt.write_bytes(b"x")
    checkpoint.require_finished(ckpt, False)  # no summary beside it: taken as it is
    (tmp_path / "task2.json").write_text(json.dumps({"finished": True}))
    checkpoint.require_finished(ckpt, False)
    (tmp_path / "task2.json").write_text(json.dumps({"finished": False}))
    expected = (f"{ckpt}: its training run did not finish ({tmp_path / 'task2.json'} says finished: false); "
                "pass --accept_unfinished to use it anyway")
    with pytest.raises(UserError) as e:
        checkpoint.require_finished(ckpt, False)
    assert str(e.value) == expected
    checkpoint.require_finished(ckpt, True)
    assert "did not finish; used anyway" in caplog.text


def test_evaluate_refuses_an_unfinished_checkpoint_unless_told(tmp_path):
    ckpt = tmp_path / "task2.pt"
    ckpt.write_bytes(b"not a checkpoint")
    (tmp_path / "task2.json").write_text(json.dumps({"finished": False}))
    with pytest.raises(UserError, match="did not finish.*--accept_unfinished"):
        evaluate.main(["--paths", str(ckpt)])
    with pytest.raises(UserError, match="task2.pt: not a readable checkpoint"):  # got past the check
        evaluate.main(["--paths", str(ckpt), "--accept_unfinished"])


# ----------------------------------------------------------------------- outputs vs inputs

def test_check_outputs_refuses_an_output_that_is_an_input(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("1,2\n")
    os.link(src, tmp_path / "hard.csv")
    for out in (src, tmp_path / "sub" / ".." / "d.csv", tmp_path / "hard.csv"):
        with pytest.raises(UserError, match=rf"^--datapath_index {out}: is the same file as --datapath {src}; "):
            utils.check_outputs({"--json": None, "--datapath_index": out}, {"--datapath": [src]})
    assert src.read_text() == "1,2\n"
    utils.check_outputs({"--datapath_index": tmp_path / "i.json"}, {"--datapath": src})


def test_check_outputs_refuses_unwritable_places_and_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=rf"--json {tmp_path}/f/a/b.json: cannot be written "
                                        rf"\({tmp_path}/f is a file, not a folder\)"):
        utils.check_outputs({"--json": tmp_path / "f" / "a" / "b.json"}, {})
    with pytest.raises(UserError, match=r"cannot be written \(is a directory, not a file\)"):
        utils.check_outputs({"--json": tmp_path}, {})
    utils.check_outputs({"--savepath": [tmp_path / "new" / "deeper" / "t.pt"]}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing created
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(UserError, match=rf"cannot be written \(folder {ro} is not writable\)"):
        utils.check_outputs({"--savepath": ro / "sub" / "task1.pt"}, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_check_outputs_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="is not writable"):
            utils.check_outputs({"--savepath": ro / "task1.pt"}, {})
    finally:
        ro.chmod(0o700)


def test_evaluate_json_over_its_inputs_is_refused(tmp_path):
    ckpt = tmp_path / "task1.pt"
    torch.save(good_checkpoint(), ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match="--json .*task1.pt: is the same file as --paths"):
        evaluate.main(["--paths", str(ckpt), "--json", str(ckpt)])
    with pytest.raises(UserError, match="--json .*task1.json: is the same file as the run summary of --paths"):
        evaluate.main(["--paths", str(ckpt), "--json", str(tmp_path / "task1.json")])
    assert ckpt.read_bytes() == before
    task_file = tmp_path / "t1.csv"
    task_file.write_text("1,2\n")
    ckpt_dict = good_checkpoint()
    ckpt_dict["tasks"][0]["file"] = str(task_file)
    torch.save(ckpt_dict, ckpt)
    with pytest.raises(UserError, match="--json .*t1.csv: is the same file as the task 1 file of --paths"):
        evaluate.main(["--paths", str(ckpt), "--json", str(task_file)])
    assert task_file.read_text() == "1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.csv", "task1.pt"]


def test_evaluate_json_below_a_file_is_one_error_line(tmp_path):
    """evaluate.py as `__main__` in this process (its run_cli; test_cli runs it in a new interpreter)."""
    (tmp_path / "f").write_text("x")
    code, out, err = helpers.run_script_in_process("evaluate.py", "--paths", tmp_path / "missing.pt",
                                                   "--json", tmp_path / "f" / "rows.json", cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: --json {tmp_path}/f/rows.json: cannot be written "
                                        f"({tmp_path}/f is a file, not a folder)"]


# --------------------------------------------------------------------- leftovers, run_cli

def test_atomic_write_removes_stale_temporary_files_of_that_output_only(tmp_path):
    stale = [tmp_path / ".out.json.abc_1234.tmp", tmp_path / ".out.json.zz99zz99.tmp"]
    kept = [tmp_path / ".other.json.abc_1234.tmp", tmp_path / ".out.json.abc_1234.tmp.keep",
            tmp_path / "out.json.abc_1234.tmp", tmp_path / ".out.json.toolongname.tmp",
            tmp_path / ".xout.json.abc_1234.tmp"]
    for p in stale + kept:
        p.write_text("leftover")
    (tmp_path / ".out.json.dir12345.tmp").mkdir()  # not a file: left alone
    utils.atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "leftover" for p in kept)
    assert (tmp_path / ".out.json.dir12345.tmp").is_dir()


def run_cli_main(raise_this):
    def main(argv):
        raise raise_this
    return main


@pytest.mark.parametrize("exc,line", [
    (PermissionError(13, "Permission denied", "/ro/task1.pt"), "error: /ro/task1.pt: Permission denied"),
    (FileExistsError(17, "File exists", "/f/sub"), "error: /f/sub: File exists"),
    (OSError(28, "No space left on device"), "error: No space left on device"),
])
def test_run_cli_turns_os_errors_into_one_line(capsys, exc, line):
    with pytest.raises(SystemExit) as e:
        utils.run_cli(run_cli_main(exc), [])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_run_cli_reports_a_real_write_below_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        utils.run_cli(lambda argv: utils.atomic_write_text(tmp_path / "f" / "sub" / "o.txt", "x"), [])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}/f") and "Traceback" not in err[0]


def test_run_cli_cuts_a_long_user_error(capsys):
    with pytest.raises(SystemExit):
        utils.run_cli(run_cli_main(UserError("x" * 100_000)), [])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and len(err[0]) < 560 and err[0].endswith("... (100000 characters)")
