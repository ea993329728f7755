"""The checkpoint format: what a `PREFIX.pt` holds, how it is written, read and validated.

A checkpoint is self-describing: format, method, model config and weights, every task learned so
far (name, data file and its sha256, classes, metric, seed, split, test metrics right after it
was trained), the item-index checksum, the run's arguments (smax among them), library versions,
and the method's own extras (HAT's cumulative mask, SinMo's members, CONURE's weight owners).
`PREFIX.json` beside it is the run summary (per-epoch log, best epoch, `finished`).
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import data_loader as dl
from methods import METHODS, LayoutError
from utils import UserError, atomic_torch_save, clip, library_versions, read_json, require_file

log = logging.getLogger("teracon")

FORMAT = "teracon/2"


def save_checkpoint(path: str | Path, *, method: str, model: torch.nn.Module, tasks: list[dict],
                    items: np.ndarray, args: dict, extras: dict, run_info: dict | None = None) -> None:
    """Write a checkpoint atomically (weights on the CPU); `run_info`: the run's precision, code
    commit and rehearsal mark."""
    atomic_torch_save(path, {
        "format": FORMAT, "method": method, "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tasks": tasks, "item_index": {"checksum": dl.index_checksum(items), "num_items": len(items) + 1},
        "args": args, "versions": library_versions(), **(run_info or {}), **extras})


def smax_of(ckpt: dict) -> float:
    """The largest annealing scale the checkpoint's run used: its masks are served at s = smax."""
    return float(ckpt["args"]["smax"])


CHECKPOINT_TASK_KEYS = {"task": int, "name": str, "file": str, "file_sha256": str, "num_classes": int,
                        "metric": str, "seed": int, "split_by": str}


def _wrong_type(value: Any, kind: type) -> bool:
    return not isinstance(value, kind) or (kind is int and isinstance(value, bool))


def checkpoint_problem(ckpt: Any) -> str | None:
    """What makes `ckpt` not a TERACON checkpoint (the keys and types the code reads), or None."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    missing = [k for k in ("state_dict", "config", "tasks", "item_index", "args") if k not in ckpt]
    if missing:
        return f"no {', '.join(missing)}"
    for key in ("state_dict", "config", "item_index", "args"):
        if not isinstance(ckpt[key], dict):
            return f"{key} is a {type(ckpt[key]).__name__}, not a dict"
    tasks = ckpt["tasks"]
    if not isinstance(tasks, list) or not tasks:
        return "tasks is not a non-empty list"
    for i, entry in enumerate(tasks):
        if not isinstance(entry, dict):
            return f"tasks[{i}] is a {type(entry).__name__}, not a dict"
        for key, kind in CHECKPOINT_TASK_KEYS.items():
            if key not in entry:
                return f"tasks[{i}] has no {key}"
            if _wrong_type(entry[key], kind):
                return f"tasks[{i}].{key} is not a {kind.__name__}"
    for key, kind in (("checksum", str), ("num_items", int)):
        if key not in ckpt["item_index"]:
            return f"item_index has no {key}"
        if _wrong_type(ckpt["item_index"][key], kind):
            return f"item_index.{key} is not a {kind.__name__}"
    smax = ckpt["args"].get("smax")
    if isinstance(smax, bool) or not isinstance(smax, (int, float)) or not math.isfinite(smax):
        return "args.smax is not a finite number"
    members = ckpt.get("members", [])
    if not isinstance(members, list) or any(not isinstance(m, dict) or not isinstance(m.get("config"), dict)
                                            or not isinstance(m.get("state_dict"), dict) for m in members):
        return "members is not a list of {config, state_dict} dicts"
    if not isinstance(ckpt.get("method", ""), str):
        return "method is not a str"
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by `atomic_torch_save`; a missing or foreign file is a UserError."""
    path = require_file(path, "checkpoint not found (train the previous task first, or pass --paths)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"{path}: not a TERACON checkpoint ({problem})")
    ckpt = upgrade(ckpt)
    problem = extras_problem(ckpt)
    if problem:
        raise UserError(f"{path}: not a TERACON checkpoint ({problem})")
    return ckpt


def extras_problem(ckpt: dict) -> str | None:
    """What is wrong with the method's own entries (HAT's cumulative mask, CONURE's owners, ...),
    as the method's class judges them, or None (an unknown method is judged where it is served)."""
    method = METHODS.get(ckpt.get("method", "teracon"))
    try:
        return method.checkpoint_problem(ckpt) if method else None
    except LayoutError as e:
        return str(e)


def upgrade(ckpt: dict) -> dict:
    """Read a checkpoint of format teracon/1 (before the methods owned their state) as teracon/2:
    the config's `owned` flag goes, and the method moves its own entries where it now keeps them
    (`upgrade_checkpoint`: CONURE's weight owners, SinMo's `first_task`)."""
    if ckpt.get("format") != "teracon/1":
        return ckpt
    owned = bool(ckpt["config"].get("owned"))  # teracon/1's mark of a model whose convs own their weights
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k != "owned"}
    for member in ckpt.get("members", []):
        member["config"] = {k: v for k, v in member["config"].items() if k != "owned"}
    method = METHODS.get(ckpt.get("method") or ("conure" if owned else "teracon"))
    if method:
        method.upgrade_checkpoint(ckpt)
    ckpt["format"] = FORMAT
    return ckpt


