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
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

import data_loader as dl
import distributed
from distributed import SINGLE, Shard
from nextitnet import NextItNet
from teracon import Step, anneal_s
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
    save_every: int = 0  # steps between resumable snapshots inside an epoch (0: at epoch ends only)
    limit_batches: int = 0       # a rehearsal: at most this many training batches an epoch (0: all)
    limit_eval_batches: int = 0  # a rehearsal: at most this many evaluation batches a split (0: all)
    drop_last: bool = False      # the authors' training batcher: the last batch of an epoch is dropped
    select_on: str = "split"     # "split": every validation example; "random_batches": the authors' subset

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


class Hooks(Protocol):
    """Around each optimiser step (HAT's gates, CONURE's frozen weights)."""
    def before_step(self, s: float) -> None: ...
    def after_step(self) -> None: ...


def autocast(device: torch.device, amp: str):
    """bf16 autocast for `--amp bf16` (CUDA and CPU); fp32 and tf32 otherwise (`utils.set_precision`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, weight decay 0 (SPEC 6): the fused kernel on CUDA; on a CPU the foreach
    implementation, bit for bit the per-tensor loop the committed results were trained with
    (tests/test_optimizer.py) and about twice as fast over TTL's 335M task-1 parameters."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0, fused=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=0.0, foreach=True)


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: NextItNet, data: dl.TaskData, split: str, smax: float, device: torch.device,
             batch_size: int = 1024, amp: str = "fp32", head: int | None = None,
             limit_batches: int = 0, rows: np.ndarray | None = None, shard: Shard = SINGLE) -> dict[str, float]:
    """Every example of the split once, in order, at s = smax (SPEC 2, 6), through the model's
    head `head` (default: the task's own, task n -> head n-1), the head in fp32 under any
    autocast. Task 1 predicts each sequence's last item. `rows`: only these examples of the
    split (`validation_rows`); `limit_batches` > 0 (a rehearsal): only the first batches. Under
    data parallelism each rank scores its part of the examples and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    head = data.task - 1 if head is None else head
    masks = model.masks(smax)
    idx = data.splits[split] if rows is None else rows
    if limit_batches:
        idx = idx[:limit_batches * batch_size]
    sums = dict.fromkeys(metric_sums(torch.zeros(0), data.kind), 0.0)
    for batch in dl.batches(idx[shard.part(len(idx))], batch_size):
        src, tgt = data.batch(batch, device)
        if data.task == 1:
            tgt = src[:, -1]
        with autocast(device, amp):
            [logits] = model.task_logits(src, [(head, None)], masks, fp32_heads=True)
        for k, v in metric_sums(rank_of_target(logits.float(), tgt), data.kind).items():
            sums[k] += v
    if shard.parallel:
        sums = distributed.all_reduce_sums(sums, device)
    model.train(was_training)
    return {k: v / max(len(idx), 1) for k, v in sums.items()}


AUTHORS_TASK1_EVAL_BATCH = 512  # the authors' train_task1.py evaluates in batches of 512; later tasks use --batch


def authors_eval_batch(data: dl.TaskData, config: TrainConfig) -> int:
    return AUTHORS_TASK1_EVAL_BATCH if data.task == 1 else config.batch


def validation_rows(data: dl.TaskData, config: TrainConfig, epoch: int) -> np.ndarray | None:
    """The validation examples that select the model at `epoch`: all of them (None; SPEC 2), or
    with `select_on` "random_batches" the authors' subset: a fresh random permutation each
    epoch, cut into full batches that end strictly inside the split (of 512 rows for task 1,
    of --batch for later tasks, as their scripts)."""
    if config.select_on == "split":
        return None
    rng = np.random.default_rng([config.seed, 2, epoch])
    return np.concatenate([*dl.batches(data.splits["valid"], authors_eval_batch(data, config), rng, drop_last=True),
                           np.zeros(0, dtype=np.int64)])


def check_batching(data: dl.TaskData, config: TrainConfig) -> None:
    """The authors' batching needs more examples than one batch in the training (`drop_last`)
    and validation (`select_on` random_batches) splits; the error says which."""
    checks = [("train", "--drop_last", config.drop_last, config.batch),
              ("valid", "--select_on random_batches", config.select_on == "random_batches",
               authors_eval_batch(data, config))]
    for split, flag, on, batch in checks:
        n = len(data.splits[split])
        if on and n <= batch:
            raise UserError(f"{data.path}: {flag} keeps only batches that end inside the {split} split, and its "
                            f"{n} examples are not more than one batch ({batch})")


# ------------------------------------------------------------------------ the loop

def train_step(model: NextItNet, step: Step, optimizer: torch.optim.Optimizer, src: torch.Tensor,
               tgt: torch.Tensor, s: float, device: torch.device, amp: str = "fp32",
               hooks: Hooks | None = None) -> float | None:
    """One batch: the step's loss under autocast, backward, the hooks around the optimiser step,
    then the clamp of the task embeddings (SPEC 4). A non-finite loss updates nothing (SPEC 5.6)
    and returns None; otherwise the loss. The loss is read once, after backward is queued: the
    step's only host-device synchronisation in one process. Under data parallelism the ranks'
    gradients and losses are summed before anything reads them, so every rank decides and
    updates alike."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss = step.backward(src, tgt, s)
    if step.shard.parallel:
        loss = distributed.all_reduce_gradients([p for g in optimizer.param_groups for p in g["params"]], loss)
    value = loss.item()
    if math.isfinite(value):
        if hooks:
            hooks.before_step(s)
        optimizer.step()
        if hooks:
            hooks.after_step()
    else:
        value = None
        optimizer.zero_grad(set_to_none=True)  # whatever backward accumulated is discarded
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


@dataclass
class Progress:
    """Where one phase of training stands: enough, with the weights, the optimiser and the step's
    own state, to continue it exactly (`--resume`)."""
    phase: str
    first_epoch: int       # the phase's first epoch number
    epochs: int            # the phase's epoch budget
    epoch: int             # the epoch in progress, or the next one
    batch: int             # batches of `epoch` already done
    epoch_rng: dict        # the batch-order generator's state at the start of `epoch`
    best: float = -math.inf
    bad_epochs: int = 0
    skipped: int = 0
    total: float = 0.0     # sum and count of this epoch's finite losses so far
    count: int = 0
    s_used: list = field(default_factory=list)
    seconds: float = 0.0   # of this epoch so far
    summary: dict = field(default_factory=dict)

    def end_epoch(self, rng: np.random.Generator) -> None:
        self.epoch, self.batch, self.epoch_rng = self.epoch + 1, 0, rng.bit_generator.state
        self.total, self.count, self.s_used, self.seconds = 0.0, 0, [], 0.0


def train(model: NextItNet, step: Step, data: dl.TaskData, config: TrainConfig, device: torch.device,
          save: Callable[..., None], hooks: Hooks | None = None, epochs: int | None = None,
          summary: dict | None = None, phase: str = "train", resume: dict | None = None,
          snapshot: Callable[[Progress, torch.optim.Optimizer], None] | None = None,
          extra_params: list[torch.Tensor] = ()) -> dict:
    """Epochs with annealed s, early stopping on validation `--select_by` (SPEC 6: hit@1); `save(summary)`
    writes the checkpoint at the first epoch and at every improvement. `hooks.before_step(s)`
    and `hooks.after_step()` surround each optimiser step (HAT, CONURE); a second `phase`
    (CONURE's retraining) continues `summary`. `snapshot(progress, optimizer)` is called at the
    end of every epoch and every `config.save_every` steps; `resume` (a snapshot's progress and
    optimiser state) continues a phase where it stopped. `extra_params`: trained tensors the
    method keeps outside the model (Piggyback's scores)."""
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad] + list(extra_params), config.lr, device)
    rng = np.random.default_rng([config.seed, len(summary["epochs"]) if summary else 0])
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        progress = Progress(**resume["progress"])
    else:
        summary = summary or {"epochs": [], "best_epoch": None, "valid": None, "test": None, "finished": False}
        first = len(summary["epochs"]) + 1
        progress = Progress(phase, first, epochs or config.epochs, first, 0, rng.bit_generator.state, summary=summary)
        if snapshot and first > 1:  # a later phase (CONURE's retraining) resumes from its own start
            snapshot(progress, optimizer)
    summary, phase = progress.summary, progress.phase
    check_batching(data, config)
    train_idx = data.splits["train"]
    batches_per_epoch = len(train_idx) / config.batch
    if config.limit_batches:  # a rehearsal anneals s over the batches it runs (eq. 19 with B = N)
        batches_per_epoch = min(batches_per_epoch, config.limit_batches)
    head, shard = model.num_tasks - 1, step.shard
    while progress.epoch < progress.first_epoch + progress.epochs and progress.bad_epochs < config.patience:
        epoch, start = progress.epoch, time.time() - progress.seconds
        rng.bit_generator.state = progress.epoch_rng
        batches = list(dl.batches(train_idx, config.batch, rng, config.drop_last))
        batches = step.epoch_batches(batches)
        if config.limit_batches:
            batches = batches[:config.limit_batches]
        model.train()
        bar = tqdm(range(progress.batch, len(batches)), total=len(batches), initial=progress.batch,
                   desc=f"task {data.task} epoch {epoch}", leave=False, disable=config.quiet or not shard.main)
        for b in bar:
            src, tgt = data.batch(batches[b], device)
            s = anneal_s(b, batches_per_epoch, config.smax)
            progress.s_used.append(s)
            loss = train_step(model, step, optimizer, src, tgt, s, device, config.amp, hooks)
            if loss is None:
                progress.skipped += 1
            else:
                progress.total, progress.count = progress.total + loss, progress.count + 1
            progress.batch, progress.seconds = b + 1, time.time() - start
            bar.set_postfix(loss=f"{progress.total / max(progress.count, 1):.4f}")
            if snapshot and config.save_every and progress.batch % config.save_every == 0 and b + 1 < len(batches):
                snapshot(progress, optimizer)
        if progress.count == 0:
            raise UserError(f"task {data.task} epoch {epoch}: every step had a non-finite loss (NaN or inf); "
                            "nothing was learned and no checkpoint is written (lower --lr or --alpha)")
        train_seconds = time.time() - start
        check_finite_model(model, f"task {data.task} epoch {epoch}")
        eval_start = time.time()
        rows = validation_rows(data, config, epoch)
        n_valid = len(data.splits["valid"] if rows is None else rows)
        valid = evaluate(model, data, "valid", config.smax, device, config.eval_batch, config.amp, head,
                         config.limit_eval_batches, rows, shard)
        timing = {"train_seconds": round(train_seconds, 3), "steps": len(batches),
                  "step_seconds": round(train_seconds / max(len(batches), 1), 4),
                  "valid_seconds": round(time.time() - eval_start, 3),
                  "valid_examples": min(n_valid, (config.limit_eval_batches * config.eval_batch) or n_valid)}
        diagnostics = epoch_diagnostics(model, step, progress.s_used, config.smax)
        record = {"epoch": epoch, "phase": phase, "train_loss": progress.total / max(progress.count, 1),
                  "valid": valid, "seconds": round(time.time() - start, 2), "skipped_steps": progress.skipped,
                  "diagnostics": diagnostics, "timing": timing}
        summary["epochs"].append(record)
        chosen = valid.get(config.select_by, valid["hit@1"])  # classification tasks have hit@1 only
        improved = chosen > progress.best
        if improved:
            progress.best, progress.bad_epochs = chosen, 0
            summary.update(best_epoch=epoch, valid=valid,
                           test=evaluate(model, data, "test", config.smax, device, config.eval_batch, config.amp, head,
                                         config.limit_eval_batches, shard=shard))
            save(summary)
        else:
            progress.bad_epochs += 1
        log.info("task %d %s epoch %d  loss %.4f  valid %s  %s%.1fs", data.task, phase, epoch, record["train_loss"],
                 format_metrics(valid), "* " if improved else "", record["seconds"])
        log.info("task %d %s epoch %d  %s", data.task, phase, epoch, _fmt_diagnostics(diagnostics))
        save(summary, checkpoint=False)
        progress.end_epoch(rng)
        if snapshot:
            snapshot(progress, optimizer)
        if progress.bad_epochs >= config.patience:
            log.info("task %d: no improvement for %d epochs, stopping", data.task, config.patience)
    return summary


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
