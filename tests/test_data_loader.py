"""Task files, the item index, the split, batching, evaluation coverage and metrics (SPEC 1-2, 6)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import helpers  # noqa: F401  (puts the repository root on sys.path)
import data_loader as dl
import trainer
from nextitnet import NextItNet
from utils import UserError, metrics_from_ranks, rank_of_target


# --------------------------------------------------------------------------------- split

@pytest.mark.parametrize("n,expected", [(1000, (800, 50, 150)), (7, (6, 1, 0)), (20, (16, 1, 3)),
                                        (101, (81, 5, 15)), (10, (8, 1, 1))])
def test_split_sizes_follow_official_formula(n, expected):
    """train/valid/test = N - int(0.2N), int(0.2N) - int(0.75 int(0.2N)), int(0.75 int(0.2N))."""
    assert dl.split_sizes(n) == expected
    assert sum(dl.split_sizes(n)) == n


def official_split(perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' slicing with negative indices (dev = -int(0.2N), valid_end = int(dev*0.75))."""
    dev = -int(0.2 * len(perm))
    valid_end = int(dev * 0.75)
    return perm[:dev], perm[dev:valid_end], perm[valid_end:]


@pytest.mark.parametrize("n", [1000, 20, 101, 333])
def test_split_examples_equals_official_slicing(n):
    """split_examples(by='example') slices one seeded permutation exactly as the official code."""
    parts = dl.split_examples(np.arange(n), seed=3)
    perm = np.random.RandomState(3).permutation(n)
    for got, ref in zip((parts["train"], parts["valid"], parts["test"]), official_split(perm)):
        assert np.array_equal(got, ref)


