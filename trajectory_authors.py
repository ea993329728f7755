#!/usr/bin/env python3
"""Whole epochs of task 1, step by step, beside the authors' code (issue 22): what the two-step
parity checks cannot see (the state carried over hundreds of steps and across epochs).

Both models start from the same weights (the authors' `NextItNet_Decoder`, built with `--seed`,
copied into ours) and train on the same batches: those of our own pipeline (`data_loader`'s
reading, item index and split of t1_watch.csv, then `trainer.train`'s batch stream with
`--drop_last`, i.e. their `getBatch`: only batches that end strictly inside the split). The
authors' side runs the loop body of their train_task1.py on each (their model, CE over every
position, Adam, the clamp of the task embeddings to [-6, 6]; the mask regulariser is
commented out there); ours runs `trainer.train_step` with `teracon.Task1Step` (mask_reg 0)
and `trainer.make_optimizer`, as `train_task1.py --drop_last --mask_reg 0` does. s follows
eq. 19 over B = n_train / 32. After every epoch both models are scored on the same whole
validation split at s = smax.

What it reports per epoch: the largest |loss difference| over the epoch's steps, the largest
relative difference of any parameter tensor (max |a - b| / max |a|), and each side's
validation hit@1 and MRR@5. In float64 (the default) two identical computations stay within
rounding for the whole run; a difference in the carried state (the optimiser, the clamp, the
schedule) shows as a jump far above it.

The authors' code is imported unchanged from a checkout (`--authors`), as in bench_authors.py.

    python trajectory_authors.py --authors /tmp/teracon_authors --data /tmp/ca22/data --epochs 2
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data_loader as dl
import utils
from bench_authors import checkout_error, load_authors, tensor_get_device_is_device
from compare_authors import ROOT, code_of, cpu_name
from nextitnet import NextItNet
from teracon import Task1Step, anneal_s
from trainer import make_optimizer, train_step
from utils import OneLineParser, UserError, atomic_write_json, run_cli

log = logging.getLogger("teracon")

BATCH, EVAL_BATCH, EMB_LIMIT = 32, 512, 6.0  # what their train_task1.py hard-codes


def copy_weights(theirs: nn.Module, ours: NextItNet) -> None:
    """Their NextItNet_Decoder's weights into our one-task model: their Conv2d (C, C, 1, k) is our
    Conv1d (C, C, k); block b's task embedding rows (mask 1, mask 2) are our layers 2b, 2b + 1."""
    with torch.no_grad():
        ours.item_embedding.weight.copy_(theirs.embeding.weight)
        for b, (tb, ob) in enumerate(zip(theirs.residual_blocks, ours.blocks)):
            for name in ("conv1", "conv2"):
                getattr(ob, name).weight.copy_(getattr(tb, name).weight.squeeze(2))
                getattr(ob, name).bias.copy_(getattr(tb, name).bias)
            for name in ("ln1", "ln2"):
                getattr(ob, name).weight.copy_(getattr(tb, name).weight)
                getattr(ob, name).bias.copy_(getattr(tb, name).bias)
            ours.task_masks.task_embedding[0, 2 * b:2 * b + 2].copy_(tb.ec[0].weight)
        ours.heads[0].weight.copy_(theirs.task_classifier[0].weight)
        ours.heads[0].bias.copy_(theirs.task_classifier[0].bias)


def their_weights_as_ours(theirs: nn.Module, like: NextItNet) -> dict[str, torch.Tensor]:
    """Their current weights under our parameter names (for the comparison); not our relation
    MLPs, which a one-task model holds but never uses."""
    twin = NextItNet(like.num_items, [like.heads[0].out_features], channels=like.channels,
                     dilations=like.dilations).to(like.item_embedding.weight.dtype)
    copy_weights(theirs, twin)
    return {n: p.detach() for n, p in twin.named_parameters() if not n.startswith("task_masks.relation")}


def largest_relative_difference(theirs: nn.Module, ours: NextItNet) -> tuple[float, str]:
    """max over parameter tensors of max |a - b| / max |a| (a theirs), and which tensor."""
    ref = their_weights_as_ours(theirs, ours)
    worst, where = 0.0, ""
    for name, p in ours.named_parameters():
        if name not in ref:
            continue
        a = ref[name]
        scale = a.abs().max().item() or 1.0
        rel = (a - p.detach()).abs().max().item() / scale
        if rel > worst:
            worst, where = rel, name
    return worst, where


@torch.no_grad()
def validation(theirs: nn.Module, ours: NextItNet, valid: torch.Tensor, smax: float) -> dict[str, dict[str, float]]:
    """hit@1 (in examples) and MRR@5 of both models on the whole validation split, last position."""
    out = {"authors": {"hits": 0, "mrr@5": 0.0}, "ours": {"hits": 0, "mrr@5": 0.0}}
    theirs.eval(), ours.eval()
    masks = ours.masks(smax)
    for start in range(0, len(valid), EVAL_BATCH):
        seqs = valid[start:start + EVAL_BATCH]
        with tensor_get_device_is_device():
            their_logits, _ = theirs(seqs[:, :-1], smax, [], 0, "cpu", onecall=True)
        [our_logits] = ours.task_logits(seqs, [(0, None)], masks)
        for side, logits in (("authors", their_logits), ("ours", our_logits)):
            target = seqs[:, -1]
            rank = (logits > logits.gather(1, target[:, None])).sum(1)  # 0-based
            out[side]["hits"] += int((rank == 0).sum())
            out[side]["mrr@5"] += float(torch.where(rank < 5, 1.0 / (rank + 1.0), 0.0).sum())
    for side in out:
        out[side]["mrr@5"] /= len(valid)
    theirs.train(), ours.train()
    return out


