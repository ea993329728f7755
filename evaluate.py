"""Evaluate every task a checkpoint knows with the final model (relation-aware masks, s = smax).

This is the paper's "past tasks after the last task" view (the authors' inference_past_tasks.py):

    python evaluate.py --paths saved_models/task6.pt
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

import data_loader as dl
from checkpoint import load_checkpoint, require_finished, smax_of, summary_path
from methods import METHODS
from trainer import evaluate
from utils import UserError, atomic_write_json, check_outputs, clip, resolve_device, run_cli

log = logging.getLogger("teracon")


def evaluate_checkpoint(path: str | Path, device_name: str = "auto", split: str = "test",
                        batch_size: int = 1024, ckpt: dict | None = None, limit_batches: int = 0) -> list[dict]:
    """One row per task: its name, metric kind, metrics now and right after it was trained
    (`ckpt`: the checkpoint at `path` when already loaded; `limit_batches` > 0: a rehearsal's
    first batches only). A rehearsal checkpoint's rows say `rehearsal`."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    device = resolve_device(device_name)
    smax = smax_of(ckpt)
    method = METHODS.get(ckpt.get("method", "teracon"))
    if method is None:
        raise UserError(f"{path}: made by an unknown method {clip(str(ckpt.get('method')))}")
    rows, items = [], None
    for entry, (model, head) in zip(ckpt["tasks"], method.serve(ckpt, device, str(path))):
        data, items = dl.load_trained_task(entry, items)
        if entry["task"] == 1 and dl.index_checksum(items) != ckpt["item_index"]["checksum"]:
            raise UserError(f"{entry['file']}: its item index differs from the checkpoint's")
        if data.num_classes != entry["num_classes"]:
            raise UserError(f"{entry['file']}: {data.num_classes} classes, checkpoint has {entry['num_classes']}")
        metrics = evaluate(model, data, split, smax, device, batch_size, head=head, limit_batches=limit_batches)
        rows.append({"task": entry["task"], "name": entry["name"], "metric": entry["metric"],
                     "method": ckpt.get("method", "teracon"), "rehearsal": bool(ckpt.get("rehearsal")),
                     "now": metrics, "after_training": entry.get("test")})
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = ("hit@1", "mrr@5", "hr@5", "ndcg@5", "mrr@20", "hr@20", "ndcg@20", "accuracy")
    lines = [f"{'task':<5}{'name':<14}" + "".join(f"{k:>9}" for k in keys)]
    for r in rows:
        cells = "".join(f"{r['now'][k]:>9.4f}" if k in r["now"] else f"{'-':>9}" for k in keys)
        lines.append(f"{r['task']:<5}{r['name'][:13]:<14}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", default="saved_models/task6.pt", help="checkpoint to evaluate (default %(default)s)")
    p.add_argument("--split", choices=("test", "valid"), default="test", help="split to evaluate (default %(default)s)")
    p.add_argument("--eval_batch", type=int, default=1024, help="evaluation batch size (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--accept_unfinished", action="store_true",
                   help="evaluate a checkpoint whose training run did not finish (its PREFIX.json says finished: false)")
    args = p.parse_args(argv)
    if args.eval_batch < 1:
        raise UserError(f"--eval_batch {args.eval_batch}: must be at least 1")
    outputs = {"--json": args.json}
    check_outputs(outputs, {"--paths": args.paths, "the run summary of --paths": summary_path(args.paths)})
    require_finished(args.paths, args.accept_unfinished)
    ckpt = load_checkpoint(args.paths)
    check_outputs(outputs, {f"the task {t['task']} file of --paths": t["file"] for t in ckpt["tasks"]})
    rows = evaluate_checkpoint(args.paths, args.device, args.split, args.eval_batch, ckpt=ckpt)
    if ckpt.get("rehearsal"):
        print(f"REHEARSAL: {args.paths} was trained with --limit_batches/--limit_eval_batches; "
              "these numbers are not results")
    print(format_rows(rows))
    if args.json:
        atomic_write_json(args.json, {"checkpoint": args.paths, "split": args.split, "rows": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
