"""ttl-shape: synthetic data with the published shapes of TTL, under TTL's six file names, so that
`prepare_data.py ttl --source DIR` and the TTL recipe read it exactly as the real files.

Published (SPEC 1, 9): the authors' scripts hard-code the heads 645974 (task 1: items with the
padding id) and 17880, 7540, 9, 3, 7 (tasks 2-6, each counting one `<UNK>` class), so the data hold
645,973 distinct items and 17,879 / 7,539 / 8 / 2 / 6 target classes; the authors' example files
are left-padded to length 100. Everything else is assumed and says so in the manifest: the line
counts (not published; 1,000,000 a task by default), the real lengths, the Zipf popularity, the
latent clusters that carry the learnable signal, and that every task holds the same users' lines.
Generation is vectorised numpy, written in chunks of lines; the prepared cache is written from
the generated arrays (no re-parse of the CSV files).
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

import data_loader as dl
import utils
from data_loader import TTL_TASKS
from datasets.common import encode_lines, write_chunks, write_manifest
from utils import UserError, log

VERSION = "ttl-shape/1"
TTL_HEADS = (645_974, 17_880, 7_540, 9, 3, 7)   # the authors' scripts (published)
TTL_ITEMS = TTL_HEADS[0] - 1                     # distinct non-zero items: head minus padding
TTL_CLASSES = tuple(h - 1 for h in TTL_HEADS[1:])  # target classes: head minus <UNK>
TTL_SEQ_LEN = 100                                # the authors' example files (published)
DEFAULT_LINES = 1_000_000                        # assumed: TTL's line counts are not published
CLUSTERS = 32        # latent user clusters; every item and every profile class belongs to one
FULL = 0.6           # share of lines with a full-length history (no padding)
P_CLUSTER = 0.6      # a drawn item comes from the user's cluster, else from all items
P_NEXT = 0.3         # a position after the first repeats its predecessor's fixed successor
P_PROFILE = 0.85     # a profile label is the user's cluster's label, else uniform
TARGETS = {"click": (1, 3), "like": (1, 2)}  # targets a line draws before coverage (inclusive)
RAW_ID_RANGE = 999_999  # raw item ids: a sorted random sample of 1..max(this, 2 x items), so the index is no identity
CHUNK_ROWS = 20_000


@dataclass
class ShapeConfig:
    """The generator's knobs; the defaults are TTL's published shapes and our assumed line count."""
    lines: int = DEFAULT_LINES
    items: int = TTL_ITEMS
    classes: tuple[int, ...] = TTL_CLASSES
    seq_len: int = TTL_SEQ_LEN
    clusters: int = CLUSTERS
    seed: int = 0

    def check(self) -> None:
        """A UserError naming the flag for any knob the generator cannot honour."""
        if len(self.classes) != 5 or min(self.classes) < 2:
            raise UserError(f"--classes {','.join(map(str, self.classes))}: need five counts (tasks 2-6), "
                            "each at least 2")
        if max(self.classes[:2]) > self.items:
            raise UserError(f"--classes: click and like targets are items, so at most --items {self.items} "
                            f"classes (got {self.classes[0]} and {self.classes[1]})")
        if self.seq_len < 2:
            raise UserError(f"--seq_len {self.seq_len}: need at least 2")
        if not 1 <= self.clusters <= min(self.items, self.lines):
            raise UserError(f"--clusters {self.clusters}: need 1..min(--items, --lines) = "
                            f"{min(self.items, self.lines)}")
        if self.lines < max(self.classes[2:]):
            raise UserError(f"--lines {self.lines}: every profile class needs a line; need at least "
                            f"{max(self.classes[2:])}")

    def published(self) -> bool:
        """Whether the data have TTL's published head sizes and length."""
        return (self.items, self.classes, self.seq_len) == (TTL_ITEMS, TTL_CLASSES, TTL_SEQ_LEN)


# ------------------------------------------------------------------------------ sampling

