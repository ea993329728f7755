"""The command line of every task script: flags, their defaults, and one task's run.

`train_task1.py`, `train_teracon_t2.py` ... `train_teracon_t6.py` and `train_teracon.py --task N`
are thin entry points around `main`.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data_loader as dl
import distributed
from checkpoint import (load_checkpoint, load_previous, load_resume_state, resume_path, save_checkpoint,
                        save_resume_state, summary_path)
from methods import METHODS
from nextitnet import CHANNELS, DILATIONS, NextItNet
from teracon import ALPHA, auto_chunk_rows
from trainer import Progress, TrainConfig, check_batching, format_metrics, train
from utils import (AMP_MODES, UserError, atomic_write_json, check_outputs, code_version, finite_float,
                   library_versions, seed_int, set_precision, set_seed, sha256_file)

log = logging.getLogger("teracon")


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
    p.add_argument("--savepath", help="output prefix: writes PREFIX.pt, PREFIX.json and, until the run "
                   "finishes, PREFIX.resume.pt "
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
    p.add_argument("--hat_reg", type=finite_float("--hat_reg", nonnegative=True), default=0.75, help="hat: weight of "
                   "HAT's sparsity regulariser on tasks >= 2 (Serra et al. eq. 5) (default %(default)s)")
    p.add_argument("--min_retention_rows", type=int, default=0, help="deviation from the paper, off by "
                   "default: label at least this many rows per past task (floor(rho_i * B) is 0 for small "
                   "batches once rho is small); task >= 2 only (default %(default)s)")
    p.add_argument("--select_by", choices=("hit@1", "mrr@5"), default="hit@1", help="validation metric of "
                   "early stopping and model selection: hit@1 as the paper, or mrr@5 (ranking tasks only; "
                   "steadier on small validation splits; classification tasks always use hit@1 = accuracy) "
                   "(default %(default)s)")
    p.add_argument("--drop_last", action="store_true", help="the authors' training batcher: drop each epoch's "
                   "last batch (partial, or full when --batch divides the split), as their `while end < len` does; "
                   "off by default: we train on every example (SPEC 2)")
    p.add_argument("--select_on", choices=("split", "random_batches"), default="split", help="validation "
                   "examples that select the model: the whole split, each once (SPEC 2), or the authors' subset: "
                   "a fresh random permutation each epoch cut into full batches (512 rows for task 1, --batch later, as "
                   "their scripts) that end inside the split "
                   "(test metrics always cover the whole test split) (default %(default)s)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation metric "
                   "before stopping (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split, the initialisation and the batches (default %(default)s)")
    p.add_argument("--split_by", choices=("example", "source"), default="example",
                   help="'example': split after expanding multi-target lines (the authors' way); "
                   "'source': all targets of one source line in one split (default %(default)s)")
    p.add_argument("--name", help="task name recorded in the checkpoint (default from the manifest or file)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--method", choices=list(METHODS), default="teracon", help="teracon, its ablations "
                   "teracon-nokr (alpha 0) and teracon-norel (plain masks), or a baseline on the same backbone: "
                   "fineall, sinmo, hat, conure, peterrec, piggyback, or the multi-task reference mtl; later tasks must use the method of task 1 (default %(default)s)")
    p.add_argument("--channels", type=int, default=CHANNELS, help="task 1 only: hidden size C; later tasks "
                   "take the checkpoint's (default %(default)s)")
    p.add_argument("--dilations", type=int, nargs="+", default=list(DILATIONS), help="task 1 only: one "
                   "residual block per dilation d (convs d and 2d); later tasks take the checkpoint's "
                   "(default %(default)s)")
    p.add_argument("--prune_ratio", type=finite_float("--prune_ratio"), default=0.7, help="conure: share of a task's free conv "
                   "weights pruned after it (default %(default)s)")
    p.add_argument("--patch_size", type=int, default=0, help="peterrec: width k of each model patch "
                   "C -> k -> C (0: C/4, PeterRec's cardinality-1 patch; fixed by task 2 for the later tasks) "
                   "(default %(default)s)")
    p.add_argument("--retrain_epochs", type=int, default=10, help="conure: maximum epochs of retraining "
                   "after pruning (default %(default)s)")
    p.add_argument("--amp", choices=AMP_MODES, default="fp32", help="precision: fp32 (matmuls and "
                   "convolutions in full fp32, also on CUDA), tf32 (TF32 matmuls and cuDNN convolutions on an "
                   "Ampere-or-newer GPU, as the authors' PyTorch 1.7 ran there; fp32 on a CPU) or bf16 (autocast "
                   "for training and evaluation; pays on CUDA and on CPUs with AMX or AVX512-BF16); recorded in "
                   "PREFIX.json and the checkpoint (default %(default)s)")
    p.add_argument("--deterministic", action="store_true", help="bitwise-reproducible kernels on CUDA "
                   "(deterministic algorithms, a fixed cuBLAS workspace, no cuDNN autotuning; slower); a CPU "
                   "run is reproducible for a fixed thread count without it")
    p.add_argument("--limit_batches", type=int, default=0, help="a rehearsal: at most N training batches an "
                   "epoch, s annealed over those N (eq. 19); its checkpoints and summaries are marked "
                   "rehearsal, and only a rehearsal may start from them (default 0: every batch)")
    p.add_argument("--limit_eval_batches", type=int, default=0, help="a rehearsal: at most N evaluation "
                   "batches a split (default 0: the whole split)")
    p.add_argument("--accept_unfinished", action="store_true", help="start from a --paths checkpoint whose "
                   "run did not finish (its PREFIX.json says finished: false)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this task from "
                   "PREFIX.resume.pt (written at every epoch end and every --save_every steps), bit for bit "
                   "on the same device; every other flag must be the same as the interrupted run's")
    p.add_argument("--save_every", type=int, default=0, help="also write the resumable state every N training "
                   "steps inside an epoch (0: at epoch ends only) (default %(default)s)")
    p.add_argument("--chunk_rows", type=int, default=-1, help="micro-batching of a task-n step with knowledge "
                   "retention: at most this many stacked rows per forward and backward, gradients accumulated, "
                   "the same loss and gradients as one pass; 0 = off, -1 = auto: rows whose activations fit "
                   "8 MiB on a CPU, off on CUDA (default %(default)s)")
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
    if args.chunk_rows < -1:
        raise UserError(f"--chunk_rows {args.chunk_rows}: must be -1 (auto), 0 (off) or positive")
    for flag in ("min_retention_rows", "save_every", "limit_batches", "limit_eval_batches", "patch_size"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 0")
    if args.channels < 1 or min(args.dilations) < 1:
        raise UserError("--channels and --dilations must be positive")
    if not 0 <= args.prune_ratio < 1:
        raise UserError(f"--prune_ratio {args.prune_ratio}: must be in [0, 1)")
    METHODS[args.method].resolve(args)
    if first and args.paths:
        raise UserError("--paths: task 1 starts from scratch and takes no previous checkpoint")
    folder, prefix = Path("Data/Session"), Path("saved_models")
    entry = None
    if args.dataset:
        manifest = dl.load_manifest(args.dataset)
        entry = dl.manifest_task(manifest, task)
        folder, prefix = Path(manifest["dir"]), prefix / Path(manifest["dir"]).name
    if args.datapath is None:
        if entry is None and task not in dl.TTL_FILES:
            raise UserError(f"--task {task}: give --datapath or --dataset (TTL has tasks 1-6 only)")
        args.datapath = entry["file"] if entry else str(folder / dl.TTL_FILES[task])
        if entry is None and not Path(args.datapath).is_file():
            raise UserError(f"{args.datapath}: file not found (put the TTL files in Data/Session/, or use "
                            "--dataset ml-100k after `python prepare_data.py ml-100k`, or --datapath FILE)")
    if args.name is None:
        args.name = entry["name"] if entry else Path(args.datapath).stem
    # the prepared cache of the manifest's task file (default: cache/ beside the file)
    args.cache_dir = entry.get("cache_dir") if entry and Path(entry["file"]) == Path(args.datapath) else None
    args.datapath_index = args.datapath_index or str(folder / "index.json")
    args.savepath = args.savepath or str(prefix / f"task{task}")
    if not first:
        args.paths = args.paths or str(prefix / f"task{task - 1}.pt")
        if Path(args.paths).resolve() == Path(args.savepath + ".pt").resolve():
            raise UserError(f"--savepath {args.savepath}: would overwrite the checkpoint it starts from")
    args.task = task
    return args


def load_data(args: argparse.Namespace) -> tuple[dl.TaskData, dict | None, np.ndarray]:
    """The task's data, the task n-1 checkpoint (None for task 1) and the item index."""
    prev = None
    if args.task == 1:
        data, items = dl.load_task1(args.datapath, args.seed, split_by=args.split_by, cache_dir=args.cache_dir)
    else:
        prev, items = load_previous(args.paths, args.datapath_index, args.task, args.method, args.accept_unfinished,
                                    rehearsal=is_rehearsal(args))
        data = dl.load_task(args.task, args.datapath, items, args.seed, args.split_by, args.name,
                            cache_dir=args.cache_dir)
    n = {k: len(v) for k, v in data.splits.items()}
    if n["valid"] == 0 or n["test"] == 0:
        raise UserError(f"{data.path}: {sum(n.values())} examples are too few for a 80/5/15 split "
                        "(need at least 10)")
    data.name = args.name
    return data, prev, items


