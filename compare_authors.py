#!/usr/bin/env python3
"""Run-level comparison of the authors' TERACON code and ours (issue 22): both train three tasks
on the same synthetic CSV files with the same settings over several seeds; per cell (phase x task
x metric) it prints each arm's mean +- sd, the difference ours - authors, d (difference / pooled
sd) and the per-seed differences.

The authors' side runs their scripts, unmodified, from a checkout (`--authors`):
train_task1.py, train_teracon.py (tasks 2 and 3) and inference_past_tasks.py (every task with the
final model), each in its own process through `scripts/run_authors.py`, which applies the only
run-time adaptations (`Tensor.get_device`, `--gpu_num cpu`, `.view` -> `.reshape` when not
contiguous). Their metrics are read from their stdout as they print them: the last test block of
a training script (the test at the best validation epoch) and the one test block of
inference_past_tasks.py. They evaluate on random full batches (SPEC 2): their test and
validation figures cover a random subset of each split. Our side runs train_task1.py,
train_teracon_t2.py, train_teracon_t3.py and evaluate.py of the code folder `--ours`.

Arms: `authors`; `ours` (defaults); `ours-match` (--drop_last --select_on random_batches on
every task); `ours-drop_last`; `ours-random_batches`. Each (arm, seed) writes one JSON into
`--out`/per_run/ and is skipped when that JSON exists, so an interrupted comparison continues;
`--report` only aggregates.

    python compare_authors.py --authors /tmp/teracon_authors --arms authors ours-match --seeds 0 1 2
    python compare_authors.py --report --out results/compare_authors
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import utils
from bench_authors import checkout_error, cpu_name
from datasets.common import Task, left_pad, write_dataset
from utils import OneLineParser as Parser, UserError, atomic_write_json, atomic_write_text, run_cli, sha256_file

log = logging.getLogger("teracon")

ROOT = Path(__file__).resolve().parent
HARNESS_SHA256 = sha256_file(__file__)  # of the file as loaded, not as it may be edited while runs go on
AUTHORS_SCRIPTS = ("train_task1.py", "train_teracon.py", "inference_past_tasks.py", "data_loader.py")
ARMS = {"authors": None, "ours": [], "ours-match": ["--drop_last", "--select_on", "random_batches"],
        "ours-drop_last": ["--drop_last"], "ours-random_batches": ["--select_on", "random_batches"]}
FACTORIAL = ("ours", "ours-drop_last", "ours-random_batches", "ours-match")  # the 2 x 2 of the two switches
TASKS = ("t1_watch", "t2_click", "t3_profile")
RANKING_METRICS = ("mrr@5", "hr@5", "ndcg@5")
METRIC_ORDER = (*RANKING_METRICS, "accuracy")
PHASES = ("after_task", "after_last")
AUTHORS_METRIC = {"mrr_5": "mrr@5", "mrr_20": "mrr@20", "hit_5": "hr@5", "hit_20": "hr@20",
                  "ndcg_5": "ndcg@5", "ndcg_20": "ndcg@20"}
MARKER = re.compile(r"-{20,}(train|valid|test)\s*$")
AUTHORS_LINE = re.compile(r"Accuracy (mrr|hit|ndcg)_(5|20): (\S+)")
AUTHORS_HIT1 = re.compile(r"accuracy\(hit@1\):\s*(\S+)")
AUTHORS_EPOCH = re.compile(r"^epoch:(\d+)\s+accuracy\(hit@1\)")
AUTHORS_VALID_HITS = re.compile(r"^Acc\(hit@1\): \S+% \((\d+)/(\d+)\)")  # training lines start with "Loss:"


# ------------------------------------------------------------------------------ data

def comparison_tasks(users: int = 11000, items: int = 500, seq_len: int = 16, click_classes: int = 488,
                     profile_classes: int = 8, seed: int = 0, noise: float = 0.1, max_step: int = 3,
                     label_noise: float = 0.3) -> tuple[list[Task], str]:
    """The three tasks of the comparison, in the spirit of `datasets.synthetic` (users in latent
    clusters walking their cluster's item cycle), sized so that the authors' evaluation batcher
    (full batches of 1024 strictly inside a split) finds a batch in every split of tasks 2 and 3."""
    rng = np.random.default_rng(seed)
    k = profile_classes
    cycles = np.array_split(rng.permutation(np.arange(1, items + 1)), k)
    clickable = set(rng.permutation(np.arange(1, items + 1))[:click_classes].tolist())
    cluster = rng.permutation(np.arange(users) % k)
    profile = np.where(rng.random(users) < label_noise, rng.integers(0, k, size=users), cluster)
    min_len = seq_len // 2

    def walk(cyc: np.ndarray, start: int, n: int) -> tuple[np.ndarray, int]:
        """n items from position `start` on, each step 1..max_step positions ahead; the last position."""
        pos = start + np.concatenate([[0], np.cumsum(rng.integers(1, max_step + 1, size=n - 1))])
        seq = cyc[pos % len(cyc)].astype(np.int64)
        flip = rng.random(n) < noise
        seq[flip] = rng.integers(1, items + 1, size=int(flip.sum()))
        return seq, int(pos[-1])

    seqs, clicks, sessions = [], [], []
    for u in range(users):
        cyc = cycles[cluster[u]]
        start, n = int(rng.integers(len(cyc))), int(rng.integers(min_len, seq_len + 1))
        seq, end = walk(cyc, start, n)
        seqs.append(left_pad(seq, seq_len))
        after = [int(x) for x in cyc[(end + 1 + np.arange(len(cyc))) % len(cyc)] if int(x) in clickable]
        clicks.append(after[:int(rng.integers(2, 4))])
        session, _ = walk(cyc, int(rng.integers(len(cyc))), int(rng.integers(min_len, seq_len + 1)))
        sessions.append(left_pad(session, seq_len))
    sources = np.stack(seqs)
    profile_sources = np.concatenate([sources, np.stack(sessions)])
    profile_targets = [[int(c)] for c in np.concatenate([profile, profile])]
    tasks = [Task("watch", sources, None, users), Task("click", sources, clicks, users),
             Task("profile", profile_sources, profile_targets, users)]
    protocol = (
        f"Comparison data (compare_authors.py, seed {seed}): {users} users in {k} equal latent clusters; "
        f"items 1..{items} split at random into {k} cycles, one per cluster; {click_classes} items, drawn at "
        f"random, are clickable. A user's sequence (length {min_len}..{seq_len}, left-padded to {seq_len}) "
        f"walks the cluster's cycle from a random start, each step 1 to {max_step} positions ahead at random, "
        f"each item replaced by a random one with probability {noise}. T1 watch: the sequences. T2 click: the "
        f"next 2-3 clickable items of the cycle after the sequence's last position. T3 profile: the cluster "
        f"id ({k} classes), replaced by a random class for a share "
        f"{label_noise} of users; two lines per user, the T1 sequence and a second session (another walk of "
        "the cycle), so that the validation split holds more than one batch of 1024.")
    return tasks, protocol


def make_data(out: Path, seed: int) -> Path:
    """Write the comparison data (CONURE/TERACON CSV files, manifest, cache) unless present."""
    manifest = out / "tasks.json"
    if manifest.is_file():
        return manifest
    tasks, protocol = comparison_tasks(seed=seed)
    clicks = {t for ts in tasks[1].targets for t in ts}
    log.info("writing the comparison data into %s (%d click classes)", out, len(clicks))
    return write_dataset(out, "compare-authors", protocol, tasks, f"python compare_authors.py --data_seed {seed}")


# ------------------------------------------------------------------------------ parsing

def parse_authors_tests(text: str) -> list[dict[str, float]]:
    """Every test block the authors' scripts print, in order, as {metric: value}; their hit_k is
    our hr@k, their accuracy(hit@1) (a percentage) our hit@1 (= accuracy) as a fraction."""
    blocks, current = [], None
    for line in text.splitlines():
        m = MARKER.search(line)
        if m:
            current = {} if m.group(1) == "test" else None
            if current is not None:
                blocks.append(current)
            continue
        if current is None:
            continue
        m = AUTHORS_LINE.search(line)
        if m:
            current[AUTHORS_METRIC[f"{m.group(1)}_{m.group(2)}"]] = float(m.group(3))
            continue
        m = AUTHORS_HIT1.search(line)
        if m:
            current["hit@1"] = float(m.group(1)) / 100.0
            current["accuracy"] = current["hit@1"]
        m = AUTHORS_EPOCH.search(line)
        if m:
            current["epoch"] = int(m.group(1)) + 1  # theirs count from 0, ours from 1
    return blocks


def parse_authors_valid(text: str) -> list[list[int]]:
    """[hits, examples] of every validation block the authors' scripts print (one per epoch)."""
    out, in_valid = [], False
    for line in text.splitlines():
        m = MARKER.search(line)
        if m:
            in_valid = m.group(1) == "valid"
            continue
        m = AUTHORS_VALID_HITS.search(line)
        if in_valid and m:
            out.append([int(m.group(1)), int(m.group(2))])
            in_valid = False
    return out


def last_test(text: str, what: str) -> dict[str, float]:
    blocks = parse_authors_tests(text)
    if not blocks or "hit@1" not in blocks[-1]:
        raise RuntimeError(f"{what}: no test metrics in the authors' output")
    return blocks[-1]


def cell_values(metrics: dict[str, float], task: int) -> dict[str, float]:
    """The metrics a cell table shows: @5 for the ranking tasks 1-2, accuracy for task 3."""
    keys = ("accuracy",) if task == 3 else RANKING_METRICS
    return {k: metrics[k] for k in keys}


# ------------------------------------------------------------------------------ statistics

def summarise(ours: dict[int, float], theirs: dict[int, float]) -> dict:
    """Means, sample sds, difference ours - theirs, pooled sd, d, and the per-seed differences
    (seeds present on both sides)."""
    a, b = list(ours.values()), list(theirs.values())
    sd_a = statistics.stdev(a) if len(a) > 1 else float("nan")
    sd_b = statistics.stdev(b) if len(b) > 1 else float("nan")
    dof = len(a) + len(b) - 2  # an arm of one run adds nothing to the pooled variance
    squares = sum((len(x) - 1) * sd ** 2 for x, sd in ((a, sd_a), (b, sd_b)) if len(x) > 1)
    pooled = math.sqrt(squares / dof) if dof > 0 else float("nan")
    diff = statistics.fmean(a) - statistics.fmean(b)
    per_seed = {s: ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))}
    return {"ours_mean": statistics.fmean(a), "ours_sd": sd_a, "n_ours": len(a),
            "theirs_mean": statistics.fmean(b), "theirs_sd": sd_b, "n_theirs": len(b),
            "diff": diff, "pooled_sd": pooled, "d": diff / pooled if pooled > 0 else float("nan"),
            "per_seed": per_seed, "lower": sum(v < 0 for v in per_seed.values())}


