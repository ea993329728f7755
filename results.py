"""Reference rows and continual-learning summaries of a comparison (what `reproduce.py` writes).

A run of one method and seed gives the matrix R[i][j]: task j's test metrics with the model
saved after task i (i >= j). From it, per method, mean +- std over seeds:

- final: R[T][j], every task with the last model (the paper's tables);
- forgetting of task j < T: max over j <= i < T of R[i][j], minus R[T][j];
- BWT (backward transfer, Lopez-Paz & Ranzato 2017): mean over j < T of R[T][j] - R[j][j];
- transfer: R[j][j] / SinMo's R[j][j] (SinMo trains a fresh model on each task alone);
- the reference: most popular training target (ranking) or majority class (accuracy), ranked
  first on the same test split.

Averages over tasks use each task's main metric (MRR@5 for ranking, accuracy otherwise).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import data_loader as dl
from checkpoint import load_checkpoint
from utils import metrics_from_ranks

MAIN_METRIC = {"ranking": "mrr@5", "accuracy": "accuracy"}
REPORTED = {"ranking": ("mrr@5", "ndcg@5", "hr@5"), "accuracy": ("accuracy",)}
REFERENCE = "reference"
VERDICT = {True: "yes", False: "no", None: "n/a (one seed)"}


# ------------------------------------------------------------------------------ reference

def training_counts(data: dl.TaskData) -> np.ndarray:
    """How often each class is a training target: every non-padding next item of the training
    sequences for task 1 (it trains on every position), the example targets otherwise."""
    train = data.splits["train"]
    if data.task == 1:
        targets = data.sources[torch.from_numpy(train)][:, 1:].reshape(-1)
        targets = targets[targets != 0]
    else:
        targets = data.targets[torch.from_numpy(train)]
    return np.bincount(targets.numpy(), minlength=data.num_classes).astype(np.float64)


def reference_metrics(data: dl.TaskData, split: str = "test") -> dict[str, float]:
    """Metrics of one fixed ranking for every example: classes by training frequency, ties by the
    lower class index (no ties left, so no optimistic ranks)."""
    counts = training_counts(data)
    order = np.lexsort((np.arange(len(counts)), -counts))  # most frequent first, ties by lower index
    rank_of_class = torch.from_numpy(np.argsort(order))     # 0-based rank of each class
    idx = torch.from_numpy(data.splits[split])
    targets = data.sources[idx][:, -1] if data.task == 1 else data.targets[idx]
    return metrics_from_ranks(rank_of_class[targets], data.kind)


def reference_rows(checkpoint: str) -> list[dict]:
    """The reference's test metrics for every task a checkpoint knows, on its recorded split."""
    rows, items = [], None
    for entry in load_checkpoint(checkpoint)["tasks"]:
        data, items = dl.load_trained_task(entry, items)
        rows.append({"task": entry["task"], "name": entry["name"], "metric": entry["metric"],
                     "test": reference_metrics(data)})
    return rows


# ------------------------------------------------------------------------------ summaries

def long_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per (method, seed, after, task, metric, value) from `reproduce.py`'s matrix.json
    records; the reference gets after = task (it never changes)."""
    rows = []
    for run in runs:
        for i, evaluated in enumerate(run["after"], 1):
            for r in evaluated:
                for metric, value in r["now"].items():
                    rows.append((run["method"], run["seed"], i, r["task"], r["name"], r["metric"], metric, value))
        for r in run.get("reference", []):
            for metric, value in r["test"].items():
                rows.append((REFERENCE, run["seed"], r["task"], r["task"], r["name"], r["metric"], metric, value))
    frame = pd.DataFrame(rows, columns=["method", "seed", "after", "task", "name", "kind", "metric", "value"])
    return frame.drop_duplicates(["method", "seed", "after", "task", "metric"])


def main_metric(frame: pd.DataFrame) -> pd.DataFrame:
    """Only each task's main metric (MRR@5 or accuracy)."""
    return frame[frame["metric"] == frame["kind"].map(MAIN_METRIC)]


