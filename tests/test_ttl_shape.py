"""Tests of `prepare_data.py ttl-shape` on tiny shapes: TTL's file names and CSV format, left
padding and length, exact head sizes after loading through data_loader, every item and class
present, the manifest's published/assumed record, determinism, a learnable signal, and that
`prepare_data.py ttl --source` reads it as real TTL files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import helpers  # also puts the repository root on sys.path
import data_loader as dl
import prepare_data
from datasets import ttl_shape
from datasets.common import encode_lines, format_sequences, format_task_lines
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--lines", "600", "--items", "1500", "--classes", "300,120,8,2,6", "--seq_len", "12",
        "--clusters", "8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ttlshape")
    prepare_data.main(["ttl-shape", "--out", str(out), *TINY])
    return out


def test_files_names_and_format(tiny):
    """TTL's six file names plus manifest, statistics and cache; task 1 lines are 12 ids, task-n
    lines `SOURCE,,TARGETS` with a 12-id source; every line is LF-terminated."""
    assert sorted(p.name for p in tiny.iterdir()) == sorted([f for _, f in dl.TTL_TASKS] +
                                                            ["cache", "stats.md", "tasks.json"])
    for n, (_, name) in enumerate(dl.TTL_TASKS, 1):
        raw = (tiny / name).read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw
        lines = raw.decode("ascii").splitlines()
        assert len(lines) == 600
        for line in lines[:50]:
            src, sep, tgt = line.partition(",,")
            assert bool(sep) == (n > 1)
            assert len(src.split(",")) == 12 and all(t.isdigit() for t in src.split(","))
            if n > 1:
                assert tgt and all(t.isdigit() for t in tgt.split(","))


def test_left_padding_and_lengths(tiny):
    """Zeros only as a left prefix; real lengths vary: some lines full, some padded."""
    seqs = dl.read_sequence_file(tiny / dl.TTL_TASKS[0][1])
    real = seqs != 0
    assert (np.diff(real.astype(int), axis=1) >= 0).all()  # once real, never padding again
    lengths = real.sum(axis=1)
    assert lengths.min() >= 2 and (lengths == 12).mean() > 0.4 and (lengths < 12).mean() > 0.2
    src, _, _ = dl.read_task_file(tiny / dl.TTL_TASKS[3][1])
    assert np.array_equal(src, seqs)  # the same users in every task


@pytest.mark.parametrize("cache_dir", [None, "/nonexistent"], ids=["cache", "parse"])
def test_exact_head_sizes_after_loading(tiny, cache_dir):
    """Through data_loader (from the cache and from the CSV alike): task 1 has items + 1 classes,
    tasks 2-6 exactly the requested classes, so every item and every class occurs."""
    t1, items = dl.load_task1(tiny / dl.TTL_TASKS[0][1], seed=0, cache_dir=cache_dir)
    assert t1.num_classes == 1501 and len(items) == 1500
    assert sorted(np.unique(t1.sources.numpy()).tolist()) == list(range(1501))
    for n, want in zip(range(2, 7), (300, 120, 8, 2, 6)):
        data = dl.load_task(n, tiny / dl.TTL_TASKS[n - 1][1], items, seed=0, cache_dir=cache_dir)
        assert data.num_classes == want
        assert len(np.unique(data.targets.numpy())) == want
    m = json.loads((tiny / "tasks.json").read_text())
    assert [t["num_classes"] for t in m["tasks"]] == [1501, 300, 120, 8, 2, 6]
    assert [t["metric"] for t in m["tasks"]] == ["ranking"] * 3 + ["accuracy"] * 3


def test_manifest_says_what_is_published_and_assumed(tiny):
    m = json.loads((tiny / "tasks.json").read_text())
    assert m["dataset"] == "ttl-shape" and m["version"] == ttl_shape.VERSION
    assert [t["file"] for t in m["tasks"]] == [f for _, f in dl.TTL_TASKS]
    assert [t["name"] for t in m["tasks"]] == [n for n, _ in dl.TTL_TASKS]
    shapes = m["shapes"]
    assert shapes["published"]["heads"] == [645974, 17880, 7540, 9, 3, 7]
    assert shapes["published"]["classes"] == [17879, 7539, 8, 2, 6]
    assert shapes["assumed"]["lines_per_task"] == 600
    assert shapes["this_data"]["has_published_shapes"] is False
    stats = (tiny / "stats.md").read_text()
    assert "not published" in stats and "These data have those shapes: no" in stats
    assert "| 1 | pretrain | 600 | 600 | 600 | 1500 | 1501 | 12 | ranking |" in stats


def test_defaults_are_ttl_shapes():
    c = ttl_shape.ShapeConfig()
    assert (c.items + 1, *(k + 1 for k in c.classes)) == ttl_shape.TTL_HEADS == (645974, 17880, 7540, 9, 3, 7)
    assert c.seq_len == 100 and c.lines == 1_000_000 and c.published()
    args = prepare_data.build_parser().parse_args(["ttl-shape"])
    assert (args.lines, args.items, args.classes, args.seq_len) == (1_000_000, 645_973, (17879, 7539, 8, 2, 6), 100)


def test_deterministic_per_seed(tmp_path):
    small = ["--lines", "80", "--items", "200", "--classes", "30,20,4,2,3", "--seq_len", "6", "--clusters", "4"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        prepare_data.main(["ttl-shape", "--out", str(tmp_path / name), "--seed", seed, *small])
    files = [f for _, f in dl.TTL_TASKS]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_too_few_lines_for_every_item(tmp_path):
    """Task 1 must hold every item: a shape that cannot is a UserError naming --lines, and the
    command line prints one error line."""
    with pytest.raises(UserError, match=r"--lines 10: the lines hold \d+ item positions, fewer than the 1000"):
        prepare_data.main(["ttl-shape", "--out", str(tmp_path), "--lines", "10", "--items", "1000",
                           "--classes", "20,10,4,2,3", "--seq_len", "8", "--clusters", "2"])
    # the script as `__main__` in this process (test_prepare_data runs it in a new interpreter)
    rc, _, err = helpers.run_script_in_process("prepare_data.py", "ttl-shape", "--out", str(tmp_path),
                                               "--lines", "10", "--classes", "5,3")
    assert rc == 2 and "--classes" in err and "Traceback" not in err
    with pytest.raises(UserError, match="--clusters 9"):
        ttl_shape.generate(ttl_shape.ShapeConfig(lines=8, items=50, classes=(5, 4, 3, 2, 2), seq_len=5, clusters=9))


def test_encode_lines_equals_the_plain_writers():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 10 ** rng.integers(1, 8, size=(50, 7)), size=(50, 7))
    src[:, :3] *= rng.random((50, 3)) < 0.5  # some zeros
    assert encode_lines(src).decode() == format_sequences(src)
    counts = rng.integers(1, 4, size=50)
    tgt = rng.integers(0, 100000, size=(50, 3))
    want = format_task_lines(src, [t[:c].tolist() for t, c in zip(tgt, counts)])
    assert encode_lines(src, tgt, counts).decode() == want
    assert encode_lines(np.zeros((2, 3), dtype=np.int64)).decode() == "0,0,0\n0,0,0\n"
    big = np.array([[0, 7, 12345678901], [10 ** 17, 0, 1]])  # 64-bit ids
    assert encode_lines(big, np.array([[3, 9], [4, 0]]), np.array([2, 1])).decode() == \
        "0,7,12345678901,,3,9\n100000000000000000,0,1,,4\n"


def _vote_accuracy(seqs: np.ndarray, labels: np.ndarray, n_train: int) -> tuple[float, float]:
    """Accuracy of a vote of the items in a line (each item's label distribution on the training
    lines) on the other lines, and the majority class's accuracy."""
    k = int(labels.max()) + 1
    counts = np.zeros((int(seqs.max()) + 1, k))
    rows = np.repeat(np.arange(n_train), seqs.shape[1])
    np.add.at(counts, (seqs[:n_train].ravel(), labels[:n_train][rows]), 1)
    counts[0] = 0
    prob = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    pred = prob[seqs[n_train:]].sum(axis=1).argmax(axis=1)
    majority = np.bincount(labels[:n_train], minlength=k).argmax()
    return float((pred == labels[n_train:]).mean()), float((labels[n_train:] == majority).mean())