def switch_effects(cell: dict[str, dict[int, float]]) -> dict[str, dict] | None:
    """Main effect of each switch in the 2 x 2 design of our four arms (FACTORIAL): the mean of
    the two arms with the switch on minus the mean of the two with it off. Its standard error
    uses the within-arm variance pooled over the four arms (N - 4 degrees of freedom):
    se = sqrt(var / 4 * sum of 1/n_arm); t = effect / se; d = effect / pooled sd. Also the
    interaction (half the difference of one switch's effect with and without the other).
    The arms share their seeds (a seed fixes the split, the initialisation and the batch order
    of every arm), so each effect is also tested paired: per seed present in all four arms the
    same contrast, then t = mean / (sd / sqrt(n)) on n - 1 degrees of freedom (`paired_t`,
    `paired_dof`; nan under 2 seeds).
    None unless all four arms have a value and the pooled variance has a degree of freedom."""
    if any(not cell.get(arm) for arm in FACTORIAL):
        return None
    values = {arm: list(cell[arm].values()) for arm in FACTORIAL}
    dof = sum(len(v) for v in values.values()) - 4
    if dof < 1:
        return None
    var = sum((len(v) - 1) * statistics.variance(v) for v in values.values() if len(v) > 1) / dof
    mean = {arm: statistics.fmean(v) for arm, v in values.items()}
    se = math.sqrt(var / 4 * sum(1 / len(v) for v in values.values()))
    # +1 where an arm's flags (ARMS) have the switch on, -1 where off; the interaction is their product
    drop = {arm: 1 if "--drop_last" in ARMS[arm] else -1 for arm in FACTORIAL}
    select = {arm: 1 if "random_batches" in ARMS[arm] else -1 for arm in FACTORIAL}
    signs = {"--drop_last": drop, "--select_on random_batches": select,
             "interaction": {arm: drop[arm] * select[arm] for arm in FACTORIAL}}
    seeds = sorted(set.intersection(*(set(cell[arm]) for arm in FACTORIAL)))
    out = {}
    for name, sign in signs.items():
        effect = sum(sign[arm] * mean[arm] for arm in FACTORIAL) / 2
        per_seed = [sum(sign[arm] * cell[arm][x] for arm in FACTORIAL) / 2 for x in seeds]
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else float("nan")
        paired = statistics.fmean(per_seed) / (sd / math.sqrt(len(per_seed))) if sd > 0 else float("nan")
        out[name] = {"effect": effect, "se": se, "t": effect / se if se > 0 else float("nan"),
                     "d": effect / math.sqrt(var) if var > 0 else float("nan"), "dof": dof,
                     "paired_t": paired, "paired_dof": len(per_seed) - 1}
    return out


