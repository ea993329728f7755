"""TERACON's method (paper Sec. 4): annealing, knowledge retention and the training steps.

The model is `nextitnet.py`, the loop `trainer.py`, the command line `cli.py`; the methods it is
compared with live in `methods.py`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from chunked_ce import CE_CHUNK_ELEMENTS, next_item_loss  # noqa: F401  (task 1's loss, re-exported)
from distributed import SINGLE, Shard
from nextitnet import NextItNet

ALPHA = 0.7          # weight of the knowledge-retention loss (eq. 18)
RHO_INIT = 0.9       # initial sampling ratio of every past task
RHO_SHARPNESS = 6.0  # rho_i = 1 - mean sigmoid(6 * cos(...)) (eq. 15)
COS_EPS = 1e-6       # the authors' nn.CosineSimilarity(dim=1, eps=1e-6): norms below it are clamped


def anneal_s(batch: int, batches_per_epoch: float, smax: float) -> float:
    """eq. 19: s = 1/smax + (smax - 1/smax) * b / B, with B = n_train / batch_size."""
    return 1.0 / smax + (smax - 1.0 / smax) * batch / batches_per_epoch


def subset_sizes(rho: np.ndarray, batch_size: int, min_rows: int = 0) -> list[int]:
    """floor(rho_i * B) rows for every past task (eq. 15-16); `min_rows` > 0 (off in the paper)
    raises each to min(min_rows, B)."""
    return [max(int(math.floor(r * batch_size)), min(min_rows, batch_size)) for r in rho]


def sample_subsets(rho: np.ndarray, batch_size: int, rng: np.random.Generator,
                   min_rows: int = 0) -> list[np.ndarray]:
    """An independent random subset of the batch's rows for every past task, of `subset_sizes`."""
    return [rng.permutation(batch_size)[:size] for size in subset_sizes(rho, batch_size, min_rows)]


