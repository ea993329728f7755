"""plot_tasks.py: the task-relation matrix, the forgetting table, and the files `main` writes."""
from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch

import checkpoint
import helpers
from helpers import write_task1, write_task_classes, write_task_ranking
import plot_tasks
import cli
from evaluate import evaluate_checkpoint
from nextitnet import NextItNet
from utils import UserError

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
    without any is a UserError naming the folder, and nothing is written into it."""
    with pytest.raises(UserError) as e:
        plot_tasks.run_checkpoints(tmp_path)
    assert str(e.value) == f"{tmp_path}: no task<N>.pt checkpoints in this folder"
    assert list(tmp_path.iterdir()) == []
    for name in ("task10.pt", "task2.pt", "task9.pt", "task1.pt", "taskx.pt", "task3.json", "final.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in plot_tasks.run_checkpoints(tmp_path)] == ["task1.pt", "task2.pt", "task9.pt", "task10.pt"]


# ------------------------------------------------------------------ a hand-made run folder

# (name, metric kind, main metric, head size) of the three tasks
TASKS = [("t_a", "ranking", "mrr@5", 12), ("t_b", "ranking", "mrr@5", 12), ("t_c", "accuracy", "accuracy", 3)]
# every task's main metric after task 1, 2, 3 (matrix.json); t_b scored 0 right after it was trained
AFTER = [[0.20], [0.15, 0.0], [0.25, 0.10, 0.80]]
# every task's epochs in its run summary task<N>.json, and its best epoch; task 2's first epoch
# has no diagnostics, task 3's second is a CONURE-style retraining epoch
EPOCHS = {
    1: ([{"epoch": 1, "train_loss": 2.5, "valid": {"mrr@5": 0.125}, "diagnostics": {"s_min": 0.02, "s_max": 50.0}}], 1),
    2: ([{"epoch": 1, "train_loss": 1.75, "valid": {"mrr@5": 0.0625}},
         {"epoch": 2, "train_loss": 1.5, "valid": {"mrr@5": 0.25},
          "diagnostics": {"s_min": 0.04, "s_max": 25.0, "rho_mean": [0.375]}}], 2),
    3: ([{"epoch": 1, "train_loss": 0.875, "valid": {"accuracy": 0.5},
          "diagnostics": {"s_min": 0.02, "s_max": 50.0, "rho_mean": [0.25, 0.125]}},
         {"epoch": 2, "phase": "retrain", "train_loss": 0.75, "valid": {"accuracy": 0.4375},
          "diagnostics": {"s_min": 0.05, "s_max": 40.0, "rho_mean": [0.1875, 0.0625]}}], 1),
}
S2 = math.sqrt(0.5)
# the layer-averaged cosines of PATTERNS by hand: (A, B) = (2/sqrt(4*2) + 4/sqrt(8*4)) / 2 = sqrt(1/2),
# (A, C) = (0 + 4/sqrt(8*4)) / 2, (B, C) = (0 + 4/4) / 2
RELATION = np.array([[1.0, S2, S2 / 2], [S2, 1.0, 0.5], [S2 / 2, 0.5, 1.0]])


@pytest.fixture
def hand_run(tmp_path):
    """A run folder as reproduce.py leaves it, every number set by hand: task3.pt (task1.pt and
    task2.pt are only listed) with the binary masks PATTERNS (task embeddings +-6, each
    relation MLP reading only its own embedding), matrix.json with AFTER, task<N>.json with EPOCHS."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.manual_seed(0)
    model = NextItNet(12, [size for *_, size in TASKS], channels=8, dilations=(1,), relation=True)
    with torch.no_grad():
        model.task_masks.task_embedding.copy_(torch.tensor(np.where(_binary(PATTERNS) > 0, 6.0, -6.0)))
        model.task_masks.relation_weight.zero_()
        model.task_masks.relation_weight[:, :, 0] = 1.0
        model.task_masks.relation_bias.zero_()
    tasks = [{"task": t, "name": name, "file": f"{name}.csv", "file_sha256": "0" * 64, "num_classes": size,
              "metric": kind, "seed": 0, "split_by": "example"} for t, (name, kind, _, size) in enumerate(TASKS, 1)]
    for t in (1, 2):
        (folder / f"task{t}.pt").write_bytes(b"")
    checkpoint.save_checkpoint(folder / "task3.pt", method="teracon", model=model, tasks=tasks,
                               items=np.arange(1, 12), args={"smax": 50.0}, extras={})
    rows = [[{"task": j + 1, "name": TASKS[j][0], "metric": TASKS[j][1], "now": {TASKS[j][2]: v}}
             for j, v in enumerate(row)] for row in AFTER]
    (folder / "matrix.json").write_text(json.dumps({"after": rows}))
    for t, (epochs, best) in EPOCHS.items():
        (folder / f"task{t}.json").write_text(json.dumps({"task": tasks[t - 1], "epochs": epochs, "best_epoch": best,
                                                          "finished": True}))
    return folder