def effects_table(runs: list[dict]) -> str:
    """Markdown table of `switch_effects` for every cell that all four of our arms have."""
    data = collect(runs)
    if any(arm not in data for arm in FACTORIAL):
        return ""
    from results import t_975  # results imports pandas: only when a table is made
    lines = ["| phase | task | metric | runs per arm | --drop_last: effect (se), t, paired t | "
             "--select_on random_batches: effect (se), t, paired t | interaction: effect, t, paired t |",
             "|---|---|---|---|---|---|---|"]
    crit = crit_paired = None
    for key in sorted(set.intersection(*(set(data[arm]) for arm in FACTORIAL)), key=cell_order):
        e = switch_effects({arm: data[arm][key] for arm in FACTORIAL})
        if e is None:
            continue
        dof, pdof = e["interaction"]["dof"], e["interaction"]["paired_dof"]
        crit, crit_paired = t_975(dof), t_975(pdof) if pdof >= 1 else math.inf
        star = lambda x, key, c: "*" if abs(x[key]) > c else ""  # noqa: E731
        n = "/".join(str(len(data[arm][key])) for arm in FACTORIAL)
        cells = [f"{e[k]['effect']:+.4f}" + (f" ({e[k]['se']:.4f})" if k != "interaction" else "")
                 + f", {e[k]['t']:+.2f}{star(e[k], 't', crit)}, {e[k]['paired_t']:+.2f}{star(e[k], 'paired_t', crit_paired)}"
                 for k in ("--drop_last", "--select_on random_batches", "interaction")]
        lines.append(f"| {key[0].replace('_', ' ')} | T{key[1]} | {key[2]} | {n} | " + " | ".join(cells) + " |")
    if crit is None:
        return ""
    return "\n".join(lines) + f"\n\n`*`: beyond the two-sided 5% point of one cell: |t| > t_0.975({dof}) = {crit:.3f}, " \
        f"|paired t| > t_0.975({pdof}) = {crit_paired:.3f} (with 14 cells and 3 effects, about two such marks in 40 " \
        "come by chance in each column)."


