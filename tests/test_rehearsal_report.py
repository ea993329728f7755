"""scripts/rehearsal_report.py: the time-to-result table's figures and its projection of the
full recipe, checked on hand-made run summaries."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import rehearsal_report  # noqa: E402
from utils import UserError  # noqa: E402


def _summary(task: int, batch: int, epochs: int, train: int, valid: int, timings: list[tuple]) -> dict:
    return {"task": {"task": task, "name": f"t{task}", "num_classes": 10 * task,
                     "split_sizes": {"train": train, "valid": valid, "test": valid}},
            "args": {"batch": batch, "epochs": epochs},
            "resources": {"load_seconds": 1.5, "peak_rss_gib": 2.0},
            "epochs": [{"epoch": i + 1, "timing": {"steps": s, "train_seconds": ts, "valid_seconds": vs,
                                                     "valid_examples": ve}} for i, (s, ts, vs, ve) in enumerate(timings)]}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "seed0"
    folder.mkdir()
    # task 1: 2 steps of 3 s and 5 s -> 4 s a step; 100 validation examples scored in 2 s -> 0.02 s each
    (folder / "task1.json").write_text(json.dumps(_summary(1, 32, 1, 320, 500, [(2, 8.0, 2.0, 100)])))
    (folder / "task1.pt").write_bytes(b"x" * 2_000_000)
    # task 2: two epochs, 4 steps in 10 s -> 2.5 s a step; 300 examples in 3 s -> 0.01 s each
    (folder / "task2.json").write_text(json.dumps(_summary(2, 1024, 1, 2049, 1000, [(2, 4.0, 1.0, 100), (2, 6.0, 2.0, 200)])))
    return folder


def test_projection_is_epochs_times_batches_times_step_plus_validation(run: Path, capsys) -> None:
    rows = rehearsal_report.main([str(run)])
    t1, t2 = rows
    assert t1["step_seconds"] == pytest.approx(4.0) and t1["eval_seconds_per_1k"] == pytest.approx(20.0)
    assert t1["batches_per_epoch"] == 10 and t1["epochs"] == 1
    assert t1["projected_seconds"] == pytest.approx(1 * (10 * 4.0 + 500 * 0.02))      # 50 s
    assert t1["checkpoint_gb"] == pytest.approx(0.002)
    assert t2["batches_per_epoch"] == 3                                                  # ceil(2049 / 1024)
    assert t2["projected_seconds"] == pytest.approx(1 * (3 * 2.5 + 1000 * 0.01))         # 17.5 s
    out = capsys.readouterr().out
    assert "| 1 | t1 | 10 | 32 | 1.5 s | 2.0 GiB | 4.00 s | 20.00 s | 0.00 GB | 10 | 1 | 0.8 min |" in out
    assert "Projected wall time of the whole recipe (every task at its epoch cap): 1.1 min." in out


def test_epochs_of_the_full_recipe_replace_a_capped_runs_own(run: Path) -> None:
    t1, t2 = rehearsal_report.main([str(run), "--task1_epochs", "10", "--taskn_epochs", "100"])
    assert t1["epochs"] == 10 and t1["projected_seconds"] == pytest.approx(500.0)
    assert t2["epochs"] == 100 and t2["projected_seconds"] == pytest.approx(1750.0)


def test_a_folder_without_summaries_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"^{tmp_path}: no task<N>\.json run summaries here$"):
        rehearsal_report.main([str(tmp_path)])