class TaskRun:
    """One task's training run: its data, method, model and step, and the files it writes
    (PREFIX.pt at every new best epoch, PREFIX.json after every epoch, PREFIX.resume.pt).
    Under torchrun (`shard`) every rank trains and rank 0 alone writes."""

    def __init__(self, args: argparse.Namespace, device: torch.device, precision: dict,
                 shard: distributed.Shard = distributed.SINGLE):
        self.args, self.device, self.shard = args, device, shard
        self.ckpt_out, self.summary_out = Path(args.savepath + ".pt"), Path(args.savepath + ".json")
        self.resume_out = resume_path(args.savepath)
        start = time.time()
        # every rank reads on its own (the data cache is only read here), so that a bad input stops
        # each rank with its own error line before any collective
        self.data, self.prev, self.items = load_data(args)
        self.load_seconds = time.time() - start
        if args.chunk_rows < 0:
            args.chunk_rows = auto_chunk_rows(device, self.data.sources.shape[1],
                                              self.prev["config"]["channels"] if self.prev else 0)
        self.method = METHODS[args.method](args, args.task, self.prev, device)
        self.model, teacher = self.method.build(len(self.items) + 1, self.data.num_classes)
        self.model.to(device)
        self.method.prepare(self.model)
        self.step = self.method.step(self.model, teacher)
        self.step.shard = shard
        self.config = TrainConfig.from_args(args)
        check_batching(self.data, self.config)  # before anything is written
        self.run_args = dict(vars(args))
        # what produced the run: recorded in PREFIX.json and the checkpoint
        self.run_info = {"precision": precision, "code": code_version(), "rehearsal": is_rehearsal(args),
                         "world_size": shard.world}
        self.task_entry = {"task": args.task, "name": self.data.name, "file": self.data.path,
                           "file_sha256": sha256_file(self.data.path), "num_classes": self.data.num_classes,
                           "metric": self.data.kind, "seed": args.seed, "split_by": args.split_by,
                           "split_sizes": {k: len(v) for k, v in self.data.splits.items()}}
        # a resumable state is only valid for the same inputs, byte for byte
        self.resume_args = dict(self.run_args, datapath_sha256=self.task_entry["file_sha256"],
                                paths_sha256=sha256_file(args.paths) if args.task > 1 else None,
                                run_device=str(device), world_size=shard.world)

    def save(self, summary: dict, checkpoint: bool = True) -> None:
        """The checkpoint (at a new best epoch) and the run summary (after every epoch); rank 0 only."""
        if not self.shard.main:
            return
        entry = dict(self.task_entry, best_epoch=summary["best_epoch"], test=summary["test"])
        if checkpoint:
            save_checkpoint(self.ckpt_out, method=self.args.method, model=self.model,
                            tasks=(self.prev["tasks"] if self.prev else []) + [entry], items=self.items,
                            args=self.run_args, extras=self.method.extras(), run_info=self.run_info)
        atomic_write_json(self.summary_out, {"task": entry, "method": self.args.method, "args": self.run_args,
                                             "checkpoint": str(self.ckpt_out), "versions": library_versions(),
                                             **self.run_info, "resources": self.resources(), **summary})

    def resources(self) -> dict:
        """Seconds to load the task's data and checkpoint, and the process's peak memory so far."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        gib = peak / 2**30 if sys.platform == "darwin" else peak / 2**20
        return {"load_seconds": round(self.load_seconds, 3), "peak_rss_gib": round(gib, 3)}

    def snapshot(self, progress: Progress, optimizer: torch.optim.Optimizer) -> None:
        """The resumable state (`--resume`); rank 0 only."""
        if not self.shard.main:
            return
        save_resume_state(self.resume_out, args=self.resume_args, progress=asdict(progress), model=self.model,
                          optimizer=optimizer, step_state=self.step.state_dict(),
                          method_state=self.method.state_dict())

    def restore(self) -> dict:
        """Weights, method and step as the resumable state holds them; returns the state."""
        state = load_resume_state(self.resume_out, self.resume_args)
        for key, what in (("run_device", "device"), ("chunk_rows", "--chunk_rows"), ("world_size", "ranks")):
            before, now = state["args"].get(key), self.resume_args[key]
            if before != now:
                log.warning("task %d: resuming with %s %s where the state was written with %s: the same "
                            "loss and gradients up to float rounding, so the run continues equivalently but "
                            "not bit for bit", self.args.task, what, now, before)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.step.load_state_dict(state["step"])
        log.info("task %d: resuming %s phase at epoch %d, batch %d (%s)", self.args.task, state["progress"]["phase"],
                 state["progress"]["epoch"], state["progress"]["batch"], self.resume_out)
        return state

    def fit(self, epochs: int | None = None, phase: str = "train", summary: dict | None = None,
            resume: dict | None = None) -> dict:
        return train(self.model, self.step, self.data, self.config, self.device, self.save, self.method.hooks(),
                     epochs=epochs, summary=summary, phase=phase, resume=resume, snapshot=self.snapshot,
                     extra_params=self.method.parameters())

    def run(self) -> dict:
        """Fit (from the resumable state with --resume), then what the method does after the fit."""
        state = self.restore() if self.args.resume else None
        if state is None or state["progress"]["phase"] == "train":
            summary = self.fit(resume=state)
            summary = self.method.after_fit(self.model, self.reload_best,
                                            lambda **kw: self.fit(summary=summary, **kw)) or summary
        else:  # a later phase (CONURE's retraining) continues where it stopped
            summary = self.fit(resume=state)
        summary["finished"] = True
        self.save(summary, checkpoint=False)
        if self.shard.main:
            self.resume_out.unlink(missing_ok=True)  # a finished run has nothing to resume
        distributed.barrier(self.shard)  # the files are complete when any rank returns
        return summary

    def reload_best(self) -> None:
        """The best epoch's weights from PREFIX.pt; under torchrun rank 0 reads them and sends them."""
        if self.shard.main:
            reload_weights(self.model, self.ckpt_out)
        if self.shard.parallel:
            distributed.broadcast_model(self.model)


