"""plot_tasks.py: the task-relation matrix, the forgetting table, and the files `main` writes."""
from __future__ import annotations

import builtins
import csv
import math

import numpy as np
import pytest
import torch

from helpers import write_task1, write_task_classes, write_task_ranking
import plot_tasks
import cli
from evaluate import evaluate_checkpoint
from nextitnet import NextItNet
from utils import UserError

PNG = b"\x89PNG\r\n\x1a\n"
MAIN_METRIC = {"ranking": "mrr@5", "accuracy": "accuracy"}

# Hand-set binary masks: [task][layer] -> channels switched on (8 channels, 2 masked layers).
PATTERNS = [[{0, 1, 2, 3}, set(range(8))],
            [{0, 1}, {0, 1, 2, 3}],
            [{4, 5, 6, 7}, {0, 1, 2, 3}]]


def _binary(patterns, channels: int = 8) -> np.ndarray:
    out = np.zeros((len(patterns), len(patterns[0]), channels))
    for t, layers in enumerate(patterns):
        for m, on in enumerate(layers):
            out[t, m, sorted(on)] = 1.0
    return out


def _cosine_matrix(masks: np.ndarray) -> np.ndarray:
    """Mean over layers of the cosine between every two tasks' masks, computed independently."""
    t = len(masks)
    out = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            cos = [masks[i, m] @ masks[j, m] / (np.linalg.norm(masks[i, m]) * np.linalg.norm(masks[j, m]))
                   for m in range(masks.shape[1])]
            out[i, j] = np.mean(cos)
    return out


def _checkpoint(model: NextItNet, smax: float) -> dict:
    return {"config": model.config(), "state_dict": model.state_dict(), "args": {"smax": smax}}


@pytest.mark.parametrize("relation", [False, True])
def test_task_relation_of_hand_set_masks(relation):
    """Masks set by hand to binary channel patterns (task embeddings +-6; with relation-aware
    masks, each task's relation MLP reads only its own embedding): task_relation gives the
    layer-averaged cosine matrix of those patterns, symmetric with ones on the diagonal."""
    torch.manual_seed(0)
    model = NextItNet(12, [12, 3, 4], channels=8, dilations=(1,), relation=relation)
    binary = _binary(PATTERNS)
    with torch.no_grad():
        model.task_masks.task_embedding.copy_(torch.tensor(np.where(binary > 0, 6.0, -6.0)))
        model.task_masks.relation_weight.zero_()
        model.task_masks.relation_weight[:, :, 0] = 1.0  # column 0 of E_t is e_t itself
        model.task_masks.relation_bias.zero_()
    got = plot_tasks.task_relation(_checkpoint(model, 50.0))
    want = _cosine_matrix(binary)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, got.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-6)
    # the patterns make the entries distinct: (A, B) = (sqrt(1/2) + sqrt(1/2)) / 2, (A, C) = 1/(2 sqrt 2)
    assert got[0, 1] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert got[0, 2] == pytest.approx(0.5 * math.sqrt(0.5), abs=1e-6)
    assert got[1, 2] == pytest.approx(0.5, abs=1e-6)


def test_task_relation_uses_the_checkpoints_smax():
    """Unsaturated masks: the matrix is that of sigmoid(smax * e) with smax from the checkpoint's
    args (plain masks, a relation=False model)."""
    torch.manual_seed(1)
    model = NextItNet(12, [12, 3, 4], channels=8, dilations=(1, 2), relation=False)
    with torch.no_grad():
        model.task_masks.task_embedding.uniform_(-0.5, 0.5)
    e = model.task_masks.task_embedding.detach().double().numpy()
    for smax in (2.0, 20.0):
        got = plot_tasks.task_relation(_checkpoint(model, smax))
        np.testing.assert_allclose(got, _cosine_matrix(1.0 / (1.0 + np.exp(-smax * e))), atol=1e-5)


