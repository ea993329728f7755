"""The paper's pictures of a run: the task-relation heatmap and the forgetting view.

    python plot_tasks.py --run results/ml-100k/teracon/seed0 --out results/ml-100k/teracon/seed0

- `task_relation.png`: cosine similarity between the tasks' learned masks (relation-aware,
  s = smax) in the run's last checkpoint, averaged over the masked layers (paper Fig. 4); only
  for methods with masks (not fineall, sinmo, conure).
  The colour scale spans the off-diagonal values, so that small differences show.
- `forgetting.png`: each task's main metric (MRR@5 for ranking, accuracy for classification)
  after every later task, relative to its value right after it was trained (1.00 = nothing
  forgotten), with the raw value in each cell; from `matrix.json` (written by reproduce.py) or
  else by evaluating the run's checkpoints task1.pt, task2.pt, ...

- `curves.png`: per task (one column each), the training loss, the validation main metric,
  the range of s (eq. 19) and rho of every past task (eq. 15, the epoch's mean) per epoch,
  from the run's task<N>.json; the best epoch is marked. The numbers are in curves.csv.

The numbers are also written as CSV (forgetting.csv raw, forgetting_relative.csv relative).
Needs matplotlib for the PNGs (`pip install matplotlib`).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluate import evaluate_checkpoint
from results import MAIN_METRIC
from nextitnet import NextItNet
from checkpoint import load_checkpoint, smax_of
from utils import UserError, atomic_write, atomic_write_text, read_json, run_cli

log = logging.getLogger("teracon")


@torch.no_grad()
def task_relation(ckpt: dict) -> np.ndarray:
    """[T, T] cosine similarity of the tasks' masks at s = smax, averaged over masked layers."""
    model = NextItNet.from_checkpoint(ckpt, "checkpoint")
    masks = model.masks(smax_of(ckpt))                      # [T, M, C]
    cos = F.cosine_similarity(masks[:, None], masks[None, :], dim=-1)      # [T, T, M]
    return cos.mean(dim=-1).numpy()


def run_checkpoints(run: Path) -> list[Path]:
    """task1.pt, task2.pt, ... of one run folder, in task order."""
    found = sorted((int(m.group(1)), p) for p in run.glob("task*.pt") if (m := re.fullmatch(r"task(\d+)\.pt", p.name)))
    if not found:
        raise UserError(f"{run}: no task<N>.pt checkpoints in this folder")
    return [p for _, p in found]


def forgetting(checkpoints: list[Path], device: str = "auto") -> tuple[list[str], np.ndarray]:
    """Task names and [checkpoints, tasks] main metric; NaN where a task is not learned yet.
    Read from the run's matrix.json when reproduce.py wrote one for these checkpoints."""
    matrix = checkpoints[-1].parent / "matrix.json"
    rows = None
    if matrix.is_file():
        after = read_json(matrix)
        after = after.get("after") if isinstance(after, dict) else None
        if isinstance(after, list) and len(after) == len(checkpoints):
            rows = after
    rows = rows or [evaluate_checkpoint(p, device) for p in checkpoints]
    names = [r["name"] for r in rows[-1]]
    table = np.full((len(rows), len(names)), np.nan)
    for i, row in enumerate(rows):
        for j, r in enumerate(row):
            table[i, j] = r["now"][MAIN_METRIC[r["metric"]]]
    return names, table


def relative_to_first(table: np.ndarray) -> np.ndarray:
    """R[i][j] / R[j][j]: each task's metric relative to right after it was trained (NaN where
    that value is 0 or the task is not learned yet)."""
    diag = np.diag(table)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diag > 0, table / diag, np.nan)


CURVE_COLUMNS = ("task", "name", "epoch", "phase", "train_loss", "valid_metric", "valid", "s_min", "s_max",
                 "rho_mean", "best")


def curves(run: Path) -> list[dict]:
    """One row per task and epoch of the run's task<N>.json: loss, validation main metric, s range,
    each past task's mean rho (';'-joined; empty without retention), and whether it was the best."""
    rows = []
    for ckpt in run_checkpoints(run):
        if not ckpt.with_suffix(".json").is_file():
            log.warning("%s: no run summary beside it: no training curves for that task", ckpt)
            continue
        summary = read_json(ckpt.with_suffix(".json"), "run summary")
        metric = MAIN_METRIC[summary["task"]["metric"]]
        for e in summary["epochs"]:
            d = e.get("diagnostics", {})
            rows.append({"task": summary["task"]["task"], "name": summary["task"]["name"], "epoch": e["epoch"],
                         "phase": e.get("phase", "train"), "train_loss": e["train_loss"],
                         "valid_metric": metric, "valid": e["valid"].get(metric, float("nan")),
                         "s_min": d.get("s_min", float("nan")), "s_max": d.get("s_max", float("nan")),
                         "rho_mean": d.get("rho_mean", []), "best": e["epoch"] == summary.get("best_epoch")})
    return rows


def curves_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CURVE_COLUMNS)
    for r in rows:
        w.writerow([r["task"], r["name"], r["epoch"], r["phase"], f"{r['train_loss']:.6f}", r["valid_metric"],
                    f"{r['valid']:.6f}", f"{r['s_min']:.6g}", f"{r['s_max']:.6g}",
                    ";".join(f"{x:.6f}" for x in r["rho_mean"]), int(r["best"])])
    return buf.getvalue()