def summary_path(ckpt_path: str | Path) -> Path | None:
    """The run summary `PREFIX.json` written beside the checkpoint `PREFIX.pt` (None if not a .pt path)."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_suffix(".json") if ckpt_path.suffix == ".pt" else None


def require_finished(ckpt_path: str | Path, accept_unfinished: bool) -> None:
    """Refuse a checkpoint whose run summary says `finished: false` (a killed or running training),
    unless `accept_unfinished`; a checkpoint without a summary beside it is taken as it is."""
    summary = summary_path(ckpt_path)
    if summary is None or not summary.is_file():
        return
    try:
        finished = read_json(summary, "run summary")
    except UserError:
        if accept_unfinished:
            return
        raise
    if isinstance(finished, dict) and finished.get("finished") is False:
        if not accept_unfinished:
            raise UserError(f"{ckpt_path}: its training run did not finish ({summary} says finished: false); "
                            "pass --accept_unfinished to use it anyway")
        log.warning("%s: its training run did not finish; used anyway (--accept_unfinished)", ckpt_path)


def load_previous(path: str, index_path: str, task: int, method: str, accept_unfinished: bool,
                  rehearsal: bool = False) -> tuple[dict, np.ndarray]:
    """The task n-1 checkpoint and the item index, checked against each other, the task and the
    method; a rehearsal's checkpoint only for another rehearsal."""
    prev = load_checkpoint(path)
    require_finished(path, accept_unfinished)
    if prev.get("rehearsal") and not rehearsal:
        raise UserError(f"{path}: a rehearsal checkpoint (trained with --limit_batches/--limit_eval_batches); "
                        "only a rehearsal may start from it (retrain the previous task without the limits)")
    if len(prev["tasks"]) != task - 1:
        raise UserError(f"{path}: checkpoint knows {len(prev['tasks'])} task(s); "
                        f"task {task} needs the checkpoint of task {task - 1}")
    if prev.get("method", "teracon") != method:
        raise UserError(f"{path}: made by --method {prev.get('method')}, not {method}")
    items = dl.load_item_index(index_path)
    if dl.index_checksum(items) != prev["item_index"]["checksum"]:
        raise UserError(f"{index_path}: item index differs from the one {path} was "
                        "trained with (retrain task 1 or pass the right --datapath_index)")
    return prev, items


# ------------------------------------------------------------------------ resumable state

RESUME_FORMAT = "teracon-resume/1"
# flags that may differ between a run and its --resume: none of them changes what is computed,
# except the device, --chunk_rows and the number of torchrun ranks (the same loss and gradients
# up to float rounding: bit for bit only with all three unchanged; the run says so when they change)
RESUME_FREE_FLAGS = {"resume", "save_every", "quiet", "device", "run_device", "chunk_rows", "accept_unfinished",
                     "cache_dir", "world_size"}


def resume_path(savepath: str) -> Path:
    """`PREFIX.resume.pt`: the resumable state of the run writing `PREFIX.pt`."""
    return Path(savepath + ".resume.pt")


def save_resume_state(path: Path, *, args: dict, progress: dict, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, step_state: dict, method_state: dict) -> None:
    """Everything `--resume` needs to continue bit for bit: weights, optimiser, the step's and the
    method's own state, the trainer's progress and every global random generator."""
    atomic_torch_save(path, {
        "format": RESUME_FORMAT, "args": args, "progress": progress,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "step": step_state, "method": method_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}})


def load_resume_state(path: Path, args: dict) -> dict:
    """A resumable state written for the same run (every flag that matters equal), RNGs restored."""
    path = require_file(path, "no resumable state here (the run never finished an epoch or a --save_every "
                              "interval, or it finished and removed it); run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(f"{path}: not a readable resumable state ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise UserError(f"{path}: not a TERACON resumable state")
    differ = sorted(k for k in (set(args) | set(state["args"])) - RESUME_FREE_FLAGS
                    if args.get(k) != state["args"].get(k))
    if differ:
        k = differ[0]
        if k.endswith("_sha256"):
            raise UserError(f"{path}: the file of --{k[:-len('_sha256')]} changed since this state was written; "
                            "delete this file and run without --resume")
        raise UserError(f"{path}: written by a run with --{k} {clip(repr(state['args'].get(k)))}, not "
                        f"{clip(repr(args.get(k)))}; resume with the same flags, or delete this file to start over")
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    kind, key, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    return state
