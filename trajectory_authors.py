#!/usr/bin/env python3
"""Whole epochs of tasks 1 and 2, step by step, beside the authors' code (issue 22): what the
two-step parity checks cannot see (the state carried over hundreds of steps and across epochs:
Adam's moments, the clamp, eq. 19's schedule, rho from one batch to the next, the relation MLPs
drawn afresh at task 2).

Both sides start from the same weights and train on the same batches: those of our own pipeline
(`data_loader`'s reading, item index and split of t1_watch.csv / t2_click.csv, then
`trainer.train`'s batch stream with `--drop_last`, i.e. their `getBatch`: only batches that end
strictly inside the split).

* Task 1: the authors' `NextItNet_Decoder` (generator_hat_other.py) built with `--seed` and
  copied into ours; their train_task1.py loop body (CE over every position, Adam, the clamp of the
  task embeddings to [-6, 6]; their mask regulariser is commented out) against
  `trainer.train_step` with `teracon.Task1Step` (mask_reg 0), as `train_task1.py --drop_last
  --mask_reg 0`.
* Task 2 (`--task2_epochs`): their student and frozen teacher (teracon.py's model, loaded from
  the task-1 weights as train_teracon.py loads its checkpoint, relation MLPs dropped); ours grown as
  `methods.Teracon.build` does, with their fresh draws (task-2 embeddings, head, relation MLPs)
  copied in. Their train_teracon.py loop body (teacher on task 1's subset with the plain mask,
  student with relation-aware masks, CE + alpha * rho-weighted MSE, rho from their `sample_ratio`
  for the next batch) against our `RetentionStep`, on the same subsets: int(B * rho) rows drawn
  here from their rho; our rho is compared with theirs before every step.

After every epoch both models are scored on the same whole validation split at s = smax. Per
epoch it reports the largest |loss difference| over the steps, the largest |rho difference|
(task 2), the largest relative difference of any parameter tensor (max |a - b| / max |a|), and
each side's validation hit@1 and MRR@5. Two identical computations stay within rounding for the
whole run in float64 (the default). In float32 task 1 is bit for bit equal here, while task 2
drifts by rounding alone (the stacked and per-task passes sum in different orders, and Adam turns
the sign of near-zero gradients into full-size steps): check task 2 in float64 (`--channels 64`
keeps it affordable on a CPU).

The authors' code is imported unchanged from a checkout (`--authors`), as in bench_authors.py.

    python trajectory_authors.py --authors /tmp/teracon_authors --data /tmp/ca22/data --channels 64 --epochs 2 --task2_epochs 2
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data_loader as dl
import utils
from bench_authors import checkout_error, cpu_name, load_authors, tensor_get_device_is_device
from compare_authors import ROOT, code_of
from nextitnet import NextItNet
from teracon import RetentionStep, Task1Step, anneal_s, auto_chunk_rows
from trainer import make_optimizer, train_step
from utils import OneLineParser, UserError, atomic_write_json, run_cli

log = logging.getLogger("teracon")

BATCH1, EVAL_BATCH, EMB_LIMIT = 32, 512, 6.0  # what their train_task1.py hard-codes; their clamp


def weight_pairs(theirs: nn.Module, ours: NextItNet) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(our parameter's name, a view into it, their matching tensor in its shape) for every weight
    of their NextItNet_Decoder (generator_hat_other's or teracon's) and our model of as many tasks:
    their Conv2d (C, C, 1, k) is our Conv1d (C, C, k); block b's task embedding rows (mask 1,
    mask 2) of task t are our layers 2b, 2b + 1 of task t; their relation MLPs mlp1[t], mlp2[t] of
    block b (teracon's model only; ours of a one-task model are never used) are our relation
    weights of task t, layers 2b, 2b + 1."""
    yield "item_embedding.weight", ours.item_embedding.weight, theirs.embeding.weight
    masks = ours.task_masks
    for b, (tb, ob) in enumerate(zip(theirs.residual_blocks, ours.blocks)):
        for name in ("conv1", "conv2", "ln1", "ln2"):
            mine, their = getattr(ob, name), getattr(tb, name)
            yield f"blocks.{b}.{name}.weight", mine.weight, their.weight.reshape(mine.weight.shape)
            yield f"blocks.{b}.{name}.bias", mine.bias, their.bias
        for t in range(ours.num_tasks):
            yield "task_masks.task_embedding", masks.task_embedding[t, 2 * b:2 * b + 2], tb.ec[t].weight
            for r, mlp in enumerate((getattr(tb, "mlp1", None), getattr(tb, "mlp2", None))):
                if mlp is not None:
                    yield "task_masks.relation_weight", masks.relation_weight[t, 2 * b + r], mlp[t].weight[0]
                    yield "task_masks.relation_bias", masks.relation_bias[t, 2 * b + r], mlp[t].bias[0]
    for t, head in enumerate(ours.heads):
        yield f"heads.{t}.weight", head.weight, theirs.task_classifier[t].weight
        yield f"heads.{t}.bias", head.bias, theirs.task_classifier[t].bias


