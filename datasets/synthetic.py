"""The small synthetic dataset: users in latent clusters whose sequences, click/like targets and
profile labels follow their cluster, so every task has a learnable signal (for tests)."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from datasets.common import Task, left_pad, write_dataset
from utils import UserError

SYNTHETIC_NAMES = ["watch", "click", "like", "age", "gender", "lifestatus"]
SYNTHETIC_CLUSTERS = 4


def synthetic_tasks(users: int = 200, items: int = 40, seq_len: int = 10, num_tasks: int = 6,
                    seed: int = 0, noise: float = 0.1) -> tuple[list[Task], str]:
    """Generate the tasks of the synthetic dataset (see the protocol string it returns)."""
    if users < 2 * SYNTHETIC_CLUSTERS:
        raise UserError(f"--users {users}: need at least {2 * SYNTHETIC_CLUSTERS}")
    if items < 2 * SYNTHETIC_CLUSTERS:
        raise UserError(f"--items {items}: need at least {2 * SYNTHETIC_CLUSTERS}")
    if seq_len < 3:
        raise UserError(f"--seq_len {seq_len}: need at least 3")
    if num_tasks < 2:
        raise UserError(f"--tasks {num_tasks}: need at least 2")
    rng = np.random.default_rng(seed)
    k = SYNTHETIC_CLUSTERS
    cycles = np.array_split(rng.permutation(np.arange(1, items + 1)), k)  # one item cycle per cluster
    favourites = [c[rng.permutation(len(c))[:min(3, len(c))]] for c in cycles]
    cluster = rng.permutation(np.arange(users) % k)
    min_len = max(2, seq_len // 2)
    lengths = rng.integers(min_len, seq_len + 1, size=users)
    active_cut = (min_len + seq_len) / 2
    seqs, clicks, likes = [], [], []
    for u in range(users):
        cyc = cycles[cluster[u]]
        start = int(rng.integers(len(cyc)))
        n = int(lengths[u])
        seq = cyc[(start + np.arange(n)) % len(cyc)].astype(np.int64)
        flip = rng.random(n) < noise
        seq[flip] = rng.integers(1, items + 1, size=int(flip.sum()))
        seqs.append(left_pad(seq, seq_len))
        m = int(rng.integers(1, 3))
        clicks.append(cyc[(start + n + np.arange(m)) % len(cyc)].tolist())
        fav = favourites[cluster[u]]
        likes.append(sorted(fav[rng.permutation(len(fav))[:int(rng.integers(1, 3))]].tolist()))
    sources = np.stack(seqs)
    tasks = [Task("watch", sources, None, users), Task("click", sources, clicks, users),
             Task("like", sources, likes, users)]
    labels = {"age": cluster, "gender": cluster % 2, "lifestatus": (lengths > active_cut).astype(int)}
    for n in range(4, num_tasks + 1):
        name = SYNTHETIC_NAMES[n - 1] if n <= 6 else f"profile{n}"
        lab = labels[name] if n <= 6 else (cluster + n) % 3
        tasks.append(Task(name, sources, [[int(x)] for x in lab], users))
    tasks = tasks[:num_tasks]
    protocol = (
        f"Synthetic data (seed {seed}): {users} users in {k} equal latent clusters; items 1..{items} "
        f"are split at random into {k} cycles, one per cluster. Each user's sequence (length "
        f"{min_len}..{seq_len}, left-padded to {seq_len}) walks their cluster's cycle from a random "
        f"start, each item replaced by a uniformly random one with probability {noise}. Task 1 "
        "(watch): the sequences. Click: the next 1-2 items of the cycle after the sequence. Like: 1-2 "
        "of the cluster's 3 favourite items. Age: the cluster id; gender: cluster id mod 2; "
        f"lifestatus: 1 if the sequence is longer than {active_cut:g} items, else 0; "
        "profile<n> (n > 6): (cluster id + n) mod 3. Every later task uses the task-1 sequences as "
        "sources.")
    return tasks, protocol


def make_synthetic(out_dir: str | Path, users: int = 200, items: int = 40, seq_len: int = 10,
                   num_tasks: int = 6, seed: int = 0) -> Path:
    """Write the synthetic dataset into `out_dir`; return the manifest path."""
    tasks, protocol = synthetic_tasks(users, items, seq_len, num_tasks, seed)
    command = (f"python prepare_data.py synthetic --out {shlex.quote(str(out_dir))} --users {users} "
               f"--items {items} --seq_len {seq_len} --tasks {num_tasks} --seed {seed}")
    return write_dataset(out_dir, "synthetic", protocol, tasks, command)


