"""MovieLens: our documented protocols for ML-100K (RecBole's copy, pinned by sha256) and ML-25M
(user-supplied zip or folder); the authors never published theirs (SPEC 1)."""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import re
import shlex
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

import utils
from datasets.common import Task, left_pad, windows, write_dataset
from utils import UserError, log


# ------------------------------------------------------------------- MovieLens protocol (shared)

@dataclass
class UserSplit:
    """One user's ratings in time order (ties by item id), cut into history (first 70%) and future."""
    user: int
    hist: np.ndarray
    hist_ratings: np.ndarray
    future: np.ndarray
    future_ratings: np.ndarray


HISTORY_FRACTION = (7, 10)  # the first floor(7n/10) ratings of a user are the history


def split_users(user: np.ndarray, item: np.ndarray, rating: np.ndarray,
                timestamp: np.ndarray) -> Iterator[UserSplit]:
    """Yield each user's history/future split, users in increasing id order. Users whose history
    would be empty (fewer than 2 ratings) are skipped."""
    order = np.lexsort((item, timestamp, user))
    u, i, r = user[order], np.asarray(item, dtype=np.int64)[order], rating[order]
    bounds = np.flatnonzero(u[1:] != u[:-1]) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [len(u)]]).astype(np.int64)
    num, den = HISTORY_FRACTION
    for s, e in zip(starts.tolist(), ends.tolist()):
        h = (num * (e - s)) // den
        if h < 1:
            continue
        yield UserSplit(int(u[s]), i[s:s + h], r[s:s + h], i[s + h:e], r[s + h:e])


ProfileFn = Callable[[UserSplit], "int | None"]


def movielens_tasks(user: np.ndarray, item: np.ndarray, rating: np.ndarray, timestamp: np.ndarray,
                    profiles: list[tuple[str, ProfileFn]], *, window: int, src_len: int,
                    targets: int, like_min: float, next_name: str = "next_watch") -> list[Task]:
    """The MovieLens protocol as a pure function of the rating columns.

    T1 `watch`: every user's history cut into non-overlapping windows of `window` (from the end;
    only the oldest is left-padded). T2 `next_watch`: source = the last `src_len` history items
    (left-padded), targets = the first `targets` future items. T3 `like`: same source, targets =
    the first `targets` future items rated >= `like_min` (users without one are dropped). Then one
    task per profile function (source as T2, one label; users where it gives None are dropped)."""
    if len(user) == 0:
        raise UserError("no ratings")
    t1, srcs, nxt, like_src, like_tgt = [], [], [], [], []
    prof_src: list[list[np.ndarray]] = [[] for _ in profiles]
    prof_lab: list[list[list[int]]] = [[] for _ in profiles]
    t1_users = 0
    for sp in split_users(user, item, rating, timestamp):
        t1.append(windows(sp.hist, window))
        t1_users += 1
        src = left_pad(sp.hist, src_len)
        srcs.append(src)
        nxt.append(sp.future[:targets].tolist())
        liked = sp.future[sp.future_ratings >= like_min][:targets]
        if len(liked):
            like_src.append(src)
            like_tgt.append(liked.tolist())
        for p, (_, fn) in enumerate(profiles):
            label = fn(sp)
            if label is not None:
                prof_src[p].append(src)
                prof_lab[p].append([int(label)])
    if not t1:
        raise UserError("no user has at least 2 ratings")

    def stack(rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows) if rows else np.zeros((0, src_len), dtype=np.int64)

    tasks = [Task("watch", np.concatenate(t1), None, t1_users),
             Task(next_name, stack(srcs), nxt, len(srcs)),
             Task("like", stack(like_src), like_tgt, len(like_src))]
    for p, (name, _) in enumerate(profiles):
        tasks.append(Task(name, stack(prof_src[p]), prof_lab[p], len(prof_src[p])))
    for t in tasks[1:]:
        if not t.targets:
            raise UserError(f"task {t.name}: no user qualifies, the data are too small")
    return tasks