@torch.no_grad()
def copy_weights(theirs: nn.Module, ours: NextItNet) -> None:
    """Their weights into ours (`weight_pairs`)."""
    for _, mine, their in weight_pairs(theirs, ours):
        mine.copy_(their)


@torch.no_grad()
def largest_relative_difference(theirs: nn.Module, ours: NextItNet) -> tuple[float, str]:
    """max over our parameter tensors of max |a - b| / max |a| (a theirs, over the parts of the
    tensor `weight_pairs` maps), and which tensor."""
    diff: dict[str, float] = {}
    scale: dict[str, float] = {}
    for name, mine, their in weight_pairs(theirs, ours):
        diff[name] = max(diff.get(name, 0.0), (their - mine).abs().max().item())
        scale[name] = max(scale.get(name, 0.0), their.abs().max().item())
    worst, where = 0.0, ""
    for name in diff:
        rel = diff[name] / (scale[name] or 1.0)
        if rel > worst:
            worst, where = rel, name
    return worst, where


@torch.no_grad()
def validation(theirs: nn.Module, ours: NextItNet, data: dl.TaskData, smax: float) -> dict[str, dict[str, float]]:
    """hit@1 (in examples) and MRR@5 of both models on the whole validation split of the model's
    newest task, at s = smax (task 1: the last position)."""
    out = {"authors": {"hits": 0, "mrr@5": 0.0}, "ours": {"hits": 0, "mrr@5": 0.0}}
    theirs.eval(), ours.eval()
    task, masks, idx = ours.num_tasks - 1, ours.masks(smax), data.splits["valid"]
    for start in range(0, len(idx), EVAL_BATCH):
        src, tgt = data.batch(idx[start:start + EVAL_BATCH], torch.device("cpu"))
        with tensor_get_device_is_device():
            if task == 0:
                their_logits, _ = theirs(src[:, :-1], smax, [], 0, "cpu", onecall=True)
            else:
                their_logits, _ = theirs(src, smax, [], task, "cpu", onecall=True, new_task=task)
        [our_logits] = ours.task_logits(src, [(task, None)], masks)
        target = src[:, -1] if task == 0 else tgt
        for side, logits in (("authors", their_logits), ("ours", our_logits)):
            rank = (logits > logits.gather(1, target[:, None])).sum(1)  # 0-based
            out[side]["hits"] += int((rank == 0).sum())
            out[side]["mrr@5"] += float(torch.where(rank < 5, 1.0 / (rank + 1.0), 0.0).sum())
    for side in out:
        out[side]["mrr@5"] /= len(idx)
    theirs.train(), ours.train()
    return out


class AuthorsTask1:
    """The loop body of their train_task1.py: CE over every position, Adam, clamp."""

    def __init__(self, model: nn.Module, lr: float):
        self.model, self.opt, self.ce = model, torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0), nn.CrossEntropyLoss()

    def step(self, src: torch.Tensor, tgt: torch.Tensor, s: float, subsets: list[np.ndarray]) -> float:
        with tensor_get_device_is_device():
            self.opt.zero_grad()
            logits, _ = self.model(src[:, :-1], s, [], 0, "cpu")
            loss = self.ce(logits, src[:, 1:].reshape(-1))
            loss.backward()
            self.opt.step()
        clamp_their_task_embeddings(self.model)
        return loss.item()


