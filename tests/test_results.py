"""results.py: the reference ranking and the continual-learning summaries of a comparison, on
examples small enough to compute by hand (every expected number below is worked out in the
comments, not by the code under test)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import helpers  # noqa: F401  (puts the repository root on sys.path)
import data_loader as dl
import results

SQRT2 = math.sqrt(2.0)
TASKS = [(1, "watch", "ranking"), (2, "click", "ranking"), (3, "age", "accuracy")]


def metrics(kind: str, main: float) -> dict[str, float]:
    """An evaluate row's metrics whose main metric is `main`; the other reported ranking metrics
    are fixed offsets of it so that the table rows of every metric are predictable."""
    if kind == "ranking":
        return {"hit@1": main / 2, "mrr@5": main, "hr@5": main + 0.02, "ndcg@5": main + 0.01}
    return {"hit@1": main, "accuracy": main}


def run_record(method: str, seed: int, matrix: list[list[float]], reference: list[float]) -> dict:
    """A matrix.json record as reproduce.py writes it: `after[i-1]` = evaluate_checkpoint rows of
    task<i>.pt (tasks 1..i, main metric R[i][j] = matrix[i-1][j-1]), and the reference's rows."""
    after = []
    for i, row in enumerate(matrix, 1):
        after.append([{"task": j, "name": TASKS[j - 1][1], "metric": TASKS[j - 1][2], "method": method,
                       "now": metrics(TASKS[j - 1][2], value),
                       "after_training": metrics(TASKS[j - 1][2], matrix[j - 1][j - 1])}
                      for j, value in enumerate(row, 1)])
    ref = [{"task": j, "name": name, "metric": kind, "test": metrics(kind, value)}
           for (j, name, kind), value in zip(TASKS, reference)]
    return {"method": method, "seed": seed, "version": "test/1", "after": after, "reference": ref}


# R[i][j]: main metric of task j with the model saved after task i.
MATRICES = {
    # seed 0: final 0.35 0.10 0.60 -> avg 0.35. Forgetting: T1 max(0.30, 0.40) - 0.35 = 0.05,
    # T2 0.20 - 0.10 = 0.10 -> 0.075. BWT: T1 0.35 - 0.30 = +0.05, T2 0.10 - 0.20 = -0.10 -> -0.025.
    ("teracon", 0): [[0.30], [0.40, 0.20], [0.35, 0.10, 0.60]],
    # seed 1: final 0.45 0.30 0.90 -> avg 0.55. Forgetting: T1 max(0.50, 0.40) - 0.45 = 0.05,
    # T2 0.30 - 0.30 = 0 -> 0.025. BWT: T1 0.45 - 0.50 = -0.05, T2 0 -> -0.025.
    ("teracon", 1): [[0.50], [0.40, 0.30], [0.45, 0.30, 0.90]],
    # SinMo: a fresh model per task, so every column is constant: no forgetting, BWT 0.
    # seed 0 final avg (0.20 + 0.10 + 0.60) / 3 = 0.30; seed 1 (0.25 + 0.15 + 0.75) / 3 = 0.383333.
    ("sinmo", 0): [[0.20], [0.20, 0.10], [0.20, 0.10, 0.60]],
    ("sinmo", 1): [[0.25], [0.25, 0.15], [0.25, 0.15, 0.75]],
}
# The reference per seed (the same for every method of a seed): T1 0.10 / 0.12, T2 0.05, T3 0.50.
REFERENCE = {0: [0.10, 0.05, 0.50], 1: [0.12, 0.05, 0.50]}
ORDER = [("teracon", 1), ("teracon", 0), ("sinmo", 0), ("sinmo", 1)]  # seeds not in order on purpose


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    runs = [run_record(m, s, MATRICES[m, s], REFERENCE[s]) for m, s in ORDER]
    return results.long_frame(runs)


def by_method(df: pd.DataFrame) -> dict[str, dict]:
    return {r["method"]: r for r in df.to_dict("records")}