# ------------------------------------------------------------------------ a real run folder

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-task teracon run (tiny model) in one folder, as reproduce.py lays it out."""
    d = tmp_path_factory.mktemp("plot_run")
    files = [write_task1(d / "t1.csv", lines=120), write_task_ranking(d / "t2.csv", lines=120),
             write_task_classes(d / "t3.csv", lines=120)]
    folder = d / "run"
    for task, f in enumerate(files, 1):
        argv = ["--datapath", str(f), "--datapath_index", str(d / "index.json"), "--savepath",
                str(folder / f"task{task}"), "--epochs", "1", "--batch", "32", "--quiet", "--device", "cpu"]
        if task == 1:
            argv += ["--channels", "16", "--dilations", "1", "2"]
        else:
            argv += ["--paths", str(folder / f"task{task - 1}.pt")]
        cli.main(argv, task=task)
    return folder


def test_forgetting_is_lower_triangular(run):
    """forgetting over a run folder: task names of the last checkpoint; row i = every task's main
    metric (MRR@5 ranking, accuracy classification) after task i+1, NaN above the diagonal (not
    learned yet); each row equals evaluate_checkpoint on that task's checkpoint."""
    checkpoints = plot_tasks.run_checkpoints(run)
    assert [p.name for p in checkpoints] == ["task1.pt", "task2.pt", "task3.pt"]
    names, table = plot_tasks.forgetting(checkpoints, "cpu")
    assert names == ["t1", "t2", "t3"]
    assert table.shape == (3, 3)
    above = np.triu(np.ones((3, 3), dtype=bool), k=1)
    assert np.isnan(table[above]).all()
    assert np.isfinite(table[~above]).all() and (table[~above] >= 0).all() and (table[~above] <= 1).all()
    for i, ckpt in enumerate(checkpoints):
        rows = evaluate_checkpoint(ckpt, "cpu")
        assert len(rows) == i + 1
        for j, r in enumerate(rows):
            assert table[i, j] == r["now"][MAIN_METRIC[r["metric"]]]
        # the diagonal is each task right after it was trained: the test result at its best epoch
        assert table[i, i] == pytest.approx(rows[i]["after_training"][MAIN_METRIC[rows[i]["metric"]]], abs=1e-12)


def test_run_checkpoints_numeric_order_and_empty_folder(tmp_path):
    """task<N>.pt files in task order (task10 after task9), other names ignored; a folder
    without any is a UserError."""
    with pytest.raises(UserError):
        plot_tasks.run_checkpoints(tmp_path)
    for name in ("task10.pt", "task2.pt", "task9.pt", "task1.pt", "taskx.pt", "task3.json", "final.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in plot_tasks.run_checkpoints(tmp_path)] == ["task1.pt", "task2.pt", "task9.pt", "task10.pt"]


def _read_csv(path):
    return list(csv.reader(path.read_text().splitlines()))


def test_main_writes_pngs_and_csvs(run, tmp_path):
    """main --run RUN --out OUT writes task_relation.png and forgetting.png (PNG files) and the two
    CSVs: the relation matrix with ones on the diagonal, the forgetting table with empty cells
    above the diagonal; both agree with task_relation and forgetting."""
    out = tmp_path / "figs"
    plot_tasks.main(["--run", str(run), "--out", str(out), "--device", "cpu"])
    for png in ("task_relation.png", "forgetting.png"):
        assert (out / png).read_bytes()[:8] == PNG
    rel = _read_csv(out / "task_relation.csv")
    assert rel[0] == ["", "t1", "t2", "t3"] and [r[0] for r in rel[1:]] == ["t1", "t2", "t3"]
    matrix = np.array([[float(x) for x in r[1:]] for r in rel[1:]])
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)
    np.testing.assert_allclose(matrix, plot_tasks.task_relation(torch.load(run / "task3.pt", weights_only=True)),
                               atol=1e-6)
    forg = _read_csv(out / "forgetting.csv")
    assert forg[0] == ["", "t1", "t2", "t3"] and len(forg) == 4
    _, table = plot_tasks.forgetting(plot_tasks.run_checkpoints(run), "cpu")
    for i, r in enumerate(forg[1:]):
        assert r[0] == f"after task{i + 1}"
        for j, cell in enumerate(r[1:]):
            assert (cell == "") == (j > i)
            if j <= i:
                assert float(cell) == pytest.approx(table[i, j], abs=1e-6)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_without_matplotlib_csvs_then_user_error(run, tmp_path, monkeypatch):
    """With matplotlib not importable, main writes both CSVs and then raises one UserError that
    names matplotlib; no PNG is written."""
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "figs"
    with pytest.raises(UserError, match="matplotlib"):
        plot_tasks.main(["--run", str(run), "--out", str(out), "--device", "cpu"])
    assert (out / "task_relation.csv").is_file() and (out / "forgetting.csv").is_file()
    assert len(_read_csv(out / "forgetting.csv")) == 4
    assert not list(out.glob("*.png"))