def per_seed_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed: average final metric, average forgetting, BWT (main metrics)."""
    main = main_metric(frame[frame["method"] != REFERENCE])
    out = []
    for (method, seed), g in main.groupby(["method", "seed"], sort=False):
        r = g.pivot_table(index="after", columns="task", values="value")  # R[i][j], NaN for i < j
        last = r.index.max()
        final = r.loc[last]
        diag = pd.Series({j: r.loc[j, j] for j in r.columns})
        earlier = [j for j in r.columns if j < last]
        forgetting = [r.loc[j:last - 1, j].max() - final[j] for j in earlier]
        bwt = [final[j] - diag[j] for j in earlier]
        out.append({"method": method, "seed": seed, "avg_final": final.mean(),
                    "avg_forgetting": float(np.mean(forgetting)) if earlier else 0.0,
                    "bwt": float(np.mean(bwt)) if earlier else 0.0})
    return pd.DataFrame(out)


def transfer(frame: pd.DataFrame, base: str = "sinmo") -> pd.DataFrame:
    """Per method, seed and task: R[j][j] / the base method's R[j][j] (same seed), main metric."""
    main = main_metric(frame)
    diag = main[main["after"] == main["task"]]
    base_values = diag[diag["method"] == base].set_index(["seed", "task"])["value"]
    diag = diag[diag["method"] != REFERENCE].copy()
    keys = pd.MultiIndex.from_frame(diag[["seed", "task"]])
    base_at = base_values.reindex(keys).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        diag["transfer"] = np.where(base_at > 0, diag["value"].to_numpy() / base_at, np.nan)
    return diag[["method", "seed", "task", "name", "transfer"]]


