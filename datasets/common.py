"""What every dataset shares: the in-memory Task, the CONURE/TERACON CSV writers (SPEC 1), the
statistics table, the manifest (`tasks.json`, `stats.md`) and the prepared cache of each task."""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import data_loader as dl
import utils
from data_loader import read_sequence_file, read_task_file
from utils import log

MANIFEST = "tasks.json"
STATS = "stats.md"


# ------------------------------------------------------------------------- task containers

@dataclass
class Task:
    """One task in memory: `sources` [lines, L] raw item ids (0 = padding); `targets` one list of
    labels per line (None for task 1); `users` how many users it covers (None when unknown)."""
    name: str
    sources: np.ndarray
    targets: list[list[int]] | None = None
    users: int | None = None


def left_pad(items: np.ndarray | Sequence[int], length: int) -> np.ndarray:
    """The last `length` items, left-padded with 0 to exactly `length`."""
    items = np.asarray(items, dtype=np.int64)[-length:]
    out = np.zeros(length, dtype=np.int64)
    if len(items):
        out[length - len(items):] = items
    return out


def windows(items: np.ndarray, length: int) -> np.ndarray:
    """Split a sequence into non-overlapping windows of `length`, cut from the end: the most recent
    windows are full and only the oldest one is left-padded with 0. Shape [ceil(n/length), length]."""
    items = np.asarray(items, dtype=np.int64)
    pad = (-len(items)) % length
    return np.concatenate([np.zeros(pad, dtype=np.int64), items]).reshape(-1, length)


def format_sequences(rows: np.ndarray) -> str:
    """Task-1 format: one comma-separated line per row, LF-terminated."""
    return "".join(",".join(map(str, row)) + "\n" for row in np.asarray(rows).tolist())


def format_task_lines(sources: np.ndarray, targets: Sequence[Sequence[int]]) -> str:
    """Task-n format: `SOURCE,,TARGETS` per line, LF-terminated."""
    if len(sources) != len(targets):
        raise ValueError("one target list per source line")
    return "".join(",".join(map(str, src)) + ",," + ",".join(map(str, tgt)) + "\n"
                   for src, tgt in zip(np.asarray(sources).tolist(), targets))


def task_lines(task: Task) -> list[str]:
    """The lines (without newline) a task's file holds."""
    text = format_sequences(task.sources) if task.targets is None \
        else format_task_lines(task.sources, task.targets)
    return text.splitlines()