def main(argv: list[str] | None = None, task: int | None = None) -> dict:
    """Train one task with its method; writes PREFIX.pt (best validation epoch) and PREFIX.json."""
    args = build_parser(task).parse_args(argv)
    args = resolve_args(args, task or args.task)
    outputs = {"--savepath": [Path(args.savepath + ".pt"), Path(args.savepath + ".json"), resume_path(args.savepath)]}
    inputs = {"--datapath": args.datapath}
    if args.task == 1:
        outputs["--datapath_index"] = args.datapath_index
    else:
        inputs.update({"--paths": [args.paths, summary_path(args.paths)], "--datapath_index": args.datapath_index})
    check_outputs(outputs, inputs)  # before any training: never write over an input, never fail late
    # under torchrun every rank has failed the checks above alike before any joins the process group
    shard, device = distributed.init(args.device)
    precision = set_precision(args.amp, device, args.deterministic)
    set_seed(args.seed)

    run = TaskRun(args, device, precision, shard)
    data, n = run.data, run.task_entry["split_sizes"]
    log.info("task %d (%s), method %s: %s, %d classes (%s), split train/valid/test %d/%d/%d, device %s, %s%s",
             args.task, data.name, args.method, data.path, data.num_classes, data.kind, n["train"], n["valid"],
             n["test"], device, args.amp, f", {shard.world} ranks (torchrun)" if shard.parallel else "")
    if run.run_info["rehearsal"]:
        log.warning("task %d: a REHEARSAL (--limit_batches %d, --limit_eval_batches %d): its metrics are not "
                    "results", args.task, args.limit_batches, args.limit_eval_batches)
    if args.task == 1 and shard.main:
        dl.save_item_index(args.datapath_index, run.items, args.datapath)
    start = time.time()
    summary = run.run()
    log.info("task %d done in %.1fs: best epoch %s, test %s -> %s", args.task, time.time() - start,
             summary["best_epoch"], format_metrics(summary["test"]), run.ckpt_out)
    return summary


def is_rehearsal(args: argparse.Namespace) -> bool:
    """A run that limits its batches rehearses the recipe; its numbers are not results."""
    return bool(args.limit_batches or args.limit_eval_batches)


def reload_weights(model: NextItNet, path: Path) -> None:
    """The weights of the best epoch, saved at `path` by this run."""
    model.load_state_dict(load_checkpoint(path)["state_dict"])