def test_main_writes_the_hand_computed_csvs(hand_run, tmp_path):
    """main --run RUN --out OUT on the hand-made run writes, to 6 decimals: forgetting.csv (AFTER,
    empty cells above the diagonal), forgetting_relative.csv (R[i][j] / R[j][j]; t_b's column
    empty, its value right after training is 0), task_relation.csv (RELATION, the cosines of
    PATTERNS) and curves.csv (every epoch of EPOCHS; nan where an epoch has no diagnostics),
    besides the three PNGs, and no temporary file."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    before = helpers.file_hashes(hand_run)
    plot_tasks.main(["--run", str(hand_run), "--out", str(out), "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.csv", "curves.png", "forgetting.csv", "forgetting.png", "forgetting_relative.csv",
        "task_relation.csv", "task_relation.png"]
    assert (out / "forgetting.csv").read_text() == (
        ",t_a,t_b,t_c\n"
        "after task1,0.200000,,\n"
        "after task2,0.150000,0.000000,\n"
        "after task3,0.250000,0.100000,0.800000\n")
    assert (out / "forgetting_relative.csv").read_text() == (
        ",t_a,t_b,t_c\n"
        "after task1,1.000000,,\n"
        "after task2,0.750000,,\n"
        "after task3,1.250000,,1.000000\n")
    assert (out / "task_relation.csv").read_text() == (
        ",t_a,t_b,t_c\n"
        "t_a,1.000000,0.707107,0.353553\n"
        "t_b,0.707107,1.000000,0.500000\n"
        "t_c,0.353553,0.500000,1.000000\n")
    assert (out / "curves.csv").read_text() == (
        "task,name,epoch,phase,train_loss,valid_metric,valid,s_min,s_max,rho_mean,best\n"
        "1,t_a,1,train,2.500000,mrr@5,0.125000,0.02,50,,1\n"
        "2,t_b,1,train,1.750000,mrr@5,0.062500,nan,nan,,0\n"
        "2,t_b,2,train,1.500000,mrr@5,0.250000,0.04,25,0.375000,1\n"
        "3,t_c,1,train,0.875000,accuracy,0.500000,0.02,50,0.250000;0.125000,1\n"
        "3,t_c,2,retrain,0.750000,accuracy,0.437500,0.05,40,0.187500;0.062500,0\n")
    assert helpers.file_hashes(hand_run) == before  # with --out, the run folder is only read


def _cell_pixel(fig, ax, x: float, y: float, shape) -> tuple[int, int]:
    """(row, column) in the saved PNG of `shape` of the data point (x, y) of `ax` (after drawing)."""
    fx, fy = fig.transFigure.inverted().transform(ax.transData.transform((x, y)))
    return int(round((1.0 - fy) * shape[0])), int(round(fx * shape[1]))


def test_relation_and_curves_figures_show_the_hand_made_numbers(hand_run, tmp_path, monkeypatch):
    """task_relation.png: a 696 x 504 picture (5.8 x 4.2 in at 120 dpi for 3 tasks) of RELATION,
    each cell written to 4 decimals, colours spanning the off-diagonal range: read back from the
    PNG, a cell's colour is viridis at (v - min) / (max - min) of the off-diagonal values
    (diagonal and maximum the top colour, minimum the bottom one). curves.png: 880 x 850 (8.8 x
    8.5 in at 100 dpi); per task a column whose rows plot, against epochs 1..n, the training
    loss, the validation metric (the best epoch starred), s max and min, and each past task's rho
    ("no retention" for task 1)."""
    pytest.importorskip("matplotlib")
    import matplotlib
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    captured = {}
    real_savefig = Figure.savefig

    def savefig(fig, *a, **kw):
        result = real_savefig(fig, *a, **kw)  # drawn: positions and the aspect are final
        title = fig.axes[0].get_title()
        captured["relation" if title.startswith("task relation") else
                 "forgetting" if title.startswith("forgetting") else "curves"] = fig
        return result

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = tmp_path / "figs"
    plot_tasks.main(["--run", str(hand_run), "--out", str(out), "--device", "cpu"])

    fig = captured["relation"]
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), RELATION, atol=1e-6)
    assert ax.images[0].get_clim() == pytest.approx((S2 / 2, S2), abs=1e-6)
    assert [t.get_text() for t in ax.texts] == ["1.0000", "0.7071", "0.3536", "0.7071", "1.0000", "0.5000",
                                                "0.3536", "0.5000", "1.0000"]
    pixels = mpimg.imread(out / "task_relation.png")
    assert pixels.shape == (504, 696, 4)
    viridis = matplotlib.colormaps["viridis"]
    for i in range(3):
        for j in range(3):
            level = min(1.0, (RELATION[i, j] - S2 / 2) / (S2 - S2 / 2))
            row, col = _cell_pixel(fig, ax, j - 0.3, i - 0.3, pixels.shape)  # off the cell's text
            np.testing.assert_allclose(pixels[row, col, :3], viridis(level)[:3], atol=2.5 / 255,
                                       err_msg=f"cell {i},{j}")

    fig = captured["curves"]
    assert mpimg.imread(out / "curves.png").shape[:2] == (850, 880)
    axes = np.array(fig.axes).reshape(4, 3)

    def lines(a):
        return [(list(line.get_xdata()), list(line.get_ydata())) for line in a.get_lines()]

    assert lines(axes[0, 0]) == [([1], [2.5])] and lines(axes[0, 1]) == [([1, 2], [1.75, 1.5])]
    assert lines(axes[0, 2]) == [([1, 2], [0.875, 0.75])]
    assert lines(axes[1, 0]) == [([1], [0.125]), ([1], [0.125])]  # the curve, then the star
    assert lines(axes[1, 1]) == [([1, 2], [0.0625, 0.25]), ([2], [0.25])]
    assert lines(axes[1, 2]) == [([1, 2], [0.5, 0.4375]), ([1], [0.5])]
    assert [line.get_marker() for a in axes[1] for line in a.get_lines()[1:]] == ["*"] * 3
    assert lines(axes[2, 2]) == [([1, 2], [50.0, 40.0]), ([1, 2], [0.02, 0.05])]  # max, then min
    assert lines(axes[3, 0]) == [] and [t.get_text() for t in axes[3, 0].texts] == ["no retention"]
    assert lines(axes[3, 2]) == [([1, 2], [0.25, 0.1875]), ([1, 2], [0.125, 0.0625])]  # task 1, then task 2
    [(x, rho)] = lines(axes[3, 1])  # task 2's first epoch has no diagnostics: no point there
    assert x == [1, 2] and math.isnan(rho[0]) and rho[1] == 0.375


def test_without_matplotlib_csvs_then_user_error(hand_run, tmp_path, monkeypatch):
    """With matplotlib not importable, main writes every CSV (as with it) and then raises one
    UserError saying matplotlib is missing and the CSVs were written; no PNG is written."""
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "figs"
    with pytest.raises(UserError) as e:
        plot_tasks.main(["--run", str(hand_run), "--out", str(out), "--device", "cpu"])
    assert str(e.value) == "matplotlib is not installed: `pip install matplotlib` (the CSV files were written)"
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "forgetting.csv", "forgetting_relative.csv",
                                                     "task_relation.csv"]
    assert (out / "forgetting_relative.csv").read_text().splitlines()[-1] == "after task3,1.250000,,1.000000"


def test_curves_keep_the_rho_lines_when_the_last_epoch_has_no_retention(tmp_path, monkeypatch):
    """A task whose last epoch recorded no rho still gets one rho line per past task, with no
    point at that epoch, not "no retention"."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    captured = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (captured.append(fig), real_savefig(fig, *a, **kw))[1])
    row = {"task": 2, "name": "t2", "valid_metric": "mrr@5", "s_min": 0.02, "s_max": 50.0}
    rows = [{**row, "train_loss": 1.0, "valid": 0.1, "best": False, "rho_mean": [0.25]},
            {**row, "train_loss": 0.5, "valid": 0.2, "best": True, "rho_mean": []}]
    plot_tasks.draw_curves(rows, "conure", tmp_path / "curves.png")
    rho_axis = captured[0].axes[3]
    [line] = rho_axis.get_lines()
    assert list(line.get_xdata()) == [1, 2]
    assert line.get_ydata()[0] == 0.25 and np.isnan(line.get_ydata()[1])
    assert [t.get_text() for t in rho_axis.texts] == []