def mean_std(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean and sample std (0 for one seed) over seeds of `columns`, grouped by `by`."""
    g = frame.groupby(by, sort=False)[columns]
    mean, std = g.mean().add_suffix("_mean"), g.std(ddof=1).fillna(0.0).add_suffix("_std")
    return mean.join(std).reset_index()


def metric_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method, task and reported metric: after training that task (R[j][j]) and after the
    last task (R[T][j]), mean and std over seeds, with the per-seed values."""
    rows = []
    last = frame[frame["method"] != REFERENCE].groupby(["method", "seed"])["after"].transform("max")
    frame = frame.assign(last=last.reindex(frame.index).fillna(frame["after"]))
    order = {m: i for i, m in enumerate([REFERENCE] + [m for m in frame["method"].unique() if m != REFERENCE])}
    frame = frame.sort_values(["method", "task"], key=lambda c: c.map(order) if c.name == "method" else c,
                              kind="stable")
    for (method, task), g in frame.groupby(["method", "task"], sort=False):
        for metric in REPORTED[g["kind"].iloc[0]]:
            m = g[g["metric"] == metric]
            after_task = m[m["after"] == task].sort_values("seed")
            after_last = m[m["after"] == m["last"]].sort_values("seed")
            rows.append({"method": method, "task": task, "name": g["name"].iloc[0], "metric": metric,
                         "seeds": after_task["seed"].tolist(), "after_task": after_task["value"].tolist(),
                         "after_last": after_last["value"].tolist()})
    return pd.DataFrame(rows)


def reference_check(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: the reference and the best method on the final model (main metric), and whether
    the best beats the reference by more than two standard deviations (the larger of the two)."""
    main = main_metric(frame)
    last = main.groupby(["method", "seed"])["after"].transform("max")
    final = main[(main["after"] == last) | (main["method"] == REFERENCE)]
    stats = final.groupby(["task", "name", "method"])["value"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    rows = []
    for (task, name), g in stats.groupby(["task", "name"]):
        ref = g[g["method"] == REFERENCE]
        methods = g[g["method"] != REFERENCE]
        if ref.empty or methods.empty:
            continue
        best = methods.loc[methods["mean"].idxmax()]
        ref = ref.iloc[0]
        margin = best["mean"] - ref["mean"]
        spread = max(best["std"], ref["std"])
        if min(best["count"], ref["count"]) < 2:  # one seed: no spread to judge by, no verdict
            in_std, beats = math.nan, None
        else:
            in_std = margin / spread if spread > 0 else (math.copysign(math.inf, margin) if margin else 0.0)
            beats = bool(margin > 2 * spread)
        rows.append({"task": task, "name": name, "reference": ref["mean"], "reference_std": ref["std"],
                     "best_method": best["method"], "best": best["mean"], "best_std": best["std"],
                     "margin_in_std": in_std, "beats_by_2_std": beats})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ provenance

def provenance(runs: list[dict]) -> str:
    """One line on the code behind a table: its commit, or a warning when the runs come from more
    than one commit or from uncommitted changes, and a REHEARSAL mark (runs with limited batches)."""
    commits = sorted({c for run in runs for c in run.get("commits", [None])}, key=str)
    unrecorded = None in commits and len(commits) > 1
    commits = [c for c in commits if c is not None] or [None]
    dirty = any(run.get("dirty") for run in runs)
    parts = []
    if any(run.get("rehearsal") for run in runs):
        parts.append("REHEARSAL (--limit_batches/--limit_eval_batches): these numbers are not results")
    if commits == [None]:
        parts.append("code commit not recorded")
    elif len(commits) > 1:
        parts.append(f"WARNING: the runs come from {len(commits)} code commits "
                     f"({', '.join(str(c)[:10] for c in commits)}): rerun them at one commit to compare")
    else:
        parts.append(f"code {str(commits[0])[:10]}")
    if unrecorded:
        parts.append("WARNING: some runs recorded no code commit")
    if dirty:
        parts.append("WARNING: some runs had uncommitted changes")
    return "; ".join(parts)


# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1..30; 1.96 beyond.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_975(dof: int) -> float:
    """Student's t 0.975 quantile on `dof` >= 1 degrees of freedom (1.96 beyond 30)."""
    return T_975[dof - 1] if dof <= len(T_975) else 1.96


def prediction_half_width(reference_seeds: int, seeds: int) -> float:
    """The 95% prediction interval's half-width in reference std for the mean of `seeds` new runs
    drawn like an n-seed reference: t_0.975(n - 1) * sqrt(1/seeds + 1/n) (the std itself is
    estimated from n runs, hence t, not 2). n < 2 has no spread: 0 (the run must equal it)."""
    n, dof = reference_seeds, reference_seeds - 1
    if dof < 1:
        return 0.0
    return t_975(dof) * math.sqrt(1.0 / seeds + 1.0 / n)


def placement(frame: pd.DataFrame, reference_csv: str | Path) -> pd.DataFrame:
    """Each method and task of this comparison against a committed reference table
    (`table.csv`) of the same protocol: the final main metric here (mean over this run's seeds),
    the reference's mean, std and seeds after the last task, the distance in reference std, and
    whether it lies within the reference's 95% prediction interval (`prediction_half_width`)."""
    ref = pd.read_csv(reference_csv)
    main = main_metric(frame[frame["method"] != REFERENCE])
    last = main.groupby(["method", "seed"])["after"].transform("max")
    final = main[main["after"] == last].groupby(["method", "task", "name", "metric"], sort=False)["value"]
    final = final.agg(["mean", "count"]).reset_index()
    rows = []
    for r in final.itertuples():
        match = ref[(ref["method"] == r.method) & (ref["task"] == r.task) & (ref["metric"] == r.metric)]
        if match.empty:
            continue
        m, sd = float(match["after_last_mean"].iloc[0]), float(match["after_last_std"].iloc[0])
        seeds = sum(1 for c in match.columns if c.startswith("after_last_seed") and pd.notna(match[c].iloc[0]))
        d = (r.mean - m) / sd if sd > 0 else (0.0 if r.mean == m else math.copysign(math.inf, r.mean - m))
        allowed = prediction_half_width(seeds, int(r.count)) if sd > 0 else 0.0
        rows.append({"method": r.method, "task": r.task, "name": r.name, "metric": r.metric, "value": r.mean,
                     "seeds": int(r.count), "reference_mean": m, "reference_std": sd, "reference_seeds": seeds,
                     "distance_in_std": d, "allowed_std": allowed, "within": bool(abs(d) <= allowed)})
    return pd.DataFrame(rows)


def format_placement(place: pd.DataFrame, reference: str) -> str:
    """The placement table and a plain verdict."""
    if place.empty:
        return f"No method of this run is in the reference {reference}: nothing to place it against."
    lines = [f"Your run against the committed reference {reference} (final model, main metric):", "",
             "| method | task | name | metric | yours | reference (mean ± std, seeds) | distance / std | "
             "95% interval / std | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in place.itertuples():
        lines.append(f"| {r.method} | {r.task} | {r.name} | {r.metric} | {r.value:.4f} | "
                     f"{_pm(r.reference_mean, r.reference_std)} ({r.reference_seeds}) | {r.distance_in_std:+.2f} | "
                     f"±{r.allowed_std:.2f} | {'ok' if r.within else 'OUTSIDE'} |")
    outside = place[~place["within"]]
    lines.append("")
    if outside.empty:
        lines.append("Reproduced: every task lies within the reference's 95% prediction interval.")
    else:
        which = ", ".join(f"{r.method} T{r.task} ({r.distance_in_std:+.2f} std)" for r in outside.itertuples())
        lines.append(f"NOT reproduced on {len(outside)} of {len(place)} task(s): {which} lie outside the "
                     "reference's 95% prediction interval. Likely causes: another code commit than the reference's, "
                     "the CPU (float kernels differ between AVX2, AVX512 and AMX), the thread count, the torch "
                     "version, or a real difference; see the README's robustness table.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ formatting

def _pm(mean: float, std: float, digits: int = 4) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ms(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def format_metric_table(table: pd.DataFrame, title: str) -> str:
    lines = [f"# {title}", "", "| method | task | name | metric | after training that task | after the last task |",
             "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.task} | {r.name} | {r.metric} | {_pm(*_ms(r.after_task))} | "
                     f"{_pm(*_ms(r.after_last))} |")
    return "\n".join(lines) + "\n"


def metric_table_csv(table: pd.DataFrame) -> str:
    out = []
    for r in table.itertuples():
        a, b = _ms(r.after_task), _ms(r.after_last)
        row = {"method": r.method, "task": r.task, "name": r.name, "metric": r.metric,
               "after_task_mean": a[0], "after_task_std": a[1], "after_last_mean": b[0], "after_last_std": b[1]}
        for seed, x, y in zip(r.seeds, r.after_task, r.after_last):
            row[f"after_task_seed{seed}"], row[f"after_last_seed{seed}"] = x, y
        out.append(row)
    return pd.DataFrame(out).to_csv(index=False, float_format="%.6f", lineterminator="\n")


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method: avg final, avg forgetting, BWT and per-task transfer, mean and std."""
    seeds = per_seed_summary(frame)
    summary = mean_std(seeds, ["method"], ["avg_final", "avg_forgetting", "bwt"])
    tr = transfer(frame)
    if not tr.empty and tr["transfer"].notna().any():
        wide = tr.pivot_table(index=["method", "seed"], columns="task", values="transfer", sort=False,
                              dropna=False).reset_index()
        wide.columns = [c if isinstance(c, str) else f"transfer_t{c}" for c in wide.columns]
        cols = [c for c in wide.columns if c.startswith("transfer_t")]
        summary = summary.merge(mean_std(wide, ["method"], cols), on="method", how="left")
    return summary


def format_summary(summary: pd.DataFrame, check: pd.DataFrame, title: str) -> str:
    tasks = sorted(int(c[len("transfer_t"):-len("_mean")]) for c in summary.columns
                   if c.startswith("transfer_t") and c.endswith("_mean"))
    head = ["method", "avg final", "avg forgetting", "BWT"] + [f"T{t} vs SinMo" for t in tasks]
    lines = [f"# {title}", "", "Main metric per task: MRR@5 (ranking) or accuracy. Mean ± std over seeds. "
             "Forgetting: best earlier value minus final (lower is better); BWT: final minus right after "
             "training (higher is better); T<j> vs SinMo: metric right after training task j relative to "
             "a fresh model trained on task j alone.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.to_dict("records"):
        cells = [r["method"], _pm(r["avg_final_mean"], r["avg_final_std"]),
                 _pm(r["avg_forgetting_mean"], r["avg_forgetting_std"]), _pm(r["bwt_mean"], r["bwt_std"])]
        cells += [_pm(r.get(f"transfer_t{t}_mean", np.nan), r.get(f"transfer_t{t}_std", np.nan), 2) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    if not check.empty:
        lines += ["", "Every task against its trivial reference (most popular item / majority class) on the "
                  "final model; 'beats' means best minus reference > 2 × the larger std.", "",
                  "| task | name | reference | best method | best | margin / std | beats by 2 std |",
                  "|---|---|---|---|---|---|---|"]
        for r in check.itertuples():
            lines.append(f"| {r.task} | {r.name} | {_pm(r.reference, r.reference_std)} | {r.best_method} | "
                         f"{_pm(r.best, r.best_std)} | {'n/a' if math.isnan(r.margin_in_std) else f'{r.margin_in_std:.1f}'} | "
                         f"{VERDICT[r.beats_by_2_std]} |")
    return "\n".join(lines) + "\n"
