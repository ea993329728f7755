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

import helpers
import data_loader as dl
import prepare_data as pd_
from datasets import movielens as ml  # the module whose pins the fake wheel patches
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
    assert set(m) - {"version"} == {"dataset", "protocol", "tasks"} and m["protocol"]
    assert m.get("version", "x") and isinstance(m.get("version", "x"), str)
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

# (user_id, item_id, rating, timestamp), deliberately not in time order.
INTER = [
    # user 1, 10 ratings. Items 13 and 12 share timestamp 200 (the tie goes by item id: 12
    # first); 19 is listed before 18 and 99 although it is the latest.
    ("1", "11", "4", "100"), ("1", "13", "5", "200"), ("1", "12", "3", "200"),
    ("1", "14", "2", "300"), ("1", "15", "4", "400"), ("1", "16", "1", "500"),
    ("1", "17", "5", "600"), ("1", "19", "2", "900"), ("1", "18", "4", "700"),
    ("1", "99", "5", "800"),
    # user 2, 5 ratings
    ("2", "21", "3", "10"), ("2", "18", "5", "20"), ("2", "11", "2", "30"),
    ("2", "22", "4", "40"), ("2", "13", "3", "50"),
    # user 3, 4 ratings
    ("3", "23", "5", "5"), ("3", "16", "4", "6"), ("3", "13", "5", "7"), ("3", "24", "1", "8"),
    # user 4, 1 rating: no history (floor(0.7) = 0), dropped; item 50 appears nowhere
    ("4", "50", "5", "1"),
]
# (item_id, release_year, class): classes are space-separated tokens as in RecBole's .item
MOVIES_100K = [
    ("11", "1994", "Comedy"), ("12", "1995", "Drama"), ("13", "1980", "Action Thriller"),
    ("14", "1971", "Drama"), ("15", "1982", "Comedy"),
    ("16", "", "Drama"),                     # no year (non-numeric): no decade
    ("17", "1977", "Sci-Fi"), ("18", "1990", "Comedy Drama"),
    ("19", "1996", "unknown"),               # only the genre 'unknown': no genre at all
    ("21", "1993", "Drama"), ("22", "1994", "Thriller"), ("23", "1960", "Comedy"),
    ("24", "1997", "Action"), ("50", "1950", "Drama"),
    ("99", "1998", "Comedy Drama Thriller"),
]
SMALL_100K = pd_.Ml100kConfig(window=3, src_len=4, stride=2, targets=2, horizon=3)

# Worked out by hand (like_min 4, the default).
# Sorted per user (timestamp, then item id), history = first floor(0.7 n):
#   user 1: 11 12 13 14 15 16 17 | 18 99 19   ratings 4 3 5 2 4 1 5 | 4 5 2   (h = 7)
#   user 2: 21 18 11 | 22 13                  ratings 3 5 2 | 4 3           (h = 3)
#   user 3: 23 16 | 13 24                     ratings 5 4 | 5 1             (h = 2)
#   user 4: one rating, h = 0: dropped.
# T1 watch, windows of 3 from the most recent: user 1 (7 items) -> 0,0,11 / 12,13,14 /
#   15,16,17; user 2 -> 21,18,11; user 3 -> 0,23,16. T1 items: 11-18, 21, 23 (not 99, 19, 22,
#   24, 50), so 99 is dropped from every source.
# Cut points p = h, h+2, ... < n; source = last 4 T1 items of seq[:p], left-padded:
#   user 1 p=7: source 14,15,16,17. Next 2: 18,99. Next 3 (horizon): 18(4) 99(5) 19(2) ->
#       like 18,99. Genres of 18, 99, 19: Comedy 2, Drama 2, Thriller 1 ('unknown' ignored) ->
#       tie Comedy/Drama -> Comedy. Movie p-1 = 17 (in T1): rated 5 -> liked 1; 1977 -> 1970.
#   user 1 p=9: seq[:9] = 11..17 18 99 -> 99 dropped -> source 15,16,17,18. Next 2: only 19.
#       Like: 19 rated 2 -> none, dropped. Genre: 19 has only 'unknown' -> none, dropped.
#       Movie p-1 = 99 is not in T1 -> no liked, no decade.
#   user 2 p=3: source 0,21,18,11. Next 2: 22,13. Like: 22(4) 13(3) -> 22. Genres of 22, 13:
#       Thriller 2, Action 1 -> Thriller. Movie p-1 = 11: rated 2 -> liked 0; 1994 -> 1990.
#   user 3 p=2: source 0,0,23,16. Next 2: 13,24. Like: 13(5) 24(1) -> 13. Genres of 13, 24:
#       Action 2, Thriller 1 -> Action. Movie p-1 = 16: rated 4 (>= 4) -> liked 1; 16 has no
#       year -> no decade.
# Class ids: genre sorted [Action, Comedy, Thriller] -> 0, 1, 2; decade [1970, 1990] -> 0, 1.
EXPECTED_100K = {
    "watch": ["0,0,11", "12,13,14", "15,16,17", "21,18,11", "0,23,16"],
    "next_watch": ["14,15,16,17,,18,99", "15,16,17,18,,19", "0,21,18,11,,22,13", "0,0,23,16,,13,24"],
    "like": ["14,15,16,17,,18,99", "0,21,18,11,,22", "0,0,23,16,,13"],
    "genre": ["14,15,16,17,,1", "0,21,18,11,,2", "0,0,23,16,,0"],
    "liked": ["14,15,16,17,,1", "0,21,18,11,,0", "0,0,23,16,,1"],
    "decade": ["14,15,16,17,,0", "0,21,18,11,,1"],
}
EXPECTED_100K_USERS = [3, 3, 3, 3, 3, 2]
EXPECTED_100K_NAMES = {"genre": ["Action", "Comedy", "Thriller"], "decade": [1970, 1990]}


