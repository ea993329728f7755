"""TERACON training: task 1 (next-item prediction) and task n >= 2 with knowledge retention.

One routine serves every task; `train_task1.py`, `train_teracon_t2.py` ... and
`train_teracon.py --task N` are thin entry points around `main`.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data_loader as dl
from baselines import METHODS, HAT, Conure, mask_penalty, model_options
from nextitnet import CHANNELS, DILATIONS, NextItNet
from utils import (UserError, atomic_torch_save, atomic_write_json, check_finite_model, check_outputs,
                   finite_float, library_versions, load_checkpoint, metric_sums, rank_of_target, require_finished,
                   resolve_device, seed_int, set_seed, sha256_file, summary_path)

log = logging.getLogger("teracon")

ALPHA = 0.7          # weight of the knowledge-retention loss (eq. 18)
RHO_INIT = 0.9       # initial sampling ratio of every past task
RHO_SHARPNESS = 6.0  # rho_i = 1 - mean sigmoid(6 * cos(...)) (eq. 15)
COS_EPS = 1e-6       # the authors' nn.CosineSimilarity(dim=1, eps=1e-6): norms below it are clamped
CE_CHUNK_ELEMENTS = 1 << 26  # task-1 logits held at once: 256 MB in fp32 (104 positions at 646k items)
TTL_FILES = {1: "original_desen_pretrain.csv", 2: "original_desen_finetune_click_nouserID.csv",
             3: "original_desen_finetune_like_nouserID.csv", 4: "original_desen_age.csv",
             5: "original_desen_gender.csv", 6: "original_desen_lifestatus.csv"}


# ------------------------------------------------------------------------ the method

def anneal_s(batch: int, batches_per_epoch: float, smax: float) -> float:
    """eq. 19: s = 1/smax + (smax - 1/smax) * b / B, with B = n_train / batch_size."""
    return 1.0 / smax + (smax - 1.0 / smax) * batch / batches_per_epoch


def sample_subsets(rho: np.ndarray, batch_size: int, rng: np.random.Generator,
                   min_rows: int = 0) -> list[np.ndarray]:
    """An independent random subset of floor(rho_i * B) rows of the batch for every past task
    (eq. 15-16). `min_rows` > 0 (off in the paper) raises each subset to min(min_rows, B) rows."""
    return [rng.permutation(batch_size)[: max(int(math.floor(r * batch_size)), min(min_rows, batch_size))]
            for r in rho]


def knowledge_retention_loss(student: list[torch.Tensor | None], teacher: list[torch.Tensor | None],
                             rho: np.ndarray) -> torch.Tensor:
    """eq. 16-17: sum_i rho_i / sum_j rho_j * MSE(student_i, teacher_i); empty subsets add nothing."""
    weights = rho / rho.sum()
    terms = [w * F.mse_loss(s, t) for w, s, t in zip(weights, student, teacher) if s is not None and len(s)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def update_rho(teacher_masks: torch.Tensor, new_task_mask: torch.Tensor) -> np.ndarray:
    """eq. 15: rho_i = 1 - mean over masked layers of sigmoid(6 * cos(m_i^teacher, m_new^student)).

    teacher_masks [T-1, M, C], new_task_mask [M, C] -> [T-1]. The cosine clamps each norm at
    COS_EPS as the authors' code does, which matters when a layer's mask is near zero.
    """
    cos = F.cosine_similarity(teacher_masks, new_task_mask.unsqueeze(0), dim=-1, eps=COS_EPS)  # [T-1, M]
    return (1.0 - torch.sigmoid(RHO_SHARPNESS * cos).mean(dim=1)).detach().double().cpu().numpy()


def past_task_logits(model: NextItNet, masks: torch.Tensor, src: torch.Tensor,
                     subsets: list[np.ndarray], extra: torch.Tensor | None = None
                     ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Logits of every past task i on its subset rows of `src`, in one backbone pass.

    Rows of all subsets (and the `extra` rows, which use the last task's mask) are stacked
    and run once with per-row masks. Task 1 reads position -2, i.e. the last position of
    `src[:, :-1]`, which is the same because every layer is causal (SPEC 5.2).
    Returns (logits per past task, None where its subset is empty; hidden states of `extra`).
    """
    device = src.device
    rows = [torch.as_tensor(sub, device=device, dtype=torch.long) for sub in subsets]
    task_of_row = torch.cat([torch.full((len(r),), i, device=device) for i, r in enumerate(rows)])
    seqs = src[torch.cat(rows)] if rows else src[:0]
    if extra is not None:
        task_of_row = torch.cat([task_of_row, torch.full((len(extra),), model.num_tasks - 1, device=device)])
        seqs = torch.cat([seqs, extra])
    hidden = model.encode(seqs, masks.index_select(0, task_of_row))  # deterministic backward
    logits, start = [], 0
    for i, r in enumerate(rows):
        pos = -2 if i == 0 else -1
        logits.append(model.heads[i](hidden[start:start + len(r), pos]) if len(r) else None)
        start += len(r)
    return logits, (hidden[start:, -1] if extra is not None else None)


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")


