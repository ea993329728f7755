"""Task files, the item index, the 80/5/15 split and batching (SPEC 1-2), and the prepared cache.

File formats (SPEC 1): a task-1 file holds one left-padded sequence of raw item ids per line;
a task-n file holds `SOURCE,,TARGETS` lines. Every reader validates before anything is
trained and raises `UserError` naming the file and the line.

The prepared cache: `prepare_data.py` stores each task file's parsed and mapped arrays as `.npy`
files in `cache/` next to the manifest (`cache/<file name>.json` records the file's sha256, the
item index and the command that wrote it). `load_task1` and `load_task` use it when the file's
sha256 (computed on every load) and, for task n, the item index still match; otherwise they parse
the CSV as without a cache and log that the cache is stale. Either way the arrays are the same.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from utils import (UserError, atomic_write, atomic_write_json, metric_kind, quote, read_json, require_file,
                   sha256_file)

log = logging.getLogger("teracon")

DATA_ROOT = Path("Data")
CACHE_DIR = "cache"   # the prepared cache's folder, next to the manifest (and, by default, the task file)
CACHE_FORMAT = 1      # bump when the cached arrays change meaning
# TTL as the CONURE authors publish it, in TERACON's task order (SPEC 1): (task name, file name)
TTL_TASKS = (("pretrain", "original_desen_pretrain.csv"), ("click", "original_desen_finetune_click_nouserID.csv"),
             ("like", "original_desen_finetune_like_nouserID.csv"), ("age", "original_desen_age.csv"),
             ("gender", "original_desen_gender.csv"), ("lifestatus", "original_desen_lifestatus.csv"))
TTL_FILES = {n: file for n, (_, file) in enumerate(TTL_TASKS, 1)}
_INT_ROW = re.compile(r"\d{1,18}(,\d{1,18})*")  # ids fit in int64


# ------------------------------------------------------------------------------- reading

def _read_lines(path: str | Path) -> list[str]:
    """Lines of a text file; CRLF endings and a missing final newline are accepted."""
    path = require_file(path, "file not found")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf") or raw.startswith(b"\xff\xfe") or raw.startswith(b"\xfe\xff"):
        raise UserError(f"{path}: line 1: starts with a byte-order mark; save the file as plain ASCII/UTF-8")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: non-ASCII byte; expected comma-separated integers") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"{path}: file is empty")
    return lines


def _parse_rows(rows: list[str], path: Path, what: str, line_no: list[int] | None = None) -> np.ndarray:
    """Parse comma-separated non-negative integers of equal count per row -> int64 [rows, L]."""
    for i, row in enumerate(rows):
        if not _INT_ROW.fullmatch(row):
            n = line_no[i] if line_no else i + 1
            bad = next((t for t in row.split(",") if not (t.isdigit() and len(t) <= 18)), row)
            problem = "is empty" if row == "" else f"has token {quote(bad)}, not a non-negative integer below 10**18"
            raise UserError(f"{path}: line {n}: {what} {problem}")
    lengths = np.fromiter((r.count(",") + 1 for r in rows), dtype=np.int64, count=len(rows))
    if (lengths != lengths[0]).any():
        i = int(np.argmax(lengths != lengths[0]))
        n = line_no[i] if line_no else i + 1
        raise UserError(f"{path}: line {n}: {what} has {lengths[i]} items, line "
                        f"{line_no[0] if line_no else 1} has {lengths[0]}; pad every line to one length")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = np.fromstring(",".join(rows), dtype=np.int64, sep=",")  # rows validated above
    return flat.reshape(len(rows), int(lengths[0]))


def read_sequence_file(path: str | Path) -> np.ndarray:
    """Task-1 file -> raw item ids, int64 [lines, L] (SPEC 1)."""
    path = Path(path)
    return _parse_rows(_read_lines(path), path, "sequence")


def read_task_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task-n file -> (sources [lines, L] raw ids, targets [examples] raw labels,
    line_of_example [examples]); a line with k targets gives k examples (SPEC 1)."""
    path = Path(path)
    lines = _read_lines(path)
    sources, targets = [], []
    for i, line in enumerate(lines):
        src, sep, tgt = line.partition(",,")
        if not sep:
            raise UserError(f"{path}: line {i + 1}: no ',,' between the source sequence and the targets")
        if not tgt:
            raise UserError(f"{path}: line {i + 1}: no target after ',,'")
        sources.append(src)
        targets.append(tgt)
    line_no = list(range(1, len(lines) + 1))
    src = _parse_rows(sources, path, "source", line_no)
    for i, t in enumerate(targets):
        if not _INT_ROW.fullmatch(t):
            raise UserError(f"{path}: line {i + 1}: targets {quote(t)} are not comma-separated non-negative "
                            "integers below 10**18")
    counts = np.fromiter((t.count(",") + 1 for t in targets), dtype=np.int64, count=len(targets))
    tgt = np.fromstring(",".join(targets), dtype=np.int64, sep=",")
    return src, tgt, np.repeat(np.arange(len(lines)), counts)