def movielens_protocol_text(dataset: str, window: int, src_len: int, targets: int,
                            like_rule: str, profile_text: str) -> str:
    """The manifest's protocol paragraph for a MovieLens dataset."""
    return (
        f"{dataset}: each user's ratings are sorted by timestamp (ties by item id); the first "
        f"floor(70%) are the history, the rest the future (users with fewer than 2 ratings are "
        f"dropped). T1 watch: each history cut into non-overlapping windows of {window} items, "
        f"counted from the most recent, so only the oldest window is shorter and left-padded with 0 "
        f"(no line repeats another's items). T2 next_watch: source = the last {src_len} history items "
        f"(left-padded with 0), targets = the first {targets} future movies. T3 like: same source, "
        f"targets = the first {targets} future movies {like_rule} (users without one dropped). "
        f"{profile_text} Raw MovieLens item ids are kept; every source item is in the T1 file.")


# ---------------------------------------------------------------------------------- ml-100k

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"


def fetch_recbole_wheel(cache: str | Path) -> Path:
    """The RecBole wheel in `cache`, downloaded with pip when absent; sha256-checked."""
    cache = Path(cache)
    wheel = cache / RECBOLE_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log.info("downloading recbole==%s (MovieLens-100K inside) into %s", RECBOLE_VERSION, cache)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"recbole=={RECBOLE_VERSION}", "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download recbole=={RECBOLE_VERSION} with pip ({last}); "
                            f"put {RECBOLE_WHEEL} into {cache} by hand or pass --cache")
    else:
        log.info("using cached %s", wheel)
    digest = utils.sha256_file(wheel)
    if digest != RECBOLE_SHA256:
        raise UserError(f"{wheel}: sha256 {digest} is not the pinned {RECBOLE_SHA256} "
                        "(corrupt or truncated download: delete it and run again)")
    return wheel


