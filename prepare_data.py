"""Write a dataset's task files in the CONURE/TERACON format (SPEC 1), a manifest, statistics and
the prepared cache. The command line; each dataset lives in its module under `datasets/`.

    python prepare_data.py ml-100k                      # real data, fetched from RecBole's PyPI wheel
    python prepare_data.py ml-25m --source ml-25m.zip   # user-supplied MovieLens-25M
    python prepare_data.py ttl --source DIR             # validate the six CONURE Tencent files
    python prepare_data.py synthetic --users 200        # small generated data with learnable signal
    python prepare_data.py ttl-shape --lines 20000      # generated data with TTL's published shapes

Every dataset lands in `Data/<dataset>/` (`--out DIR` overrides) as task files plus `tasks.json`
(the manifest the training scripts read), `stats.md` (the statistics table, also logged) and
`cache/` (each task's parsed and mapped arrays as .npy, which data_loader reads instead of the
CSV while the file's sha256 matches). `ttl` writes no task files: its manifest points at the
originals. Every file is written through a temporary name and renamed, so none is left half-written.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import utils
from datasets import ttl_shape
# re-exported: tests and scripts import these names from prepare_data
from datasets.common import (MANIFEST, STATS, Task, flatten_targets, format_sequences,  # noqa: F401
                             format_task_lines, left_pad, task_lines, task_stats, windows, write_dataset,
                             write_manifest)
from datasets.movielens import (ML100K_MEMBERS, ML100K_NAMES, ML100K_VERSION, RECBOLE_WHEEL,  # noqa: F401
                                Ml100kConfig, ml25m_tasks, ml100k_movies, ml100k_tasks, movielens_tasks,
                                parse_atomic, prepare_ml25m, prepare_ml100k)
from datasets.synthetic import make_synthetic, synthetic_tasks  # noqa: F401
from datasets.ttl import prepare_ttl
from utils import UserError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _classes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(values) != 5 or min(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: need five counts (tasks 2-6), each at least 2")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per dataset."""
    parser = argparse.ArgumentParser(
        description="Write a dataset's TERACON task files, tasks.json manifest, stats.md and prepared cache.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{ml-100k,ml-25m,ttl,synthetic,ttl-shape}")

    def common(p: argparse.ArgumentParser, name: str) -> None:
        p.add_argument("--out", default=None,
                       help=f"output folder (default Data/{name})")

    def movielens(p: argparse.ArgumentParser, src_len: int, targets: int) -> None:
        p.add_argument("--window", type=_positive, default=20,
                       help="T1 window length: histories are cut into non-overlapping windows of "
                            "this many items (default 20)")
        p.add_argument("--src_len", type=_positive, default=src_len,
                       help=f"source length of T2..T6 (default {src_len})")
        p.add_argument("--targets", type=_positive, default=targets,
                       help=f"at most this many future movies as next_watch / like targets "
                            f"(default {targets})")

    p = sub.add_parser("ml-100k", help="MovieLens-100K from RecBole's PyPI wheel (downloaded once), "
                       f"protocol {ML100K_VERSION}")
    common(p, "ml-100k")
    movielens(p, Ml100kConfig.src_len, Ml100kConfig.targets)
    p.add_argument("--stride", type=_positive, default=Ml100kConfig.stride,
                   help=f"movies between two cut points of T2-T6 (default {Ml100kConfig.stride})")
    p.add_argument("--cache", default="Data/.cache",
                   help="folder for the downloaded recbole wheel (default Data/.cache)")

    p = sub.add_parser("ml-25m", help="MovieLens-25M from ml-25m.zip or its unpacked folder")
    common(p, "ml-25m")
    movielens(p, 50, 5)
    p.add_argument("--source", required=True,
                   help="ml-25m.zip, or a folder with ratings.csv and movies.csv")

    p = sub.add_parser("ttl", help="validate the six CONURE Tencent (TTL) files, write a manifest and their cache")
    common(p, "ttl")
    p.add_argument("--source", required=True, help="folder holding the six original_desen_*.csv files")

    p = sub.add_parser("synthetic", help="small generated data with learnable signal (for tests)")
    common(p, "synthetic")
    p.add_argument("--users", type=_positive, default=200, help="number of users (default 200)")
    p.add_argument("--items", type=_positive, default=40, help="number of items (default 40)")
    p.add_argument("--seq_len", type=_positive, default=10, help="sequence length (default 10)")
    p.add_argument("--tasks", type=_positive, default=6, help="number of tasks, >= 2 (default 6)")
    p.add_argument("--seed", type=utils.seed_type("--seed"), default=0, help="random seed (default 0)")

    p = sub.add_parser("ttl-shape", help="synthetic data with TTL's published shapes under TTL's file names "
                       "(645,974-item head, 17,879/7,539/8/2/6 classes, length 100)")
    common(p, "ttl-shape")
    p.add_argument("--lines", type=_positive, default=ttl_shape.DEFAULT_LINES,
                   help=f"lines per task (default {ttl_shape.DEFAULT_LINES:,}; TTL's counts are not "
                        "published); task 1 must have room for every item")
    p.add_argument("--seed", type=utils.seed_type("--seed"), default=0, help="random seed (default 0)")
    p.add_argument("--items", type=_positive, default=ttl_shape.TTL_ITEMS,
                   help=f"distinct non-zero items, all of them in task 1; the head adds padding "
                        f"(default {ttl_shape.TTL_ITEMS:,}: TTL's head of {ttl_shape.TTL_HEADS[0]:,}); "
                        "smaller for tests")
    p.add_argument("--classes", type=_classes, default=ttl_shape.TTL_CLASSES,
                   help="target classes of tasks 2-6, comma-separated (default "
                        f"{','.join(map(str, ttl_shape.TTL_CLASSES))}: TTL's heads less one <UNK> each)")
    p.add_argument("--seq_len", type=_positive, default=ttl_shape.TTL_SEQ_LEN,
                   help=f"sequence length, left-padded (default {ttl_shape.TTL_SEQ_LEN})")
    p.add_argument("--clusters", type=_positive, default=ttl_shape.CLUSTERS,
                   help=f"latent user clusters carrying the learnable signal (default {ttl_shape.CLUSTERS})")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line and prepare the chosen dataset; returns the manifest path."""
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path("Data") / args.dataset
    try:
        return _prepare(args, out)
    except OSError as e:  # unwritable --out, disk full, unreadable input, ...
        where = e.filename or out
        raise UserError(f"{where}: {e.strerror or e}") from None


def _prepare(args: argparse.Namespace, out: Path) -> Path:
    if args.dataset == "ml-100k":
        config = Ml100kConfig(window=args.window, src_len=args.src_len, stride=args.stride, targets=args.targets)
        return prepare_ml100k(out, args.cache, config)
    if args.dataset == "ml-25m":
        return prepare_ml25m(out, args.source, args.window, args.src_len, args.targets)
    if args.dataset == "ttl":
        return prepare_ttl(out, args.source)
    if args.dataset == "ttl-shape":
        config = ttl_shape.ShapeConfig(lines=args.lines, items=args.items, classes=args.classes,
                                       seq_len=args.seq_len, clusters=args.clusters, seed=args.seed)
        return ttl_shape.make_ttl_shape(out, config)
    return make_synthetic(out, args.users, args.items, args.seq_len, args.tasks, args.seed)


if __name__ == "__main__":
    utils.run_cli(main)