# ---------------------------------------------------------------------------- item index

def build_item_index(sequences: np.ndarray) -> np.ndarray:
    """Sorted distinct non-zero raw ids; raw id items[k] maps to k+1, padding 0 maps to 0."""
    items = np.unique(sequences)
    return items[items != 0]


def index_checksum(items: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(items, dtype=np.int64).tobytes()).hexdigest()


def save_item_index(path: str | Path, items: np.ndarray, source: str | Path) -> None:
    """JSON, never a Python repr (the official code `eval`s its index file)."""
    atomic_write_json(path, {"source": str(source), "num_items": int(len(items)) + 1,
                             "checksum": index_checksum(items), "items": [int(x) for x in items]})


def load_item_index(path: str | Path) -> np.ndarray:
    obj = read_json(path, "item index")
    raw = obj.get("items") if isinstance(obj, dict) else None
    if not isinstance(raw, list) or any(type(x) is not int for x in raw):
        raise UserError(f"{path}: not an item index (needs an 'items' list of integers)")
    big = next((x for x in raw if not -2**63 <= x < 2**63), None)
    if big is not None:
        raise UserError(f"{path}: item id {quote(str(big))} does not fit in 64 bits")
    items = np.asarray(raw, dtype=np.int64)
    if items.ndim != 1 or items.size == 0 or (items <= 0).any() or (np.diff(items) <= 0).any():
        raise UserError(f"{path}: item index must list distinct positive ids in increasing order")
    if obj.get("checksum") not in (None, index_checksum(items)):
        raise UserError(f"{path}: item index checksum does not match its items (file edited?)")
    return items


def id_dtype(n: int) -> np.dtype:
    """int32 when the indices 0..n-1 fit in it, else int64."""
    return np.dtype(np.int32) if n <= np.iinfo(np.int32).max else np.dtype(np.int64)