def read_zip_member(zip_path: Path, member: str, sha256: str | None = None) -> bytes:
    """One member of a zip file, optionally sha256-checked; a broken zip is a UserError."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            data = z.read(member)
    except KeyError:
        raise UserError(f"{zip_path}: has no member {member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise UserError(f"{zip_path}: not a readable zip file ({e})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{zip_path}: member {member} does not match its pinned sha256")
    return data


def parse_atomic(text: str, where: str, columns: Sequence[str]) -> list[list[str]]:
    """RecBole atomic file (tab separated, header `name:type`): the requested columns per row."""
    lines = text.splitlines()
    if not lines:
        raise UserError(f"{where}: empty file")
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{where}: header lacks column(s) {', '.join(missing)}")
    idx = [header.index(c) for c in columns]
    rows = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(header):
            raise UserError(f"{where}: line {n}: {len(parts)} fields, expected {len(header)}")
        rows.append([parts[i] for i in idx])
    return rows


ML100K_MEMBERS = {
    "inter": ("recbole/dataset_example/ml-100k/ml-100k.inter",
              "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
    "item": ("recbole/dataset_example/ml-100k/ml-100k.item",
             "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
}
ML100K_VERSION = "ml-100k/2"  # the task sequence below; bump it whenever a task changes
ML100K_NAMES = ("watch", "next_watch", "like", "genre", "liked", "decade")


@dataclass
class Ml100kConfig:
    """The ml-100k/2 protocol's knobs: T1 windows, the source length of T2-T6, the stride of
    their cut points, and how many future movies T2, T3 and T4 look at."""
    window: int = 20
    src_len: int = 20
    stride: int = 10
    targets: int = 2
    horizon: int = 10
    like_min: int = 4


def ml100k_movies(item_rows: Sequence[Sequence[str]], where: str = "ml-100k.item"
                  ) -> tuple[dict[int, list[str]], dict[int, int]]:
    """(item_id, release_year, class) rows -> genres and release decade per movie; the genre
    'unknown' and non-numeric years are left out."""
    genre, decade = {}, {}
    for n, (item, year, classes) in enumerate(item_rows, 2):
        try:
            movie = int(item)
        except ValueError:
            raise UserError(f"{where}: line {n}: item id {item[:40]!r} is not an integer") from None
        genre[movie] = [g for g in classes.split() if g != "unknown"]
        if year.isdigit():
            decade[movie] = int(year) // 10 * 10
    return genre, decade


def ml100k_tasks(inter_rows: Sequence[Sequence[str]], item_rows: Sequence[Sequence[str]],
                 config: Ml100kConfig = Ml100kConfig(), where: str = "ml-100k.inter"
                 ) -> tuple[list[Task], dict[str, list]]:
    """The ml-100k/2 task sequence from (user_id, item_id, rating, timestamp) and (item_id,
    release_year, class) string rows; the same pure function for tests and the real data.

    Each user's ratings in time order (ties by item id); the first floor(70%) are the history.
    T1 watch: histories in non-overlapping windows of `window`. Cut points p = h, h + stride, ...
    inside the future part; the source of T2-T6 is the last `src_len` movies before p that T1
    knows. T2 next_watch: the next `targets` movies. T3 like: the first `targets` movies rated
    >= `like_min` among the next `horizon`. T4 genre: the most frequent genre of the next
    `horizon` movies (ties by name). T5 liked: movie p-1 (the source's last) rated >= `like_min`.
    T6 decade: the release decade of movie p-1.
    Returns the tasks and the class names of T4 and T6 (class id = position)."""
    try:
        arr = np.array([[float(x) for x in r] for r in inter_rows], dtype=np.float64).reshape(-1, 4)
    except ValueError:
        raise UserError(f"{where}: a user_id, item_id, rating or timestamp is not a number") from None
    ids = arr[:, :2]
    if (ids != np.floor(ids)).any() or (ids[:, 1] < 1).any():
        raise UserError(f"{where}: user and item ids must be integers, item ids >= 1")
    genre_of, decade_of = ml100k_movies(item_rows)
    splits = list(split_users(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], arr[:, 3]))
    if not splits:
        raise UserError(f"{where}: no user has at least 2 ratings")
    t1 = np.concatenate([windows(sp.hist, config.window) for sp in splits])
    known = set(np.unique(t1).tolist()) - {0}
    rows: dict[str, tuple[list, list]] = {name: ([], []) for name in ML100K_NAMES[1:]}
    users: dict[str, set] = {name: set() for name in ML100K_NAMES[1:]}

    def add(name: str, user: int, src: np.ndarray, labels: list) -> None:
        if labels:
            rows[name][0].append(src)
            rows[name][1].append(labels)
            users[name].add(user)

    for sp in splits:
        seq = np.concatenate([sp.hist, sp.future])
        ratings = np.concatenate([sp.hist_ratings, sp.future_ratings])
        in_t1 = np.fromiter((x in known for x in seq.tolist()), dtype=bool, count=len(seq))
        for p in range(len(sp.hist), len(seq), config.stride):
            before = seq[:p][in_t1[:p]]
            if len(before) < 2:
                continue
            src = left_pad(before, config.src_len)
            ahead = slice(p, p + config.horizon)
            add("next_watch", sp.user, src, seq[p:p + config.targets].tolist())
            add("like", sp.user, src, seq[ahead][ratings[ahead] >= config.like_min][:config.targets].tolist())
            add("genre", sp.user, src, favourite([g for x in seq[ahead].tolist() for g in genre_of.get(x, [])]))
            if in_t1[p - 1]:  # the source ends with movie p-1
                add("liked", sp.user, src, [int(ratings[p - 1] >= config.like_min)])
                add("decade", sp.user, src, [decade_of[seq[p - 1]]] if seq[p - 1] in decade_of else [])
    names = {"genre": sorted({g[0] for g in rows["genre"][1]}),
             "decade": sorted({d[0] for d in rows["decade"][1]})}
    for task, labels in names.items():
        index = {label: i for i, label in enumerate(labels)}
        rows[task] = (rows[task][0], [[index[x] for x in t] for t in rows[task][1]])
    tasks = [Task("watch", t1, None, len(splits))]
    for name in ML100K_NAMES[1:]:
        if not rows[name][0]:
            raise UserError(f"{where}: task {name}: no example qualifies, the data are too small")
        tasks.append(Task(name, np.stack(rows[name][0]), rows[name][1], len(users[name])))
    return tasks, names


def favourite(labels: list[str]) -> list[str]:
    """[the most frequent label, ties by name], or [] for no label."""
    if not labels:
        return []
    names, counts = np.unique(labels, return_counts=True)
    return [str(names[np.argmax(counts)])]


def ml100k_protocol(config: Ml100kConfig, names: dict[str, list]) -> str:
    c = config
    return (
        f"{ML100K_VERSION}: MovieLens-100K (RecBole {RECBOLE_VERSION} copy). Each user's ratings "
        "are sorted by timestamp (ties by item id); the first floor(70%) are the history, the rest "
        f"the future. T1 watch: each history cut into non-overlapping windows of {c.window} items "
        "from the most recent (only the oldest is left-padded with 0). T2-T6 share cut points "
        f"p = h, h+{c.stride}, h+{2 * c.stride}, ... inside each user's future (h = history length); "
        f"their source is the last {c.src_len} movies before p that occur in T1 (left-padded). "
        f"T2 next_watch: the next {c.targets} movies. T3 like: the first {c.targets} movies rated "
        f">= {c.like_min} among the next {c.horizon} (cut points without one dropped). T4 genre: the "
        f"most frequent genre among all genres of the next {c.horizon} movies, ties by name (class "
        f"ids in the order {names['genre']}). T5 liked: whether the source's last movie was rated "
        f">= {c.like_min} (1) or lower (0). T6 decade: the release decade of the source's last movie "
        f"(class ids in the order {names['decade']}). T5 and T6 use only cut points whose movie p-1 "
        "occurs in T1; the genre 'unknown' is ignored and T6 drops movies without a year.")


def prepare_ml100k(out_dir: str | Path, cache: str | Path, config: Ml100kConfig = Ml100kConfig()) -> Path:
    """Fetch (or reuse) the RecBole wheel, derive the ml-100k/2 tasks, write them; manifest path."""
    wheel = fetch_recbole_wheel(cache)
    texts = {key: read_zip_member(wheel, member, digest).decode("utf-8")
             for key, (member, digest) in ML100K_MEMBERS.items()}
    inter = parse_atomic(texts["inter"], f"{wheel}!{ML100K_MEMBERS['inter'][0]}",
                         ["user_id", "item_id", "rating", "timestamp"])
    movies = parse_atomic(texts["item"], f"{wheel}!{ML100K_MEMBERS['item'][0]}",
                          ["item_id", "release_year", "class"])
    tasks, names = ml100k_tasks(inter, movies, config)
    c = config
    command = (f"python prepare_data.py ml-100k --out {shlex.quote(str(out_dir))} --cache "
               f"{shlex.quote(str(cache))} --window {c.window} --src_len {c.src_len} --stride {c.stride} "
               f"--targets {c.targets}")
    return write_dataset(out_dir, "ml-100k", ml100k_protocol(config, names), tasks, command, ML100K_VERSION)


# ----------------------------------------------------------------------------------- ml-25m

ML25M_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
RATINGS_DTYPE = np.dtype([("user", np.int32), ("item", np.int32), ("rating", np.float32),
                          ("ts", np.int64)])  # 20 bytes a rating: 25M ratings in 0.5 GB
CHUNK_LINES = 1 << 20
NO_GENRE = "(no genres listed)"
EARLIEST_DECADE = 1920  # decades before the 1920s are merged into the 1920s class


class _Source:
    """`ratings.csv` and `movies.csv` from a folder or from a zip (e.g. the official ml-25m.zip)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            return
        if not self.path.is_file():
            raise UserError(f"{self.path}: --source not found (give ml-25m.zip or a folder with "
                            "ratings.csv and movies.csv)")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(f"{self.path}: not a readable zip file ({e})") from None

    def name(self, base: str) -> str:
        """Where a member is, for messages and for opening."""
        if self.zip is None:
            f = self.path / base
            if not f.is_file():
                raise UserError(f"{f}: not found")
            return str(f)
        hits = sorted(n for n in self.zip.namelist() if n == base or n.endswith("/" + base))
        if not hits:
            raise UserError(f"{self.path}: the zip holds no {base}")
        return min(hits, key=len)

    def open(self, base: str) -> tuple[io.TextIOBase, str]:
        member = self.name(base)
        if self.zip is None:
            return open(member, encoding="utf-8", newline=""), member
        try:
            raw = self.zip.open(member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise UserError(f"{self.path}: the zip is corrupt or truncated ({e})") from None
        return io.TextIOWrapper(raw, encoding="utf-8", newline=""), f"{self.path}!{member}"

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


_BROKEN = (zipfile.BadZipFile, zlib.error, EOFError)


def read_ratings(src: _Source) -> np.ndarray:
    """ratings.csv as a structured array (user, item, rating, ts), read in chunks of lines."""
    f, where = src.open("ratings.csv")
    chunks = []
    try:
        with f:
            header = f.readline().strip().split(",")
            if tuple(h.strip() for h in header) != ML25M_RATING_COLUMNS:
                raise UserError(f"{where}: line 1: header must be {','.join(ML25M_RATING_COLUMNS)}")
            first = 2
            while True:
                lines = list(itertools.islice(f, CHUNK_LINES))
                if not lines:
                    break
                try:
                    chunks.append(np.loadtxt(lines, delimiter=",", dtype=RATINGS_DTYPE, ndmin=1))
                except ValueError:
                    raise UserError(_bad_rating_line(lines, first, where)) from None
                first += len(lines)
    except _BROKEN as e:
        raise UserError(f"{where}: the zip is corrupt or truncated ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=RATINGS_DTYPE)
    if len(data) == 0:
        raise UserError(f"{where}: no ratings")
    if (data["item"] < 1).any():
        raise UserError(f"{where}: movieId must be >= 1 (0 is the padding id)")
    return data


def _bad_rating_line(lines: list[str], first: int, where: str) -> str:
    """The message for the first line of a chunk that does not parse."""
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            np.loadtxt([line], delimiter=",", dtype=RATINGS_DTYPE, ndmin=1)
        except ValueError:
            text = line.strip()[:80]
            return (f"{where}: line {n}: expected userId,movieId,rating,timestamp "
                    f"(integers, a number, an integer), got {text!r}")
    return f"{where}: lines {first}..{first + len(lines) - 1}: malformed"


def read_movies(src: _Source) -> tuple[dict[int, list[str]], dict[int, int]]:
    """movies.csv: genres per movieId (without '(no genres listed)') and release year (when the
    title ends with '(YYYY)')."""
    f, where = src.open("movies.csv")
    genres: dict[int, list[str]] = {}
    years: dict[int, int] = {}
    year_re = re.compile(r"\((\d{4})\)\s*$")
    try:
        with f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header] != ["movieId", "title", "genres"]:
                raise UserError(f"{where}: line 1: header must be movieId,title,genres")
            for n, row in enumerate(rows, 2):
                if not row:
                    continue
                if len(row) != 3:
                    raise UserError(f"{where}: line {n}: {len(row)} fields, expected 3")
                try:
                    movie = int(row[0])
                except ValueError:
                    raise UserError(f"{where}: line {n}: movieId {row[0]!r} is not an integer") \
                        from None
                genres[movie] = [g for g in row[2].split("|") if g and g != NO_GENRE]
                m = year_re.search(row[1])
                if m:
                    years[movie] = int(m.group(1))
    except _BROKEN as e:
        raise UserError(f"{where}: the zip is corrupt or truncated ({e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{where}: unreadable ({e})") from None
    return genres, years


def ml25m_profiles(genres: dict[int, list[str]], years: dict[int, int],
                   max_item: int) -> tuple[list[tuple[str, ProfileFn]], list[str], list[int]]:
    """Favourite future genre, history mean-rating band, favourite future decade. Returns the
    profile functions, the genre names (class id = position) and the decades (class id = position)."""
    names = sorted({g for gs in genres.values() for g in gs})
    if len(names) > 20:
        raise UserError(f"movies.csv: {len(names)} genres; the genre task allows at most 20 classes")
    gid = {g: i for i, g in enumerate(names)}
    size = max(max_item, max(genres, default=0), max(years, default=0)) + 1
    gmask = np.zeros((size, max(len(names), 1)), dtype=np.int32)
    for movie, gs in genres.items():
        if movie >= 0:
            for g in gs:
                gmask[movie, gid[g]] = 1
    decades = np.full(size, -1, dtype=np.int64)
    for movie, y in years.items():
        if movie >= 0:
            decades[movie] = max(y // 10 * 10, EARLIEST_DECADE)
    decade_list = sorted(int(d) for d in np.unique(decades[decades >= 0]))
    decade_id = {d: i for i, d in enumerate(decade_list)}
    if len(decade_list) > 20:
        raise UserError(f"movies.csv: release years span {len(decade_list)} decades (max 20)")

    def genre(sp: UserSplit) -> int | None:
        counts = gmask[sp.future].sum(axis=0)
        return int(np.argmax(counts)) if counts.max() > 0 else None  # ties: first name

    def band(sp: UserSplit) -> int:
        return int(np.clip(np.floor(float(np.mean(sp.hist_ratings)) - 0.5), 0, 4))

    def decade(sp: UserSplit) -> int | None:
        d = decades[sp.future]
        d = d[d >= 0]
        if len(d) == 0:
            return None
        vals, counts = np.unique(d, return_counts=True)
        return decade_id[int(vals[np.argmax(counts)])]  # ties: earliest decade

    return [("genre", genre), ("rating_band", band), ("decade", decade)], names, decade_list


def ml25m_tasks(ratings: np.ndarray, genres: dict[int, list[str]], years: dict[int, int], *,
                window: int = 20, src_len: int = 50, targets: int = 5) -> tuple[list[Task], str]:
    """The ML-25M protocol on a structured ratings array; returns the tasks and protocol text."""
    profiles, names, decades = ml25m_profiles(genres, years, int(ratings["item"].max()))
    tasks = movielens_tasks(ratings["user"], ratings["item"], ratings["rating"], ratings["ts"],
                            profiles, window=window, src_len=src_len, targets=targets,
                            like_min=4.5)
    text = movielens_protocol_text(
        "MovieLens-25M (our protocol; the authors never published theirs)", window, src_len,
        targets, "rated >= 4.5",
        "T4 genre: the most frequent genre among the user's future movies (movies.csv, "
        f"'{NO_GENRE}' ignored, ties by name; class id = position in the sorted genre list "
        f"{names}; users whose future movies have no genre dropped). T5 rating_band: the mean "
        "rating of the history in 5 bands [0.5,1.5), [1.5,2.5), [2.5,3.5), [3.5,4.5), [4.5,5] "
        "(class ids 0..4). T6 decade: the most frequent release decade (year at the end of the "
        f"title) among the future movies, ties by the earlier decade, before {EARLIEST_DECADE} "
        f"merged into {EARLIEST_DECADE}s; class id = position in {decades}. Profile sources are "
        "the T2 sources.")
    return tasks, text


def prepare_ml25m(out_dir: str | Path, source: str | Path, window: int = 20, src_len: int = 50,
                  targets: int = 5) -> Path:
    """Read MovieLens-25M (zip or folder), derive the tasks, write them; manifest path."""
    src = _Source(source)
    try:
        log.info("reading %s", source)
        genres, years = read_movies(src)
        ratings = read_ratings(src)
    finally:
        src.close()
    log.info("%d ratings, %d movies in movies.csv", len(ratings), len(genres))
    tasks, text = ml25m_tasks(ratings, genres, years, window=window, src_len=src_len,
                              targets=targets)
    del ratings
    command = (f"python prepare_data.py ml-25m --out {shlex.quote(str(out_dir))} --source "
               f"{shlex.quote(str(source))} --window {window} --src_len {src_len} --targets {targets}")
    return write_dataset(out_dir, "ml-25m", text, tasks, command)


