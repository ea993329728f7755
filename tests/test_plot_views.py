"""plot_tasks.py's readable views and the reading of format-1 checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

import helpers  # noqa: F401  (puts the repository root on sys.path)
import plot_tasks
from checkpoint import FORMAT, upgrade
from nextitnet import NextItNet


def test_forgetting_relative_to_right_after_training():
    """R[i][j] / R[j][j] by hand; NaN above the diagonal and where R[j][j] is 0."""
    nan = math.nan
    table = np.array([[0.04, nan, nan],
                      [0.03, 0.50, nan],
                      [0.02, 0.60, 0.0]])
    got = plot_tasks.relative_to_first(table)
    want = np.array([[1.0, nan, nan],
                     [0.75, 1.0, nan],
                     [0.5, 1.2, nan]])
    np.testing.assert_allclose(got, want, equal_nan=True)


def test_forgetting_reads_matrix_json_instead_of_evaluating(tmp_path, monkeypatch):
    """With reproduce.py's matrix.json beside the checkpoints, nothing is re-evaluated."""
    checkpoints = [tmp_path / "task1.pt", tmp_path / "task2.pt"]
    row = lambda task, name, kind, value: {"task": task, "name": name, "metric": kind,  # noqa: E731
                                           "now": {"mrr@5" if kind == "ranking" else "accuracy": value}}
    matrix = {"after": [[row(1, "watch", "ranking", 0.04)],
                        [row(1, "watch", "ranking", 0.03), row(2, "age", "accuracy", 0.6)]]}
    (tmp_path / "matrix.json").write_text(json.dumps(matrix))
    monkeypatch.setattr(plot_tasks, "evaluate_checkpoint", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    names, table = plot_tasks.forgetting(checkpoints)
    assert names == ["watch", "age"]
    np.testing.assert_allclose(table, [[0.04, math.nan], [0.03, 0.6]], equal_nan=True)


def test_format_1_checkpoint_is_upgraded():
    """A teracon/1 checkpoint (config 'owned', CONURE owners as conv buffers) reads as teracon/2:
    owners moved to conure_owner in the model's conv order, weights untouched."""
    model = NextItNet(20, [20], channels=4, dilations=(1, 2, 1))
    state = dict(model.state_dict())
    owners = {}
    for b in (0, 1, 2):
        for k in (1, 2):
            owners[f"blocks.{b}.conv{k}.owner"] = torch.full((4, 4, 3), 10 * b + k, dtype=torch.int16)
    old = {"format": "teracon/1", "config": dict(model.config(), owned=True),
           "state_dict": {**state, **owners}, "members": [{"config": {"owned": False, "channels": 4}, "state_dict": {}}]}
    new = upgrade(old)
    assert new["format"] == FORMAT and "owned" not in new["config"] and "owned" not in new["members"][0]["config"]
    assert [int(o[0, 0, 0]) for o in new["conure_owner"]] == [1, 2, 11, 12, 21, 22]
    assert set(new["state_dict"]) == set(state)
    NextItNet.from_checkpoint(new)  # loads


def test_format_1_sinmo_members_say_which_task_they_serve():
    """A teracon/1 SinMo checkpoint had no first_task: member i serves task i + 1, the top-level
    model the last task, so tasks >= 2 read the last position, not task 1's."""
    model = NextItNet(20, [5], channels=4, dilations=(1,), masked=False)
    cfg = {k: v for k, v in model.config().items() if k != "first_task"}
    member = {"config": dict(cfg), "state_dict": model.state_dict()}
    old = {"format": "teracon/1", "method": "sinmo", "config": dict(cfg), "state_dict": model.state_dict(),
           "tasks": [{}, {}, {}], "members": [dict(member, config=dict(cfg)), dict(member, config=dict(cfg))]}
    new = upgrade(old)
    assert [m["config"]["first_task"] for m in new["members"]] == [1, 2]
    assert new["config"]["first_task"] == 3


def test_checkpoint_with_broken_method_extras_is_refused(tmp_path):
    """A conure or hat checkpoint whose own entries are missing or misshapen: one UserError."""
    import pytest
    from checkpoint import load_checkpoint
    from utils import UserError
    model = NextItNet(20, [20], channels=4, dilations=(1,), masked=False)
    task = {"task": 1, "name": "t", "file": "f", "file_sha256": "0", "num_classes": 20, "metric": "ranking",
            "seed": 0, "split_by": "example"}
    base = {"format": FORMAT, "config": model.config(), "state_dict": model.state_dict(), "tasks": [task],
            "item_index": {"checksum": "0", "num_items": 20}, "args": {"smax": 50.0}}
    for method, extra, needle in (("conure", {"conure_owner": [torch.zeros(4, 4, 3)]}, "conure_owner"),
                                  ("hat", {"hat_cumulative": torch.zeros(3, 4)}, "hat_cumulative")):
        torch.save(dict(base, method=method, **extra), tmp_path / "c.pt")
        with pytest.raises(UserError, match=f"c.pt: not a TERACON checkpoint .*{needle}"):
            load_checkpoint(tmp_path / "c.pt")