def map_items(raw: np.ndarray, items: np.ndarray, path: Path, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Raw ids -> 0..N-1 through the index (as `dtype`); an id absent from the task-1 index is an error."""
    pos = np.searchsorted(items, raw)
    pos_c = np.minimum(pos, len(items) - 1)
    ok = (raw == 0) | (items[pos_c] == raw)
    if not ok.all():
        row = int(np.argwhere(~ok)[0][0]) if raw.ndim == 2 else int(np.argmax(~ok))
        bad = int(raw[~ok].flat[0])
        raise UserError(f"{path}: line {row + 1}: item {bad} is not in the task-1 item index")
    del pos_c, ok
    out = pos.astype(dtype, copy=False)
    out += 1
    out[raw == 0] = 0
    return out


def map_task1(raw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A parsed task-1 file -> (sequences as item indices [lines, L], int32 where they fit; item index)."""
    items = build_item_index(raw)
    if len(items) == 0:
        raise UserError(f"{path}: every item is padding (0); nothing to learn")
    return map_items(raw, items, path, id_dtype(len(items) + 1)), items


def map_sources(raw: np.ndarray, items: np.ndarray, path: Path) -> np.ndarray:
    """A task-n file's sources -> item indices through the task-1 index (int32 where they fit)."""
    return map_items(raw, items, path, id_dtype(len(items) + 1))


def target_classes(raw_targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels: the distinct raw targets sorted, targets: the class index 0..K-1 of each, int64)."""
    labels, targets = np.unique(raw_targets, return_inverse=True)
    return labels, targets.astype(np.int64, copy=False).reshape(-1)


# --------------------------------------------------------------------------------- split

def split_sizes(n: int) -> tuple[int, int, int]:
    """80/5/15 as the official `dev = -int(0.2*N)`, `valid_end = int(dev*0.75)` (SPEC 2)."""
    n_dev = int(0.2 * n)
    n_test = int(n_dev * 0.75)
    return n - n_dev, n_dev - n_test, n_test


def split_examples(line_of_example: np.ndarray, seed: int, by: str = "example") -> dict[str, np.ndarray]:
    """One permutation under `seed`; `by='source'` keeps all targets of one line in one split."""
    rng = np.random.RandomState(seed)
    if by == "example":
        perm = rng.permutation(len(line_of_example))
        n_train, n_valid, _ = split_sizes(len(perm))
        parts = np.split(perm, [n_train, n_train + n_valid])
    elif by == "source":
        n_lines = int(line_of_example.max()) + 1
        perm = rng.permutation(n_lines)
        n_train, n_valid, _ = split_sizes(n_lines)
        which = np.empty(n_lines, dtype=np.int64)
        for k, part in enumerate(np.split(perm, [n_train, n_train + n_valid])):
            which[part] = k
        rank = np.empty(n_lines, dtype=np.int64)
        rank[perm] = np.arange(n_lines)
        ex = np.argsort(rank[line_of_example], kind="stable")
        parts = [ex[which[line_of_example[ex]] == k] for k in range(3)]
    else:
        raise UserError(f"--split_by {by}: use 'example' or 'source'")
    return dict(zip(("train", "valid", "test"), parts))


# ------------------------------------------------------------------------------ the task

@dataclass
class TaskData:
    """One task's examples after mapping: `sources[line_of_example[i]]` -> `targets[i]`.

    Task 1: examples are the sequences themselves and `targets` is unused (-1).
    """
    task: int
    name: str
    path: str
    sources: torch.Tensor          # [lines, L] item indices
    targets: torch.Tensor          # [examples] class indices 0..K-1
    line_of_example: torch.Tensor  # [examples]
    num_classes: int
    labels: np.ndarray             # raw target label of class k (task n >= 2)
    splits: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return metric_kind(self.num_classes)

    _resident: dict = field(default_factory=dict, repr=False, compare=False)

    def resident(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sources, targets, line_of_example) where batches are gathered: on a CUDA device, copied
        there once when they fit in a quarter of its free memory; on the host otherwise."""
        host = (self.sources, self.targets, self.line_of_example)
        if device.type != "cuda":
            return host
        key = str(device)
        if key not in self._resident:
            size = sum(t.numel() * t.element_size() for t in host)
            free, _ = torch.cuda.mem_get_info(device)
            self._resident[key] = tuple(torch.as_tensor(t).to(device) for t in host) if size <= free // 4 else None
        return self._resident[key] or host

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(source sequences [b, L] int64, targets [b]) of examples `idx` on `device` (the sources are
        held as int32 where the ids fit and widened after the copy). On CUDA the gather runs on the
        device when the data are resident there, else from pinned host memory."""
        sources, targets, line = self.resident(device)
        i = torch.from_numpy(idx).to(sources.device)
        src, tgt = sources[line[i]], targets[i]
        if device.type == "cuda" and src.device.type == "cpu":
            src, tgt = src.pin_memory(), tgt.pin_memory()
        return src.to(device, non_blocking=True).long(), tgt.to(device, non_blocking=True)


def load_task1(path: str | Path, seed: int, split_by: str = "example",
               cache_dir: str | Path | None = None) -> tuple[TaskData, np.ndarray]:
    """Read the task-1 file (or its prepared cache, see `read_cache`), build its item index and split."""
    path = Path(path)
    cached = read_cache(path, cache_dir)
    if cached is not None:
        seqs, items = cached["sources"], cached["items"]
    else:
        raw = read_sequence_file(path)
        if raw.shape[1] < 2:
            raise UserError(f"{path}: sequences need at least 2 items (inputs seq[:-1], target seq[-1])")
        seqs, items = map_task1(raw, path)
        del raw
    if seqs.shape[1] < 2:
        raise UserError(f"{path}: sequences need at least 2 items (inputs seq[:-1], target seq[-1])")
    if len(items) < 2:
        raise UserError(f"{path}: every item is {items[0]}: one item only, nothing to learn")
    sources = torch.from_numpy(seqs)
    lines = torch.arange(len(sources))
    data = TaskData(1, "task1", str(path), sources, torch.full((len(sources),), -1), lines,
                    len(items) + 1, np.arange(len(items) + 1))
    data.splits = split_examples(lines.numpy(), seed, split_by)
    return data, items


def load_task(task: int, path: str | Path, items: np.ndarray, seed: int, split_by: str = "example",
              name: str | None = None, cache_dir: str | Path | None = None) -> TaskData:
    """Read a task-n file (or its prepared cache, when it was mapped with this item index), map
    sources through the task-1 index and targets to 0..K-1, split."""
    path = Path(path)
    cached = read_cache(path, cache_dir, items)
    if cached is not None:
        sources, targets = cached["sources"], cached["targets"].astype(np.int64)
        line_of_example, labels = cached["line_of_example"].astype(np.int64), cached["labels"]
    else:
        raw_src, raw_tgt, line_of_example = read_task_file(path)
        if raw_src.shape[1] < 2:
            raise UserError(f"{path}: sources need at least 2 items (task 1's pseudo-labels read position -2)")
        sources = map_sources(raw_src, items, path)
        del raw_src
        labels, targets = target_classes(raw_tgt)
    if sources.shape[1] < 2:
        raise UserError(f"{path}: sources need at least 2 items (task 1's pseudo-labels read position -2)")
    if len(labels) < 2:
        raise UserError(f"{path}: every example has the target {labels[0]}: the task has only one class, "
                        "nothing to learn")
    data = TaskData(task, name or f"task{task}", str(path), torch.from_numpy(sources), torch.from_numpy(targets),
                    torch.from_numpy(line_of_example), len(labels), labels)
    data.splits = split_examples(line_of_example, seed, split_by)
    return data


# ------------------------------------------------------------------------ prepared cache

def cache_record_path(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the cache record of task file `path` lives: `<cache_dir>/<file name>.json`, with
    `cache_dir` defaulting to `cache/` beside the file."""
    path = Path(path)
    folder = Path(cache_dir) if cache_dir is not None else path.parent / CACHE_DIR
    return folder / f"{path.name}.json"


def _array_path(record: Path, key: str) -> Path:
    return record.with_name(f"{record.name[:-len('.json')]}.{key}.npy")


def write_cache(path: str | Path, arrays: dict[str, np.ndarray], items: np.ndarray, prepared_by: str,
                cache_dir: str | Path | None = None, sha256: str | None = None) -> Path:
    """Store a task file's parsed and mapped arrays as .npy files plus a JSON record (the file's
    sha256, size, the item index checksum, the arrays' dtypes and shapes, `prepared_by`: the
    command that re-prepares it). Task 1: `sources`, `items`; task n: `sources`, `targets`,
    `line_of_example`, `labels`. The record is written last, so a record means complete arrays.
    `sha256`: the file's digest when the caller computed it while writing; returns the record."""
    path = Path(path)
    wanted = {"sources", "items"} if "items" in arrays else {"sources", "targets", "line_of_example", "labels"}
    if set(arrays) != wanted:
        raise ValueError(f"cache arrays must be {sorted(wanted)}, got {sorted(arrays)}")
    record = cache_record_path(path, cache_dir)
    record.unlink(missing_ok=True)  # no record may describe half-replaced arrays
    specs = {}
    for key, array in arrays.items():
        array = np.ascontiguousarray(array)
        if key in ("targets", "line_of_example"):  # small, stored narrow, widened to int64 on load
            array = array.astype(id_dtype(int(array.max(initial=0)) + 1), copy=False)
        atomic_write(_array_path(record, key), lambda f, a=array: np.save(f, a, allow_pickle=False), "wb")
        specs[key] = {"dtype": array.dtype.str, "shape": list(array.shape)}
    atomic_write_json(record, {
        "format": CACHE_FORMAT, "file": str(path.resolve()), "sha256": sha256 or sha256_file(path),
        "size": path.stat().st_size, "index_checksum": index_checksum(items), "prepared_by": prepared_by,
        "arrays": specs})
    return record


def read_cache(path: str | Path, cache_dir: str | Path | None = None,
               items: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The prepared arrays of task file `path` (`sources` memory-mapped), or None when there is no
    cache record. A record whose sha256 differs from the file's (computed now), that was mapped
    with another item index than `items` (task n), or whose arrays do not read back as recorded
    gives None and one log line saying the cache is stale and how to re-prepare it."""
    path = require_file(path, "file not found")
    record = cache_record_path(path, cache_dir)
    if not record.is_file():
        return None
    try:
        meta = json.loads(record.read_text())
        specs, prepared_by = dict(meta["arrays"]), str(meta["prepared_by"])
        if meta["format"] != CACHE_FORMAT or ("items" in specs) != (items is None):
            raise ValueError("another cache format or kind of task")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: the prepared cache %s is unreadable (%s); parsing the CSV instead "
                    "(re-prepare with `python prepare_data.py ...`)", path, record, e)
        return None
    why = None
    if meta.get("sha256") != sha256_file(path):
        why = "the file changed since it was prepared (sha256 differs)"
    elif items is not None and meta.get("index_checksum") != index_checksum(items):
        why = "it was mapped with another task-1 item index"
    arrays = {}
    if why is None:
        try:
            for key, spec in specs.items():
                array = np.load(_array_path(record, key), mmap_mode="c" if key == "sources" else None,
                                allow_pickle=False)
                if array.dtype.str != spec["dtype"] or list(array.shape) != spec["shape"]:
                    raise ValueError(f"{key} is {array.dtype.str} {list(array.shape)}, the record says "
                                     f"{spec['dtype']} {spec['shape']}")
                arrays[key] = array
            if items is None and index_checksum(arrays["items"]) != meta.get("index_checksum"):
                raise ValueError("the item index does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"its arrays do not read back ({e})"
    if why is not None:
        log.warning("%s: the prepared cache %s is stale: %s; parsing the CSV instead (re-prepare with `%s`)",
                    path, record, why, prepared_by)
        return None
    log.info("%s: read from the prepared cache %s", path, record.parent)
    return arrays


def batches(idx: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
            drop_last: bool = False) -> Iterator[np.ndarray]:
    """Consecutive batches of `idx` (reshuffled by `rng` if given); the partial last batch is kept.
    `drop_last`: the authors' batcher (`while end < len`): only batches that end strictly inside
    `idx`, so the last batch goes, partial or, when `batch_size` divides `len(idx)`, full."""
    if rng is not None:
        idx = rng.permutation(idx)
    stop = len(idx) - batch_size if drop_last else len(idx)
    for start in range(0, stop, batch_size):
        yield idx[start:start + batch_size]


def load_trained_task(entry: dict, items: np.ndarray | None) -> tuple[TaskData, np.ndarray]:
    """Re-read the task a checkpoint entry describes exactly as its training run did (same file,
    byte for byte, seed and split); task 1 also rebuilds the item index, later tasks take `items`."""
    path = entry["file"]
    if not Path(path).is_file():
        raise UserError(f"{path}: task {entry['task']} data file not found (run from the training folder)")
    if sha256_file(path) != entry["file_sha256"]:
        raise UserError(f"{path}: file changed since task {entry['task']} was trained (sha256 differs)")
    if entry["task"] == 1:
        return load_task1(path, entry["seed"], split_by=entry["split_by"])
    return load_task(entry["task"], path, items, entry["seed"], entry["split_by"], entry["name"]), items



# ------------------------------------------------------------------------------ manifest

def load_manifest(dataset: str, root: str | Path = DATA_ROOT) -> dict:
    """`Data/<dataset>/tasks.json` (or a path to a tasks.json) with absolute task-file paths."""
    path = Path(dataset)
    if path.suffix != ".json":
        path = Path(root) / dataset / "tasks.json"
        if not path.is_file():
            raise UserError(f"{path}: dataset manifest not found; run `python prepare_data.py {dataset}` first")
    manifest = read_json(path, "dataset manifest")
    try:
        for t in manifest["tasks"]:
            t["file"] = str((path.parent / t["file"]))
            if "cache_dir" in t:
                t["cache_dir"] = str(path.parent / t["cache_dir"])
            int(t["task"]), str(t["name"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: manifest needs a 'tasks' list of {{task, name, file}} entries") from None
    manifest["path"] = str(path)
    manifest["dir"] = str(path.parent)
    return manifest


def manifest_task(manifest: dict, task: int) -> dict:
    for t in manifest["tasks"]:
        if int(t["task"]) == task:
            return t
    raise UserError(f"{manifest['path']}: has no task {task} (it lists "
                    f"{[t['task'] for t in manifest['tasks']]})")
