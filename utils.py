"""Shared helpers: errors for the command line, atomic file writes, seeding, device choice,
checkpoint I/O, logging and the ranking/classification metrics of SPEC 6."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("teracon")

RANKING_MIN_CLASSES = 21  # more than 20 classes: ranking metrics; otherwise accuracy (SPEC 6)
TOPK = (5, 20)


class UserError(Exception):
    """A problem with the user's input (file, flag, checkpoint): reported as one line, exit 2."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's `main`, turning a UserError into one `error:` line and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; files already written are complete, nothing is half-written",
              file=sys.stderr)
        sys.exit(130)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


# ---------------------------------------------------------------------------------- files

def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **({"newline": "\n"} if "b" not in mode else {})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by `atomic_torch_save`; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (train the previous task first, or pass --paths)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("state_dict", "config", "tasks", "item_index", "args")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a TERACON checkpoint (no {', '.join(missing)})")
    return ckpt


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__}


# ------------------------------------------------------------------------- seeds, devices

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cpu`, `cuda`, `cuda:N` are taken as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return device


# -------------------------------------------------------------------------------- metrics

def metric_kind(num_classes: int) -> str:
    return "ranking" if num_classes >= RANKING_MIN_CLASSES else "accuracy"


def rank_of_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: how many classes score strictly higher than it."""
    target_score = logits.gather(1, targets.view(-1, 1))
    return (logits > target_score).sum(dim=1)


def metric_sums(ranks: torch.Tensor, kind: str) -> dict[str, float]:
    """Per-batch sums of the SPEC 6 metrics from 0-based ranks; divide by the count later."""
    r = ranks.double()
    out = {"hit@1": (r < 1).sum().item()}
    if kind == "accuracy":
        out["accuracy"] = out["hit@1"]
        return out
    for k in TOPK:
        top = r < k
        out[f"mrr@{k}"] = torch.where(top, 1.0 / (r + 1), 0.0).sum().item()
        out[f"hr@{k}"] = top.sum().item()
        out[f"ndcg@{k}"] = torch.where(top, 1.0 / torch.log2(r + 2), 0.0).sum().item()
    return out


def metrics_from_ranks(ranks: torch.Tensor, kind: str) -> dict[str, float]:
    """MRR/HR/NDCG at 5 and 20 plus hit@1 for ranking tasks, accuracy (= hit@1) otherwise."""
    n = max(len(ranks), 1)
    return {k: v / n for k, v in metric_sums(ranks, kind).items()}
