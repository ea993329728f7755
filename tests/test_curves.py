"""plot_tasks.py's training curves (issue 19): curves.csv holds every epoch of every task's
PREFIX.json, and curves.png is drawn from them."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import plot_tasks
from test_peterrec import train_chain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("curves")
    train_chain(d, "teracon", "--epochs", "3")
    return d


def test_curves_csv_lists_every_epoch_of_every_task_as_its_summary_says(run, tmp_path):
    """One row per (task, epoch), in task order: the loss, the validation MRR@5 (ranking tasks)
    or accuracy (classification), s's range and the mean rho of each past task, read here
    straight from task<N>.json; `best` marks the summary's best epoch only."""
    pytest.importorskip("matplotlib")
    plot_tasks.main(["--run", str(run), "--out", str(tmp_path), "--device", "cpu"])
    rows = list(csv.DictReader((tmp_path / "curves.csv").open()))
    expected = []
    for t, metric in ((1, "mrr@5"), (2, "mrr@5"), (3, "accuracy")):
        summary = json.loads((run / f"task{t}.json").read_text())
        for e in summary["epochs"]:
            expected.append((str(t), str(e["epoch"]), metric, e["train_loss"], e["valid"][metric],
                             e["diagnostics"]["s_max"], e["diagnostics"].get("rho_mean", []),
                             str(int(e["epoch"] == summary["best_epoch"]))))
    assert len(rows) == len(expected) == 1 + 3 + 3  # task 1: 1 epoch, tasks 2 and 3: 3 each
    for r, (task, epoch, metric, loss, valid, s_max, rho, best) in zip(rows, expected):
        assert (r["task"], r["epoch"], r["valid_metric"], r["best"]) == (task, epoch, metric, best)
        assert float(r["train_loss"]) == pytest.approx(loss, abs=1e-6)
        assert float(r["valid"]) == pytest.approx(valid, abs=1e-6)
        assert float(r["s_max"]) == pytest.approx(s_max, rel=1e-5)
        assert [float(x) for x in r["rho_mean"].split(";") if x] == pytest.approx(rho, abs=1e-6)
    assert [len(r["rho_mean"].split(";")) if r["rho_mean"] else 0 for r in rows] == [0, 1, 1, 1, 2, 2, 2]


def test_curves_png_is_a_drawn_picture(run, tmp_path):
    """curves.png decodes as an image with something drawn on it (not one flat colour), wider
    than tall for three task columns."""
    image = pytest.importorskip("matplotlib.image")
    plot_tasks.main(["--run", str(run), "--out", str(tmp_path), "--device", "cpu"])
    pixels = image.imread(tmp_path / "curves.png")
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0] * 0.9 and float(np.std(pixels)) > 0.05