def next_item_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                   chunk_elements: int = CE_CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` [P, N] against `targets` [P], never holding more
    than `chunk_elements` logits: chunks of positions are recomputed in backward, so loss and
    gradients equal the full cross-entropy (task 1 over 646k items on TTL)."""
    rows = max(1, chunk_elements // head.out_features)
    if rows >= len(hidden):
        return F.cross_entropy(head(hidden), targets)
    total = sum(checkpoint(_ce_sum, hidden[i:i + rows], head.weight, head.bias, targets[i:i + rows],
                           use_reentrant=False) for i in range(0, len(hidden), rows))
    return total / len(hidden)


def autocast(device: torch.device, amp: str):
    """bf16 autocast for `--amp bf16` (CUDA and CPU); fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: NextItNet, data: dl.TaskData, split: str, smax: float, device: torch.device,
             batch_size: int = 1024, amp: str = "fp32", head: int | None = None) -> dict[str, float]:
    """Every example of the split once, in order, at s = smax (SPEC 2, 6), through the model's
    head `head` (default: the task's own, task n -> head n-1)."""
    was_training = model.training
    model.eval()
    task = data.task - 1 if head is None else head
    model.serve(data.task)
    masks = model.masks(smax)[task].unsqueeze(0)
    idx = data.splits[split]
    sums: dict[str, float] = {}
    for batch in dl.batches(idx, batch_size):
        src, tgt = data.batch(batch, device)
        if data.task == 1:
            src, tgt = src[:, :-1], src[:, -1]
        with autocast(device, amp):
            logits = model.heads[task](model.encode(src, masks)[:, -1])
        for k, v in metric_sums(rank_of_target(logits.float(), tgt), data.kind).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    return {k: v / max(len(idx), 1) for k, v in sums.items()}


# ------------------------------------------------------------------------ training steps

class Task1Step:
    """Next-item loss on every position (SPEC 3) plus `mask_reg` * mean of all masks."""

    def __init__(self, model: NextItNet, mask_reg: float):
        self.model, self.mask_reg = model, mask_reg

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)
        hidden = self.model.encode(src[:, :-1], masks)
        loss = next_item_loss(hidden.reshape(-1, hidden.shape[-1]), self.model.heads[0], src[:, 1:].reshape(-1))
        if self.mask_reg and self.model.masked:
            loss = loss + self.mask_reg * mask_penalty(masks)
        return loss


class TaskNStep:
    """New-task cross-entropy plus alpha * knowledge retention from the frozen teacher (Sec. 4.3).

    With `teacher=None` (the baselines) it is the new task's cross-entropy alone, plus an
    optional `penalty(masks)` (HAT's regulariser).
    """

    def __init__(self, model: NextItNet, teacher: NextItNet | None, alpha: float, rng: np.random.Generator,
                 penalty=None, min_rows: int = 0):
        self.model, self.teacher, self.alpha, self.rng, self.penalty = model, teacher, alpha, rng, penalty
        self.min_rows = min_rows
        self.rho = np.full(teacher.num_tasks if teacher else 0, RHO_INIT)
        self.stats = RetentionStats(len(self.rho))

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)
        if self.teacher is None:
            hidden = self.model.encode(src, masks[-1:])[:, -1]
            loss = F.cross_entropy(self.model.heads[-1](hidden), tgt)
            return loss + self.penalty(masks) if self.penalty else loss
        subsets = sample_subsets(self.rho, len(src), self.rng, self.min_rows)
        self.stats.add(self.rho, subsets)
        with torch.no_grad():
            teacher_masks = self.teacher.masks(s)
            teacher_logits, _ = past_task_logits(self.teacher, teacher_masks, src, subsets)
        student_logits, hidden = past_task_logits(self.model, masks, src, subsets, extra=src)
        loss = F.cross_entropy(self.model.heads[-1](hidden), tgt)
        loss = loss + self.alpha * knowledge_retention_loss(student_logits, teacher_logits, self.rho)
        self.rho = update_rho(teacher_masks, masks[-1])  # used by the next batch
        return loss


# ------------------------------------------------------------------------ diagnostics

class RetentionStats:
    """Per past task, over one epoch's steps: the rho each step used and the rows it labelled."""

    def __init__(self, past_tasks: int):
        self.past_tasks = past_tasks
        self.reset()

    def reset(self) -> None:
        self.rho_sum, self.rows_sum, self.steps = np.zeros(self.past_tasks), np.zeros(self.past_tasks), 0

    def add(self, rho: np.ndarray, subsets: list[np.ndarray]) -> None:
        self.rho_sum += rho
        self.rows_sum += [len(sub) for sub in subsets]
        self.steps += 1

    def pop(self) -> dict[str, list[float]]:
        """Means over the steps since the last call (rho_mean, retention_rows_mean), then reset."""
        n = max(self.steps, 1)
        out = {"rho_mean": (self.rho_sum / n).round(6).tolist(),
               "retention_rows_mean": (self.rows_sum / n).round(3).tolist()}
        self.reset()
        return out


@torch.no_grad()
def mask_diagnostics(model: NextItNet, smax: float) -> dict[str, list[float]]:
    """Per task, the share of mask channels (all masked layers) below 0.5 at s = smax."""
    if not model.masked:
        return {"mask_share_below_half": [0.0] * model.num_tasks}
    masks = model.masks(smax)
    return {"mask_share_below_half": (masks < 0.5).double().mean(dim=(1, 2)).cpu().round(decimals=6).tolist()}


def epoch_diagnostics(model: NextItNet, step, s_used: list[float], smax: float) -> dict:
    """eq. 19's range of s this epoch, rho and retention rows per past task, mask sparsity."""
    out = {"s_min": min(s_used, default=0.0), "s_max": max(s_used, default=0.0), "steps": len(s_used)}
    stats = getattr(step, "stats", None)
    if stats is not None and stats.past_tasks:
        out.update(stats.pop(), rho_end=np.round(step.rho, 6).tolist())
    return {**out, **mask_diagnostics(model, smax)}


def _fmt_diagnostics(d: dict) -> str:
    parts = [f"s {d['s_min']:.3g}..{d['s_max']:.3g} over {d['steps']} steps"]
    if "rho_mean" in d:
        parts.append("rho " + "/".join(f"{r:.3f}" for r in d["rho_mean"]))
        parts.append("retention rows " + "/".join(f"{r:.1f}" for r in d["retention_rows_mean"]))
    parts.append("mask<0.5 " + "/".join(f"{m:.2f}" for m in d["mask_share_below_half"]))
    return ", ".join(parts)


# ------------------------------------------------------------------------- the loop

def train(model: NextItNet, step, data: dl.TaskData, args: argparse.Namespace, device: torch.device,
          save, hooks=None, epochs: int | None = None, summary: dict | None = None,
          phase: str = "train") -> dict:
    """Epochs with annealed s, early stopping on validation `--select_by` (SPEC 6: hit@1); `save(summary)`
    writes the checkpoint at the first epoch and at every improvement. `hooks.before_step(s)`
    and `hooks.after_step()` surround each optimiser step (HAT, CONURE); a second `phase`
    (CONURE's retraining) continues `summary`."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, len(summary["epochs"]) if summary else 0])
    train_idx = data.splits["train"]
    batches_per_epoch = len(train_idx) / args.batch
    head = model.num_tasks - 1
    summary = summary or {"epochs": [], "best_epoch": None, "valid": None, "test": None, "finished": False}
    best, bad_epochs, skipped = -math.inf, 0, 0
    for epoch in range(len(summary["epochs"]) + 1, len(summary["epochs"]) + 1 + (epochs or args.epochs)):
        start, total, count, s_used = time.time(), 0.0, 0, []
        model.train()
        bar = tqdm(dl.batches(train_idx, args.batch, rng), total=math.ceil(batches_per_epoch),
                   desc=f"task {data.task} epoch {epoch}", leave=False, disable=args.quiet)
        for b, batch in enumerate(bar):
            src, tgt = data.batch(batch, device)
            s = anneal_s(b, batches_per_epoch, args.smax)
            s_used.append(s)
            with autocast(device, args.amp):
                loss = step.loss(src, tgt, s)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                if hooks:
                    hooks.before_step(s)
                optimizer.step()
                if hooks:
                    hooks.after_step()
                total, count = total + loss.item(), count + 1
            else:
                skipped += 1
            model.task_masks.clamp_()
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if count == 0:
            raise UserError(f"task {data.task} epoch {epoch}: every step had a non-finite loss (NaN or inf); "
                            "nothing was learned and no checkpoint is written (lower --lr or --alpha)")
        check_finite_model(model, f"task {data.task} epoch {epoch}")
        valid = evaluate(model, data, "valid", args.smax, device, args.eval_batch, args.amp, head)
        diagnostics = epoch_diagnostics(model, step, s_used, args.smax)
        record = {"epoch": epoch, "phase": phase, "train_loss": total / max(count, 1), "valid": valid,
                  "seconds": round(time.time() - start, 2), "skipped_steps": skipped, "diagnostics": diagnostics}
        summary["epochs"].append(record)
        chosen = valid.get(args.select_by, valid["hit@1"])  # classification tasks have hit@1 only
        improved = chosen > best
        if improved:
            best, bad_epochs = chosen, 0
            summary.update(best_epoch=epoch, valid=valid,
                           test=evaluate(model, data, "test", args.smax, device, args.eval_batch, args.amp, head))
            save(summary)
        else:
            bad_epochs += 1
        log.info("task %d %s epoch %d  loss %.4f  valid %s  %s%.1fs", data.task, phase, epoch, record["train_loss"],
                 _fmt(valid), "* " if improved else "", record["seconds"])
        log.info("task %d %s epoch %d  %s", data.task, phase, epoch, _fmt_diagnostics(diagnostics))
        save(summary, checkpoint=False)
        if bad_epochs >= args.patience:
            log.info("task %d: no improvement for %d epochs, stopping", data.task, args.patience)
            break
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ------------------------------------------------------------------------ command line

def build_parser(task: int | None) -> argparse.ArgumentParser:
    """Flags of the authors' scripts (SPEC 6 defaults); `task=None` adds --task."""
    p = argparse.ArgumentParser(
        description=(f"Train TERACON task {task}." if task else "Train TERACON task N (N >= 1).")
        + " Without --dataset/--datapath, reads TTL's file for the task from Data/Session/.")
    if task is None:
        p.add_argument("--task", type=int, required=True, help="task number (1 = next-item pretraining)")
    p.add_argument("--dataset", help="prepared dataset name (Data/NAME/tasks.json) or a tasks.json path; "
                   "gives the task file, the index and the save folder")
    p.add_argument("--datapath", help="task file (overrides --dataset)")
    p.add_argument("--datapath_index", help="item index JSON, written by task 1 and read by later tasks "
                   "(default Data/Session/index.json, or Data/NAME/index.json with --dataset)")
    p.add_argument("--savepath", help="output prefix: writes PREFIX.pt and PREFIX.json "
                   "(default saved_models/taskN, or saved_models/NAME/taskN with --dataset)")
    p.add_argument("--paths", help="checkpoint of the previous task (default: the previous task's "
                   "--savepath default); task >= 2 only")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 10 for task 1, 100 otherwise)")
    p.add_argument("--lr", type=finite_float("--lr", positive=True), help="Adam learning rate (default 1e-3 for task 1, 1e-4 otherwise)")
    p.add_argument("--batch", type=int, help="training batch size (default 32 for task 1, 1024 otherwise)")
    p.add_argument("--eval_batch", type=int, default=1024, help="evaluation batch size (default %(default)s)")
    p.add_argument("--smax", type=finite_float("--smax", positive=True), default=50.0, help="largest annealing scale s (eq. 19; default %(default)s)")
    p.add_argument("--alpha", type=finite_float("--alpha", nonnegative=True), default=ALPHA, help="weight of the knowledge-retention loss (eq. 18); "
                   "task >= 2 only (default %(default)s)")
    p.add_argument("--mask_reg", type=finite_float("--mask_reg", nonnegative=True), default=0.75, help="weight of the mean-of-masks term in "
                   "the task-1 loss (the authors' scripts use 0.75; 0 turns it off); task 1 only (default %(default)s)")
    p.add_argument("--min_retention_rows", type=int, default=0, help="deviation from the paper, off by "
                   "default: label at least this many rows per past task (floor(rho_i * B) is 0 for small "
                   "batches once rho is small); task >= 2 only (default %(default)s)")
    p.add_argument("--select_by", choices=("hit@1", "mrr@5"), default="hit@1", help="validation metric of "
                   "early stopping and model selection: hit@1 as the paper, or mrr@5 (ranking tasks only; "
                   "steadier on small validation splits; classification tasks always use hit@1 = accuracy) "
                   "(default %(default)s)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation metric "
                   "before stopping (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split, the initialisation and the batches (default %(default)s)")
    p.add_argument("--split_by", choices=("example", "source"), default="example",
                   help="'example': split after expanding multi-target lines (the authors' way); "
                   "'source': all targets of one source line in one split (default %(default)s)")
    p.add_argument("--name", help="task name recorded in the checkpoint (default from the manifest or file)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--method", choices=sorted(METHODS), default="teracon", help="teracon, its ablations "
                   "teracon-nokr (alpha 0) and teracon-norel (plain masks), or a baseline on the same backbone: "
                   "fineall, sinmo, hat, conure; later tasks must use the method of task 1 (default %(default)s)")
    p.add_argument("--channels", type=int, default=CHANNELS, help="task 1 only: hidden size C; later tasks "
                   "take the checkpoint's (default %(default)s)")
    p.add_argument("--dilations", type=int, nargs="+", default=list(DILATIONS), help="task 1 only: one "
                   "residual block per dilation d (convs d and 2d); later tasks take the checkpoint's "
                   "(default %(default)s)")
    p.add_argument("--prune_ratio", type=finite_float("--prune_ratio"), default=0.7, help="conure: share of a task's free conv "
                   "weights pruned after it (default %(default)s)")
    p.add_argument("--retrain_epochs", type=int, default=10, help="conure: maximum epochs of retraining "
                   "after pruning (default %(default)s)")
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast for training "
                   "and evaluation (CUDA, and CPUs with AMX); default %(default)s")
    p.add_argument("--accept_unfinished", action="store_true", help="start from a --paths checkpoint whose "
                   "run did not finish (its PREFIX.json says finished: false)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_args(args: argparse.Namespace, task: int) -> argparse.Namespace:
    """Fill the defaults that depend on the task and the dataset; check the flags."""
    first = task == 1
    for flag, value in (("epochs", 10 if first else 100), ("lr", 1e-3 if first else 1e-4),
                        ("batch", 32 if first else 1024)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if task < 1:
        raise UserError(f"--task {task}: tasks are numbered from 1")
    for flag in ("epochs", "batch", "eval_batch", "patience", "retrain_epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.min_retention_rows < 0:
        raise UserError(f"--min_retention_rows {args.min_retention_rows}: must be at least 0")
    if args.channels < 1 or min(args.dilations) < 1:
        raise UserError("--channels and --dilations must be positive")
    if not 0 <= args.prune_ratio < 1:
        raise UserError(f"--prune_ratio {args.prune_ratio}: must be in [0, 1)")
    if args.method == "teracon-nokr":
        args.alpha = 0.0
    if first and args.paths:
        raise UserError("--paths: task 1 starts from scratch and takes no previous checkpoint")
    folder, prefix = Path("Data/Session"), Path("saved_models")
    entry = None
    if args.dataset:
        manifest = dl.load_manifest(args.dataset)
        entry = dl.manifest_task(manifest, task)
        folder, prefix = Path(manifest["dir"]), prefix / Path(manifest["dir"]).name
    if args.datapath is None:
        if entry is None and task not in TTL_FILES:
            raise UserError(f"--task {task}: give --datapath or --dataset (TTL has tasks 1-6 only)")
        args.datapath = entry["file"] if entry else str(folder / TTL_FILES[task])
        if entry is None and not Path(args.datapath).is_file():
            raise UserError(f"{args.datapath}: file not found (put the TTL files in Data/Session/, or use "
                            "--dataset ml-100k after `python prepare_data.py ml-100k`, or --datapath FILE)")
    if args.name is None:
        args.name = entry["name"] if entry else Path(args.datapath).stem
    args.datapath_index = args.datapath_index or str(folder / "index.json")
    args.savepath = args.savepath or str(prefix / f"task{task}")
    if not first:
        args.paths = args.paths or str(prefix / f"task{task - 1}.pt")
        if Path(args.paths).resolve() == Path(args.savepath + ".pt").resolve():
            raise UserError(f"--savepath {args.savepath}: would overwrite the checkpoint it starts from")
    args.task = task
    return args


def load_previous(args: argparse.Namespace, task: int) -> tuple[dict, np.ndarray]:
    """The task n-1 checkpoint and the item index, checked against each other and the method."""
    prev = load_checkpoint(args.paths)
    require_finished(args.paths, args.accept_unfinished)
    if len(prev["tasks"]) != task - 1:
        raise UserError(f"{args.paths}: checkpoint knows {len(prev['tasks'])} task(s); "
                        f"task {task} needs the checkpoint of task {task - 1}")
    if prev.get("method", "teracon") != args.method:
        raise UserError(f"{args.paths}: made by --method {prev.get('method')}, not {args.method}")
    items = dl.load_item_index(args.datapath_index)
    if dl.index_checksum(items) != prev["item_index"]["checksum"]:
        raise UserError(f"{args.datapath_index}: item index differs from the one {args.paths} was "
                        "trained with (retrain task 1 or pass the right --datapath_index)")
    return prev, items


def main(argv: list[str] | None = None, task: int | None = None) -> dict:
    args = build_parser(task).parse_args(argv)
    args = resolve_args(args, task or args.task)
    device = resolve_device(args.device)
    set_seed(args.seed)
    task, method = args.task, args.method
    ckpt_out, summary_out = Path(args.savepath + ".pt"), Path(args.savepath + ".json")
    outputs = {"--savepath": [ckpt_out, summary_out]}
    if task == 1:
        outputs["--datapath_index"] = args.datapath_index
    inputs = {"--datapath": args.datapath}
    if task > 1:
        inputs.update({"--paths": [args.paths, summary_path(args.paths)], "--datapath_index": args.datapath_index})
    check_outputs(outputs, inputs)  # before any training: never write over an input, never fail late

    prev, teacher, extras = None, None, {}
    if task == 1:
        data, items = dl.load_task1(args.datapath, args.seed, split_by=args.split_by)
    else:
        prev, items = load_previous(args, task)
        data = dl.load_task(task, args.datapath, items, args.seed, args.split_by, args.name)
    n = {k: len(v) for k, v in data.splits.items()}
    if n["valid"] == 0 or n["test"] == 0:
        raise UserError(f"{data.path}: {sum(n.values())} examples are too few for a 80/5/15 split "
                        "(need at least 10)")
    data.name = args.name

    if task == 1 or method == "sinmo":  # SinMo: a fresh model for every task
        config = prev["config"] if prev else {"channels": args.channels, "dilations": tuple(args.dilations)}
        model = NextItNet(len(items) + 1, [data.num_classes], channels=config["channels"],
                          dilations=tuple(config["dilations"]), **model_options(method))
        if prev is not None:
            extras["members"] = prev.get("members", []) + [{"config": prev["config"], "state_dict": prev["state_dict"]}]
    else:
        if METHODS[method]["retention"] and args.alpha > 0:
            teacher = NextItNet.from_checkpoint(prev, args.paths).to(device).eval().requires_grad_(False)
        model = NextItNet.from_checkpoint(prev, args.paths)
        model.add_task(data.num_classes)
    model.to(device)

    hat, conure = None, None
    if method == "hat":
        cumulative = prev["hat_cumulative"].to(device) if prev is not None else None
        hat = HAT(model, cumulative, args.smax, args.mask_reg)
    elif method == "conure":
        conure = Conure(model, task, args.prune_ratio)
    hooks = hat or conure
    if task == 1:
        step = Task1Step(model, args.mask_reg)
    else:
        step = TaskNStep(model, teacher, args.alpha, np.random.default_rng([args.seed, 1]),
                         penalty=hat.penalty if hat else None, min_rows=args.min_retention_rows)
    log.info("task %d (%s), method %s: %s, %d classes (%s), split train/valid/test %d/%d/%d, device %s",
             task, data.name, method, data.path, data.num_classes, data.kind, n["train"], n["valid"], n["test"],
             device)
    if task == 1:
        dl.save_item_index(args.datapath_index, items, args.datapath)
    run_args = dict(vars(args))
    task_entry = {"task": task, "name": data.name, "file": data.path, "file_sha256": sha256_file(data.path),
                  "num_classes": data.num_classes, "metric": data.kind, "seed": args.seed,
                  "split_by": args.split_by, "split_sizes": n}
    history = prev["tasks"] if prev else []

    def save(summary: dict, checkpoint: bool = True) -> None:
        entry = dict(task_entry, best_epoch=summary["best_epoch"], test=summary["test"])
        if checkpoint:
            if hat:
                extras["hat_cumulative"] = hat.updated_cumulative()
            atomic_torch_save(ckpt_out, {
                "format": "teracon/1", "method": method, "config": model.config(),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "tasks": history + [entry], "item_index": {"checksum": dl.index_checksum(items),
                                                          "num_items": len(items) + 1},
                "args": run_args, "versions": library_versions(), **extras})
        atomic_write_json(summary_out, {"task": entry, "method": method, "args": run_args,
                                        "checkpoint": str(ckpt_out), "versions": library_versions(), **summary})

    start = time.time()
    summary = train(model, step, data, args, device, save, hooks)
    if conure:  # prune the best model, then retrain the weights it keeps
        model.load_state_dict(load_checkpoint(ckpt_out)["state_dict"])
        conure.prune()
        summary = train(model, step, data, args, device, save, hooks, epochs=args.retrain_epochs,
                        summary=summary, phase="retrain")
    summary["finished"] = True
    save(summary, checkpoint=False)
    log.info("task %d done in %.1fs: best epoch %s, test %s -> %s", task, time.time() - start,
             summary["best_epoch"], _fmt(summary["test"]), ckpt_out)
    return summary