class AuthorsTask2:
    """The loop body of their train_teracon.py for task 2: the frozen previous model labels task
    1's subset of the batch (the sources without their last item, plain mask), the student scores
    it with its relation-aware mask and the new task on the whole batch; CE + alpha * the
    rho-weighted MSE; rho for the next batch from their `sample_ratio`; the step is skipped if
    the CE is not finite; clamp."""

    def __init__(self, model: nn.Module, teacher: nn.Module, lr: float, alpha: float, sample_ratio):
        self.model, self.teacher, self.alpha, self.sample_ratio = model, teacher, alpha, sample_ratio
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0)
        self.ce, self.mse, self.rho = nn.CrossEntropyLoss(), nn.MSELoss(), [0.9]

    def step(self, src: torch.Tensor, tgt: torch.Tensor, s: float, subsets: list[np.ndarray]) -> float:
        [rows] = subsets
        with tensor_get_device_is_device():
            self.opt.zero_grad()
            teacher_out, teacher_masks = self.teacher(src[rows, :-1], s, [], 0, "cpu", onecall=True, new_task=1)
            out, new_masks = self.model(src, s, [], 1, "cpu", onecall=True, new_task=1)
            student_out, _ = self.model(src[rows, :-1], s, [], 0, "cpu", onecall=True, backward=True, new_task=1)
            retention = self.rho[0] / sum(self.rho) * self.mse(student_out, teacher_out)
            loss = self.ce(out, tgt)
            self.rho = [self.sample_ratio(teacher_masks, new_masks)]
            value = float("nan")
            if torch.isfinite(loss):
                loss = loss + self.alpha * retention
                loss.backward()
                self.opt.step()
                value = loss.item()
        clamp_their_task_embeddings(self.model)
        return value


def clamp_their_task_embeddings(model: nn.Module) -> None:
    with torch.no_grad():
        for block in model.residual_blocks:
            for emb in block.ec:
                emb.weight.clamp_(-EMB_LIMIT, EMB_LIMIT)


def run_phase(a: argparse.Namespace, task: int, data: dl.TaskData, theirs, ours: NextItNet, our_step,
              epochs: int, batch_size: int) -> list[dict]:
    """`epochs` epochs of one task on both sides, on our pipeline's batches; per epoch the record."""
    cpu, records = torch.device("cpu"), []
    our_opt = make_optimizer([p for p in ours.parameters() if p.requires_grad], a.lr, cpu)
    rng = np.random.default_rng([a.seed, 0])  # trainer.train's batch stream of a phase
    subset_rng = np.random.default_rng([a.seed, 1])
    train_idx = data.splits["train"]
    for epoch in range(1, epochs + 1):
        batches = list(dl.batches(train_idx, batch_size, rng, drop_last=True))  # their getBatch: full batches
        if a.steps:
            batches = batches[:a.steps]
        worst_loss, worst_rho, sums, t0 = 0.0, 0.0, {"authors": 0.0, "ours": 0.0}, time.time()
        for b, idx in enumerate(tqdm(batches, desc=f"task {task} epoch {epoch}", leave=False, disable=a.quiet)):
            src, tgt = data.batch(idx, cpu)
            s = anneal_s(b, len(train_idx) / batch_size, a.smax)
            subsets = []
            if task > 1:  # their subset size int(B * rho) of their rho; ours must have the same rho
                subsets = [subset_rng.permutation(len(src))[:int(len(src) * theirs.rho[0])]]
                worst_rho = max(worst_rho, abs(float(our_step.rho[0]) - theirs.rho[0]))
                our_step._subsets = lambda _batch, given=subsets: given
            their_loss = theirs.step(src, tgt, s, subsets)
            our_loss = train_step(ours, our_step, our_opt, src, tgt, s, cpu)
            our_loss = float("nan") if our_loss is None else our_loss
            worst_loss = max(worst_loss, abs(their_loss - our_loss))
            sums["authors"], sums["ours"] = sums["authors"] + their_loss, sums["ours"] + our_loss
        rel, where = largest_relative_difference(theirs.model, ours)
        scores = validation(theirs.model, ours, data, a.smax)
        record = {"task": task, "epoch": epoch, "steps": len(batches), "max_abs_loss_difference": worst_loss,
                  "max_relative_weight_difference": rel, "worst_tensor": where, "valid": scores,
                  "mean_train_loss": {side: v / len(batches) for side, v in sums.items()},
                  "seconds": round(time.time() - t0, 1)}
        if task > 1:
            record["max_abs_rho_difference"] = worst_rho
        records.append(record)
        log.info("task %d epoch %d: %d steps, max |loss diff| %.3g%s, max relative weight diff %.3g (%s); valid "
                 "hit@1 authors %d / ours %d of %d, MRR@5 %.6f / %.6f; %.0fs", task, epoch, len(batches), worst_loss,
                 f", max |rho diff| {worst_rho:.3g}" if task > 1 else "", rel, where, scores["authors"]["hits"],
                 scores["ours"]["hits"], len(data.splits["valid"]), scores["authors"]["mrr@5"], scores["ours"]["mrr@5"],
                 record["seconds"])
    return records