def draw_curves(rows: list[dict], method: str, path: Path) -> None:
    """A grid: one column per task; rows loss, validation metric, s range, rho per past task."""
    plt = pyplot()
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(4, len(tasks), figsize=(2.6 * len(tasks) + 1, 8.5), squeeze=False)
    for j, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        x = list(range(1, len(mine) + 1))  # epochs in order (CONURE's retraining continues the count)
        best = [i for i, r in enumerate(mine) if r["best"]]
        axes[0, j].plot(x, [r["train_loss"] for r in mine], marker=".")
        axes[0, j].set_title(f"task {task} ({mine[0]['name']})", fontsize=9)
        axes[1, j].plot(x, [r["valid"] for r in mine], marker=".", color="tab:green")
        for i in best:
            axes[1, j].plot(x[i], mine[i]["valid"], "r*", markersize=10)
        axes[1, j].set_ylabel(f"valid {mine[0]['valid_metric']}" if j == 0 else mine[0]["valid_metric"], fontsize=8)
        axes[2, j].plot(x, [r["s_max"] for r in mine], marker=".", label="max")
        axes[2, j].plot(x, [r["s_min"] for r in mine], marker=".", label="min")
        past = max(len(r["rho_mean"]) for r in mine)  # an epoch that recorded no rho keeps the lines
        for i in range(past):
            axes[3, j].plot(x, [r["rho_mean"][i] if len(r["rho_mean"]) > i else np.nan for r in mine],
                            marker=".", label=f"task {i + 1}")
        if past:
            axes[3, j].legend(fontsize=6)
        else:
            axes[3, j].text(0.5, 0.5, "no retention", ha="center", va="center", transform=axes[3, j].transAxes)
        axes[3, j].set_xlabel("epoch", fontsize=8)
    for i, label in enumerate(("train loss", None, "s (min..max)", "rho (mean)")):
        if label:
            axes[i, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"training curves ({method}); * = best validation epoch", fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), "wb")
    finally:
        plt.close(fig)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed: `pip install matplotlib` (the CSV files were written)") from None
    return plt


def matrix_csv(labels_rows: list[str], labels_cols: list[str], values: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([""] + labels_cols)
    for label, row in zip(labels_rows, values):
        w.writerow([label] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buf.getvalue()


def draw(values: np.ndarray, rows: list[str], cols: list[str], title: str, path: Path, cmap: str,
         vmin: float | None = None, vmax: float | None = None, digits: int = 2,
         below: np.ndarray | None = None) -> None:
    """A heatmap with every value written in its cell (and `below`'s under it, smaller)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.8 * len(rows) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            r, g, b, _ = image.cmap(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            text = f"{v:.{digits}f}" + ("" if below is None or np.isnan(below[i, j]) else f"\n({below[i, j]:.4f})")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), "wb")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder holding task1.pt, task2.pt, ... (from reproduce.py)")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    args = p.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out or run)
    checkpoints = run_checkpoints(run)
    last = load_checkpoint(checkpoints[-1])
    names = [t["name"] for t in last["tasks"]]

    method = last.get("method", "teracon")
    _, table = forgetting(checkpoints, args.device)
    relative = relative_to_first(table)
    after = [f"after {c.stem}" for c in checkpoints]
    masked = last["config"].get("masked", True)
    relation = task_relation(last) if masked else None
    # every CSV first: they need no matplotlib
    atomic_write_text(out / "forgetting.csv", matrix_csv(after, names, table))
    atomic_write_text(out / "forgetting_relative.csv", matrix_csv(after, names, relative))
    curve_rows = curves(run)
    written = ["forgetting.png", "forgetting.csv", "forgetting_relative.csv"]
    if curve_rows:
        atomic_write_text(out / "curves.csv", curves_csv(curve_rows))
        written += ["curves.png", "curves.csv"]
    if masked:
        atomic_write_text(out / "task_relation.csv", matrix_csv(names, names, relation))
        written += ["task_relation.png", "task_relation.csv"]
    else:
        log.info("%s uses no task masks: no task-relation heatmap", method)
    span = max(0.05, float(np.nanmax(np.abs(relative - 1.0))) if np.isfinite(relative).any() else 0.05)
    draw(relative, after, names, f"forgetting ({method}): main metric relative to right after training\n"
         "(1.00 = kept; raw MRR@5 or accuracy in brackets)", out / "forgetting.png", "RdBu", 1 - span, 1 + span,
         below=table)
    if masked:
        off = relation[~np.eye(len(names), dtype=bool)]
        low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
        if high - low < 1e-6:
            low, high = low - 1e-3, high + 1e-3
        draw(relation, names, names, f"task relation ({method}): mask cosine at s = smax\n(colours span "
             f"{low:.4f}..{high:.4f}, the off-diagonal range)", out / "task_relation.png", "viridis", low, high,
             digits=4)
    if curve_rows:
        draw_curves(curve_rows, method, out / "curves.png")
    log.info("wrote %s", ", ".join(str(out / f) for f in written))

if __name__ == "__main__":
    run_cli(main)