def test_ml100k_protocol_exact_lines():
    """ml-100k/2 on a hand-made table: time order with ties by item id, the 70% history, T1
    windows, cut points every `stride` future movies, sources restricted to T1 items (99 is in
    no history), next_watch/like/genre over the next targets/horizon movies, genre ties by name
    with 'unknown' ignored, liked/decade only where movie p-1 is in T1 and has a year; users
    with one rating are dropped. Every line and the class names are computed by hand above."""
    tasks, names = pd_.ml100k_tasks(INTER, MOVIES_100K, SMALL_100K)
    assert [t.name for t in tasks] == list(EXPECTED_100K) == list(pd_.ML100K_NAMES)
    for t in tasks:
        assert pd_.task_lines(t) == EXPECTED_100K[t.name], t.name
    assert [t.users for t in tasks] == EXPECTED_100K_USERS
    assert names == EXPECTED_100K_NAMES


def test_ml100k_horizon_and_like_threshold():
    """`horizon` bounds the movies T3 (like) and T4 (genre) look at, `like_min` is the rating
    threshold of T3 and T5 (by hand from the table above). Horizon 1: user 1 p=7 looks at 18
    only -> like 18; genre of 18 = Comedy/Drama tie -> Comedy (same class as before); user 3:
    13 -> Action/Thriller tie -> Action. like_min 5: like keeps the 5s (99 for user 1 p=7, 13
    for user 3; user 2 has none), liked is 1 only for a p-1 movie rated 5 (user 1's 17)."""
    one = pd_.Ml100kConfig(window=3, src_len=4, stride=2, targets=2, horizon=1)
    tasks, names = pd_.ml100k_tasks(INTER, MOVIES_100K, one)
    got = {t.name: pd_.task_lines(t) for t in tasks}
    assert got["like"] == ["14,15,16,17,,18", "0,21,18,11,,22", "0,0,23,16,,13"]
    assert got["genre"] == EXPECTED_100K["genre"] and names["genre"] == ["Action", "Comedy", "Thriller"]
    assert got["next_watch"] == EXPECTED_100K["next_watch"]  # targets, not horizon

    five = pd_.Ml100kConfig(window=3, src_len=4, stride=2, targets=2, horizon=3, like_min=5)
    got = {t.name: pd_.task_lines(t) for t in pd_.ml100k_tasks(INTER, MOVIES_100K, five)[0]}
    assert got["like"] == ["14,15,16,17,,99", "0,0,23,16,,13"]
    assert got["liked"] == ["14,15,16,17,,1", "0,21,18,11,,0", "0,0,23,16,,0"]


def test_ml100k_movies_genres_and_decades():
    """The .item rows: genre 'unknown' is left out, a non-numeric or empty year gives no
    decade, years map to their decade; a non-integer item id is a UserError naming the line."""
    genres, decades = pd_.ml100k_movies([("1", "1995", "Action unknown Drama"), ("2", "", "unknown"),
                                         ("3", "n/a", "Comedy"), ("4", "1909", "Western")])
    assert genres == {1: ["Action", "Drama"], 2: [], 3: ["Comedy"], 4: ["Western"]}
    assert decades == {1: 1990, 4: 1900}
    with pytest.raises(UserError, match="x.item: line 3: item id 'abc'"):
        pd_.ml100k_movies([("1", "1995", "Drama"), ("abc", "1995", "Drama")], "x.item")


