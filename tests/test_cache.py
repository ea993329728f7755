"""Tests of the prepared cache (data_loader.read_cache / write_cache, written by prepare_data.py):
a hit parses no CSV, a missing cache parses silently, a stale or broken one re-parses with one
log line naming the re-prepare command, and the arrays and splits are identical either way."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers  # noqa: F401  (puts the repository root on sys.path)
import data_loader as dl
import prepare_data
from datasets.common import cache_task, cache_task1


@pytest.fixture()
def synth(tmp_path) -> list[Path]:
    """A small synthetic dataset (prepared, so cached); its task files in order."""
    manifest = prepare_data.make_synthetic(tmp_path / "data", users=60, items=30, seq_len=8, num_tasks=3, seed=0)
    return [manifest.parent / t["file"] for t in json.loads(manifest.read_text())["tasks"]]


def _no_parse(monkeypatch) -> None:
    def refuse(*_):
        raise AssertionError("the CSV was parsed")
    monkeypatch.setattr(dl, "read_sequence_file", refuse)
    monkeypatch.setattr(dl, "read_task_file", refuse)


def _same(a: dl.TaskData, b: dl.TaskData) -> None:
    for key in ("sources", "targets", "line_of_example"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and torch.equal(x, y), key
    assert a.num_classes == b.num_classes and np.array_equal(a.labels, b.labels)
    assert a.splits.keys() == b.splits.keys()
    for key in a.splits:
        assert np.array_equal(a.splits[key], b.splits[key]), key


def test_prepare_writes_a_cache_per_task(synth):
    folder = synth[0].parent / dl.CACHE_DIR
    for path in synth:
        record = json.loads((folder / f"{path.name}.json").read_text())
        assert record["sha256"] == dl.sha256_file(path) and record["size"] == path.stat().st_size
        assert record["prepared_by"].startswith("python prepare_data.py synthetic --out ")
        assert record["arrays"]["sources"]["dtype"] == "<i4"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("split_by", ["example", "source"])
def test_hit_parses_nothing_and_equals_the_parse(synth, monkeypatch, caplog, split_by):
    """With the cache no CSV is parsed, and task 1 and task n (arrays, dtypes, classes, splits)
    equal what parsing the CSV gives."""
    parsed1, items = dl.load_task1(synth[0], seed=3, split_by=split_by, cache_dir=synth[0].parent / "none")
    parsed2 = dl.load_task(2, synth[1], items, seed=3, split_by=split_by, cache_dir=synth[0].parent / "none")
    _no_parse(monkeypatch)
    with caplog.at_level(logging.INFO, logger="teracon"):
        cached1, cached_items = dl.load_task1(synth[0], seed=3, split_by=split_by)
        cached2 = dl.load_task(2, synth[1], cached_items, seed=3, split_by=split_by)
    assert np.array_equal(items, cached_items)
    _same(parsed1, cached1)
    _same(parsed2, cached2)
    assert sum("read from the prepared cache" in r.message for r in caplog.records) == 2
    assert cached1.sources.dtype == torch.int32
    src, tgt = cached1.batch(np.array([0, 2]), torch.device("cpu"))
    assert src.dtype == torch.int64 and torch.equal(src, parsed1.sources[[0, 2]].long())


def test_missing_cache_parses_silently(synth, caplog):
    with caplog.at_level(logging.INFO, logger="teracon"):
        data, _ = dl.load_task1(synth[0], seed=0, cache_dir=synth[0].parent / "none")
    assert data.num_classes == 31
    assert not [r for r in caplog.records if "cache" in r.message]


def test_stale_task1_reparses_with_one_log_line(synth, caplog):
    """A task file changed after prepare: the new content is parsed (not the cached arrays) and
    one warning says the cache is stale and how to re-prepare it."""
    lines = synth[0].read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    synth[0].write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="teracon"):
        data, _ = dl.load_task1(synth[0], seed=0)
    fresh, _ = dl.load_task1(synth[0], seed=0, cache_dir=synth[0].parent / "none")
    _same(data, fresh)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "is stale: the file changed since it was prepared" in warnings[0]
    assert "re-prepare with `python prepare_data.py synthetic --out" in warnings[0]


def test_task_n_with_another_item_index_reparses(synth, caplog):
    """A task-n cache mapped with another task-1 index is not used (the ids would mean other items)."""
    _, items = dl.load_task1(synth[0], seed=0)
    other = np.concatenate([items, [items[-1] + 1]])
    with caplog.at_level(logging.WARNING, logger="teracon"):
        data = dl.load_task(2, synth[1], other, seed=0)
    fresh = dl.load_task(2, synth[1], other, seed=0, cache_dir=synth[0].parent / "none")
    _same(data, fresh)
    assert len(caplog.records) == 1 and "mapped with another task-1 item index" in caplog.records[0].message


@pytest.mark.parametrize("damage", ["truncate", "record", "shape"])
def test_broken_cache_reparses(synth, caplog, damage):
    folder = synth[0].parent / dl.CACHE_DIR
    record = folder / f"{synth[0].name}.json"
    if damage == "truncate":
        array = folder / f"{synth[0].name}.sources.npy"
        array.write_bytes(array.read_bytes()[:100])
    elif damage == "record":
        record.write_text("{not json")
    else:
        meta = json.loads(record.read_text())
        meta["arrays"]["sources"]["shape"][0] += 1
        record.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="teracon"):
        data, _ = dl.load_task1(synth[0], seed=0)
    _same(data, dl.load_task1(synth[0], seed=0, cache_dir=folder.parent / "none")[0])
    assert len(caplog.records) == 1 and "parsing the CSV instead" in caplog.records[0].message


def test_load_time_checks_apply_to_the_cache(tmp_path):
    """A one-class task is refused from the cache as from the CSV (prepare_ttl caches it)."""
    t1, t2 = tmp_path / "t1.csv", tmp_path / "t2.csv"
    t1.write_text("0,1,2\n3,4,5\n")
    t2.write_text("0,1,2,,7\n3,4,5,,7\n")
    items = cache_task1(t1, dl.read_sequence_file(t1), "cmd")
    cache_task(t2, *dl.read_task_file(t2), items, "cmd")
    assert dl.read_cache(t2, items=items) is not None
    with pytest.raises(dl.UserError, match="only one class"):
        dl.load_task(2, t2, items, seed=0)


def test_ttl_manifest_points_at_its_cache(tmp_path, monkeypatch):
    """`prepare_data.py ttl` caches next to the manifest, not beside the source files; loading
    with the entry's cache_dir parses no CSV."""
    src = tmp_path / "src"
    src.mkdir()
    seqs = "0,1,2,3\n4,5,6,7\n0,0,8,9\n"
    for n, (_, f) in enumerate(dl.TTL_TASKS, 1):
        text = seqs if n == 1 else "".join(line + f",,{i % 2}\n" for i, line in enumerate(seqs.splitlines()))
        (src / f).write_text(text)
    manifest = dl.load_manifest(str(prepare_data.main(["ttl", "--source", str(src), "--out", str(tmp_path / "out")])))
    assert not (src / dl.CACHE_DIR).exists()
    entries = manifest["tasks"]
    _no_parse(monkeypatch)
    data, items = dl.load_task1(entries[0]["file"], seed=0, cache_dir=entries[0]["cache_dir"])
    task2 = dl.load_task(2, entries[1]["file"], items, seed=0, cache_dir=entries[1]["cache_dir"])
    assert data.num_classes == 10 and task2.num_classes == 2