def run(a: argparse.Namespace) -> dict:
    why = checkout_error(str(a.authors))
    if why:
        raise UserError(why.removeprefix("error: "))
    path = a.data / "t1_watch.csv"
    if not path.is_file():
        raise UserError(f"{path}: task-1 CSV not found (compare_authors.py writes the comparison data)")
    data, _ = dl.load_task1(path, a.seed)  # our loader, item index and split, as train_task1.py
    dtype = {"float64": torch.float64, "float32": torch.float32}[a.dtype]
    mods = load_authors(str(a.authors))
    num_items, cpu = data.num_classes, torch.device("cpu")
    valid = data.batch(data.splits["valid"], cpu)[0]
    train_idx = data.splits["train"]
    rng = np.random.default_rng([a.seed, 0])  # trainer.train's batch stream of a first phase
    torch.manual_seed(a.seed)
    para = {"item_size": num_items, "dilated_channels": a.channels, "dilations": list(a.dilations),
            "kernel_size": 3, "learning_rate": a.lr, "batch_size": BATCH, "task_embs": [0, 2]}
    theirs = mods["generator_hat_other"].NextItNet_Decoder(para).to(dtype)
    ours = NextItNet(num_items, [num_items], channels=a.channels, dilations=tuple(a.dilations)).to(dtype)
    copy_weights(theirs, ours)
    their_opt = torch.optim.Adam(theirs.parameters(), lr=a.lr, weight_decay=0)
    our_opt = make_optimizer([p for p in ours.parameters() if p.requires_grad], a.lr, cpu)
    step, ce = Task1Step(ours, mask_reg=0.0), nn.CrossEntropyLoss()
    start_rel, _ = largest_relative_difference(theirs, ours)

    batches_per_epoch = len(train_idx) / BATCH
    epochs = []
    for epoch in range(1, a.epochs + 1):
        batches = list(dl.batches(train_idx, BATCH, rng, drop_last=True))  # their getBatch: full batches
        if a.steps:
            batches = batches[:a.steps]
        worst_loss, sums, t0 = 0.0, {"authors": 0.0, "ours": 0.0}, time.time()
        for b, idx in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=a.quiet)):
            batch, tgt = data.batch(idx, cpu)
            s = anneal_s(b, batches_per_epoch, a.smax)
            with tensor_get_device_is_device():
                their_opt.zero_grad()
                logits, _ = theirs(batch[:, :-1], s, [], 0, "cpu")
                their_loss = ce(logits, batch[:, 1:].reshape(-1))
                their_loss.backward()
                their_opt.step()
            with torch.no_grad():
                for block in theirs.residual_blocks:
                    block.ec[0].weight.clamp_(-EMB_LIMIT, EMB_LIMIT)
            our_loss = train_step(ours, step, our_opt, batch, tgt, s, cpu)
            worst_loss = max(worst_loss, abs(their_loss.item() - our_loss))
            sums["authors"], sums["ours"] = sums["authors"] + their_loss.item(), sums["ours"] + our_loss
        rel, where = largest_relative_difference(theirs, ours)
        scores = validation(theirs, ours, valid, a.smax)
        record = {"epoch": epoch, "steps": len(batches), "max_abs_loss_difference": worst_loss,
                  "max_relative_weight_difference": rel, "worst_tensor": where, "valid": scores,
                  "mean_train_loss": {side: v / len(batches) for side, v in sums.items()},
                  "seconds": round(time.time() - t0, 1)}
        epochs.append(record)
        log.info("epoch %d: %d steps, max |loss diff| %.3g, max relative weight diff %.3g (%s); valid hit@1 "
                 "authors %d / ours %d of %d, MRR@5 %.6f / %.6f; %.0fs", epoch, len(batches), worst_loss, rel, where,
                 scores["authors"]["hits"], scores["ours"]["hits"], len(valid), scores["authors"]["mrr@5"],
                 scores["ours"]["mrr@5"], record["seconds"])
    result = {"seed": a.seed, "dtype": a.dtype, "code": code_of(ROOT), "cpu": cpu_name(), "threads": torch.get_num_threads(), "train": len(train_idx),
              "valid": len(valid), "start_relative_weight_difference": start_rel, "epochs": epochs,
              "data": str(path), "data_sha256": utils.sha256_file(path)}
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
    if a.epochs < 1 or a.steps < 0:
        raise UserError("trajectory_authors.py: --epochs must be >= 1 and --steps >= 0")
    utils.setup_logging()
    return run(a)


if __name__ == "__main__":
    run_cli(main)