def run(a: argparse.Namespace) -> dict:
    why = checkout_error(str(a.authors))
    if why:
        raise UserError(why.removeprefix("error: "))
    paths = [a.data / "t1_watch.csv", a.data / "t2_click.csv"][:1 + (a.task2_epochs > 0)]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: not found (compare_authors.py writes the comparison data)")
    dtype = {"float64": torch.float64, "float32": torch.float32}[a.dtype]
    mods = load_authors(str(a.authors))
    data1, items = dl.load_task1(paths[0], a.seed)  # our loader, item index and split, as train_task1.py
    num_items = data1.num_classes

    torch.manual_seed(a.seed)
    para = {"item_size": num_items, "dilated_channels": a.channels, "dilations": list(a.dilations),
            "kernel_size": 3, "learning_rate": a.lr, "batch_size": BATCH1, "task_embs": [0, 2]}
    theirs1 = mods["generator_hat_other"].NextItNet_Decoder(para).to(dtype)
    ours = NextItNet(num_items, [num_items], channels=a.channels, dilations=tuple(a.dilations)).to(dtype)
    copy_weights(theirs1, ours)
    result = {"seed": a.seed, "dtype": a.dtype, "code": code_of(ROOT), "cpu": cpu_name(),
              "threads": torch.get_num_threads(), "start_relative_weight_difference":
              largest_relative_difference(theirs1, ours)[0], "epochs": []}
    result["epochs"] += run_phase(a, 1, data1, AuthorsTask1(theirs1, a.lr), ours, Task1Step(ours, mask_reg=0.0),
                                  a.epochs, BATCH1)
    if a.task2_epochs:
        data2 = dl.load_task(2, paths[1], items, a.seed)
        # theirs as train_teracon.py builds them from the task-1 checkpoint (relation MLPs dropped)
        state = theirs1.state_dict()
        para2 = dict(para, batch_size=a.batch, num_task=2, target_item_size=[num_items, data2.num_classes])
        student = mods["teracon"].NextItNet_Decoder(para2).to(dtype)
        student.load_state_dict({k: v for k, v in state.items() if "mlp" not in k}, strict=False)
        teacher = mods["teracon"].NextItNet_Decoder(dict(para2, num_task=1, target_item_size=[num_items])).to(dtype)
        teacher.load_state_dict(state, strict=False)
        teacher.requires_grad_(False)
        # ours as methods.Teracon.build grows it: a frozen copy as the teacher, add_task
        our_teacher = copy.deepcopy(ours).eval().requires_grad_(False)
        ours.add_task(data2.num_classes)
        ours.to(dtype)
        copy_weights(student, ours)  # their fresh draws (new embeddings, head, relation MLPs) into ours
        cpu = torch.device("cpu")
        step = RetentionStep(ours, our_teacher, a.alpha, np.random.default_rng(0),
                             chunk_rows=auto_chunk_rows(cpu, data2.sources.shape[1], a.channels))
        theirs2 = AuthorsTask2(student, teacher, a.lr, a.alpha, mods["utils"].sample_ratio)
        result["epochs"] += run_phase(a, 2, data2, theirs2, ours, step, a.task2_epochs, a.batch)
    result["data"] = {str(p): utils.sha256_file(p) for p in paths}
    if a.out:
        atomic_write_json(a.out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="trajectory_authors.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--authors", type=Path, default=Path("/tmp/teracon_authors"),
                   help="checkout of github:Sein-Kim/TERACON, unmodified")
    p.add_argument("--data", type=Path, default=Path("/tmp/compare_authors/data"),
                   help="folder of compare_authors.py's data (its t1_watch.csv is read)")
    p.add_argument("--seed", type=utils.seed_type("--seed"), default=0, help="seed of the weights, split and batches")
    p.add_argument("--epochs", type=int, default=2, help="epochs of task 1")
    p.add_argument("--task2_epochs", type=int, default=1, help="epochs of task 2 after task 1 (0: task 1 only)")
    p.add_argument("--batch", type=int, default=1024, help="batch of task 2 (task 1: 32, as they hard-code)")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of knowledge retention in task 2")
    p.add_argument("--steps", type=int, default=0, help="steps per epoch (0: the whole epoch)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of both models")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--smax", type=int, default=50, help="largest annealing scale s")
    p.add_argument("--channels", type=int, default=256, help="channels C")
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 4, 1, 4, 1, 4, 1, 4], help="block dilations")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.epochs < 1 or a.steps < 0 or a.task2_epochs < 0 or a.batch < 2:
        raise UserError("trajectory_authors.py: --epochs must be >= 1, --task2_epochs and --steps >= 0, --batch >= 2")
    return run(a)  # run_cli has set up logging


if __name__ == "__main__":
    run_cli(main)