def cell_order(key: tuple[str, int, str]) -> tuple[int, int, int]:
    """Table order of a (phase, task, metric) cell: phase, then task, then metric."""
    return PHASES.index(key[0]), key[1], METRIC_ORDER.index(key[2])


def collect(runs: list[dict]) -> dict[str, dict[tuple[str, int, str], dict[int, float]]]:
    """arm -> (phase, task, metric) -> seed -> value."""
    out: dict = {}
    for r in runs:
        cells = out.setdefault(r["arm"], {})
        for phase in PHASES:
            for task, metrics in r["cells"][phase].items():
                for metric, value in metrics.items():
                    cells.setdefault((phase, int(task), metric), {})[r["seed"]] = value
    return out


def table(runs: list[dict], arm: str, versus: str = "authors") -> tuple[str, list[dict]]:
    """Markdown table of `arm` against `versus`, and its rows."""
    data = collect(runs)
    if arm not in data or versus not in data:
        return "", []
    rows, lines = [], [f"| phase | task | metric | {versus} | {arm} | diff | d | lower | per seed, {arm} - {versus} |",
                       "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(set(data[arm]) & set(data[versus]), key=cell_order):
        s = summarise(data[arm][key], data[versus][key])
        rows.append({"phase": key[0], "task": key[1], "metric": key[2], **s})
        seeds = " ".join(f"{v:+.3f}" for v in s["per_seed"].values())
        lines.append(f"| {key[0].replace('_', ' ')} | T{key[1]} | {key[2]} | {s['theirs_mean']:.4f} +- "
                     f"{s['theirs_sd']:.4f} | {s['ours_mean']:.4f} +- {s['ours_sd']:.4f} | {s['diff']:+.4f} | "
                     f"{s['d']:+.2f} | {s['lower']}/{len(s['per_seed'])} | {seeds} |")
    return "\n".join(lines), rows


# ------------------------------------------------------------------------------ running

def run_stage(cmd: list[str], log_path: Path, cwd: Path) -> tuple[str, float]:
    """Run one script, its stdout and stderr into `log_path`; returns (stdout, seconds)."""
    log.info("$ %s", shlex.join(cmd))
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.time() - start
    atomic_write_text(log_path, proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"{cmd[1]} exited {proc.returncode} after {seconds:.0f}s: {tail[0]} (log {log_path})")
    return proc.stdout, seconds


def authors_run(a: argparse.Namespace, data: Path, work: Path, seed: int) -> tuple[dict, list[dict]]:
    py = [sys.executable, str(ROOT / "scripts" / "run_authors.py"), "--authors", str(a.authors)]
    files = [str((data / f"{t}.csv").resolve()) for t in TASKS]
    index, common = str(work / "index.csv"), ["--gpu_num", "cpu", "--seed", str(seed), "--smax", str(a.smax)]
    stages, cells = [], {"after_task": {}, "after_last": {}}

    def stage(name: str, script: str, flags: list[str]) -> str:
        out, seconds = run_stage([*py, script, *flags], work / f"{name}.log", work)
        stages.append({"stage": name, "command": shlex.join([*py, script, *flags]), "seconds": round(seconds, 1)})
        return out

    out = stage("task1", "train_task1.py", [*common, "--epochs", str(a.epochs[0]), "--lr", str(a.lr),
                                            "--datapath", files[0], "--datapath_index", index,
                                            "--savepath", str(work / "task1")])
    selected = {1: last_test(out, "task 1").get("epoch")}
    cells["after_task"][1] = cell_values(last_test(out, "task 1"), 1)
    cells["valid_hits"] = {1: parse_authors_valid(out)}
    for n in range(2, a.tasks + 1):
        out = stage(f"task{n}", "train_teracon.py",
                    [*common, "--epochs", str(a.epochs[n - 1]), "--lr", str(a.lr), "--batch", str(a.batch),
                     "--alpha", str(a.alpha), "--datapath", files[n - 1], "--datapath_index", index,
                     "--paths", str(work / f"task{n - 1}.t7"), "--savepath", str(work / f"task{n}"),
                     "--n_tasks", str(n)])
        cells["after_task"][n] = cell_values(last_test(out, f"task {n}"), n)
        cells["valid_hits"][n] = parse_authors_valid(out)
        selected[n] = last_test(out, f"task {n}").get("epoch")
    for n in (1, 2, 3) if a.tasks == 3 else ():
        out = stage(f"past{n}", "inference_past_tasks.py",
                    [*common, "--batch", str(a.batch), "--datapath", files[n - 1], "--datapath_index", index,
                     "--paths", str(work / "task3.t7"), "--n_tasks", "3", "--inference_task", str(n),
                     "--savepath", str(work / f"past{n}")])
        cells["after_last"][n] = cell_values(last_test(out, f"inference of task {n}"), n)
    cells["selected_epoch"] = selected
    return cells, stages


def ours_run(a: argparse.Namespace, arm: str, data: Path, work: Path, seed: int) -> tuple[dict, list[dict]]:
    manifest = str((data / "tasks.json").resolve())
    common = ["--dataset", manifest, "--datapath_index", str(work / "index.json"), "--seed", str(seed),
              "--smax", str(a.smax), "--patience", "5", "--device", "cpu", "--quiet", *ARMS[arm]]
    stages, cells = [], {"after_task": {}, "after_last": {}}
    scripts = ("train_task1.py", "train_teracon_t2.py", "train_teracon_t3.py")
    for n, script in enumerate(scripts[:a.tasks], 1):
        flags = [*common, "--epochs", str(a.epochs[n - 1]), "--lr", str(a.lr), "--savepath", str(work / f"task{n}")]
        if n == 1:
            flags += ["--batch", "32", "--mask_reg", "0", "--channels", "256", "--dilations", *"1 4 1 4 1 4 1 4".split()]
        else:
            flags += ["--batch", str(a.batch), "--alpha", str(a.alpha), "--paths", str(work / f"task{n - 1}.pt")]
        cmd = [sys.executable, str(a.ours / script), *flags]
        _, seconds = run_stage(cmd, work / f"task{n}.log", a.ours)
        stages.append({"stage": f"task{n}", "command": shlex.join(cmd), "seconds": round(seconds, 1)})
        summary = json.loads((work / f"task{n}.json").read_text())
        cells["after_task"][n] = cell_values(summary["test"], n)
        cells.setdefault("selected_epoch", {})[n] = summary["best_epoch"]
        cells.setdefault("valid_hits", {})[n] = [[round(e["valid"]["hit@1"] * e["timing"]["valid_examples"]),
                                                  e["timing"]["valid_examples"]] for e in summary["epochs"]]
    if a.tasks < 3:
        return cells, stages
    cmd = [sys.executable, str(a.ours / "evaluate.py"), "--paths", str(work / "task3.pt"), "--device", "cpu",
           "--json", str(work / "eval.json")]
    _, seconds = run_stage(cmd, work / "evaluate.log", a.ours)
    stages.append({"stage": "evaluate", "command": shlex.join(cmd), "seconds": round(seconds, 1)})
    for row in json.loads((work / "eval.json").read_text())["rows"]:
        cells["after_last"][row["task"]] = cell_values(row["now"], row["task"])
    return cells, stages


def code_of(folder: Path) -> dict:
    """The git commit of `folder` and whether its tracked files differ from it."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else "unknown"
    return {"folder": str(folder), "commit": git("rev-parse", "HEAD"),
            "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}


def one_run(a: argparse.Namespace, arm: str, seed: int, data: Path) -> dict:
    work = a.work / arm / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if arm == "authors":
        cells, stages = authors_run(a, data, work, seed)
        code = {"authors": code_of(a.authors), "folder": str(a.authors)}
    else:
        cells, stages = ours_run(a, arm, data, work, seed)
        code = code_of(a.ours)
    return {"arm": arm, "seed": seed, "flags": ARMS[arm], "cells": cells, "stages": stages,
            "seconds": round(time.time() - start, 1), "code": code,
            "harness_sha256": HARNESS_SHA256, "cpu": cpu_name(),
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "data": {t: sha256_file(data / f"{t}.csv") for t in TASKS},
            "settings": {"epochs": a.epochs, "lr": a.lr, "batch": a.batch, "batch1": 32, "alpha": a.alpha,
                         "smax": a.smax, "patience": 5, "channels": 256, "dilations": [1, 4] * 4, "mask_reg": 0,
                         "tasks": a.tasks}}


def valid_hits_table(runs: list[dict], arms: list[str]) -> str:
    """Markdown: per arm and task, the mean validation hits of each epoch over the runs that
    recorded them (`cells.valid_hits`), of how many examples, and the selected-epoch counts."""
    lines = ["| arm | task | runs | examples | mean hits per epoch | selected epoch: runs |", "|---|---|---|---|---|---|"]
    for arm in arms:
        for task in (1, 2, 3):
            recs = [r["cells"] for r in runs if r["arm"] == arm and str(task) in
                    {str(k) for k in r["cells"].get("valid_hits", {})}]
            if not recs:
                continue
            per = [c["valid_hits"].get(str(task), c["valid_hits"].get(task)) for c in recs]
            epochs = max(len(p) for p in per)
            means = [statistics.fmean(p[e][0] for p in per if len(p) > e) for e in range(epochs)]
            sizes = sorted({h[1] for p in per for h in p})
            chosen = [c["selected_epoch"].get(str(task), c["selected_epoch"].get(task)) for c in recs]
            counts = ", ".join(f"{e}: {chosen.count(e)}" for e in sorted({x for x in chosen if x is not None}))
            lines.append(f"| {arm} | T{task} | {len(recs)} | {'/'.join(map(str, sizes))} | "
                         f"{' / '.join(f'{m:.1f}' for m in means)} | {counts} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "per_run").glob("*/seed*.json"))]


def report(out: Path, command: str) -> str:
    """The tables of every ours arm against the authors; also written to `out`/table.md."""
    runs = load_runs(out)
    if not runs:
        raise UserError(f"{out}/per_run: no run JSON yet")
    arms = sorted({r["arm"] for r in runs}, key=list(ARMS).index)
    parts = [f"# compare_authors: ours against the authors' code, {len(runs)} runs\n",
             f"Command: `{command}`\n"]
    codes = sorted({r["code"].get("commit", "") for r in runs if r["arm"] != "authors"} - {""})
    authors_code = sorted({r["code"]["authors"]["commit"] for r in runs if r["arm"] == "authors"})
    parts.append(f"Our code: commit(s) {', '.join(codes) or '-'}; the authors': commit(s) "
                 f"{', '.join(authors_code) or '-'} (their checkout, unmodified). CPU: "
                 f"{', '.join(sorted({r['cpu'] for r in runs}))}; threads: "
                 f"{', '.join(sorted({str(r['threads']) for r in runs}))}.\n")
    parts.append("| arm | seeds | seconds per run (mean, min-max) | seconds in all |\n|---|---|---|---|")
    total = 0.0
    for arm in arms:
        secs = [r["seconds"] for r in runs if r["arm"] == arm]
        total += sum(secs)
        seeds = sorted(r["seed"] for r in runs if r["arm"] == arm)
        parts.append(f"| {arm} | {' '.join(map(str, seeds))} | {statistics.fmean(secs):.0f} "
                     f"({min(secs):.0f}-{max(secs):.0f}) | {sum(secs):.0f} |")
    parts.append(f"| all | | | {total:.0f} ({total / 3600:.2f} h) |\n")
    parts.append("Selected epoch (the best validation epoch, whose checkpoint the next task starts from) "
                 "of T1 / T2 / T3, per seed:\n\n| arm | " + " | ".join(f"seed {s}" for s in
                 sorted({r['seed'] for r in runs})) + " |\n|---|" + "---|" * len({r['seed'] for r in runs}))
    for arm in arms:
        by_seed = {r["seed"]: r["cells"].get("selected_epoch", {}) for r in runs if r["arm"] == arm}
        parts.append(f"| {arm} | " + " | ".join(
            " / ".join(str(by_seed[s].get(str(t), by_seed[s].get(t, "-"))) for t in (1, 2, 3)) if s in by_seed else ""
            for s in sorted({r['seed'] for r in runs})) + " |")
    parts.append("")
    hits = valid_hits_table(runs, arms)
    if hits:
        parts.append("Validation hit@1 per epoch, in examples (mean over the seeds that recorded it; the authors "
                     "and `--select_on random_batches` count a random subset of full batches, drawn afresh "
                     "each epoch), and how often each epoch was selected:\n\n" + hits + "\n")
    for arm in arms:
        if arm == "authors":
            continue
        text, _ = table(runs, arm)
        if text:
            parts.append(f"## {arm} ({' '.join(ARMS[arm]) or 'defaults'}) against authors\n\n{text}\n")
    effects = effects_table(runs)
    if effects:
        parts.append("## What each switch does: the 2 x 2 of our four arms\n\nEach switch's main effect is the "
                     "mean of the two arms with it minus the mean of the two without it (in the metric's units); "
                     "se and t from the within-arm variance pooled over the four arms (the arms as independent "
                     "samples); paired t from the same contrast taken seed by seed (the arms share each seed's "
                     "split, initialisation and batch order).\n\n" + effects + "\n")
    md = "\n".join(parts)
    atomic_write_text(out / "table.md", md)
    return md


# ------------------------------------------------------------------------------ command line

def build_parser() -> Parser:
    p = Parser(prog="compare_authors.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--authors", type=Path, default=Path(os.environ.get("TERACON_AUTHORS_DIR", "/tmp/teracon_authors")),
                   help="checkout of github:Sein-Kim/TERACON, unmodified (env TERACON_AUTHORS_DIR)")
    p.add_argument("--ours", type=Path, default=ROOT, help="folder of our code whose scripts run (a git worktree "
                   "at a fixed commit)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["authors", "ours-match", "ours"],
                   help="which arms to run, in this order")
    p.add_argument("--seeds", nargs="+", type=utils.seed_type("--seeds"), default=[0, 1, 2, 3, 4, 5],
                   help="training seeds (split, initialisation, batches) of every arm")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "compare_authors",
                   help="folder of the per-run JSON (per_run/ARM/seedN.json) and table.md")
    p.add_argument("--work", type=Path, default=Path("/tmp/compare_authors"),
                   help="folder of the checkpoints and logs of every run, and of the data unless --data")
    p.add_argument("--data", type=Path, help="folder of the comparison data (written there if missing; "
                   "default WORK/data)")
    p.add_argument("--data_seed", type=utils.seed_type("--data_seed"), default=0, help="seed of the data generator")
    p.add_argument("--tasks", type=int, choices=(1, 2, 3), default=3,
                   help="train tasks 1..N only (the after-last cells need all 3); e.g. 1 for many cheap seeds of task 1")
    p.add_argument("--epochs", nargs=3, type=int, default=[2, 3, 3], metavar=("T1", "T2", "T3"),
                   help="maximum epochs of tasks 1, 2, 3")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every task")
    p.add_argument("--batch", type=int, default=1024, help="batch of tasks 2 and 3 (task 1: 32, as the authors "
                   "hard-code); also the authors' evaluation batch of tasks 2 and 3")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of knowledge retention")
    p.add_argument("--smax", type=int, default=50,
                   help="largest annealing scale s (an int: the authors parse it so)")
    p.add_argument("--report", action="store_true", help="run nothing: aggregate the JSON in --out and print the tables")
    p.add_argument("--force", action="store_true", help="rerun (arm, seed) pairs whose JSON exists")
    return p


def main(argv: list[str] | None = None) -> str:
    """Run the missing (arm, seed) pairs, then print and write the tables."""
    a = build_parser().parse_args(argv)
    command = "python compare_authors.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if min(a.epochs) < 1 or a.batch < 2 or not (a.lr > 0 and math.isfinite(a.lr)) or a.smax < 1 or a.alpha < 0:
        raise UserError("--epochs, --batch, --lr and --smax must be positive, --alpha at least 0")
    if not a.report:
        if "authors" in a.arms:
            problem = checkout_error(str(a.authors))
            missing = [f for f in AUTHORS_SCRIPTS if not (a.authors / f).is_file()]
            if problem:
                raise UserError(problem.removeprefix("error: "))
            if missing:
                raise UserError(f"{a.authors}: not a full checkout of the authors' TERACON code "
                                f"(missing {', '.join(missing)})")
        a.authors, a.ours, a.work = a.authors.resolve(), a.ours.resolve(), a.work.resolve()
        if not (a.ours / "train_teracon_t3.py").is_file():
            raise UserError(f"--ours {a.ours}: no train_teracon_t3.py there (not a checkout of this project)")
        data = make_data((a.data or a.work / "data").resolve(), a.data_seed)
        for arm in a.arms:
            for seed in a.seeds:
                path = a.out / "per_run" / arm / f"seed{seed}.json"
                if path.is_file() and not a.force:
                    log.info("%s seed %d: %s exists, skipped", arm, seed, path)
                    continue
                try:
                    record = one_run(a, arm, seed, data.parent)
                except RuntimeError as e:
                    raise UserError(f"{arm} seed {seed}: {e}") from None
                atomic_write_json(path, record)
                log.info("%s seed %d done in %.0fs: %s", arm, seed, record["seconds"],
                         json.dumps(record["cells"]))
    md = report(a.out, command)
    print(md)
    return md


if __name__ == "__main__":
    run_cli(main)