def test_long_frame_rows_and_reference_deduplicated(frame):
    """One row per (method, seed, after, task, metric); the reference of a seed appears once
    (both methods of the seed carry it) with after = task."""
    # per run: 1 + 2 + 3 evaluated (checkpoint, task) pairs; 4 metrics per ranking row, 2 per accuracy
    per_run = (1 * 4) + (2 * 4) + (2 * 4 + 2)
    ref_rows = 2 * (4 + 4 + 2)  # two seeds x (two ranking tasks + one accuracy task)
    assert len(frame) == 4 * per_run + ref_rows
    ref = frame[frame["method"] == results.REFERENCE]
    assert (ref["after"] == ref["task"]).all()
    assert not frame.duplicated(["method", "seed", "after", "task", "metric"]).any()
    v = frame.set_index(["method", "seed", "after", "task", "metric"])["value"]
    assert v["teracon", 0, 2, 1, "mrr@5"] == pytest.approx(0.40)
    assert v["teracon", 0, 2, 1, "ndcg@5"] == pytest.approx(0.41)
    assert v[results.REFERENCE, 1, 1, 1, "mrr@5"] == pytest.approx(0.12)


def test_per_seed_final_forgetting_and_bwt(frame):
    """avg final = mean over tasks of R[T][j]; forgetting = mean over j < T of (best of
    R[j..T-1][j]) - R[T][j], which is not R[j][j] when a later task lifted task j; BWT = mean
    over j < T of R[T][j] - R[j][j]. Main metric only (mrr@5 / accuracy)."""
    got = {(r["method"], r["seed"]): r for r in results.per_seed_summary(frame).to_dict("records")}
    assert set(got) == set(MATRICES)
    want = {("teracon", 0): (0.35, 0.075, -0.025), ("teracon", 1): (0.55, 0.025, -0.025),
            ("sinmo", 0): (0.30, 0.0, 0.0), ("sinmo", 1): (1.15 / 3, 0.0, 0.0)}
    for key, (final, forgetting, bwt) in want.items():
        assert got[key]["avg_final"] == pytest.approx(final, abs=1e-12), key
        assert got[key]["avg_forgetting"] == pytest.approx(forgetting, abs=1e-12), key
        assert got[key]["bwt"] == pytest.approx(bwt, abs=1e-12), key


def test_summary_mean_std_over_seeds_and_transfer(frame):
    """summary_frame: per method the mean and sample std (ddof 1) over seeds of avg final,
    avg forgetting and BWT, and per task the transfer R[j][j] / SinMo's R[j][j] of the same seed.
    Two seeds a and b: std = |a - b| / sqrt(2)."""
    s = by_method(results.summary_frame(frame))
    assert list(s) == ["teracon", "sinmo"]  # order of first appearance, no reference row
    t = s["teracon"]
    assert t["avg_final_mean"] == pytest.approx(0.45) and t["avg_final_std"] == pytest.approx(0.20 / SQRT2)
    assert t["avg_forgetting_mean"] == pytest.approx(0.05)
    assert t["avg_forgetting_std"] == pytest.approx(0.05 / SQRT2)
    assert t["bwt_mean"] == pytest.approx(-0.025) and t["bwt_std"] == pytest.approx(0.0, abs=1e-12)
    # transfer: seed 0 0.30/0.20 = 1.5, 0.20/0.10 = 2, 0.60/0.60 = 1;
    #           seed 1 0.50/0.25 = 2,   0.30/0.15 = 2, 0.90/0.75 = 1.2
    assert t["transfer_t1_mean"] == pytest.approx(1.75) and t["transfer_t1_std"] == pytest.approx(0.5 / SQRT2)
    assert t["transfer_t2_mean"] == pytest.approx(2.0) and t["transfer_t2_std"] == pytest.approx(0.0, abs=1e-12)
    assert t["transfer_t3_mean"] == pytest.approx(1.1) and t["transfer_t3_std"] == pytest.approx(0.2 / SQRT2)
    m = s["sinmo"]
    # avg final 0.30 and 0.383333: mean 0.341667, std 0.083333 / sqrt 2
    assert m["avg_final_mean"] == pytest.approx((0.30 + 1.15 / 3) / 2)
    assert m["avg_final_std"] == pytest.approx((1.15 / 3 - 0.30) / SQRT2)
    assert m["avg_forgetting_mean"] == 0.0 and m["bwt_mean"] == 0.0
    for j in (1, 2, 3):
        assert m[f"transfer_t{j}_mean"] == pytest.approx(1.0) and m[f"transfer_t{j}_std"] == pytest.approx(0.0)