def knowledge_retention_loss(student: list[torch.Tensor | None], teacher: list[torch.Tensor | None],
                             rho: np.ndarray) -> torch.Tensor:
    """eq. 16-17: sum_i rho_i / sum_j rho_j * MSE(student_i, teacher_i); empty subsets add nothing."""
    weights = rho / rho.sum()
    terms = [w * F.mse_loss(s, t) for w, s, t in zip(weights, student, teacher) if s is not None and len(s)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def rho_of_masks(teacher_masks: torch.Tensor, new_task_mask: torch.Tensor) -> torch.Tensor:
    """eq. 15: rho_i = 1 - mean over masked layers of sigmoid(6 * cos(m_i^teacher, m_new^student)).

    teacher_masks [T-1, M, C], new_task_mask [M, C] -> [T-1] float64, on their device. The cosine
    clamps each norm at COS_EPS as the authors' code does, which matters when a layer's mask is
    near zero.
    """
    cos = F.cosine_similarity(teacher_masks, new_task_mask.unsqueeze(0), dim=-1, eps=COS_EPS)  # [T-1, M]
    return (1.0 - torch.sigmoid(RHO_SHARPNESS * cos).mean(dim=1)).detach().double()


def update_rho(teacher_masks: torch.Tensor, new_task_mask: torch.Tensor) -> np.ndarray:
    """`rho_of_masks` on the host."""
    return rho_of_masks(teacher_masks, new_task_mask).cpu().numpy()


# ------------------------------------------------------------------------ training steps

def mask_mean(masks: torch.Tensor) -> torch.Tensor:
    """The authors' task-1 sparsity term: the mean of all masks (times --mask_reg)."""
    return masks.mean()


class Step:
    """A training step: `loss` of a batch at annealing scale s; `backward` also accumulates its
    gradients and returns the loss, detached. A non-finite loss updates nothing (SPEC 5.6):
    `trainer.train_step` then clears whatever gradients a micro-batched step accumulated.

    Under data parallelism (`shard.parallel`) a step computes only its rank's part of the batch,
    weighted by the whole batch's denominators, and the terms that do not depend on the rows
    (regularisers of the masks) on rank 0 alone: the ranks' losses and gradients sum to the
    one-process step's (`distributed.py`)."""
    shard: Shard = SINGLE

    def task_loss(self, head: int, seqs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One task's mean loss over a batch through head `head` under `masks` [T, M, C]: task 1's
        next-item loss on every position (SPEC 3), a later task's cross-entropy; under torchrun
        this rank's rows only, weighted by their share of the batch."""
        if self.shard.parallel:
            part = self.shard.part(len(seqs))
            share = (part.stop - part.start) / len(seqs)
            seqs, targets = seqs[part], targets[part]
            if not len(seqs):  # a rank without rows adds nothing (but stays in the graph)
                return 0.0 * sum(p.sum() for p in self.model.heads[head].parameters())
        if self.model.first_task + head == 1:
            hidden = self.model.encode(seqs[:, :-1], masks[head:head + 1])
            loss = next_item_loss(hidden.reshape(-1, hidden.shape[-1]), self.model.heads[head], seqs[:, 1:].reshape(-1))
        else:
            [logits] = self.model.task_logits(seqs, [(head, None)], masks)
            loss = F.cross_entropy(logits, targets)
        return loss * share if self.shard.parallel else loss

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        loss = self.loss(src, tgt, s)
        loss.backward()  # unconditionally: no host sync here; train_step discards a non-finite step
        return loss.detach()

    def epoch_batches(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """An epoch's batches of the task's training split (default: as they are; MTL lengthens it)."""
        return batches

    def state_dict(self) -> dict:
        """What `--resume` must restore to continue this step exactly (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Task1Step(Step):
    """Next-item loss on every position (SPEC 3) plus `mask_reg` * mean of all masks."""

    def __init__(self, model: NextItNet, mask_reg: float):
        self.model, self.mask_reg = model, mask_reg

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)
        loss = self.task_loss(0, src, tgt, masks)
        if self.mask_reg and self.model.masked and self.shard.main:
            loss = loss + self.mask_reg * mask_mean(masks)
        return loss


class NewTaskStep(Step):
    """The new task's cross-entropy alone, plus an optional `penalty(masks)` (HAT's regulariser):
    the step of every method without knowledge retention."""

    def __init__(self, model: NextItNet, penalty: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.penalty = model, penalty

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)
        loss = self.task_loss(self.model.num_tasks - 1, src, tgt, masks)
        return loss + self.penalty(masks) if self.penalty and self.shard.main else loss


def auto_chunk_rows(device: torch.device, length: int, channels: int, cache_bytes: int = 8 << 20) -> int:
    """Rows per micro-batch on a CPU: one fp32 activation [rows, length, C] within `cache_bytes`
    (at batch 1024 the stacked rows fall out of the cache otherwise); off on CUDA."""
    if device.type != "cpu" or channels == 0:
        return 0
    return max(16, cache_bytes // (length * channels * 4))


class RetentionStep(Step):
    """New-task cross-entropy plus alpha * knowledge retention from the frozen teacher (Sec. 4.3,
    eq. 18): every past task i labels its own random subset of the batch (eq. 16-17).

    `chunk_rows` > 0: `backward` runs the stacked rows (every past task's subset, then the
    batch) through forward and backward in chunks of at most that many rows, each row's loss
    weighted by the whole batch's denominators, so the loss and every gradient equal the
    unchunked step's up to float rounding (micro-batching for cache or memory). Under data
    parallelism each rank runs its own part of the stacked rows that way."""

    def __init__(self, model: NextItNet, teacher: NextItNet, alpha: float, rng: np.random.Generator,
                 min_rows: int = 0, chunk_rows: int = 0):
        self.model, self.teacher, self.alpha, self.rng, self.min_rows = model, teacher, alpha, rng, min_rows
        self.chunk_rows = chunk_rows
        self.rho = np.full(teacher.num_tasks, RHO_INIT)
        self.stats = RetentionStats(len(self.rho))

    @property
    def rho(self) -> np.ndarray:
        """The sampling ratios of the next batch; a step's update (on the device) is brought to the
        host only when first read, after that step's backward is queued."""
        if self._rho_next is not None:
            self._rho, self._rho_next = self._rho_next.cpu().numpy(), None
        return self._rho

    @rho.setter
    def rho(self, value: np.ndarray) -> None:
        self._rho, self._rho_next = np.asarray(value, dtype=np.float64), None

    def _subsets(self, batch_size: int) -> list[np.ndarray]:
        subsets = sample_subsets(self.rho, batch_size, self.rng, self.min_rows)
        self.stats.add(self.rho, subsets)
        return subsets

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)
        past = list(enumerate(self._subsets(len(src))))
        with torch.no_grad():
            teacher_masks = self.teacher.masks(s)
            teacher_logits = self.teacher.task_logits(src, past, teacher_masks)
        *student_logits, logits = self.model.task_logits(src, past + [(self.model.num_tasks - 1, None)], masks)
        loss = F.cross_entropy(logits, tgt)
        loss = loss + self.alpha * knowledge_retention_loss(student_logits, teacher_logits, self.rho)
        self._rho_next = rho_of_masks(teacher_masks, masks[-1])  # used by the next batch
        return loss

    def backward(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        batch, new = len(src), self.model.num_tasks - 1
        stacked = batch + sum(subset_sizes(self.rho, batch, self.min_rows))
        if not self.shard.parallel and (not self.chunk_rows or stacked <= self.chunk_rows):
            return super().backward(src, tgt, s)
        masks = self.model.masks(s)
        leaf = masks.detach().requires_grad_(True)  # chunks meet here; one backward through the masks
        subsets = self._subsets(batch)
        with torch.no_grad():
            teacher_masks = self.teacher.masks(s)
        weights = self.rho / self.rho.sum()
        self._rho_next = rho_of_masks(teacher_masks, masks[-1].detach())  # used by the next batch
        # every stacked row as (task, row of the batch), in the unchunked step's order
        task_of = np.concatenate([np.full(len(sub), i) for i, sub in enumerate(subsets)] + [np.full(batch, new)])
        row_of = np.concatenate([*subsets, np.arange(batch)])
        part = self.shard.part(len(row_of))  # this rank's stacked rows (all of them in one process)
        task_of, row_of = task_of[part], row_of[part]
        chunk = self.chunk_rows or max(len(row_of), 1)
        total = torch.zeros((), dtype=torch.float64, device=src.device)
        for start in range(0, len(row_of), chunk):
            tasks, rows = task_of[start:start + chunk], row_of[start:start + chunk]
            groups = [(int(t), torch.as_tensor(rows[tasks == t], device=src.device)) for t in np.unique(tasks)]
            past = [(t, r) for t, r in groups if t != new]
            with torch.no_grad():
                teacher_logits = self.teacher.task_logits(src, past, teacher_masks) if past else []
            student_logits = self.model.task_logits(src, groups, leaf)
            teacher_of = dict(zip([t for t, _ in past], teacher_logits))
            terms = []
            for (t, r), logits in zip(groups, student_logits):
                if t == new:
                    terms.append(F.cross_entropy(logits, tgt[r], reduction="sum") / batch)
                else:
                    denominator = len(subsets[t]) * logits.shape[1]
                    terms.append(self.alpha * weights[t] * F.mse_loss(logits, teacher_of[t], reduction="sum")
                                 / denominator)
            chunk_loss = torch.stack(terms).sum()
            chunk_loss.backward()  # no host sync per chunk: a non-finite total makes train_step skip
            total += chunk_loss.detach().double()
        if leaf.grad is not None:  # None: this rank had no rows
            masks.backward(leaf.grad)
        return total.to(masks.dtype)

    def state_dict(self) -> dict:
        """What continues this step exactly after a restart: rho, the subsets' generator and the
        epoch's retention statistics so far."""
        return {"rho": self.rho.tolist(), "rng": self.rng.bit_generator.state,
                "stats": {"rho_sum": self.stats.rho_sum.tolist(), "rows_sum": self.stats.rows_sum.tolist(),
                          "steps": self.stats.steps}}

    def load_state_dict(self, state: dict) -> None:
        self.rho = np.asarray(state["rho"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]
        self.stats.rho_sum = np.asarray(state["stats"]["rho_sum"], dtype=np.float64)
        self.stats.rows_sum = np.asarray(state["stats"]["rows_sum"], dtype=np.float64)
        self.stats.steps = int(state["stats"]["steps"])


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