def test_learnable_signal():
    """Profile labels follow the users' clusters, which their items reveal: a vote of the line's
    items beats the majority class by far; the next item follows its predecessor often enough
    that the most frequent follower beats the most popular item."""
    shape = ttl_shape.generate(ttl_shape.ShapeConfig(lines=3000, items=500, classes=(100, 50, 8, 2, 6),
                                                     seq_len=20, clusters=8, seed=0))
    seqs = shape.sequences.astype(np.int64)
    for labels, _ in shape.targets[2:]:
        acc, majority = _vote_accuracy(seqs, labels, 2400)
        assert acc > majority + 0.2, (acc, majority)
    train, test = seqs[:2400], seqs[2400:]
    pairs = np.stack([train[:, :-1].ravel(), train[:, 1:].ravel()], axis=1)
    pairs = pairs[pairs[:, 0] > 0]
    follow = np.zeros((501, 501))
    np.add.at(follow, (pairs[:, 0], pairs[:, 1]), 1)
    popular = np.bincount(pairs[:, 1], minlength=501).argmax()
    pred = np.where(follow[test[:, -2]].sum(axis=1) > 0, follow[test[:, -2]].argmax(axis=1), popular)
    assert (pred == test[:, -1]).mean() > (test[:, -1] == popular).mean() + 0.1


def test_ttl_prepare_reads_ttl_shape(tiny, tmp_path):
    """`prepare_data.py ttl --source` validates the generated folder as real TTL files: same
    class counts; its manifest names the cache it wrote next to itself."""
    m = json.loads(prepare_data.main(["ttl", "--source", str(tiny), "--out", str(tmp_path / "ttl")]).read_text())
    assert [t["num_classes"] for t in m["tasks"]] == [1501, 300, 120, 8, 2, 6]
    assert all(t["cache_dir"] == "cache" for t in m["tasks"])
    manifest = dl.load_manifest(str(tmp_path / "ttl" / "tasks.json"))
    entry = dl.manifest_task(manifest, 1)
    assert Path(entry["cache_dir"]) == tmp_path / "ttl" / "cache"
    assert dl.read_cache(entry["file"], entry["cache_dir"]) is not None
