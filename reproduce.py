"""Run the whole task sequence and write the paper-style results table.

    python reproduce.py                          # ml-100k, seed 0, prepared on the fly
    python reproduce.py --dataset ttl --seeds 0 1 2

For every seed: task 1, then tasks 2..T through the real training scripts, then every task is
evaluated with the final model. A stage whose checkpoint and finished summary exist is skipped
(so an interrupted run continues), unless --force. Writes results/<dataset>/table.md and table.csv.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import data_loader as dl
from baselines import METHODS
from evaluate import evaluate_checkpoint
from utils import UserError, atomic_write_json, atomic_write_text, read_json, run_cli

log = logging.getLogger("teracon")
HERE = Path(__file__).resolve().parent

# Per-dataset presets: the flags of task 1 and of tasks n >= 2. `ttl` is the paper's setting.
PAPER = {"task1": {"epochs": 10, "lr": 1e-3, "batch": 32},
         "taskn": {"epochs": 100, "lr": 1e-4, "batch": 1024, "smax": 50, "alpha": 0.7}}
PRESETS = {
    "ttl": PAPER,
    # ~1k users and 1.6k items: 128 channels instead of 256 (4x fewer conv FLOPs, so the whole
    # sequence fits a laptop CPU in ~15 min), the authors' task-2 lr 1e-3 for every task n >= 2,
    # patience 10 (validation splits of 47-236 examples make hit@1 noisy). The batch stays 1024:
    # knowledge retention labels floor(rho_i * B) rows per past task and rho settles near
    # 1 - sigmoid(6) = 0.0025, so a batch below ~400 would retain nothing.
    "ml-100k": {"task1": {"epochs": 10, "lr": 1e-3, "batch": 32, "channels": 128},
                "taskn": {"epochs": 100, "lr": 1e-3, "batch": 1024, "smax": 50, "alpha": 0.7, "patience": 10}},
}
REPORTED = {"ranking": ("mrr@5", "ndcg@5", "hr@5"), "accuracy": ("accuracy",)}


def stage_done(prefix: Path) -> bool:
    summary = prefix.with_suffix(".json")
    if not (prefix.with_suffix(".pt").is_file() and summary.is_file()):
        return False
    try:
        return bool(read_json(summary).get("finished"))
    except UserError:
        return False


def run_stage(task: int, manifest: dict, prefix: Path, seed: int, method: str, flags: dict, device: str) -> None:
    script = [str(HERE / "train_task1.py")] if task == 1 else [str(HERE / "train_teracon.py"), "--task", str(task)]
    cmd = [sys.executable, *script, "--dataset", manifest["path"], "--savepath", str(prefix),
           "--seed", str(seed), "--method", method, "--device", device]
    if task > 1:
        cmd += ["--paths", str(prefix.parent / f"task{task - 1}.pt")]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    log.info("$ %s", " ".join(cmd[1:]))
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"task {task} (seed {seed}) failed; fix the error above and rerun: "
                        "finished stages are kept")


def run_seed(manifest: dict, out: Path, method: str, seed: int, preset: dict, args: argparse.Namespace) -> dict:
    """Train every task for one method and seed (skipping finished stages), evaluate the final model."""
    folder = out / method / f"seed{seed}"
    tasks = sorted(int(t["task"]) for t in manifest["tasks"])
    rerun = args.force
    for i, task in enumerate(tasks):
        prefix = folder / f"task{task}"
        name = dl.manifest_task(manifest, task)["name"]
        if not rerun and stage_done(prefix):
            log.info("[%s seed %d] stage %d/%d: task %d (%s) already done, skipped", method, seed, i + 1,
                     len(tasks), task, name)
            continue
        rerun = True  # every later stage depends on this one
        log.info("[%s seed %d] stage %d/%d: task %d (%s)", method, seed, i + 1, len(tasks), task, name)
        flags = dict(preset["task1" if task == 1 else "taskn"])
        if args.max_epochs:
            flags["epochs"] = min(flags["epochs"], args.max_epochs)
            if method == "conure":
                flags["retrain_epochs"] = args.max_epochs
        start = time.time()
        run_stage(task, manifest, prefix, seed, method, flags, args.device)
        s = read_json(prefix.with_suffix(".json"))
        log.info("[%s seed %d] task %d (%s) finished in %.0fs: best epoch %s, test %s", method, seed, task, name,
                 time.time() - start, s["best_epoch"],
                 " ".join(f"{k} {v:.4f}" for k, v in s["test"].items() if k in sum(REPORTED.values(), ())))
    final = folder / "final.json"
    if rerun or not final.is_file():
        rows = evaluate_checkpoint(folder / f"task{tasks[-1]}.pt", args.device)
        atomic_write_json(final, {"method": method, "seed": seed, "rows": rows})
    return read_json(final)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_table(per_seed: dict[int, dict], method: str) -> list[dict]:
    """One row per task and reported metric: after training that task, after the last task."""
    seeds = sorted(per_seed)
    rows = []
    for j, first in enumerate(per_seed[seeds[0]]["rows"]):
        for metric in REPORTED[first["metric"]]:
            after = [per_seed[s]["rows"][j]["after_training"][metric] for s in seeds]
            last = [per_seed[s]["rows"][j]["now"][metric] for s in seeds]
            rows.append({"method": method, "task": first["task"], "name": first["name"], "metric": metric,
                         "after_task": after, "after_last": last})
    return rows


def format_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| method | task | name | metric | after training that task | after the last task |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = _mean_std(r["after_task"]), _mean_std(r["after_last"])
        lines.append(f"| {r['method']} | {r['task']} | {r['name']} | {r['metric']} | "
                     f"{a[0]:.4f} ± {a[1]:.4f} | {b[0]:.4f} ± {b[1]:.4f} |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict], seeds: list[int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "task", "name", "metric", "after_task_mean", "after_task_std", "after_last_mean",
                "after_last_std"] + [f"{c}_seed{s}" for s in seeds for c in ("after_task", "after_last")])
    for r in rows:
        a, b = _mean_std(r["after_task"]), _mean_std(r["after_last"])
        per = [f"{x:.6f}" for pair in zip(r["after_task"], r["after_last"]) for x in pair]
        w.writerow([r["method"], r["task"], r["name"], r["metric"], f"{a[0]:.6f}", f"{a[1]:.6f}",
                    f"{b[0]:.6f}", f"{b[1]:.6f}"] + per)
    return buf.getvalue()


def load_or_prepare(dataset: str) -> dict:
    path = Path(dataset)
    if path.suffix != ".json" and not (dl.DATA_ROOT / dataset / "tasks.json").is_file():
        if dataset != "ml-100k":
            raise UserError(f"{dl.DATA_ROOT / dataset / 'tasks.json'}: not prepared; run "
                            f"`python prepare_data.py {dataset} ...` first (see README)")
        log.info("preparing ml-100k (first run only)")
        if subprocess.run([sys.executable, str(HERE / "prepare_data.py"), "ml-100k"]).returncode != 0:
            raise UserError("prepare_data.py ml-100k failed (see above)")
    return dl.load_manifest(dataset)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="prepared dataset name or a tasks.json path "
                   "(default %(default)s, prepared on the fly)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=["teracon"], choices=sorted(METHODS), metavar="METHOD",
                   help=f"methods, one row group each: {', '.join(sorted(METHODS))} (default %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS) + ["paper"], help="hyperparameters "
                   "(default: the dataset's own preset if it has one, else the paper's)")
    p.add_argument("--max_epochs", type=int, help="cap every task's epochs (quick looks and tests)")
    p.add_argument("--out", default="results", help="output folder; results go to OUT/<dataset>/ "
                   "(default %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain stages that are already done")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    args = p.parse_args(argv)

    start = time.time()
    manifest = load_or_prepare(args.dataset)
    name = manifest.get("dataset") or Path(manifest["dir"]).name
    preset = PAPER if args.preset == "paper" else PRESETS.get(args.preset or name, PAPER)
    out = Path(args.out) / name
    rows = []
    for method in args.methods:
        per_seed = {seed: run_seed(manifest, out, method, seed, preset, args) for seed in args.seeds}
        rows += build_table(per_seed, method)
    title = f"{', '.join(args.methods)} on {name}, seeds {' '.join(map(str, args.seeds))}"
    atomic_write_text(out / "table.md", format_markdown(rows, title))
    atomic_write_text(out / "table.csv", format_csv(rows, args.seeds))
    print(format_markdown(rows, title))
    log.info("wrote %s and %s in %.1f min", out / "table.md", out / "table.csv", (time.time() - start) / 60)
    return rows


if __name__ == "__main__":
    run_cli(main)
