"""Tests of prepare_data.py: the MovieLens protocols on hand-made tables, TTL validation, the
synthetic generator and the command line's error handling. No network unless asked for."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import prepare_data as pd_
from data_loader import read_sequence_file, read_task_file
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent


def lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    return raw.decode().splitlines()


def check_manifest(manifest_path: Path) -> dict:
    """The manifest's num_classes/metric agree with the files; sources use only task-1 items."""
    m = json.loads(manifest_path.read_text())
    assert set(m) == {"dataset", "protocol", "tasks"} and m["protocol"]
    t1 = None
    for n, t in enumerate(m["tasks"], 1):
        assert set(t) == {"task", "name", "file", "num_classes", "metric"} and t["task"] == n
        path = manifest_path.parent / t["file"]
        assert t["file"] == f"t{n}_{t['name']}.csv"
        if n == 1:
            seqs = read_sequence_file(path)
            t1 = set(np.unique(seqs).tolist())
            assert t["num_classes"] == len(t1 - {0}) + 1
        else:
            src, tgt, _ = read_task_file(path)
            assert set(np.unique(src).tolist()) <= t1
            assert t["num_classes"] == len(np.unique(tgt))
        assert t["metric"] == ("ranking" if t["num_classes"] > 20 else "accuracy")
    assert (manifest_path.parent / "stats.md").is_file()
    return m


# ------------------------------------------------------------------------------ ml-100k

# (user_id, item_id, rating, timestamp); user 1 has a timestamp tie (items 13 and 12 at 200)
INTER = [
    ("1", "11", "4", "100"), ("1", "13", "3", "200"), ("1", "12", "4", "200"),
    ("1", "14", "2", "300"), ("1", "15", "4", "400"), ("1", "16", "4", "500"),
    ("1", "17", "1", "600"), ("1", "20", "5", "900"), ("1", "18", "5", "700"),
    ("1", "19", "3", "800"),
    ("2", "21", "4", "1"), ("2", "11", "2", "2"), ("2", "22", "4", "3"),
    ("3", "30", "5", "1"),                        # one rating: dropped
    ("4", "12", "3", "5"), ("4", "11", "5", "6"),  # not in the user table: no profile tasks
]
USERS = [("1", "24", "M", "technician"), ("2", "17", "F", "none"), ("3", "60", "M", "writer")]

EXPECTED_100K = {
    "watch": ["0,0,11", "12,13,14", "15,16,17", "0,21,11", "0,0,12"],
    "next_watch": ["14,15,16,17,,18,19", "0,0,21,11,,22", "0,0,0,12,,11"],
    "like": ["14,15,16,17,,18,20", "0,0,0,12,,11"],
    "age": ["14,15,16,17,,1", "0,0,21,11,,0"],           # 24 -> 18-24 (1), 17 -> <18 (0)
    "gender": ["14,15,16,17,,1", "0,0,21,11,,0"],        # F=0, M=1
    "occupation": ["14,15,16,17,,1", "0,0,21,11,,0"],    # other(+none)=0, technician=1, writer=2
}


def test_ml100k_protocol_exact_lines():
    tasks = pd_.ml100k_tasks(INTER, USERS, window=3, src_len=4, targets=2)
    assert [t.name for t in tasks] == list(EXPECTED_100K)
    for t in tasks:
        assert pd_.task_lines(t) == EXPECTED_100K[t.name], t.name
    assert [t.users for t in tasks] == [3, 3, 2, 2, 2, 2]