def test_reference_check_verdicts(frame):
    """Per task, the best method's final mean against the reference's mean; 'beats' needs a
    margin above 2 x the larger of the two stds. T1: teracon 0.35/0.45 (mean 0.40, std 0.0707)
    vs reference 0.10/0.12 (0.11, 0.0141): margin 0.29 > 0.1414 -> yes, 0.29/0.0707 = 4.10 std.
    T2: teracon 0.10/0.30 (0.20, 0.1414) vs 0.05: 0.15 < 0.2828 -> no (1.06 std).
    T3: teracon 0.60/0.90 (0.75, 0.2121) beats sinmo 0.60/0.75 (0.675) as best; vs 0.50:
    0.25 < 0.4243 -> no (1.18 std)."""
    check = results.reference_check(frame)
    assert check["task"].tolist() == [1, 2, 3] and check["name"].tolist() == ["watch", "click", "age"]
    assert check["best_method"].tolist() == ["teracon"] * 3
    assert check["reference"].tolist() == pytest.approx([0.11, 0.05, 0.50])
    assert check["reference_std"].tolist() == pytest.approx([0.02 / SQRT2, 0.0, 0.0], abs=1e-12)
    assert check["best"].tolist() == pytest.approx([0.40, 0.20, 0.75])
    assert check["best_std"].tolist() == pytest.approx([0.10 / SQRT2, 0.20 / SQRT2, 0.30 / SQRT2])
    assert check["margin_in_std"].tolist() == pytest.approx([0.29 / (0.10 / SQRT2), 0.15 / (0.20 / SQRT2),
                                                             0.25 / (0.30 / SQRT2)])
    assert check["beats_by_2_std"].tolist() == [True, False, False]


def test_reference_check_zero_spread_is_infinite_margin():
    """Two seeds with identical values, so every std is 0: a method above the reference is inf
    std ahead (beats), one below it is -inf (does not beat), never a division error."""
    for value, sign, beats in ((0.30, 1, True), (0.05, -1, False)):
        records = [run_record("teracon", seed, [[value]], [0.10, 0.05, 0.50]) for seed in (0, 1)]
        for record in records:
            record["reference"] = record["reference"][:1]
        check = results.reference_check(results.long_frame(records))
        assert check["margin_in_std"].tolist() == [sign * math.inf]
        assert check["beats_by_2_std"].tolist() == [beats]


def test_reference_check_gives_no_verdict_for_one_seed():
    """One seed has no spread to judge by: margin n/a and no verdict, printed as such."""
    record = run_record("teracon", 0, [[0.30]], [0.10, 0.05, 0.50])
    record["reference"] = record["reference"][:1]
    frame = results.long_frame([record])
    check = results.reference_check(frame)
    assert math.isnan(check["margin_in_std"].iloc[0]) and check["beats_by_2_std"].iloc[0] is None
    text = results.format_summary(results.summary_frame(frame), check, "t")
    assert "| n/a (one seed) |" in text and "| yes |" not in text


