#!/usr/bin/env python3
"""Speed-up of data parallelism: N torchrun ranks of one thread each against one process of one
thread, on the same task-1 and task-2 training steps (README, "More than one GPU or node").

    OMP_NUM_THREADS=1 python scripts/ddp_speedup.py --dataset ml-100k --repeats 2

Each arm trains task 1 (then task 2 from the one-process task-1 checkpoint) for one epoch of
`--limit_batches` steps through the real scripts (`train_task1.py`, `train_teracon_t2.py`) and
reads the step time the run records (PREFIX.json, epochs[0].timing.step_seconds). The arms
alternate every repeat so that drift in machine load hits both alike; the median is reported.
Figures are per CPU: the CPU's name and its fp32 matmul rate (one thread) are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from bench import matmul_reference  # noqa: E402
from bench_authors import cpu_name  # noqa: E402
from utils import UserError, positive_int, run_cli  # noqa: E402

log = logging.getLogger("teracon")


def train(task: int, ranks: int, folder: Path, a: argparse.Namespace, paths: Path | None = None) -> float:
    """One epoch of `--limit_batches` steps of task `task` on `ranks` ranks; its seconds a step."""
    script = str(HERE / ("train_task1.py" if task == 1 else "train_teracon_t2.py"))
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    flags = ["--dataset", a.dataset, "--savepath", str(folder / f"task{task}"), "--datapath_index",
             str(folder / "index.json") if task == 1 else str(paths.parent / "index.json"), "--device", "cpu",
             "--epochs", "1", "--limit_batches", str(a.limit_batches), "--limit_eval_batches", "1", "--quiet"]
    flags += ["--channels", str(a.channels), "--batch", str(a.batch1)] if task == 1 else \
        ["--paths", str(paths), "--batch", str(a.batchn)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*launcher, script, *flags], cwd=HERE, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"task {task} on {ranks} rank(s) failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    summary = json.loads((folder / f"task{task}.json").read_text())
    return summary["epochs"][0]["timing"]["step_seconds"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="prepared dataset (default %(default)s)")
    p.add_argument("--ranks", type=positive_int("--ranks"), default=2, help="ranks of the parallel arm (default %(default)s)")
    p.add_argument("--repeats", type=positive_int("--repeats"), default=2, help="rounds of both arms (default %(default)s)")
    p.add_argument("--limit_batches", type=positive_int("--limit_batches"), default=20,
                   help="training steps timed per run (default %(default)s)")
    p.add_argument("--channels", type=positive_int("--channels"), default=256, help="C (default %(default)s, the paper's)")
    p.add_argument("--batch1", type=positive_int("--batch1"), default=32, help="task-1 global batch (default %(default)s)")
    p.add_argument("--batchn", type=positive_int("--batchn"), default=1024, help="task-2 global batch (default %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rate = matmul_reference(torch.float32, torch.device("cpu"), 2048, a.channels)["flops_per_s"]
    times: dict[str, list[float]] = {f"task{t} x{r}": [] for t in (1, 2) for r in (1, a.ranks)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        train(1, 1, base, a)  # the task-1 checkpoint every task-2 run starts from
        for repeat in range(a.repeats):
            for ranks in ((1, a.ranks) if repeat % 2 == 0 else (a.ranks, 1)):
                folder = Path(tmp) / f"r{repeat}x{ranks}"
                times[f"task1 x{ranks}"].append(train(1, ranks, folder, a))
                times[f"task2 x{ranks}"].append(train(2, ranks, folder, a, paths=base / "task1.pt"))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"cpu": cpu_name(), "matmul_fp32_one_thread_gflops": round(rate / 1e9, 1), "times": times,
           "speedup": {f"task{t}": round(med[f"task{t} x1"] / med[f"task{t} x{a.ranks}"], 2) for t in (1, 2)},
           "args": vars(a)}
    print(f"CPU: {out['cpu']}; fp32 matmul, one thread: {out['matmul_fp32_one_thread_gflops']} GFLOP/s")
    print(f"| step (C {a.channels}, {a.limit_batches} steps, median of {a.repeats}) | 1 process x 1 thread | "
          f"{a.ranks} ranks x 1 thread | speed-up |")
    print("|---|---|---|---|")
    for t, batch in ((1, a.batch1), (2, a.batchn)):
        print(f"| task {t}, global batch {batch} | {med[f'task{t} x1']:.3f} s | {med[f'task{t} x{a.ranks}']:.3f} s | "
              f"{out['speedup'][f'task{t}']:.2f}x |")
    return out


if __name__ == "__main__":
    run_cli(main)