def test_age_buckets():
    assert [pd_.age_bucket(a) for a in (7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_windows_and_padding():
    assert pd_.windows(np.array([1, 2, 3, 4, 5]), 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert pd_.windows(np.array([1, 2]), 2).tolist() == [[1, 2]]
    assert pd_.left_pad([1, 2, 3], 5).tolist() == [0, 0, 1, 2, 3]
    assert pd_.left_pad([1, 2, 3], 2).tolist() == [2, 3]


def _atomic(rows, header):
    return (header + "\n" + "".join("\t".join(r) + "\n" for r in rows)).encode()


def _fake_wheel(path: Path, monkeypatch, inter: bytes, user: bytes) -> None:
    """A stand-in for the RecBole wheel, with the pins patched to match it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(pd_.ML100K_MEMBERS["inter"][0], inter)
        z.writestr(pd_.ML100K_MEMBERS["user"][0], user)
    monkeypatch.setattr(pd_, "RECBOLE_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setattr(pd_, "ML100K_MEMBERS", {
        "inter": (pd_.ML100K_MEMBERS["inter"][0], hashlib.sha256(inter).hexdigest()),
        "user": (pd_.ML100K_MEMBERS["user"][0], hashlib.sha256(user).hexdigest())})


def test_ml100k_from_cached_wheel(tmp_path, monkeypatch):
    inter = _atomic(INTER, "user_id:token\titem_id:token\trating:float\ttimestamp:float")
    user = _atomic([r + ("00000",) for r in USERS],
                   "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token")
    _fake_wheel(tmp_path / "cache" / pd_.RECBOLE_WHEEL, monkeypatch, inter, user)
    manifest = pd_.main(["ml-100k", "--cache", str(tmp_path / "cache"), "--out",
                         str(tmp_path / "out"), "--window", "3", "--src_len", "4", "--targets", "2"])
    m = check_manifest(manifest)
    assert m["dataset"] == "ml-100k"
    for t in m["tasks"]:
        assert lines(manifest.parent / t["file"]) == EXPECTED_100K[t["name"]]
    assert [t["num_classes"] for t in m["tasks"]] == [9, 4, 3, 2, 2, 2]


def test_ml100k_corrupt_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / pd_.RECBOLE_WHEEL
    wheel.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="sha256"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)
    monkeypatch.setattr(pd_, "RECBOLE_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(UserError, match="not a readable zip"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_ml100k_member_checksum(tmp_path, monkeypatch):
    inter = _atomic(INTER, "user_id:token\titem_id:token\trating:float\ttimestamp:float")
    user = _atomic(USERS, "user_id:token\tage:token\tgender:token\toccupation:token")
    _fake_wheel(tmp_path / pd_.RECBOLE_WHEEL, monkeypatch, inter, user)
    monkeypatch.setitem(pd_.ML100K_MEMBERS, "user", (pd_.ML100K_MEMBERS["user"][0], "0" * 64))
    with pytest.raises(UserError, match="pinned sha256"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)


def test_atomic_header_and_fields():
    with pytest.raises(UserError, match="lacks column"):
        pd_.parse_atomic("user_id:token\titem_id:token\n1\t2\n", "x.inter",
                         ["user_id", "item_id", "rating"])
    with pytest.raises(UserError, match="x.inter: line 3"):
        pd_.parse_atomic("a:token\tb:token\n1\t2\n1\n", "x.inter", ["a", "b"])


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TERACON_NETWORK_TESTS") != "1",
                    reason="set TERACON_NETWORK_TESTS=1 to download the recbole wheel")
def test_ml100k_real_download(tmp_path):
    manifest = pd_.prepare_ml100k(tmp_path / "out", tmp_path / "cache")
    m = check_manifest(manifest)
    assert [t["name"] for t in m["tasks"]] == list(EXPECTED_100K)
    assert [t["num_classes"] for t in m["tasks"]][3:] == [7, 2, 20]


# ------------------------------------------------------------------------------- ml-25m

MOVIES = [
    "movieId,title,genres",
    '1,"Toy Story (1995)",Adventure|Animation|Children|Comedy|Fantasy',
    '2,"Jumanji (1995)",Adventure|Children|Fantasy',
    '3,"Heat, The (1995)",Action|Crime|Thriller',
    '4,"Casablanca (1942)",Drama|Romance',
    '5,"Metropolis (1927)",Drama|Sci-Fi',
    '6,"No Year",(no genres listed)',
    '7,"Old One (1910)",Drama',
    '8,"Alien (1979)",Horror|Sci-Fi',
]


def ml25m_ratings(rng_seed: int = 0) -> list[str]:
    """User 1 is hand-made; users 2..30 random."""
    rows = ["userId,movieId,rating,timestamp"]
    # user 1: history (7) = 1..7 rated 1.0 .. 4.0 (mean 2.5 -> band 2); future 8, 4, 5
    hist = [(m, r) for m, r in zip(range(1, 8), (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0))]
    for t, (m, r) in enumerate(hist + [(8, 5.0), (4, 4.5), (5, 3.0)]):
        rows.append(f"1,{m},{r:g},{1000 + t}")
    rng = np.random.default_rng(rng_seed)
    for u in range(2, 31):
        for t, m in enumerate(rng.permutation(8)[:int(rng.integers(2, 9))] + 1):
            rows.append(f"{u},{m},{rng.integers(1, 11) / 2:g},{2000 + t}")
    return rows


def write_ml25m(folder: Path, ratings: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text("\n".join(ratings or ml25m_ratings()) + "\n")
    (folder / "movies.csv").write_text("\n".join(MOVIES) + "\n")
    return folder


def test_ml25m_folder_and_zip(tmp_path):
    folder = write_ml25m(tmp_path / "src")
    m = check_manifest(pd_.main(["ml-25m", "--source", str(folder), "--out", str(tmp_path / "a"),
                                 "--window", "3", "--src_len", "5", "--targets", "2"]))
    assert [t["name"] for t in m["tasks"]] == ["watch", "next_watch", "like", "genre",
                                               "rating_band", "decade"]
    a = {t["name"]: lines(tmp_path / "a" / t["file"]) for t in m["tasks"]}
    # user 1 comes first in every task
    assert a["watch"][:3] == ["0,0,1", "2,3,4", "5,6,7"]
    assert a["next_watch"][0] == "3,4,5,6,7,,8,4"
    assert a["like"][0] == "3,4,5,6,7,,8,4"
    # genres sorted: Action Adventure Animation Children Comedy Crime Drama Fantasy Horror Romance
    # Sci-Fi Thriller; future 8,4,5: Drama 2, Sci-Fi 2 -> tie by name -> Drama (6)
    assert a["genre"][0] == "3,4,5,6,7,,6"
    assert a["rating_band"][0] == "3,4,5,6,7,,2"
    # decades of 8,4,5: 1970, 1940, 1920 -> tie -> earliest, 1920 (the first class)
    assert a["decade"][0] == "3,4,5,6,7,,0"

    zpath = tmp_path / "ml-25m.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(folder / "ratings.csv", "ml-25m/ratings.csv")
        z.write(folder / "movies.csv", "ml-25m/movies.csv")
    pd_.main(["ml-25m", "--source", str(zpath), "--out", str(tmp_path / "b"),
              "--window", "3", "--src_len", "5", "--targets", "2"])
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".csv"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    mb = json.loads((tmp_path / "b" / "tasks.json").read_text())
    assert mb["tasks"] == m["tasks"]


def test_ml25m_truncated_zip(tmp_path):
    folder = write_ml25m(tmp_path / "src")
    zpath = tmp_path / "ml-25m.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(folder / "ratings.csv", "ml-25m/ratings.csv")
        z.write(folder / "movies.csv", "ml-25m/movies.csv")
    raw = zpath.read_bytes()
    zpath.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="ml-25m.zip"):
        pd_.prepare_ml25m(tmp_path / "out", zpath)
    assert not (tmp_path / "out").exists()


def test_ml25m_bad_inputs(tmp_path):
    rows = ml25m_ratings()
    rows[5] = "1,2,oops,1003"
    folder = write_ml25m(tmp_path / "bad", rows)
    with pytest.raises(UserError, match=r"ratings.csv: line 6: "):
        pd_.prepare_ml25m(tmp_path / "out", folder)
    rows[5] = "1,2,3.5"
    write_ml25m(folder, rows)
    with pytest.raises(UserError, match=r"ratings.csv: line 6: "):
        pd_.prepare_ml25m(tmp_path / "out", folder)
    rows[0] = "user,movie,rating,timestamp"
    write_ml25m(folder, rows)
    with pytest.raises(UserError, match=r"ratings.csv: line 1: header"):
        pd_.prepare_ml25m(tmp_path / "out", folder)
    (folder / "movies.csv").unlink()
    with pytest.raises(UserError, match="movies.csv: not found"):
        pd_.prepare_ml25m(tmp_path / "out", folder)


# ---------------------------------------------------------------------------------- ttl

def write_ttl(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = [f for _, f in pd_.TTL_FILES]
    (folder / files[0]).write_text("0,0,5,7,9\n1,2,3,4,5\n0,8,9,10,11\n")
    (folder / files[1]).write_text("0,0,5,7,9,,100,101\n1,2,3,4,5,,102\n")
    (folder / files[2]).write_text("0,8,9,10,11,,200\n")
    (folder / files[3]).write_text("0,0,5,7,9,,3\n1,2,3,4,5,,5\n0,8,9,10,11,,3\n")
    (folder / files[4]).write_text("0,0,5,7,9,,1\n1,2,3,4,5,,2\n")
    (folder / files[5]).write_text("0,0,5,7,9,,0\n1,2,3,4,5,,4\n")
    return folder


def test_ttl_manifest(tmp_path):
    src = write_ttl(tmp_path / "ttl")
    manifest = pd_.main(["ttl", "--source", str(src), "--out", str(tmp_path / "out")])
    m = json.loads(manifest.read_text())
    assert [t["name"] for t in m["tasks"]] == ["pretrain", "click", "like", "age", "gender",
                                               "lifestatus"]
    assert [t["num_classes"] for t in m["tasks"]] == [11, 3, 1, 2, 2, 2]
    assert [t["metric"] for t in m["tasks"]] == ["accuracy"] * 6
    for t, (_, f) in zip(m["tasks"], pd_.TTL_FILES):
        assert Path(t["file"]).is_absolute() and Path(t["file"]) == (src / f).resolve()
    assert "| 2 | click | - | 2 | 3 |" in (tmp_path / "out" / "stats.md").read_text()
    assert sorted(os.listdir(tmp_path / "out")) == ["stats.md", "tasks.json"]


def test_ttl_errors(tmp_path):
    src = write_ttl(tmp_path / "ttl")
    (src / pd_.TTL_FILES[4][1]).unlink()
    with pytest.raises(UserError, match="missing TTL file.*original_desen_gender.csv"):
        pd_.prepare_ttl(tmp_path / "out", src)
    write_ttl(src)
    (src / pd_.TTL_FILES[2][1]).write_text("0,8,9,10,11,,200\n0,8,9,10,99,,201\n")
    with pytest.raises(UserError, match="like_nouserID.csv: line 2: item 99"):
        pd_.prepare_ttl(tmp_path / "out", src)
    (src / pd_.TTL_FILES[2][1]).write_text("0,8,9,10,11,200\n")
    with pytest.raises(UserError, match="like_nouserID.csv: line 1"):
        pd_.prepare_ttl(tmp_path / "out", src)
    assert not (tmp_path / "out" / "tasks.json").exists()


# ---------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic(tmp_path):
    a = pd_.make_synthetic(tmp_path / "a", users=200, items=40, seq_len=10, num_tasks=6, seed=3)
    b = pd_.make_synthetic(tmp_path / "b", users=200, items=40, seq_len=10, num_tasks=6, seed=3)
    c = pd_.make_synthetic(tmp_path / "c", users=200, items=40, seq_len=10, num_tasks=6, seed=4)
    m = check_manifest(a)
    assert len(m["tasks"]) == 6
    files = [t["file"] for t in m["tasks"]]
    for f in files + ["tasks.json", "stats.md"]:
        assert (a.parent / f).read_bytes() == (b.parent / f).read_bytes()
    assert any((a.parent / f).read_bytes() != (c.parent / f).read_bytes() for f in files)
    seqs = read_sequence_file(a.parent / files[0])
    assert seqs.shape == (200, 10) and seqs.min() >= 0 and seqs.max() <= 40


def test_synthetic_task_counts(tmp_path):
    m = check_manifest(pd_.make_synthetic(tmp_path / "two", num_tasks=2, seed=1))
    assert [t["name"] for t in m["tasks"]] == ["watch", "click"]
    m = check_manifest(pd_.make_synthetic(tmp_path / "eight", users=40, num_tasks=8))
    assert [t["name"] for t in m["tasks"]][-2:] == ["profile7", "profile8"]
    with pytest.raises(UserError, match="--tasks 1"):
        pd_.make_synthetic(tmp_path / "one", num_tasks=1)


def test_synthetic_signal(tmp_path):
    """Labels are functions of the latent cluster, which the sequences reveal: a nearest-item
    majority vote must beat chance by a wide margin on the profile tasks."""
    m = json.loads(pd_.make_synthetic(tmp_path, users=400, seed=0).read_text())
    for t in m["tasks"][3:5]:  # age (4 clusters), gender (2)
        src, tgt, _ = read_task_file(tmp_path / t["file"])
        last = src[:, -1]
        train, test = slice(0, 300), slice(300, None)
        vote = {}
        for item, y in zip(last[train], tgt[train]):
            vote.setdefault(int(item), []).append(int(y))
        pred = [np.bincount(vote.get(int(i), [0])).argmax() for i in last[test]]
        acc = float(np.mean(np.array(pred) == tgt[test]))
        assert acc > 1.0 / t["num_classes"] + 0.3, (t["name"], acc)


# ---------------------------------------------------------------------------------- CLI

def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["ttl", "--source", "/nonexistent/ttl"],
    ["ml-25m", "--source", "/nonexistent/ml-25m.zip"],
    ["synthetic", "--tasks", "1"],
])
def test_cli_errors(tmp_path, args):
    proc = run_cli(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr


def test_cli_truncated_zip(tmp_path):
    zpath = tmp_path / "ml-25m.zip"
    zpath.write_bytes(b"PK\x03\x04" + b"\0" * 50)
    proc = run_cli("ml-25m", "--source", str(zpath), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == \
        [f"error: {zpath}: not a readable zip file (File is not a zip file)"]


def test_cli_synthetic_default_out(tmp_path):
    proc = run_cli("synthetic", "--users", "16", "--seed", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = check_manifest(tmp_path / "Data" / "synthetic" / "tasks.json")
    assert m["dataset"] == "synthetic"
    assert "| 1 | watch |" in proc.stderr  # the statistics table is logged
    assert not [p for p in (tmp_path / "Data" / "synthetic").iterdir() if p.name.startswith(".")]