def test_metric_table_reference_first_and_per_seed_values(frame):
    """metric_table: reference rows first (after_task = after_last = its test value), then every
    method in order of appearance, tasks in order, each reported metric (ranking: mrr@5, ndcg@5,
    hr@5; accuracy: accuracy), seeds sorted, values R[j][j] and R[T][j] of each seed."""
    table = results.metric_table(frame)
    keys = [(r.method, r.task, r.metric) for r in table.itertuples()]
    per_task = [(1, "mrr@5"), (1, "ndcg@5"), (1, "hr@5"), (2, "mrr@5"), (2, "ndcg@5"), (2, "hr@5"),
                (3, "accuracy")]
    assert keys == [(m, t, metric) for m in ("reference", "teracon", "sinmo") for t, metric in per_task]
    rows = {(r["method"], r["task"], r["metric"]): r for r in table.to_dict("records")}
    assert all(r["seeds"] == [0, 1] for r in rows.values())
    cases = {("reference", 1, "mrr@5"): ([0.10, 0.12], [0.10, 0.12]),
             ("reference", 3, "accuracy"): ([0.50, 0.50], [0.50, 0.50]),
             ("teracon", 1, "mrr@5"): ([0.30, 0.50], [0.35, 0.45]),
             ("teracon", 2, "ndcg@5"): ([0.21, 0.31], [0.11, 0.31]),
             ("teracon", 2, "hr@5"): ([0.22, 0.32], [0.12, 0.32]),
             ("teracon", 3, "accuracy"): ([0.60, 0.90], [0.60, 0.90]),
             ("sinmo", 1, "mrr@5"): ([0.20, 0.25], [0.20, 0.25])}
    for key, (after_task, after_last) in cases.items():
        assert rows[key]["after_task"] == pytest.approx(after_task), key
        assert rows[key]["after_last"] == pytest.approx(after_last), key
        assert rows[key]["name"] == TASKS[key[1] - 1][1]


def test_format_metric_table_lines(frame):
    """table.md: a title, the header, then 'mean ± std' (sample std over seeds, 4 digits) of the
    value right after the task and after the last task; reference rows come first."""
    text = results.format_metric_table(results.metric_table(frame), "demo")
    lines = text.splitlines()
    assert lines[:4] == ["# demo", "",
                         "| method | task | name | metric | after training that task | after the last task |",
                         "|---|---|---|---|---|---|"]
    assert len(lines) == 4 + 21 and text.endswith("\n")
    # reference T1 mrr@5: 0.10, 0.12 -> 0.11 ± 0.0141; teracon T1: right after 0.30, 0.50 ->
    # 0.40 ± 0.1414, final 0.35, 0.45 -> 0.40 ± 0.0707; T2 ndcg@5: 0.21, 0.31 -> 0.26 ± 0.0707,
    # final 0.11, 0.31 -> 0.21 ± 0.1414; sinmo T3: 0.60, 0.75 -> 0.675 ± 0.1061
    assert lines[4] == "| reference | 1 | watch | mrr@5 | 0.1100 ± 0.0141 | 0.1100 ± 0.0141 |"
    assert lines[10] == "| reference | 3 | age | accuracy | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |"
    assert lines[11] == "| teracon | 1 | watch | mrr@5 | 0.4000 ± 0.1414 | 0.4000 ± 0.0707 |"
    assert lines[15] == "| teracon | 2 | click | ndcg@5 | 0.2600 ± 0.0707 | 0.2100 ± 0.1414 |"
    assert lines[-1] == "| sinmo | 3 | age | accuracy | 0.6750 ± 0.1061 | 0.6750 ± 0.1061 |"


def test_metric_table_csv_per_seed_columns(frame):
    """table.csv: one row per table row, mean/std columns and after_task_seed<s>/after_last_seed<s>."""
    df = pd.read_csv(__import__("io").StringIO(results.metric_table_csv(results.metric_table(frame))))
    assert list(df.columns) == ["method", "task", "name", "metric", "after_task_mean", "after_task_std",
                                "after_last_mean", "after_last_std", "after_task_seed0", "after_last_seed0",
                                "after_task_seed1", "after_last_seed1"]
    row = df[(df["method"] == "teracon") & (df["task"] == 2) & (df["metric"] == "mrr@5")].iloc[0]
    assert (row["after_task_seed0"], row["after_task_seed1"]) == pytest.approx((0.20, 0.30))
    assert (row["after_last_seed0"], row["after_last_seed1"]) == pytest.approx((0.10, 0.30))
    assert row["after_last_mean"] == pytest.approx(0.20) and row["after_last_std"] == pytest.approx(0.141421, abs=1e-6)


