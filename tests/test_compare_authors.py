"""compare_authors.py (issue 22): its statistics on hand-computed numbers, its reading of the
authors' printed metrics, and its one-line errors. No authors' checkout needed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import compare_authors as ca
from utils import run_cli

# What the authors' scripts print (utils.INFO_LOG lines and prints of train_teracon.py and
# utils.model_test), captured from a run: a validation block, then the test at the best epoch.
AUTHORS_STDOUT = """\
[2026-12-02 01:00:00]-------------------------------------------------------train
[2026-12-02 01:00:00]epoch: 0	 0/21.46
Transfer Loss: 0.012
Loss: 6.192 | Acc(hit@1): 0.000% (0/1024)
[2026-12-02 01:00:09]-------------------------------------------------------valid
Acc(hit@1): 5.566% (57/1024)
[2026-12-02 01:00:09]Accuracy mrr_5: 0.11
[2026-12-02 01:00:09]Accuracy mrr_20: 0.12
[2026-12-02 01:00:09]Accuracy hit_5: 0.2
[2026-12-02 01:00:09]Accuracy hit_20: 0.3
[2026-12-02 01:00:09]Accuracy ndcg_5: 0.13
[2026-12-02 01:00:09]Accuracy ndcg_20: 0.14
-----testing in best validation-----
[2026-12-02 01:00:09]-------------------------------------------------------test
epoch:0    accuracy(hit@1):5.542    best:5.542
[2026-12-02 01:00:10]epoch: 0	 total_epoch:3	 total_batches:4.025390625
[2026-12-02 01:00:10]Accuracy mrr_5: 0.1234
[2026-12-02 01:00:10]Accuracy mrr_20: 0.15
[2026-12-02 01:00:10]Accuracy hit_5: 0.25
[2026-12-02 01:00:10]Accuracy hit_20: 0.5
[2026-12-02 01:00:10]Accuracy ndcg_5: 0.16
[2026-12-02 01:00:10]Accuracy ndcg_20: 0.2
count 0
[2026-12-02 01:00:10]TIME FOR EPOCH During Training: 0.9
"""

# utils.model_test_acc (a task of 20 classes or fewer): the task number, then accuracy only.
AUTHORS_ACC_STDOUT = """\
[2026-12-02 01:00:00]-------------------------------------------------------valid
Acc(hit@1): 70.000% (716/1024)
-----testing in best validation-----
2
[2026-12-02 01:00:01]-------------------------------------------------------test
epoch:0    accuracy(hit@1):73.242    best:73.242
[2026-12-02 01:00:01]epoch: 0	 total_epoch:3	 total_batches:3.22265625
"""


def test_summarise_means_sd_and_d_by_hand():
    ours = {0: 1.0, 1: 2.0, 2: 3.0}        # mean 2, sd 1
    theirs = {0: 2.0, 1: 4.0, 2: 6.0}      # mean 4, sd 2
    s = ca.summarise(ours, theirs)
    assert s["ours_mean"] == 2.0 and s["theirs_mean"] == 4.0
    assert s["ours_sd"] == pytest.approx(1.0) and s["theirs_sd"] == pytest.approx(2.0)
    assert s["diff"] == -2.0
    pooled = math.sqrt((2 * 1.0 + 2 * 4.0) / 4)  # sqrt(2.5)
    assert s["pooled_sd"] == pytest.approx(pooled)
    assert s["d"] == pytest.approx(-2.0 / pooled)
    assert s["per_seed"] == {0: -1.0, 1: -2.0, 2: -3.0} and s["lower"] == 3


def test_summarise_unequal_seeds_pairs_only_common_ones():
    s = ca.summarise({0: 0.5, 1: 0.7, 2: 0.6, 3: 0.6}, {1: 0.6, 2: 0.6})
    assert s["n_ours"] == 4 and s["n_theirs"] == 2
    assert s["per_seed"] == pytest.approx({1: 0.1, 2: 0.0})
    assert s["lower"] == 0
    # pooled sd: ours sd^2 = 0.02/3, theirs 0: sqrt((3 * 0.02/3 + 0) / 4)
    assert s["pooled_sd"] == pytest.approx(math.sqrt(0.02 / 4))


def test_parse_authors_ranking_output_takes_test_blocks_not_validation():
    blocks = ca.parse_authors_tests(AUTHORS_STDOUT)
    assert len(blocks) == 1
    assert blocks[0] == {"hit@1": pytest.approx(0.05542), "accuracy": pytest.approx(0.05542), "epoch": 1,
                         "mrr@5": 0.1234,
                         "mrr@20": 0.15, "hr@5": 0.25, "hr@20": 0.5, "ndcg@5": 0.16, "ndcg@20": 0.2}
    assert ca.cell_values(ca.last_test(AUTHORS_STDOUT, "task 2"), 2) == {"mrr@5": 0.1234, "hr@5": 0.25,
                                                                        "ndcg@5": 0.16}


def test_parse_authors_last_test_block_is_the_best_epoch():
    second = AUTHORS_STDOUT.replace("0.1234", "0.2").replace("epoch:0    accuracy(hit@1):5.542",
                                                             "epoch:2    accuracy(hit@1):6.0")
    best = ca.last_test(AUTHORS_STDOUT + second, "task 2")
    assert best["mrr@5"] == 0.2 and best["epoch"] == 3


def test_parse_authors_accuracy_output():
    assert ca.cell_values(ca.last_test(AUTHORS_ACC_STDOUT, "task 3"), 3) == {"accuracy": pytest.approx(0.73242)}


def test_parse_authors_without_test_block_is_an_error():
    with pytest.raises(RuntimeError, match="no test metrics"):
        ca.last_test("Acc(hit@1): 5.566% (57/1024)\n", "task 2")


def test_table_rows_from_run_records():
    runs = [{"arm": arm, "seed": seed, "cells": {"after_task": {"3": {"accuracy": v}}, "after_last": {}}}
            for arm, values in (("authors", (0.7, 0.8)), ("ours", (0.6, 0.9))) for seed, v in enumerate(values)]
    text, rows = ca.table(runs, "ours")
    assert len(rows) == 1 and rows[0]["diff"] == pytest.approx(0.0) and rows[0]["lower"] == 1
    assert "| after task | T3 | accuracy |" in text


def test_missing_checkout_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(ca.main, ["--authors", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkout of the authors' TERACON code at ")
    assert "Traceback" not in err[0] and not (tmp_path / "work").exists()


def test_bad_flag_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(ca.main, ["--arms", "nobody"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: compare_authors.py: argument --arms: invalid choice")


def test_report_without_runs_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(ca.main, ["--report", "--out", str(tmp_path)])
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/per_run: no run JSON yet"


def test_comparison_data_shapes_small():
    tasks, protocol = ca.comparison_tasks(users=400, items=60, click_classes=50, seed=1)
    watch, click, profile = tasks
    assert watch.sources.shape == (400, 16) and (watch.sources[:, 0] == 0).any()
    assert len({t for ts in click.targets for t in ts}) == 50
    assert all(2 <= len(ts) <= 3 for ts in click.targets)
    assert profile.sources.shape == (800, 16) and {t[0] for t in profile.targets} == set(range(8))
    assert profile.targets[:400] == profile.targets[400:]  # one profile per user, two sessions
    assert "488" not in protocol and "50 items" in protocol


def test_summarise_one_run_arm_pools_the_other_arms_variance():
    s = ca.summarise({0: 0.5}, {0: 0.4, 1: 0.6})
    assert s["pooled_sd"] == pytest.approx(math.sqrt(0.02)) and s["d"] == pytest.approx(0.0)
    assert math.isnan(s["ours_sd"])
    assert math.isnan(ca.summarise({0: 0.5}, {0: 0.4})["d"])


def test_switch_effects_by_hand():
    """2 x 2 of our arms, 2 runs each, every within-arm variance 2: pooled var 2 on 4 dof,
    se = sqrt(2 / 4 * 4 * 1/2) = 1; drop_last (5 + 6)/2 - (2 + 3)/2 = 3; select (3 + 6)/2 - (2 + 5)/2 = 1;
    interaction (2 - 5 - 3 + 6)/2 = 0."""
    cell = {"ours": {0: 1.0, 1: 3.0}, "ours-drop_last": {0: 4.0, 1: 6.0},
            "ours-random_batches": {0: 2.0, 1: 4.0}, "ours-match": {0: 5.0, 1: 7.0}}
    e = ca.switch_effects(cell)
    assert e["--drop_last"]["effect"] == pytest.approx(3.0) and e["--drop_last"]["se"] == pytest.approx(1.0)
    assert e["--drop_last"]["t"] == pytest.approx(3.0) and e["--drop_last"]["d"] == pytest.approx(3 / math.sqrt(2))
    assert e["--select_on random_batches"]["effect"] == pytest.approx(1.0)
    assert e["interaction"]["effect"] == pytest.approx(0.0) and e["interaction"]["dof"] == 4
    assert math.isnan(e["--drop_last"]["paired_t"])  # the same contrast in both seeds: no spread
    # paired by seed: drop_last's contrast is 3 at seed 0 and (6 + 9 - 3 - 4)/2 = 4 at seed 1:
    # mean 3.5, sd sqrt(0.5), t = 3.5 / (sqrt(0.5) / sqrt(2)) = 7 on 1 dof
    paired = ca.switch_effects({**cell, "ours-match": {0: 5.0, 1: 9.0}})["--drop_last"]
    assert paired["paired_t"] == pytest.approx(7.0) and paired["paired_dof"] == 1
    assert ca.switch_effects({**cell, "ours-match": {}}) is None  # an arm without runs: no design
    assert ca.switch_effects({arm: {0: 1.0} for arm in cell}) is None  # one run per arm: no variance


def test_effects_table_marks_only_cells_beyond_the_t_quantile():
    big = {"ours": (1.0, 1.1, 0.9), "ours-drop_last": (2.0, 2.2, 1.9),
           "ours-random_batches": (1.05, 1.1, 0.9), "ours-match": (2.0, 2.1, 1.95)}
    runs = [{"arm": arm, "seed": seed, "cells": {"after_task": {"3": {"accuracy": v}}, "after_last": {}}}
            for arm, values in big.items() for seed, v in enumerate(values)]
    text = ca.effects_table(runs)
    row = next(line for line in text.splitlines() if line.startswith("| after task | T3"))
    # drop_last: per seed 0.975, 1.05, 1.025 (mean 1.0167): beyond both quantiles; select_on and the
    # interaction (per seed +0.025 -0.05 +0.025 and -0.025 -0.05 +0.025) are not
    assert "+1.0167" in row and row.count("*") == 2 and row.split("|")[5].count("*") == 2
    assert "t_0.975(8) = 2.306" in text and "t_0.975(2) = 4.303" in text
    assert ca.effects_table([r for r in runs if r["arm"] != "ours"]) == ""


def test_parse_authors_valid_reads_validation_blocks_not_training_lines():
    assert ca.parse_authors_valid(AUTHORS_STDOUT) == [[57, 1024]]  # "Loss: ... | Acc(hit@1): 0.000% (0/1024)" is training
    assert ca.parse_authors_valid(AUTHORS_STDOUT + AUTHORS_ACC_STDOUT) == [[57, 1024], [716, 1024]]


def test_valid_hits_table_means_per_epoch_and_selected_counts():
    runs = [{"arm": "authors", "seed": 0, "cells": {"valid_hits": {"1": [[140, 512], [150, 512]]},
                                                     "selected_epoch": {"1": 2}}},
            {"arm": "authors", "seed": 1, "cells": {"valid_hits": {"1": [[146, 512], [144, 512]]},
                                                     "selected_epoch": {"1": 1}}},
            {"arm": "ours", "seed": 0, "cells": {"selected_epoch": {"1": 2}}}]  # an older record: no hits
    text = ca.valid_hits_table(runs, ["authors", "ours"])
    assert "| authors | T1 | 2 | 512 | 143.0 / 147.0 | 1: 1, 2: 1 |" in text
    assert "| ours |" not in text
    assert ca.valid_hits_table(runs[2:], ["ours"]) == ""


def test_tasks_1_runs_task_1_only_and_records_its_validation_hits(tmp_path, monkeypatch):
    ran = []

    def fake_stage(cmd, log_path, cwd):
        ran.append(Path(cmd[1]).name)
        epochs = [{"valid": {"hit@1": h / 512}, "timing": {"valid_examples": 512}} for h in (140, 150)]
        metrics = {"mrr@5": 0.5, "hr@5": 0.8, "ndcg@5": 0.6}
        (tmp_path / "task1.json").write_text(json.dumps({"test": metrics, "best_epoch": 2, "epochs": epochs}))
        return "", 1.0

    monkeypatch.setattr(ca, "run_stage", fake_stage)
    a = ca.build_parser().parse_args(["--tasks", "1", "--ours", str(tmp_path)])
    cells, stages = ca.ours_run(a, "ours-match", tmp_path, tmp_path, 0)
    assert ran == ["train_task1.py"] and [s["stage"] for s in stages] == ["task1"]
    assert cells["valid_hits"] == {1: [[140, 512], [150, 512]]} and cells["after_last"] == {}
    assert "--drop_last" in stages[0]["command"] and "--select_on random_batches" in stages[0]["command"]