def test_split_examples_deterministic_and_partitions():
    """Same seed -> same split; another seed -> another split; train/valid/test partition all
    examples."""
    line_of_example = np.repeat(np.arange(150), 2)  # 300 examples
    a = dl.split_examples(line_of_example, seed=11)
    b = dl.split_examples(line_of_example, seed=11)
    c = dl.split_examples(line_of_example, seed=12)
    for k in ("train", "valid", "test"):
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["train"], c["train"])
    allidx = np.concatenate([a["train"], a["valid"], a["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(300))
    assert tuple(len(a[k]) for k in ("train", "valid", "test")) == (240, 15, 45)


def test_split_by_source_keeps_each_line_in_one_split():
    """by='source': every example of one line lands in one split; all examples partitioned;
    the line counts follow 80/5/15."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=200)
    line_of_example = np.repeat(np.arange(200), counts)
    parts = dl.split_examples(line_of_example, seed=5, by="source")
    allidx = np.concatenate([parts["train"], parts["valid"], parts["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(len(line_of_example)))
    owner = {}
    for k, idx in parts.items():
        for line in line_of_example[idx]:
            assert owner.setdefault(int(line), k) == k
    lines = {k: len(np.unique(line_of_example[v])) for k, v in parts.items()}
    assert (lines["train"], lines["valid"], lines["test"]) == dl.split_sizes(200)
    again = dl.split_examples(line_of_example, seed=5, by="source")
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    # by example on the same data does split some line across splits (the option matters)
    ex = dl.split_examples(line_of_example, seed=5, by="example")
    owner = {}
    crossed = False
    for k, idx in ex.items():
        for line in line_of_example[idx]:
            crossed |= owner.setdefault(int(line), k) != k
    assert crossed


def test_split_by_unknown_is_user_error():
    """An unknown --split_by is one UserError naming the flag, its value and the two choices."""
    with pytest.raises(UserError) as e:
        dl.split_examples(np.arange(10), 0, by="user")
    assert str(e.value) == "--split_by user: use 'example' or 'source'"


# ------------------------------------------------------------------------------ batching

def test_batches_in_order_without_rng_keep_partial_last():
    """Without rng: consecutive batches in order, every index once, partial last batch kept."""
    idx = np.arange(100, 123)
    out = list(dl.batches(idx, 5))
    assert [len(b) for b in out] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.concatenate(out), idx)
    assert [len(b) for b in dl.batches(np.arange(3), 10)] == [3]
    assert list(dl.batches(np.arange(0), 4)) == []


def test_batches_with_rng_are_a_permutation():
    """With rng: every index once, in a shuffled order that changes between epochs."""
    idx = np.arange(50, 90)
    rng = np.random.default_rng(0)
    e1 = np.concatenate(list(dl.batches(idx, 7, rng)))
    e2 = np.concatenate(list(dl.batches(idx, 7, rng)))
    for e in (e1, e2):
        assert np.array_equal(np.sort(e), idx)
    assert not np.array_equal(e1, idx) and not np.array_equal(e1, e2)
    assert [len(b) for b in dl.batches(idx, 7, rng)] == [7] * 5 + [5]


@pytest.mark.parametrize("n_split,batch", [(5, 64), (13, 4)])
def test_evaluate_sees_every_example_once(n_split, batch):
    """evaluate visits every example of the split exactly once, also when the split is smaller
    than one batch or not a multiple of it, and averages over all of them."""
    torch.manual_seed(0)
    model = NextItNet(11, [11, 3], channels=8, dilations=(1, 2))
    n = 40
    data = dl.TaskData(2, "t", "synthetic", torch.randint(0, 11, (n, 5)), torch.randint(0, 3, (n,)),
                       torch.arange(n), 3, np.arange(3))
    split = np.random.default_rng(1).permutation(n)[:n_split]
    data.splits = {"train": np.array([], dtype=np.int64), "valid": split, "test": split}
    seen = []
    real_batch = data.batch

    def spy(idx, device):
        seen.extend(int(i) for i in idx)
        return real_batch(idx, device)
    data.batch = spy
    got = trainer.evaluate(model, data, "valid", 50.0, torch.device("cpu"), batch)
    assert sorted(seen) == sorted(split.tolist()) and len(seen) == n_split
    with torch.no_grad():
        [logits] = model.task_logits(data.sources[split], [(1, None)], model.masks(50.0))
    acc = (logits.argmax(1) == data.targets[split]).double().mean().item()
    assert got["accuracy"] == pytest.approx(acc)


# ---------------------------------------------------------------------------- item index

def test_item_index_maps_padding_to_zero_and_sorts_others():
    """Raw 0 -> 0; other distinct raw ids sorted numerically -> 1..N-1."""
    seqs = np.array([[0, 0, 50, 7], [0, 1000, 7, 3], [9, 50, 50, 3]])
    items = dl.build_item_index(seqs)
    assert items.tolist() == [3, 7, 9, 50, 1000]
    mapped = dl.map_items(seqs, items, "x.csv")
    assert mapped.tolist() == [[0, 0, 4, 2], [0, 5, 2, 1], [3, 4, 4, 1]]


def test_item_index_json_round_trip(tmp_path):
    """save_item_index writes plain JSON; load_item_index reads back the same items."""
    items = np.array([3, 7, 9, 50, 10**12])
    path = tmp_path / "index.json"
    dl.save_item_index(path, items, "t1.csv")
    obj = json.loads(path.read_text())  # JSON, not a Python repr
    assert obj["items"] == items.tolist() and obj["num_items"] == 6
    assert np.array_equal(dl.load_item_index(path), items)


def test_item_index_file_is_never_evaluated(tmp_path):
    """A Python-repr index (what the official code writes and `eval`s) is refused as not JSON,
    and nothing in it is executed."""
    marker = tmp_path / "pwned"
    path = tmp_path / "index.json"
    path.write_text(f"{{'items': [1, 2], 'x': open({str(marker)!r}, 'w').close()}}")
    content = path.read_bytes()
    with pytest.raises(UserError) as e:
        dl.load_item_index(path)
    assert str(e.value) == (f"{path}: not valid JSON (Expecting property name enclosed in double quotes: "
                            "line 1 column 2 (char 1))")
    assert not marker.exists() and path.read_bytes() == content and list(tmp_path.iterdir()) == [path]


def test_item_index_edited_file_is_refused(tmp_path):
    """An index whose items no longer match its checksum is refused, naming the file and the
    mismatch; the file stays as it was."""
    path = tmp_path / "index.json"
    dl.save_item_index(path, np.array([1, 2, 5]), "t1.csv")
    obj = json.loads(path.read_text())
    obj["items"] = [1, 2, 6]
    path.write_text(json.dumps(obj))
    content = path.read_bytes()
    with pytest.raises(UserError) as e:
        dl.load_item_index(path)
    assert str(e.value) == f"{path}: item index checksum does not match its items (file edited?)"
    assert path.read_bytes() == content and list(tmp_path.iterdir()) == [path]


def test_source_item_absent_from_index_names_file_and_line(tmp_path):
    """A task-n source item that task 1 never saw raises UserError naming file, line and item."""
    path = tmp_path / "t2.csv"
    path.write_text("0,3,7,,1\n0,7,9,,2\n3,8,9,,1\n")
    with pytest.raises(UserError) as e:
        dl.load_task(2, path, np.array([3, 7, 9]), seed=0)
    assert str(e.value) == f"{path}: line 3: item 8 is not in the task-1 item index"
    assert path.read_text() == "0,3,7,,1\n0,7,9,,2\n3,8,9,,1\n" and list(tmp_path.iterdir()) == [path]


# -------------------------------------------------------------------------------- readers

def test_task_file_line_with_k_targets_gives_k_examples(tmp_path):
    path = tmp_path / "t2.csv"
    path.write_text("0,1,2,,5\n1,2,3,,6,5,8\n2,3,4,,6\n")
    src, tgt, line = dl.read_task_file(path)
    assert src.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert tgt.tolist() == [5, 6, 5, 8, 6]
    assert line.tolist() == [0, 1, 1, 1, 2]
    data = dl.load_task(2, path, np.array([1, 2, 3, 4]), seed=0)
    assert len(data.targets) == 5 and data.num_classes == 3
    assert data.labels.tolist() == [5, 6, 8] and data.targets.tolist() == [0, 1, 0, 2, 1]
    s, t = data.batch(np.array([3]), torch.device("cpu"))
    assert s.tolist() == [[1, 2, 3]] and t.tolist() == [2]


@pytest.mark.parametrize("reader,text", [
    ("seq", "0,1,2\n3,4,5\n"), ("task", "0,1,2,,4\n3,4,5,,6,7\n")])
def test_crlf_and_missing_final_newline_give_same_arrays(tmp_path, reader, text):
    """CRLF endings and a missing final newline are accepted and read identically (the
    official code loses the last character of a file without a trailing newline)."""
    read = dl.read_sequence_file if reader == "seq" else dl.read_task_file
    variants = [text, text.replace("\n", "\r\n"), text.rstrip("\n"), text.replace("\n", "\r\n").rstrip("\r\n")]
    results = []
    for i, v in enumerate(variants):
        p = tmp_path / f"f{i}.csv"
        p.write_bytes(v.encode())
        results.append(read(p))
    for r in results[1:]:
        if reader == "seq":
            assert np.array_equal(r, results[0])
        else:
            assert all(np.array_equal(a, b) for a, b in zip(r, results[0]))
    if reader == "seq":
        assert results[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    else:
        src, tgt, line = results[0]
        assert src.tolist() == [[0, 1, 2], [3, 4, 5]] and tgt.tolist() == [4, 6, 7] and line.tolist() == [0, 1, 1]


TOKEN = "not a non-negative integer below 10**18"
TARGETS = "are not comma-separated non-negative integers below 10**18"
BOM = "line 1: starts with a byte-order mark; save the file as plain ASCII/UTF-8"


@pytest.mark.parametrize("reader,content,message", [
    ("seq", b"1,2,3\n4,x,6\n", f"line 2: sequence has token 'x', {TOKEN}"),
    ("seq", b"1,2,3\n4,5,6\n7,8,1.5\n", f"line 3: sequence has token '1.5', {TOKEN}"),
    ("seq", b"1,2,3\n4,-5,6\n", f"line 2: sequence has token '-5', {TOKEN}"),
    ("seq", b"1,2,3\n4,5,6\n7,8\n", "line 3: sequence has 2 items, line 1 has 3; pad every line to one length"),
    ("seq", b"1,2,3\n4,5,6,7\n", "line 2: sequence has 4 items, line 1 has 3; pad every line to one length"),
    ("seq", b"1,2,3\n\n4,5,6\n", "line 2: sequence is empty"),
    ("seq", b"\xef\xbb\xbf1,2,3\n4,5,6\n", BOM),
    ("task", b"\xef\xbb\xbf1,2,3,,4\n", BOM),
    ("task", b"1,2,3,,4\n1,2,3,4\n", "line 2: no ',,' between the source sequence and the targets"),
    ("task", b"1,2,3,,4\n1,2,3,,\n", "line 2: no target after ',,'"),
    ("task", b"1,2,3,,4\n1,2,x,,5\n", f"line 2: source has token 'x', {TOKEN}"),
    ("task", b"1,2,3,,4\n1,2,3,,-5\n", f"line 2: targets '-5' {TARGETS}"),
    ("task", b"1,2,3,,4\n1,2,3,,a\n", f"line 2: targets 'a' {TARGETS}"),
    ("task", b"1,2,3,,4\n1,2,3,,4\n1,2,,4\n", "line 3: source has 2 items, line 1 has 3; pad every line to one length"),
    ("task", b"1,2,3,,4\r\n1,2,3,,4,\r\n", f"line 2: targets '4,' {TARGETS}"),
])
def test_bad_file_error_names_file_and_line(tmp_path, reader, content, message):
    """Malformed files raise UserError naming the file, the offending line and what is wrong
    there: non-integer, negative and fractional tokens, ragged lengths, blank lines, a byte-order
    mark, a task-n line without ',,' or without targets, bad targets. The file is left as it was."""
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    read = dl.read_sequence_file if reader == "seq" else dl.read_task_file
    with pytest.raises(UserError) as e:
        read(path)
    assert str(e.value) == f"{path}: {message}"
    assert path.read_bytes() == content and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("reader", ["seq", "task"])
def test_empty_file_is_user_error_naming_the_file(tmp_path, reader):
    """An empty file is one UserError: '<file>: file is empty'."""
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    read = dl.read_sequence_file if reader == "seq" else dl.read_task_file
    with pytest.raises(UserError) as e:
        read(path)
    assert str(e.value) == f"{path}: file is empty"
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b""


def test_missing_file_is_user_error(tmp_path):
    """A missing file is one UserError: '<file>: file not found'; nothing is created."""
    with pytest.raises(UserError) as e:
        dl.read_sequence_file(tmp_path / "nope.csv")
    assert str(e.value) == f"{tmp_path / 'nope.csv'}: file not found"
    assert list(tmp_path.iterdir()) == []


def test_load_task1_refuses_all_padding_and_one_column(tmp_path):
    """A task-1 file of padding only, or of one-item sequences, is one UserError naming the file
    and why nothing can be learned from it; the file is left as it was."""
    p = tmp_path / "pad.csv"
    p.write_text("0,0,0\n0,0,0\n")
    with pytest.raises(UserError) as e:
        dl.load_task1(p, 0)
    assert str(e.value) == f"{p}: every item is padding (0); nothing to learn"
    assert p.read_text() == "0,0,0\n0,0,0\n" and list(tmp_path.iterdir()) == [p]
    p.write_text("1\n2\n")
    with pytest.raises(UserError) as e:
        dl.load_task1(p, 0)
    assert str(e.value) == f"{p}: sequences need at least 2 items (inputs seq[:-1], target seq[-1])"
    assert p.read_text() == "1\n2\n" and list(tmp_path.iterdir()) == [p]


# -------------------------------------------------------------------------------- metrics

def test_rank_of_target_counts_higher_and_tied_scores_against_the_target():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 0.0],
                           [5.0, 5.0, 5.0, 5.0], [2.0, 3.0, 3.0, 3.0]])
    targets = torch.tensor([1, 1, 0, 2, 1])
    # row 3: one higher (2.0) and one tie (class 1); row 4: all tied; row 5: two ties, none higher
    assert rank_of_target(logits, targets).tolist() == [0, 3, 2, 3, 2]


def test_a_model_with_constant_scores_never_hits():
    """A collapsed model (every class the same score) must not look perfect: hit@1 0, not 1."""
    logits = torch.zeros(6, 30)
    m = metrics_from_ranks(rank_of_target(logits, torch.arange(6)), "ranking")
    assert m["hit@1"] == 0.0 and m["hr@20"] == 0.0 and m["mrr@5"] == 0.0
    assert metrics_from_ranks(rank_of_target(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])),
                              "accuracy")["accuracy"] == 0.0


def test_ranking_metrics_by_hand():
    """rank r (0-based): MRR = 1/(r+1), NDCG = 1/log2(r+2), HR = 1, all 0 outside the top k;
    hit@1 = share of rank 0."""
    ranks = torch.tensor([0, 1, 4, 5, 19, 20, 100])
    m = metrics_from_ranks(ranks, "ranking")
    n = 7
    assert m["hit@1"] == pytest.approx(1 / n)
    assert m["hr@5"] == pytest.approx(3 / n)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / n)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / n)
    assert m["hr@20"] == pytest.approx(5 / n)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 20) / n)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(7)
                                          + 1 / math.log2(21)) / n)
    assert "accuracy" not in m
    assert set(m) == {"hit@1", "mrr@5", "hr@5", "ndcg@5", "mrr@20", "hr@20", "ndcg@20"}


def test_accuracy_for_classification():
    """Classification tasks report accuracy (= hit@1) and no ranking metrics."""
    logits = torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.2, 0.3], [0.0, 0.1, 0.9], [0.3, 0.3, 0.4]])
    targets = torch.tensor([1, 2, 2, 0])
    m = metrics_from_ranks(rank_of_target(logits, targets), "accuracy")
    assert m == {"hit@1": 0.5, "accuracy": 0.5}


def test_metric_kind_threshold():
    """More than 20 classes: ranking; 20 or fewer: accuracy."""
    from utils import metric_kind
    assert metric_kind(20) == "accuracy" and metric_kind(21) == "ranking" and metric_kind(2) == "accuracy"