def test_format_summary_lines(frame):
    """summary.md: one row per method with avg final, avg forgetting, BWT (4 digits) and
    'T<j> vs SinMo' (2 digits), then the reference check with margin/std (1 digit) and yes/no."""
    text = results.format_summary(results.summary_frame(frame), results.reference_check(frame), "S")
    lines = text.splitlines()
    assert lines[0] == "# S"
    head = lines.index("| method | avg final | avg forgetting | BWT | T1 vs SinMo | T2 vs SinMo | T3 vs SinMo |")
    assert lines[head + 1] == "|---|---|---|---|---|---|---|"
    assert lines[head + 2:head + 4] == [
        "| teracon | 0.4500 ± 0.1414 | 0.0500 ± 0.0354 | -0.0250 ± 0.0000 | 1.75 ± 0.35 | 2.00 ± 0.00 | 1.10 ± 0.14 |",
        "| sinmo | 0.3417 ± 0.0589 | 0.0000 ± 0.0000 | 0.0000 ± 0.0000 | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.00 ± 0.00 |"]
    check = lines.index("| task | name | reference | best method | best | margin / std | beats by 2 std |")
    assert lines[check + 2:] == [
        "| 1 | watch | 0.1100 ± 0.0141 | teracon | 0.4000 ± 0.0707 | 4.1 | yes |",
        "| 2 | click | 0.0500 ± 0.0000 | teracon | 0.2000 ± 0.1414 | 1.1 | no |",
        "| 3 | age | 0.5000 ± 0.0000 | teracon | 0.7500 ± 0.2121 | 1.2 | no |"]


def test_transfer_is_nan_where_sinmo_is_zero():
    """Where SinMo's R[j][j] is 0 the ratio is undefined: transfer is NaN (for every method,
    SinMo included) and the summary prints n/a, while the other tasks keep their ratio
    (T1: 0.30 / 0.20 = 1.5, T3: 0.60 / 0.60 = 1)."""
    runs = [run_record("teracon", 0, MATRICES["teracon", 0], REFERENCE[0]),
            run_record("sinmo", 0, [[0.20], [0.20, 0.0], [0.20, 0.0, 0.60]], REFERENCE[0])]
    frame = results.long_frame(runs)
    tr = results.transfer(frame).set_index(["method", "task"])["transfer"]
    assert tr["teracon", 1] == pytest.approx(1.5) and tr["teracon", 3] == pytest.approx(1.0)
    assert math.isnan(tr["teracon", 2]) and math.isnan(tr["sinmo", 2])
    assert results.REFERENCE not in tr.index.get_level_values("method")
    summary = results.summary_frame(frame)
    text = results.format_summary(summary, results.reference_check(frame), "S")
    row = [ln for ln in text.splitlines() if ln.startswith("| teracon |")][0]
    assert row.endswith("| 1.50 ± 0.00 | n/a | 1.00 ± 0.00 |"), row
    assert not any(np.isinf(summary.select_dtypes("number").to_numpy()).ravel())


# ------------------------------------------------------------------------------ reference

def task_data(task: int, sources: list[list[int]], targets: list[int], num_classes: int,
              splits: dict[str, list[int]]) -> dl.TaskData:
    src = torch.tensor(sources, dtype=torch.long)
    tgt = torch.tensor(targets, dtype=torch.long) if targets else torch.full((len(sources),), -1)
    data = dl.TaskData(task, f"task{task}", "hand", src, tgt, torch.arange(len(tgt)), num_classes,
                       np.arange(num_classes))
    data.splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
    return data


