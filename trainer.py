"""The training loop and evaluation shared by every task and method (SPEC 2, 6).

`train` runs epochs with eq. 19's annealed s, early stopping and checkpointing; `evaluate`
scores one split at s = smax. What a step computes comes from the method (`teracon.py`,
`methods.py`); what a checkpoint holds from `checkpoint.py`.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

import data_loader as dl
from nextitnet import NextItNet
from teracon import anneal_s
from utils import UserError, check_finite_model, metric_sums, rank_of_target

log = logging.getLogger("teracon")


@dataclass
class TrainConfig:
    """The plain settings of one task's training run (the flags of the task scripts)."""
    lr: float
    batch: int
    epochs: int
    smax: float = 50.0
    patience: int = 5
    select_by: str = "hit@1"
    eval_batch: int = 1024
    amp: str = "fp32"
    seed: int = 0
    quiet: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


class Step(Protocol):
    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor: ...


class Hooks(Protocol):
    """Around each optimiser step (HAT's gates, CONURE's frozen weights)."""
    def before_step(self, s: float) -> None: ...
    def after_step(self) -> None: ...


def autocast(device: torch.device, amp: str):
    """bf16 autocast for `--amp bf16` (CUDA and CPU); fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: NextItNet, data: dl.TaskData, split: str, smax: float, device: torch.device,
             batch_size: int = 1024, amp: str = "fp32", head: int | None = None) -> dict[str, float]:
    """Every example of the split once, in order, at s = smax (SPEC 2, 6), through the model's
    head `head` (default: the task's own, task n -> head n-1). Task 1 predicts each sequence's
    last item."""
    was_training = model.training
    model.eval()
    head = data.task - 1 if head is None else head
    masks = model.masks(smax)
    idx = data.splits[split]
    sums: dict[str, float] = {}
    for batch in dl.batches(idx, batch_size):
        src, tgt = data.batch(batch, device)
        if data.task == 1:
            tgt = src[:, -1]
        with autocast(device, amp):
            [logits] = model.task_logits(src, [(head, None)], masks)
        for k, v in metric_sums(rank_of_target(logits.float(), tgt), data.kind).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    return {k: v / max(len(idx), 1) for k, v in sums.items()}


# ------------------------------------------------------------------------ the loop

def train_step(model: NextItNet, step: Step, optimizer: torch.optim.Optimizer, src: torch.Tensor,
               tgt: torch.Tensor, s: float, device: torch.device, amp: str = "fp32",
               hooks: Hooks | None = None) -> float | None:
    """One batch: the step's loss under autocast, backward, the hooks around the optimiser step,
    then the clamp of the task embeddings (SPEC 4). A non-finite loss updates nothing (SPEC 5.6)
    and returns None; otherwise the loss."""
    with autocast(device, amp):
        loss = step.loss(src, tgt, s)
    optimizer.zero_grad(set_to_none=True)
    value = None
    if torch.isfinite(loss):
        loss.backward()
        if hooks:
            hooks.before_step(s)
        optimizer.step()
        if hooks:
            hooks.after_step()
        value = loss.item()
    model.task_masks.clamp_()
    return value


# ------------------------------------------------------------------------ diagnostics

@torch.no_grad()
def mask_diagnostics(model: NextItNet, smax: float) -> dict[str, list[float]]:
    """Per task, the share of mask channels (all masked layers) below 0.5 at s = smax."""
    if not model.masked:
        return {"mask_share_below_half": [0.0] * model.num_tasks}
    masks = model.masks(smax)
    return {"mask_share_below_half": (masks < 0.5).double().mean(dim=(1, 2)).cpu().round(decimals=6).tolist()}


def epoch_diagnostics(model: NextItNet, step: Step, s_used: list[float], smax: float) -> dict:
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


def train(model: NextItNet, step: Step, data: dl.TaskData, config: TrainConfig, device: torch.device,
          save: Callable[..., None], hooks: Hooks | None = None, epochs: int | None = None,
          summary: dict | None = None, phase: str = "train") -> dict:
    """Epochs with annealed s, early stopping on validation `--select_by` (SPEC 6: hit@1); `save(summary)`
    writes the checkpoint at the first epoch and at every improvement. `hooks.before_step(s)`
    and `hooks.after_step()` surround each optimiser step (HAT, CONURE); a second `phase`
    (CONURE's retraining) continues `summary`."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng([config.seed, len(summary["epochs"]) if summary else 0])
    train_idx = data.splits["train"]
    batches_per_epoch = len(train_idx) / config.batch
    head = model.num_tasks - 1
    summary = summary or {"epochs": [], "best_epoch": None, "valid": None, "test": None, "finished": False}
    best, bad_epochs, skipped = -math.inf, 0, 0
    for epoch in range(len(summary["epochs"]) + 1, len(summary["epochs"]) + 1 + (epochs or config.epochs)):
        start, total, count, s_used = time.time(), 0.0, 0, []
        model.train()
        bar = tqdm(dl.batches(train_idx, config.batch, rng), total=math.ceil(batches_per_epoch),
                   desc=f"task {data.task} epoch {epoch}", leave=False, disable=config.quiet)
        for b, batch in enumerate(bar):
            src, tgt = data.batch(batch, device)
            s = anneal_s(b, batches_per_epoch, config.smax)
            s_used.append(s)
            loss = train_step(model, step, optimizer, src, tgt, s, device, config.amp, hooks)
            if loss is None:
                skipped += 1
            else:
                total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if count == 0:
            raise UserError(f"task {data.task} epoch {epoch}: every step had a non-finite loss (NaN or inf); "
                            "nothing was learned and no checkpoint is written (lower --lr or --alpha)")
        check_finite_model(model, f"task {data.task} epoch {epoch}")
        valid = evaluate(model, data, "valid", config.smax, device, config.eval_batch, config.amp, head)
        diagnostics = epoch_diagnostics(model, step, s_used, config.smax)
        record = {"epoch": epoch, "phase": phase, "train_loss": total / max(count, 1), "valid": valid,
                  "seconds": round(time.time() - start, 2), "skipped_steps": skipped, "diagnostics": diagnostics}
        summary["epochs"].append(record)
        chosen = valid.get(config.select_by, valid["hit@1"])  # classification tasks have hit@1 only
        improved = chosen > best
        if improved:
            best, bad_epochs = chosen, 0
            summary.update(best_epoch=epoch, valid=valid,
                           test=evaluate(model, data, "test", config.smax, device, config.eval_batch, config.amp, head))
            save(summary)
        else:
            bad_epochs += 1
        log.info("task %d %s epoch %d  loss %.4f  valid %s  %s%.1fs", data.task, phase, epoch, record["train_loss"],
                 format_metrics(valid), "* " if improved else "", record["seconds"])
        log.info("task %d %s epoch %d  %s", data.task, phase, epoch, _fmt_diagnostics(diagnostics))
        save(summary, checkpoint=False)
        if bad_epochs >= config.patience:
            log.info("task %d: no improvement for %d epochs, stopping", data.task, config.patience)
            break
    return summary


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
