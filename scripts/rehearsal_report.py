"""The time-to-result table of a rehearsal: per task, what one run of the recipe costs here, and
the wall time of the full recipe projected from it.

    python reproduce.py --dataset Data/ttl-shape/tasks.json --preset paper --limit_batches 2 --limit_eval_batches 1
    python scripts/rehearsal_report.py runs/ttl-shape/teracon/seed0
    python scripts/rehearsal_report.py RUN --task1_epochs 10 --taskn_epochs 100   # a rehearsal run with --max_epochs 1

Reads each stage's PREFIX.json (data load seconds, peak memory, per-epoch timing) and checkpoint
size. Projection per task: epochs x (training batches an epoch x step seconds + validation
examples x evaluation seconds per example), with the epochs of the run's own flags or of --task1_epochs/--taskn_epochs (the paper's
10 for task 1 and at most 100 for tasks 2-6: early stopping usually ends sooner, so the
projection is an upper bound). Step seconds are the rehearsal's mean, its first step included.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import UserError, positive_int, read_json, run_cli  # noqa: E402


def task_row(summary: dict, checkpoint: Path, epochs: int | None = None) -> dict:
    """One task's costs and its projected full-recipe time (seconds) over `epochs` (default: the
    epochs of the run's own flags)."""
    args, task = summary["args"], summary["task"]
    epochs = epochs or args["epochs"]
    timings = [e["timing"] for e in summary["epochs"] if "timing" in e]
    if not timings:
        raise UserError(f"{checkpoint.with_suffix('.json')}: no per-epoch timing (written by an older version)")
    steps = sum(t["steps"] for t in timings)
    step_seconds = sum(t["train_seconds"] for t in timings) / max(steps, 1)
    eval_per_example = sum(t["valid_seconds"] for t in timings) / max(sum(t["valid_examples"] for t in timings), 1)
    split = task["split_sizes"]
    batches = math.ceil(split["train"] / args["batch"])
    epoch_seconds = batches * step_seconds + split["valid"] * eval_per_example
    return {"task": task["task"], "name": task["name"], "classes": task["num_classes"], "batch": args["batch"],
            "load_seconds": summary["resources"]["load_seconds"], "peak_rss_gib": summary["resources"]["peak_rss_gib"],
            "step_seconds": step_seconds, "eval_seconds_per_1k": 1000 * eval_per_example,
            "checkpoint_gb": checkpoint.stat().st_size / 1e9 if checkpoint.is_file() else math.nan,
            "batches_per_epoch": batches, "epochs": epochs, "projected_seconds": epochs * epoch_seconds}


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_table(rows: list[dict]) -> str:
    head = ["task", "name", "classes", "batch", "data load", "peak RSS", "step", "eval / 1k", "checkpoint",
            "batches / epoch", "epochs", "projected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['task']} | {r['name']} | {r['classes']:,} | {r['batch']} | {r['load_seconds']:.1f} s | "
                     f"{r['peak_rss_gib']:.1f} GiB | {r['step_seconds']:.2f} s | {r['eval_seconds_per_1k']:.2f} s | "
                     f"{r['checkpoint_gb']:.2f} GB | {r['batches_per_epoch']:,} | {r['epochs']} | "
                     f"{_duration(r['projected_seconds'])} |")
    total = sum(r["projected_seconds"] for r in rows)
    lines += ["", f"Projected wall time of the whole recipe (every task at its epoch cap): {_duration(total)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder of reproduce.py (OUT/<dataset>/<method>/seed<N>) with task<N>.json files")
    p.add_argument("--task1_epochs", type=positive_int("--task1_epochs"), help="epochs to project for task 1 "
                   "(default: the run's own --epochs; give 10, the paper's, for a rehearsal run with --max_epochs)")
    p.add_argument("--taskn_epochs", type=positive_int("--taskn_epochs"), help="epochs to project for every "
                   "task n >= 2 (default: the run's own; the paper's cap is 100)")
    args = p.parse_args(argv)
    run = Path(args.run)
    summaries = sorted(run.glob("task*.json"), key=lambda f: int(f.stem[len("task"):]) if f.stem[4:].isdigit() else 0)
    summaries = [f for f in summaries if f.stem[len("task"):].isdigit()]
    if not summaries:
        raise UserError(f"{run}: no task<N>.json run summaries here")
    rows = []
    for f in summaries:
        summary = read_json(f, "run summary")
        epochs = args.task1_epochs if summary["task"]["task"] == 1 else args.taskn_epochs
        rows.append(task_row(summary, f.with_suffix(".pt"), epochs))
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    run_cli(main)
