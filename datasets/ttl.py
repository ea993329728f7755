"""TTL (Tencent, from the CONURE authors): validate the six original files in place and write a
manifest that points at them, plus their prepared cache next to the manifest."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

import data_loader as dl
import utils
from data_loader import TTL_TASKS, read_sequence_file, read_task_file
from datasets.common import cache_task, cache_task1, task_stats, write_manifest
from utils import UserError, log

TTL_PROTOCOL = (
    "Tencent TTL as published by the CONURE authors, used unchanged: T1 pretrain (behaviour "
    "sequences), T2 click and T3 like (items clicked/liked, ranking), T4 age, T5 gender, "
    "T6 lifestatus (profile classes). The manifest points at the original files; their prepared "
    "cache is in cache/ next to it.")


def prepare_ttl(out_dir: str | Path, source: str | Path) -> Path:
    """Validate the six CONURE Tencent files, log statistics, write their prepared cache into
    `out_dir/cache/` and the manifest (no copies of the CSV files; each entry names the cache
    folder as `cache_dir`)."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source}: --source must be the folder holding the six TTL files")
    missing = [f for _, f in TTL_TASKS if not (source / f).is_file()]
    if missing:
        raise UserError(f"{source}: missing TTL file(s): {', '.join(missing)}")
    out_dir = Path(out_dir)
    cache_dir = out_dir / dl.CACHE_DIR
    command = f"python prepare_data.py ttl --source {shlex.quote(str(source))} --out {shlex.quote(str(out_dir))}"
    entries, stats = [], []
    t1_items = cached_items = None
    for n, (name, fname) in enumerate(TTL_TASKS, 1):
        path = (source / fname).resolve()
        log.info("validating %s", path)
        if n == 1:
            seqs = read_sequence_file(path)
            st = task_stats(seqs, None, first=True)
            t1_items = dl.build_item_index(seqs)
            cached_items = cache_task1(path, seqs, command, cache_dir)
            del seqs
        else:
            src, tgt, line_of = read_task_file(path)
            unknown = ~np.isin(src, t1_items) & (src != 0)
            if unknown.any():
                line = int(np.flatnonzero(unknown.any(axis=1))[0]) + 1
                item = int(src[unknown][0])
                raise UserError(f"{path}: line {line}: item {item} does not occur in {TTL_TASKS[0][1]}")
            st = task_stats(src, tgt, first=False)
            cache_task(path, src, tgt, line_of, cached_items, command, cache_dir)
            del src, tgt, line_of
        metric = utils.metric_kind(st["classes"])
        stats.append({"task": n, "name": name, "users": None, "metric": metric, **st})
        entries.append({"task": n, "name": name, "file": str(path), "num_classes": st["classes"],
                        "metric": metric, **({"cache_dir": dl.CACHE_DIR} if cached_items is not None else {})})
    return write_manifest(out_dir, "ttl", TTL_PROTOCOL, entries, stats)