def flatten_targets(targets: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(targets [examples], line_of_example [examples]) as `data_loader.read_task_file` returns."""
    counts = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    flat = np.fromiter(itertools.chain.from_iterable(targets), dtype=np.int64, count=int(counts.sum()))
    return flat, np.repeat(np.arange(len(targets), dtype=np.int64), counts)


# ------------------------------------------------------------------------------ statistics

def task_stats(sources: np.ndarray, targets: np.ndarray | None, first: bool) -> dict:
    """Lines, examples, distinct items in the sources, classes and sequence length of one task.
    Task 1 (`first`): one example per line, classes = distinct non-zero items + 1 (padding)."""
    items = np.unique(sources)
    items = int((items != 0).sum())
    if first:
        return {"lines": len(sources), "examples": len(sources), "items": items,
                "classes": items + 1, "seq_len": int(sources.shape[1])}
    return {"lines": len(sources), "examples": len(targets), "items": items,
            "classes": int(len(np.unique(targets))), "seq_len": int(sources.shape[1])}


def stats_table(dataset: str, rows: list[dict]) -> str:
    """A markdown table of per-task statistics."""
    head = ["task", "name", "users", "lines", "examples", "items in sources", "classes", "seq_len",
            "metric"]
    out = [f"# {dataset}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        users = "-" if r.get("users") is None else str(r["users"])
        out.append(f"| {r['task']} | {r['name']} | {users} | {r['lines']} | {r['examples']} | "
                   f"{r['items']} | {r['classes']} | {r['seq_len']} | {r['metric']} |")
    return "\n".join(out) + "\n"


def write_manifest(out_dir: Path, dataset: str, protocol: str, entries: list[dict],
                   stats: list[dict], version: str | None = None, extra: dict | None = None,
                   notes: str = "") -> Path:
    """Write `tasks.json` and `stats.md` (the table is also logged); return the manifest path.
    `version` names the protocol (e.g. ml-100k/2) so that results can say which one they used;
    `extra` adds keys to the manifest, `notes` a markdown section to stats.md."""
    table = stats_table(dataset, stats)
    for line in table.rstrip("\n").splitlines():
        log.info("%s", line)
    utils.atomic_write_text(out_dir / STATS, table + "\n" + protocol + "\n" + (f"\n{notes}" if notes else ""))
    manifest = {"dataset": dataset, **({"version": version} if version else {}), "protocol": protocol,
                "tasks": entries, **(extra or {})}
    utils.atomic_write_json(out_dir / MANIFEST, manifest)
    log.info("wrote %s", out_dir / MANIFEST)
    return out_dir / MANIFEST


def write_dataset(out_dir: str | Path, dataset: str, protocol: str, tasks: list[Task],
                  prepared_by: str, version: str | None = None) -> Path:
    """Write every task file, read each back with data_loader's readers as a self-check, store the
    read-back arrays in the prepared cache (`cache/` beside the files; `prepared_by` is the command
    that re-prepares them), then the statistics and the manifest. Returns the manifest path."""
    out_dir = Path(out_dir)
    if len(tasks) < 2 or tasks[0].targets is not None or any(t.targets is None for t in tasks[1:]):
        raise ValueError("task 1 has no targets, every later task has targets, at least 2 tasks")
    entries, stats = [], []
    items = None
    for n, task in enumerate(tasks, 1):
        name = f"t{n}_{task.name}.csv"
        path = out_dir / name
        if task.targets is None:
            utils.atomic_write_text(path, format_sequences(task.sources))
            flat = None
        else:
            utils.atomic_write_text(path, format_task_lines(task.sources, task.targets))
            flat, line_of = flatten_targets(task.targets)
        # self-check: the file reads back, through data_loader's readers, exactly as generated
        if flat is None:
            src = read_sequence_file(path)
            ok = np.array_equal(src, task.sources)
            if ok:
                items = cache_task1(path, src, prepared_by)
        else:
            src, tgt, lines = read_task_file(path)
            ok = (np.array_equal(src, task.sources) and np.array_equal(tgt, flat)
                  and np.array_equal(lines, line_of))
            if ok:
                cache_task(path, src, tgt, lines, items, prepared_by)
            del tgt, lines
        del src
        if not ok:
            raise RuntimeError(f"{path}: self-check failed, the file does not read back as written")
        st = task_stats(task.sources, flat, first=flat is None)
        metric = utils.metric_kind(st["classes"])
        stats.append({"task": n, "name": task.name, "users": task.users, "metric": metric, **st})
        entries.append({"task": n, "name": task.name, "file": name, "num_classes": st["classes"],
                        "metric": metric})
        log.info("wrote %s (%d lines)", path, st["lines"])
    return write_manifest(out_dir, dataset, protocol, entries, stats, version)


# ------------------------------------------------------------------------ prepared cache

def cache_task1(path: Path, raw: np.ndarray, prepared_by: str, cache_dir: Path | None = None,
                sha256: str | None = None) -> np.ndarray | None:
    """Map a parsed task-1 file as `data_loader.load_task1` does and store it in the prepared
    cache; returns the item index (None, and no cache, for a file that has no item)."""
    try:
        sources, items = dl.map_task1(raw, path)
    except utils.UserError as e:
        log.warning("%s: not cached (%s)", path, e)
        return None
    dl.write_cache(path, {"sources": sources, "items": items}, items, prepared_by, cache_dir, sha256)
    return items


def cache_task(path: Path, raw_src: np.ndarray, raw_tgt: np.ndarray, line_of_example: np.ndarray,
               items: np.ndarray | None, prepared_by: str, cache_dir: Path | None = None,
               sha256: str | None = None) -> None:
    """Map a parsed task-n file as `data_loader.load_task` does and store it in the prepared cache
    (none without a task-1 index)."""
    if items is None:
        log.warning("%s: not cached (task 1 has no item index)", path)
        return
    sources = dl.map_sources(raw_src, items, path)
    labels, targets = dl.target_classes(raw_tgt)
    dl.write_cache(path, {"sources": sources, "targets": targets, "line_of_example": line_of_example,
                          "labels": labels}, items, prepared_by, cache_dir, sha256)


# ------------------------------------------------------------------------- bulk writing

COMMA, NEWLINE, ZERO = ord(","), ord("\n"), ord("0")


def encode_lines(sources: np.ndarray, targets: np.ndarray | None = None,
                 counts: np.ndarray | None = None) -> bytes:
    """CSV bytes of many lines at once (vectorised; equal to `format_sequences` and
    `format_task_lines`). `sources` [R, L] non-negative ids; without `targets` task-1 lines,
    with them `SOURCE,,TARGETS` lines where row r uses the first `counts[r]` (>= 1) of
    `targets[r]` ([R, T]). Every id becomes `width` digit bytes and two separator bytes (built
    as contiguous planes, one per byte position); a mask drops leading zeros, unused separators
    and unused targets, and what is left, in row-major order, is the text."""
    rows, length = sources.shape
    values = sources if targets is None else np.concatenate([sources, targets], axis=1)
    if values.size and values.min() < 0:
        raise ValueError("ids must be non-negative")
    fields = values.shape[1]
    width = len(str(int(values.max(initial=0))))
    values = values.astype(np.int32 if width < 10 else np.int64).ravel()
    text = np.empty((width + 2, len(values)), dtype=np.uint8)
    keep = np.empty(text.shape, dtype=bool)
    rest = values
    for d in range(width - 1, -1, -1):
        quotient = rest // 10
        text[d] = rest - quotient * 10
        rest = quotient
        np.greater_equal(values, 10 ** (width - 1 - d), out=keep[d])  # no leading zeros
    text[:width] += ZERO
    keep[width - 1] = True  # the last digit, also of 0
    text[width:] = COMMA
    keep[width] = True
    keep[width + 1] = False  # the second comma of ',,', after the last source id only
    starts = np.arange(rows) * fields
    if targets is None:
        text[width, starts + length - 1] = NEWLINE
    else:
        counts = np.asarray(counts)
        text[width, starts + length - 1 + counts] = NEWLINE
        keep[width + 1, starts + length - 1] = True
        used = np.ones((rows, fields), dtype=bool)
        used[:, length:] = np.arange(targets.shape[1]) < counts[:, None]
        keep &= used.ravel()
    return np.ascontiguousarray(text.T)[np.ascontiguousarray(keep.T)].tobytes()


def write_chunks(path: Path, chunks: Iterable[bytes]) -> str:
    """Write byte chunks to `path` through a temporary file (never half a file); return the
    sha256 of what was written."""
    digest = hashlib.sha256()

    def write(f) -> None:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)

    utils.atomic_write(path, write, "wb")
    return digest.hexdigest()