def test_ml100k_too_small_is_a_user_error():
    """Data where no cut point qualifies for a task (here: no user has two T1 items before a
    cut point) is one UserError naming the task, not an empty file."""
    inter = [("1", "1", "4", "1"), ("1", "2", "4", "2"), ("2", "3", "4", "1"), ("2", "4", "4", "2")]
    with pytest.raises(UserError, match="task next_watch: no example qualifies"):
        pd_.ml100k_tasks(inter, [], SMALL_100K)


def test_windows_and_padding():
    assert pd_.windows(np.array([1, 2, 3, 4, 5]), 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert pd_.windows(np.array([1, 2]), 2).tolist() == [[1, 2]]
    assert pd_.left_pad([1, 2, 3], 5).tolist() == [0, 0, 1, 2, 3]
    assert pd_.left_pad([1, 2, 3], 2).tolist() == [2, 3]


def _atomic(rows, header):
    return (header + "\n" + "".join("\t".join(r) + "\n" for r in rows)).encode()


INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"


def _inter_bytes() -> bytes:
    return _atomic(INTER, INTER_HEADER)


def _item_bytes() -> bytes:
    """The .item member in the wheel's column order (a title column between id and year)."""
    return _atomic([(i, f"Movie {i}", y, c) for i, y, c in MOVIES_100K], ITEM_HEADER)


def _fake_wheel(path: Path, monkeypatch, inter: bytes, item: bytes) -> None:
    """A stand-in for the RecBole wheel, with the pins patched to match it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = {key: member for key, (member, _) in pd_.ML100K_MEMBERS.items()}
    assert set(members) == {"inter", "item"}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(members["inter"], inter)
        z.writestr(members["item"], item)
    monkeypatch.setattr(ml, "RECBOLE_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setattr(ml, "ML100K_MEMBERS", {
        "inter": (members["inter"], hashlib.sha256(inter).hexdigest()),
        "item": (members["item"], hashlib.sha256(item).hexdigest())})


def test_ml100k_from_cached_wheel(tmp_path, monkeypatch):
    """`prepare_data.py ml-100k` on a cached wheel holding RecBole-format .inter and .item
    members: the files equal the hand-worked lines (the CLI's default horizon 10 sees the same
    movies, every future here is shorter), the manifest records version ml-100k/2, and
    num_classes/metric/stats agree with the files."""
    _fake_wheel(tmp_path / "cache" / pd_.RECBOLE_WHEEL, monkeypatch, _inter_bytes(), _item_bytes())
    manifest = pd_.main(["ml-100k", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                         "--window", "3", "--src_len", "4", "--stride", "2", "--targets", "2"])
    m = check_manifest(manifest)
    assert m["dataset"] == "ml-100k" and m["version"] == "ml-100k/2" == pd_.ML100K_VERSION
    assert json.loads(manifest.read_text())["version"] == "ml-100k/2"
    assert [t["name"] for t in m["tasks"]] == list(EXPECTED_100K)
    for t in m["tasks"]:
        assert lines(manifest.parent / t["file"]) == EXPECTED_100K[t["name"]], t["name"]
    # T1: 10 items + padding; next_watch targets 18 99 19 22 13 24; like 18 99 22 13
    assert [t["num_classes"] for t in m["tasks"]] == [11, 6, 4, 3, 2, 2]
    assert [t["metric"] for t in m["tasks"]] == ["accuracy"] * 6
    assert "['Action', 'Comedy', 'Thriller']" in m["protocol"] and "[1970, 1990]" in m["protocol"]
    assert m["protocol"].startswith("ml-100k/2")
    stats = (tmp_path / "out" / "stats.md").read_text()
    # next_watch: 3 users, 4 lines, 2+1+2+2 = 7 examples; decade: 2 users, 2 lines, 2 examples
    assert "| 2 | next_watch | 3 | 4 | 7 |" in stats and "| 6 | decade | 2 | 2 | 2 |" in stats


def test_ml100k_corrupt_wheel(tmp_path, monkeypatch):
    """A wheel that fails its sha256 pin, then one that passes it but is no zip: each a
    UserError, and no output folder is created."""
    wheel = tmp_path / pd_.RECBOLE_WHEEL
    wheel.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="sha256"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)
    monkeypatch.setattr(ml, "RECBOLE_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(UserError, match="not a readable zip"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["inter", "item"])
def test_ml100k_member_checksum(tmp_path, monkeypatch, key):
    """Each member (.inter and .item) is checked against its own pinned sha256 even when the
    wheel's pin matches; a mismatch is a UserError and nothing is written."""
    _fake_wheel(tmp_path / pd_.RECBOLE_WHEEL, monkeypatch, _inter_bytes(), _item_bytes())
    monkeypatch.setitem(ml.ML100K_MEMBERS, key, (ml.ML100K_MEMBERS[key][0], "0" * 64))
    with pytest.raises(UserError, match=f"member {ml.ML100K_MEMBERS[key][0]} does not match its pinned sha256"):
        pd_.prepare_ml100k(tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_ml100k_item_member_without_class_column(tmp_path, monkeypatch):
    """An .item member whose header lacks `class` is a UserError naming the member."""
    item = _atomic([(i, y) for i, y, _ in MOVIES_100K], "item_id:token\trelease_year:token")
    _fake_wheel(tmp_path / pd_.RECBOLE_WHEEL, monkeypatch, _inter_bytes(), item)
    with pytest.raises(UserError, match=r"ml-100k\.item: header lacks column\(s\) class"):
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
    """The real wheel: both pinned members read, six ml-100k/2 tasks, T2/T3 ranking and T4-T6
    classification, every source item in T1."""
    manifest = pd_.prepare_ml100k(tmp_path / "out", tmp_path / "cache")
    m = check_manifest(manifest)
    assert m["version"] == "ml-100k/2"
    assert [t["name"] for t in m["tasks"]] == list(pd_.ML100K_NAMES)
    assert [t["metric"] for t in m["tasks"]] == ["ranking"] * 3 + ["accuracy"] * 3
    assert m["tasks"][4]["num_classes"] == 2  # liked: yes / no


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
    files = [f for _, f in dl.TTL_TASKS]
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
    for t, (_, f) in zip(m["tasks"], dl.TTL_TASKS):
        assert Path(t["file"]).is_absolute() and Path(t["file"]) == (src / f).resolve()
    assert "| 2 | click | - | 2 | 3 |" in (tmp_path / "out" / "stats.md").read_text()
    assert sorted(os.listdir(tmp_path / "out")) == ["cache", "stats.md", "tasks.json"]  # no CSV copies
    # the task scripts' default files (data_loader.TTL_FILES) are the same six, numbered from 1
    assert dl.TTL_FILES == {n: f for n, (_, f) in enumerate(dl.TTL_TASKS, 1)}


def test_ttl_errors(tmp_path):
    src = write_ttl(tmp_path / "ttl")
    (src / dl.TTL_TASKS[4][1]).unlink()
    with pytest.raises(UserError, match="missing TTL file.*original_desen_gender.csv"):
        pd_.prepare_ttl(tmp_path / "out", src)
    write_ttl(src)
    (src / dl.TTL_TASKS[2][1]).write_text("0,8,9,10,11,,200\n0,8,9,10,99,,201\n")
    with pytest.raises(UserError, match="like_nouserID.csv: line 2: item 99"):
        pd_.prepare_ttl(tmp_path / "out", src)
    (src / dl.TTL_TASKS[2][1]).write_text("0,8,9,10,11,200\n")
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
    """prepare_data.py in a new interpreter."""
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def run_cli_in_process(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """prepare_data.py as `__main__` in this process (helpers.run_script_in_process: the same
    run_cli, exit status, stdout and stderr), without a new interpreter's torch import."""
    rc, out, err = helpers.run_script_in_process("prepare_data.py", *args, cwd=cwd)
    return subprocess.CompletedProcess(["prepare_data.py", *args], rc, out, err)


@pytest.mark.parametrize("args,error", [
    (["ttl", "--source", "/nonexistent/ttl"], "error: /nonexistent/ttl: --source must be the folder holding the six TTL files"),
    (["ml-25m", "--source", "/nonexistent/ml-25m.zip"],
     "error: /nonexistent/ml-25m.zip: --source not found (give ml-25m.zip or a folder with ratings.csv and movies.csv)"),
    (["synthetic", "--tasks", "1"], "error: --tasks 1: need at least 2"),
])
def test_cli_errors(tmp_path, args, error):
    """A missing --source (TTL folder, MovieLens zip) or too few synthetic tasks: exit status 2,
    one `error:` line naming the path or flag and the problem, no traceback, and no --out folder."""
    proc = run_cli_in_process(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [error], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_truncated_zip(tmp_path):
    zpath = tmp_path / "ml-25m.zip"
    zpath.write_bytes(b"PK\x03\x04" + b"\0" * 50)
    proc = run_cli_in_process("ml-25m", "--source", str(zpath), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == \
        [f"error: {zpath}: not a readable zip file (File is not a zip file)"]


def test_cli_synthetic_default_out(tmp_path):
    """The real script in a new interpreter (this module's one): default --out, the log on stderr."""
    proc = run_cli("synthetic", "--users", "16", "--seed", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = check_manifest(tmp_path / "Data" / "synthetic" / "tasks.json")
    assert m["dataset"] == "synthetic"
    assert "| 1 | watch |" in proc.stderr  # the statistics table is logged
    assert not [p for p in (tmp_path / "Data" / "synthetic").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ the ml-100k preset

def _generated_ml100k(users: int = 40, ratings: int = 32, items: int = 60) -> tuple[bytes, bytes]:
    """A RecBole-format ml-100k table made by rule: user u rates the items u, u+1, ... (mod
    `items`) at times 1, 2, ...; ratings cycle 1-5; movies get one of four genres and a year
    between 1950 and 1999."""
    inter = [(str(u), str(1 + (u + k) % items), str(1 + (u + k) % 5), str(k)) for u in range(1, users + 1)
             for k in range(1, ratings + 1)]
    genres = ("Action", "Comedy", "Drama", "Thriller")
    movies = [(str(i), f"Movie {i}", str(1950 + (7 * i) % 50), genres[i % 4]) for i in range(1, items + 1)]
    return _atomic(inter, INTER_HEADER), _atomic(movies, ITEM_HEADER)


def test_reproduce_runs_the_ml100k_preset_on_a_prepared_recbole_table(tmp_path, monkeypatch):
    """`prepare_data.py ml-100k` on a hand-made RecBole table (40 users x 32 ratings), then
    `reproduce.py --dataset .../tasks.json --max_epochs 1`: the dataset's own preset is used
    without --preset, each stage gets exactly its flags (task 1: lr 1e-3, batch 32, 64 channels;
    tasks 2-6: lr 1e-3, batch 256, smax 50, alpha 0.7, patience 10, --min_retention_rows 16,
    --select_by mrr@5), every stage trains and records them, and matrix.json covers the six tasks."""
    import types

    import reproduce
    from checkpoint import load_checkpoint
    inter, item = _generated_ml100k()
    _fake_wheel(tmp_path / "cache" / pd_.RECBOLE_WHEEL, monkeypatch, inter, item)
    manifest = pd_.main(["ml-100k", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ml-100k")])
    assert check_manifest(manifest)["dataset"] == "ml-100k"
    calls: list[list[str]] = []
    monkeypatch.setattr(reproduce, "subprocess", types.SimpleNamespace(run=helpers.in_process_runner(calls, [])))
    reproduce.main(["--dataset", str(manifest), "--seeds", "0", "--max_epochs", "1", "--out", str(tmp_path / "results"),
                    "--device", "cpu", "--no_plots"])

    def flags(call: list[str]) -> dict[str, str]:
        return {call[i][2:]: call[i + 1] for i in range(1, len(call) - 1) if call[i].startswith("--")
                and not call[i + 1].startswith("--")}

    want1 = {"epochs": "1", "lr": "0.001", "batch": "32", "channels": "64"}
    wantn = {"epochs": "1", "lr": "0.001", "batch": "256", "smax": "50", "alpha": "0.7", "patience": "10",
             "min_retention_rows": "16", "select_by": "mrr@5"}
    assert len(calls) == 6
    folder = tmp_path / "results" / "ml-100k" / "teracon" / "seed0"
    for task, call in enumerate(calls, 1):
        got, want = flags(call), want1 if task == 1 else wantn
        assert {k: got.get(k) for k in want} == want, task
        summary = json.loads((folder / f"task{task}.json").read_text())
        assert summary["finished"] and len(summary["epochs"]) == 1, task
        recorded = summary["args"]
        for k, v in want.items():
            assert str(recorded[k]) == v or recorded[k] == pytest.approx(float(v)), (task, k, recorded[k])
        assert load_checkpoint(folder / f"task{task}.pt")["config"]["channels"] == 64
    matrix = json.loads((folder / "matrix.json").read_text())
    assert [len(rows) for rows in matrix["after"]] == [1, 2, 3, 4, 5, 6]