def test_reference_ranking_task_ties_by_lower_class():
    """Ranking task n: classes ordered by how often they are a training target, ties by the
    lower class index (no shared ranks). Train targets 3 3 3 7 7 5 5 (valid/test not counted):
    order 3, 5, 7, then the unseen 0 1 2 4 6 8 9 ... Test targets 3 7 7 0 9 -> ranks 0 2 2 3 9:
    mrr@5 (1 + 1/3 + 1/3 + 1/4) / 5, hr@5 4/5, hit@1 1/5, ndcg@5 (1 + 2/log2 4 + 1/log2 5) / 5,
    mrr@20 adds 1/10 for the rank-9 target."""
    targets = [3, 3, 3, 7, 7, 5, 5] + [9, 9, 9, 9] + [3, 7, 7, 0, 9]
    data = task_data(2, [[1]] * len(targets), targets, 25,
                     {"train": list(range(7)), "valid": [7, 8, 9, 10], "test": [11, 12, 13, 14, 15]})
    assert data.kind == "ranking"
    got = results.reference_metrics(data)
    assert got["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 4) / 5)
    assert got["hr@5"] == pytest.approx(4 / 5)
    assert got["hit@1"] == pytest.approx(1 / 5)
    assert got["ndcg@5"] == pytest.approx((1 + 2 / math.log2(4) + 1 / math.log2(5)) / 5)
    assert got["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 4 + 1 / 10) / 5)
    assert results.reference_metrics(data, "valid")["hit@1"] == 0.0  # 9 is unseen in training: rank 9


def test_reference_accuracy_is_majority_class_ties_by_lower_class():
    """Classification: the majority training class, ties by the lower index. Train 1 1 2 2 0:
    classes 1 and 2 tie, 1 wins; test 1 2 2 0 -> accuracy 1/4 (a tie going to 2 would give 1/2)."""
    targets = [1, 1, 2, 2, 0] + [1, 2, 2, 0]
    data = task_data(4, [[1]] * len(targets), targets, 3,
                     {"train": [0, 1, 2, 3, 4], "valid": [], "test": [5, 6, 7, 8]})
    assert data.kind == "accuracy"
    got = results.reference_metrics(data)
    assert got == {"hit@1": pytest.approx(0.25), "accuracy": pytest.approx(0.25)}


def test_reference_task1_counts_next_items_of_training_lines():
    """Task 1: every non-padding item at positions 1.. of the training sequences counts (the
    first item is never a target); test scores each test sequence's last item.
    Train: 0 4 6 6 / 1 6 4 2 / 0 0 1 2 -> next items 4 6 6, 6 4 2, 1 2 (the leading 1 of line 2
    and the padding do not count): 6 x3, 2 x2, 4 x2, 1 x1 -> order 6, 2, 4 (tie by index), 1,
    0, 3, 5, ... Test last items 4, 1, 6 -> ranks 2, 3, 0: mrr@5 (1/3 + 1/4 + 1) / 3, hit@1 1/3.
    (Counting position 0 would put 1 before 2 and 4; counting padding would put 0 before 1.)"""
    sources = [[0, 4, 6, 6], [1, 6, 4, 2], [0, 0, 1, 2],      # train
               [0, 6, 2, 4], [2, 4, 6, 1], [0, 0, 0, 6],      # test
               [0, 0, 5, 5]]                                   # valid
    data = task_data(1, sources, [], 25, {"train": [0, 1, 2], "valid": [6], "test": [3, 4, 5]})
    counts = results.training_counts(data)
    assert counts[[0, 1, 2, 4, 5, 6]].tolist() == [0, 1, 2, 2, 0, 3] and counts.sum() == 8
    got = results.reference_metrics(data)
    assert got["mrr@5"] == pytest.approx((1 / 3 + 1 / 4 + 1) / 3)
    assert got["hit@1"] == pytest.approx(1 / 3) and got["hr@5"] == pytest.approx(1.0)
    assert results.reference_metrics(data, "valid")["mrr@5"] == pytest.approx(0.0)  # 5: rank 6
