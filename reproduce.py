"""Run the whole task sequence and write the paper-style results table.

    python reproduce.py                          # ml-100k, seed 0, prepared on the fly, into runs/
    python reproduce.py --dataset ttl --seeds 0 1 2
    python reproduce.py --dataset Data/ttl-shape/tasks.json --preset paper --limit_batches 2 --limit_eval_batches 1

For every seed: task 1, then tasks 2..T through the real training scripts, then every task is
evaluated with the final model. Under torchrun every stage runs in this process on all ranks
(`distributed.py`), and rank 0 alone evaluates and writes the tables. A stage whose checkpoint and finished summary exist is skipped
and a stage that was interrupted continues from its resumable state (`--resume`), unless --force.
Writes OUT/<dataset>/ (default runs/, git-ignored; `--out results` writes the committed reference):
table.md and table.csv (every task's metrics, with the trivial reference), summary.md and
summary.csv (average final metric, forgetting, BWT, transfer against SinMo), reference_check.csv
and, where results/<dataset>/table.csv exists, placement.md/.csv: the run against that committed
reference; with plots of each method's first seed (plot_tasks.py).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import cli
import data_loader as dl
import distributed
import plot_tasks
from checkpoint import resume_path
import results
from methods import METHODS
from evaluate import evaluate_checkpoint
from results import reference_rows
from utils import (AMP_MODES, UserError, atomic_write_json, atomic_write_text, positive_int, read_json, run_cli,
                   seed_type, sha256_file)

log = logging.getLogger("teracon")
HERE = Path(__file__).resolve().parent

# Per-dataset presets: the flags of task 1 and of tasks n >= 2. `ttl` is the paper's setting.
PAPER = {"task1": {"epochs": 10, "lr": 1e-3, "batch": 32},
         "taskn": {"epochs": 100, "lr": 1e-4, "batch": 1024, "smax": 50, "alpha": 0.7}}
PRESETS = {
    "ttl": PAPER,
    # ml-100k/2: ~1k users, 1.6k items, 3-7k examples a task, sources of 20 movies. 64 channels
    # (the whole sequence of one method in ~10 min on one CPU core); lr 1e-3 for every task n >= 2
    # (the authors' task-2 setting); up to 100 epochs as the paper, stopped by patience 10
    # (classification tasks sit at the majority class for the first epochs before they learn, and
    # T6 was still improving at epoch 20 when the preset capped tasks at 20 epochs). Batch 256 instead of 1024 so that every task anneals s over
    # at least 10 batches an epoch (eq. 19; with 1024 the classification tasks would train at
    # s = 1/smax only). Two documented deviations, both off by default: --min_retention_rows 16
    # (floor(rho * 256) is 0 once rho < 0.004, which the masks reach here) and --select_by mrr@5
    # (the validation splits hold 170-500 examples, so hit@1 of a ranking task moves in 2-6 hit steps).
    "ml-100k": {"task1": {"epochs": 10, "lr": 1e-3, "batch": 32, "channels": 64},
                "taskn": {"epochs": 100, "lr": 1e-3, "batch": 256, "smax": 50, "alpha": 0.7, "patience": 10,
                          "min_retention_rows": 16, "select_by": "mrr@5"}},
}


def stage_done(prefix: Path, data_file: str, limits: dict[str, int]) -> bool:
    """The stage's checkpoint exists and its summary says it finished on this very task file, with
    the same rehearsal limits (`limit_batches`, `limit_eval_batches`; 0 for a real run)."""
    summary = prefix.with_suffix(".json")
    if not (prefix.with_suffix(".pt").is_file() and summary.is_file()):
        return False
    try:
        s = read_json(summary)
        return (bool(s.get("finished")) and s["task"]["file_sha256"] == sha256_file(data_file)
                and all((s["args"].get(k) or 0) == v for k, v in limits.items()))
    except (UserError, KeyError, TypeError, OSError):
        return False


def run_stage(task: int, manifest: dict, prefix: Path, seed: int, method: str, flags: dict, device: str,
              resume: bool = False, shard: distributed.Shard = distributed.SINGLE) -> None:
    """One task's training script: a subprocess, or under torchrun `cli.main` in this process
    (the ranks' process group serves every stage)."""
    script = [str(HERE / "train_task1.py")] if task == 1 else [str(HERE / "train_teracon.py"), "--task", str(task)]
    cmd = [sys.executable, *script, "--dataset", manifest["path"], "--savepath", str(prefix),
           "--seed", str(seed), "--method", method, "--device", device]
    if task > 1:
        cmd += ["--paths", str(prefix.parent / f"task{task - 1}.pt")]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    if not sys.stderr.isatty():
        cmd.append("--quiet")  # progress bars only on a terminal, not in logs
    if resume:
        cmd.append("--resume")  # an interrupted run of this stage continues where it stopped
        log.info("[%s seed %d] task %d: resuming from %s", method, seed, task, resume_path(str(prefix)))
    log.info("$ %s", " ".join(cmd[1:]))
    if shard.parallel:
        cli.main(cmd[2:], task=1 if task == 1 else None)
        return
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise UserError(f"{method} seed {seed}, task {task} ({prefix}): the training script stopped ({how}); "
                        "its own messages, if any, are above. Rerun the same command: finished stages are kept")


def run_seed(manifest: dict, out: Path, method: str, seed: int, preset: dict, args: argparse.Namespace,
             shard: distributed.Shard = distributed.SINGLE) -> dict | None:
    """Train every task for one method and seed (skipping finished stages), evaluate the final
    model (rank 0; the other ranks of a torchrun return None)."""
    folder = out / method / f"seed{seed}"
    tasks = sorted(int(t["task"]) for t in manifest["tasks"])
    rerun = args.force
    limits = {k: getattr(args, k) or 0 for k in ("limit_batches", "limit_eval_batches")}
    rehearsal = any(limits.values())
    for i, task in enumerate(tasks):
        prefix = folder / f"task{task}"
        name = dl.manifest_task(manifest, task)["name"]
        if not rerun and stage_done(prefix, dl.manifest_task(manifest, task)["file"], limits):
            log.info("[%s seed %d] stage %d/%d: task %d (%s) already done, skipped", method, seed, i + 1,
                     len(tasks), task, name)
            continue
        # An interrupted run of the first stage to redo continues; any other resumable state is
        # stale (an earlier stage is being retrained, or --force) and is removed.
        resume = not rerun and resume_path(str(prefix)).is_file()
        if not resume:
            resume_path(str(prefix)).unlink(missing_ok=True)
        rerun = True  # every later stage depends on this one
        log.info("[%s seed %d] stage %d/%d: task %d (%s)", method, seed, i + 1, len(tasks), task, name)
        flags = dict(preset["task1" if task == 1 else "taskn"], amp=args.amp)
        for flag in ("limit_batches", "limit_eval_batches"):
            if getattr(args, flag):
                flags[flag] = getattr(args, flag)
        if args.max_epochs:  # a cap on every phase of training (CONURE's retraining too)
            flags["epochs"] = min(flags["epochs"], args.max_epochs)
            flags["retrain_epochs"] = args.max_epochs
        start = time.time()
        run_stage(task, manifest, prefix, seed, method, flags, args.device, resume, shard)
        s = read_json(prefix.with_suffix(".json"))
        log.info("[%s seed %d] task %d (%s) finished in %.0fs: best epoch %s, test %s", method, seed, task, name,
                 time.time() - start, s["best_epoch"],
                 " ".join(f"{k} {v:.4f}" for k, v in s["test"].items() if k in sum(results.REPORTED.values(), ())))
    if not shard.main:
        return None
    matrix = folder / "matrix.json"
    if rerun or not matrix.is_file():
        after = [evaluate_checkpoint(folder / f"task{t}.pt", args.device, limit_batches=args.limit_eval_batches)
                 for t in tasks]
        stages = [read_json(folder / f"task{t}.json") for t in tasks]
        codes = [s.get("code") or {} for s in stages]
        atomic_write_json(matrix, {"method": method, "seed": seed, "version": manifest.get("version"),
                                   "commits": sorted({c.get("commit") for c in codes}, key=str),
                                   "dirty": any(bool(c.get("dirty")) for c in codes), "rehearsal": rehearsal,
                                   "after": after, "reference": reference_rows(str(folder / f"task{tasks[-1]}.pt"))})
    return read_json(matrix)


def write_results(runs: list[dict], out: Path, title: str) -> tuple[list[dict], str]:
    """table.md/csv (every reported metric, with the reference rows) and summary.md/csv;
    returns the table's rows and the summary's text. Titles name the code commit (or warn)."""
    frame = results.long_frame(runs)
    table = results.metric_table(frame)
    summary = results.summary_frame(frame)
    check = results.reference_check(frame)
    title = f"{title} ({results.provenance(runs)})"
    atomic_write_text(out / "table.md", results.format_metric_table(table, title))
    atomic_write_text(out / "table.csv", results.metric_table_csv(table))
    text = results.format_summary(summary, check, f"Summary: {title}")
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    atomic_write_text(out / "reference_check.csv", check.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    return table.to_dict("records"), text


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
    """Train, evaluate and summarise; returns the rows of table.md (reference rows first)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="prepared dataset name or a tasks.json path "
                   "(default %(default)s, prepared on the fly)")
    p.add_argument("--seeds", type=seed_type("--seeds"), nargs="+", default=[0], help="seeds to run (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=["teracon"], choices=list(METHODS), metavar="METHOD",
                   help=f"methods, one row group each: {', '.join(METHODS)} (default %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS) + ["paper"], help="hyperparameters "
                   "(default: the dataset's own preset if it has one, else the paper's)")
    p.add_argument("--max_epochs", type=positive_int("--max_epochs"), help="cap every task's epochs (quick looks and tests)")
    p.add_argument("--out", default="runs", help="output folder; results go to OUT/<dataset>/ (default "
                   "%(default)s, git-ignored; `--out results` overwrites the committed reference)")
    p.add_argument("--limit_batches", type=positive_int("--limit_batches"), help="a rehearsal of the "
                   "recipe: at most N training batches an epoch in every stage (marked rehearsal everywhere)")
    p.add_argument("--limit_eval_batches", type=positive_int("--limit_eval_batches"), help="a rehearsal: at "
                   "most N evaluation batches a split in every stage and in the final evaluation")
    p.add_argument("--no_plots", action="store_true", help="skip plot_tasks.py's pictures of each "
                   "method's first seed")
    p.add_argument("--force", action="store_true", help="retrain stages that are already done")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--amp", choices=AMP_MODES, default="fp32", help="precision of every stage: fp32, tf32 "
                   "(Ampere-or-newer GPUs; the authors' setting there) or bf16 autocast (pays on CUDA and on "
                   "CPUs with AMX or AVX512-BF16) (default %(default)s)")
    args = p.parse_args(argv)

    start = time.time()
    shard, _ = distributed.init(args.device)
    manifest = load_or_prepare(args.dataset) if shard.main else None  # rank 0 prepares ml-100k on its first run
    distributed.barrier(shard)  # the others wait for it, then read the manifest
    manifest = manifest or load_or_prepare(args.dataset)
    name = manifest.get("dataset") or Path(manifest["dir"]).name
    preset = PAPER if args.preset == "paper" else PRESETS.get(args.preset or name, PAPER)
    out = Path(args.out) / name
    runs = [run_seed(manifest, out, method, seed, preset, args, shard) for method in args.methods for seed in args.seeds]
    if not shard.main:
        return []
    version = manifest.get("version") or name
    title = f"{', '.join(args.methods)} on {version}, seeds {' '.join(map(str, args.seeds))}"
    rows, text = write_results(runs, out, title)
    print(text)
    place_against_reference(runs, out, name, version, args)
    if not args.no_plots:
        for method in args.methods:
            draw_run(out / method / f"seed{args.seeds[0]}")
    log.info("wrote %s (table.md, table.csv, summary.md, summary.csv) in %.1f min", out,
             (time.time() - start) / 60)
    return rows


def place_against_reference(runs: list[dict], out: Path, name: str, version: str, args: argparse.Namespace) -> None:
    """placement.md/csv and the log: this run against the committed reference of the same dataset
    and protocol (results/<dataset>/table.csv), unless this run is that reference."""
    ref_dir = HERE / "results" / name
    if not (ref_dir / "table.csv").is_file() or out.resolve() == ref_dir.resolve():
        return
    head = (ref_dir / "table.md").read_text(encoding="utf-8").splitlines()[0] if (ref_dir / "table.md").is_file() else ""
    if f" on {version}," not in head:
        log.warning("%s is of another protocol than %s: not placed against it", ref_dir, version)
        return
    place = results.placement(results.long_frame(runs), ref_dir / "table.csv")
    text = results.format_placement(place, str(ref_dir.relative_to(HERE) / "table.csv"))
    if args.max_epochs or args.limit_batches or args.limit_eval_batches:
        text += ("This run was shortened (--max_epochs or a rehearsal's limits): it is not expected to "
                 "match the reference.\n")
    atomic_write_text(out / "placement.md", text)
    atomic_write_text(out / "placement.csv", place.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    print(text)


def draw_run(run: Path) -> None:
    """plot_tasks.py's pictures of one run (skipped with a warning without matplotlib)."""
    try:
        plot_tasks.main(["--run", str(run)])
    except UserError as e:
        log.warning("no plots for %s: %s", run, e)


if __name__ == "__main__":
    run_cli(main)