def zipf_rank(n: np.ndarray | int, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    """Ranks 0..n-1, rank r with probability ln((r + 2) / (r + 1)) / ln(n + 1), about
    1 / ((r + 1.5) ln(n + 1)): Zipf-like, drawn by inverting the CDF in closed form (no search)."""
    r = np.floor(np.expm1(rng.random(size) * np.log1p(n))).astype(np.int64)
    return np.minimum(r, np.asarray(n) - 1)


@dataclass
class Sampler:
    """Zipf-like draws (`zipf_rank`) from members ranked by popularity, each in one of `clusters`
    clusters: `draw(groups)` draws, for each group id, a member of that cluster by its rank inside
    the cluster, where the extra group id `clusters` (and any empty cluster) means all members."""
    order: np.ndarray   # members sorted by cluster, then by rank; then all members by rank
    first: np.ndarray   # [clusters + 1]: where each group's members start in `order`
    size: np.ndarray    # [clusters + 1]: how many members each group has

    def draw(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.size[groups]
        return self.order[self.first[groups] + zipf_rank(size, rng, groups.shape)]


def make_sampler(members: np.ndarray, rank: np.ndarray, cluster: np.ndarray, clusters: int) -> Sampler:
    """A Sampler over `members` with popularity ranks `rank` (0 = most popular) and cluster ids
    `cluster` (< clusters)."""
    order = np.concatenate([members[np.lexsort((rank, cluster))], members[np.argsort(rank, kind="stable")]])
    size = np.concatenate([np.bincount(cluster, minlength=clusters), [len(members)]])
    first = np.concatenate([[0], np.cumsum(size[:-1])])
    empty = size == 0
    first[empty], size[empty] = len(members), len(members)  # an empty cluster draws from all members
    return Sampler(order, first, size)


# ---------------------------------------------------------------------------- generation

@dataclass
class Shape:
    """The generated data: item indices (what data_loader maps the raw ids to) and raw ids.
    `sequences` [lines, L] int32 item indices 1..items (0 = padding), shared by every task;
    `raw_ids[k - 1]` the raw id of item k; per task 2-6 the flat targets (raw labels) and their
    lines, in file order."""
    sequences: np.ndarray
    raw_ids: np.ndarray
    user_cluster: np.ndarray
    targets: list[tuple[np.ndarray, np.ndarray]]  # (raw labels [examples], line of each)


def generate(config: ShapeConfig) -> Shape:
    """Generate every task's arrays (see the module docstring and `protocol`)."""
    config.check()
    c, rng = config, np.random.default_rng(config.seed)
    k = c.clusters
    rank = rng.permutation(c.items)  # the popularity rank of item index i + 1
    item_cluster = rng.permutation(np.arange(c.items) % k)
    items = make_sampler(np.arange(1, c.items + 1), rank, item_cluster, k)
    successor = np.concatenate([[0], items.draw(item_cluster, rng)])
    raw_ids = np.sort(rng.choice(max(RAW_ID_RANGE, 2 * c.items), size=c.items, replace=False) + 1)

    user_cluster = rng.permutation(np.arange(c.lines) % k)
    short = rng.integers(max(2, c.seq_len // 10), c.seq_len, size=c.lines) if c.seq_len > 2 \
        else np.full(c.lines, c.seq_len)
    lengths = np.where(rng.random(c.lines) < FULL, c.seq_len, short)
    positions = int(lengths.sum())
    if positions < c.items:
        raise UserError(f"--lines {c.lines}: the lines hold {positions} item positions, fewer than the "
                        f"{c.items} items that must all occur in task 1; raise --lines (to about "
                        f"{int(np.ceil(c.items / lengths.mean()))}) or lower --items")
    log.info("ttl-shape: %d lines x %d, %d items, %d positions", c.lines, c.seq_len, c.items, positions)
    # every item occurs: a random permutation of all items, cut in proportion to each chunk's positions
    cover = rng.permutation(np.arange(1, c.items + 1))
    sequences = np.empty((c.lines, c.seq_len), dtype=dl.id_dtype(c.items + 1))
    done = 0
    for lo in range(0, c.lines, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, c.lines)
        upto = c.items * int(lengths[:hi].sum()) // positions
        sequences[lo:hi] = chunk_sequences(user_cluster[lo:hi], lengths[lo:hi], cover[done:upto],
                                           items, successor, c.seq_len, k, rng)
        done = upto
    targets = [ranking_targets(c.classes[i], TARGETS[name], rank, item_cluster, user_cluster, k, rng)
               for i, name in enumerate(("click", "like"))]
    raw_pad = np.concatenate([[0], raw_ids])
    targets = [(raw_pad[values], lines) for values, lines in targets]
    for n_classes in c.classes[2:]:
        labels = profile_labels(n_classes, user_cluster, k, rng)
        targets.append((labels, np.arange(c.lines)))
    return Shape(sequences, raw_ids, user_cluster, targets)


def chunk_sequences(cluster: np.ndarray, lengths: np.ndarray, cover: np.ndarray, items: Sampler,
                    successor: np.ndarray, length: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Sequences [rows, length] of item indices for users of `cluster` with real `lengths`: each
    position draws an item (from the user's cluster with P_CLUSTER, else from all items, by
    popularity) and with P_NEXT is replaced by its predecessor's successor; then left padding;
    then the items `cover` overwrite distinct random real positions."""
    rows = len(cluster)
    groups = np.where(rng.random((rows, length)) < P_CLUSTER, cluster[:, None], clusters)
    seq = items.draw(groups, rng).T.copy()  # [length, rows]: one contiguous row per position
    follow = rng.random((length, rows)) < P_NEXT
    for t in range(1, length):
        np.copyto(seq[t], successor[seq[t - 1]], where=follow[t])
    seq = np.ascontiguousarray(seq.T)
    pad = np.arange(length)[None, :] < (length - lengths)[:, None]
    seq[pad] = 0
    real = np.flatnonzero(~pad)
    seq.flat[real[rng.choice(len(real), size=len(cover), replace=False)]] = cover
    return seq


def ranking_targets(n_classes: int, per_line: tuple[int, int], rank: np.ndarray,
                    item_cluster: np.ndarray, user_cluster: np.ndarray, k: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Click/like targets as (item indices [examples], line of each), sorted by line: the classes
    are `n_classes` random items; each line draws per_line[0]..per_line[1] of them (from the
    user's cluster with P_CLUSTER, by popularity); then every class is appended once to a random
    line of its own cluster, so every class occurs."""
    lines = len(user_cluster)
    vocab = np.sort(rng.choice(len(rank), size=n_classes, replace=False) + 1)
    classes = make_sampler(vocab, rank[vocab - 1], item_cluster[vocab - 1], k)
    count = rng.integers(per_line[0], per_line[1] + 1, size=lines)
    line_of = np.repeat(np.arange(lines), count)
    values = classes.draw(np.where(rng.random(len(line_of)) < P_CLUSTER, user_cluster[line_of], k), rng)
    by_cluster = np.argsort(user_cluster, kind="stable")
    start = np.concatenate([[0], np.cumsum(np.bincount(user_cluster, minlength=k))])
    g = item_cluster[vocab - 1]
    size = start[g + 1] - start[g]  # >= 1: users are dealt to clusters in turn and lines >= k
    cover_line = by_cluster[start[g] + (rng.random(n_classes) * size).astype(np.int64)]
    line_of = np.concatenate([line_of, cover_line])
    order = np.argsort(line_of, kind="stable")
    return np.concatenate([values, vocab])[order], line_of[order]


def profile_labels(n_classes: int, user_cluster: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One label 0..n_classes-1 per line: the user's cluster's label with P_PROFILE, else uniform;
    the clusters' labels cover every class when there are enough clusters, and n_classes random
    lines carry one class each, so every class occurs."""
    if k >= n_classes:
        of_cluster = rng.permutation(np.concatenate([np.arange(n_classes), rng.integers(n_classes, size=k - n_classes)]))
    else:
        of_cluster = rng.integers(n_classes, size=k)
    labels = of_cluster[user_cluster]
    noise = rng.random(len(labels)) >= P_PROFILE
    labels[noise] = rng.integers(n_classes, size=int(noise.sum()))
    labels[rng.choice(len(labels), size=n_classes, replace=False)] = np.arange(n_classes)
    return labels


# ------------------------------------------------------------------------------- writing

def padded_targets(values: np.ndarray, line_of: np.ndarray, lines: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat targets sorted by line -> ([lines, T] targets left-aligned, [lines] counts)."""
    counts = np.bincount(line_of, minlength=lines)
    start = np.concatenate([[0], np.cumsum(counts)])
    matrix = np.zeros((lines, int(counts.max(initial=1))), dtype=np.int64)
    matrix[line_of, np.arange(len(line_of)) - start[line_of]] = values
    return matrix, counts


def file_chunks(shape: Shape, task: int) -> Iterator[bytes]:
    """The CSV bytes of one task file, CHUNK_ROWS lines at a time."""
    raw_pad = np.concatenate([[0], shape.raw_ids])
    lines = len(shape.sequences)
    matrix = counts = None
    if task > 1:
        matrix, counts = padded_targets(*shape.targets[task - 2], lines)
    for lo in range(0, lines, CHUNK_ROWS):
        src = raw_pad[shape.sequences[lo:lo + CHUNK_ROWS]]
        if matrix is None:
            yield encode_lines(src)
        else:
            yield encode_lines(src, matrix[lo:lo + CHUNK_ROWS], counts[lo:lo + CHUNK_ROWS])


def items_in(sequences: np.ndarray, items: int) -> int:
    """Distinct non-zero item indices in `sequences`, counted in chunks of lines."""
    seen = np.zeros(items + 1, dtype=bool)
    for lo in range(0, len(sequences), CHUNK_ROWS):
        seen |= np.bincount(sequences[lo:lo + CHUNK_ROWS].ravel(), minlength=items + 1) > 0
    return int(seen[1:].sum())


def protocol(c: ShapeConfig) -> str:
    """The manifest's protocol paragraph."""
    return (
        f"{VERSION} (seed {c.seed}): synthetic data with TTL's published shapes, not TTL. "
        f"{c.lines} lines per task, the same {c.lines} users in every task (line i is user i); "
        f"{c.items} items with raw ids a sorted random sample of 1..{max(RAW_ID_RANGE, 2 * c.items)}, "
        "Zipf-like popularity (of n items, the one of rank r, from 0, is drawn with probability "
        f"ln((r+2)/(r+1))/ln(n+1)); users and items dealt to {c.clusters} latent clusters. A "
        f"sequence has the full length {c.seq_len} with probability {FULL:g}, else a uniform length "
        f"{max(2, c.seq_len // 10)}..{c.seq_len - 1}, left-padded with 0. Each position draws an item "
        f"by popularity from the user's cluster (probability {P_CLUSTER:g}) or from all items, and with "
        f"probability {P_NEXT:g} is replaced by the fixed successor (a same-cluster item) of the item "
        "before it; then every item is written once at a random real position, so all of them occur "
        "in task 1. T2 click / T3 like: the classes are random items; a line draws 1-3 / 1-2 of them "
        f"by popularity, from its user's cluster with probability {P_CLUSTER:g} (a line's targets may "
        "repeat), and every class is appended once to a random line of its cluster, so all classes "
        f"occur. T4 age / T5 gender / T6 lifestatus: the user's cluster's label with probability "
        f"{P_PROFILE:g}, else uniform; each class is forced on one random line. Classes: "
        f"{', '.join(map(str, c.classes))} (tasks 2-6).")


def shapes_record(c: ShapeConfig) -> dict:
    """What is published and what is assumed, for the manifest."""
    return {
        "published": {
            "heads": list(TTL_HEADS),
            "items": TTL_ITEMS, "classes": list(TTL_CLASSES), "seq_len": TTL_SEQ_LEN,
            "source": "the authors' scripts hard-code the heads (tasks 2-6 count one <UNK> class each, "
                      "task 1 counts the padding id); their example files are left-padded to length 100",
        },
        "assumed": {
            "lines_per_task": c.lines, "same_users_in_every_task": True,
            "lengths": f"full {c.seq_len} with probability {FULL:g}, else uniform",
            "popularity": "Zipf-like: rank r of n drawn with probability ln((r+2)/(r+1))/ln(n+1)",
            "clusters": c.clusters,
            "note": "TTL's line counts, lengths and distributions are not published",
        },
        "this_data": {"items": c.items, "classes": list(c.classes), "seq_len": c.seq_len,
                      "lines": c.lines, "has_published_shapes": c.published()},
    }


def shapes_notes(c: ShapeConfig) -> str:
    """The stats.md section on published and assumed shapes."""
    same = "yes" if c.published() else "no (--items/--classes/--seq_len override them)"
    return (
        "## Published and assumed shapes\n\n"
        f"- Published (the authors' scripts): heads {', '.join(map(str, TTL_HEADS))}, i.e. "
        f"{TTL_ITEMS} items plus padding and {', '.join(map(str, TTL_CLASSES))} classes plus one "
        f"<UNK> each; sequences left-padded to length {TTL_SEQ_LEN} (the authors' example files).\n"
        f"- These data have those shapes: {same}.\n"
        f"- Assumed (not published): {c.lines} lines per task, the same users in every task, the "
        "length distribution, Zipf popularity and the latent clusters (see the protocol above).\n")


def make_ttl_shape(out_dir: str | Path, config: ShapeConfig = ShapeConfig()) -> Path:
    """Generate ttl-shape into `out_dir` (TTL's file names, cache/, tasks.json, stats.md); the
    manifest path."""
    out_dir = Path(out_dir)
    c = config
    command = (f"python prepare_data.py ttl-shape --out {shlex.quote(str(out_dir))} --lines {c.lines} "
               f"--seed {c.seed} --items {c.items} --classes {','.join(map(str, c.classes))} "
               f"--seq_len {c.seq_len} --clusters {c.clusters}")
    t0 = time.perf_counter()
    shape = generate(c)
    log.info("generated in %.1f s", time.perf_counter() - t0)
    n_items = items_in(shape.sequences, c.items)
    if n_items != c.items:
        raise RuntimeError(f"generator: {n_items} of {c.items} items occur in task 1")
    cache_dir = out_dir / dl.CACHE_DIR
    entries, stats = [], []
    for n, (name, fname) in enumerate(TTL_TASKS, 1):
        path = out_dir / fname
        digest = write_chunks(path, file_chunks(shape, n))
        if n == 1:
            arrays = {"sources": shape.sequences, "items": shape.raw_ids}
            classes, examples = c.items + 1, len(shape.sequences)
        else:
            raw, line_of = shape.targets[n - 2]
            labels, targets = dl.target_classes(raw)
            if len(labels) != c.classes[n - 2]:
                raise RuntimeError(f"generator: task {n} has {len(labels)} of {c.classes[n - 2]} classes")
            arrays = {"sources": shape.sequences, "targets": targets, "line_of_example": line_of,
                      "labels": labels}
            classes, examples = len(labels), len(raw)
        dl.write_cache(path, arrays, shape.raw_ids, command, cache_dir, digest)
        metric = utils.metric_kind(classes)
        stats.append({"task": n, "name": name, "users": c.lines, "metric": metric, "lines": c.lines,
                      "examples": examples, "items": n_items, "classes": classes, "seq_len": c.seq_len})
        entries.append({"task": n, "name": name, "file": fname, "num_classes": classes, "metric": metric})
        log.info("wrote %s (%d lines, %d examples, %d classes) at %.1f s", path, c.lines, examples, classes,
                 time.perf_counter() - t0)
    return write_manifest(out_dir, "ttl-shape", protocol(c), entries, stats, VERSION,
                          extra={"seed": c.seed, "shapes": shapes_record(c)}, notes=shapes_notes(c))
