"""Shared helpers: errors for the command line, atomic file writes, seeding, device choice,
checkpoint I/O, logging and the ranking/classification metrics of SPEC 6."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

log = logging.getLogger("teracon")

RANKING_MIN_CLASSES = 21  # more than 20 classes: ranking metrics; otherwise accuracy (SPEC 6)
TOPK = (5, 20)
MAX_SEED = 2**32 - 1       # numpy's RandomState takes seeds in [0, 2**32 - 1]
MAX_ERROR_CHARS = 500      # an error line longer than this is cut


class UserError(Exception):
    """A problem with the user's input (file, flag, checkpoint): reported as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """Argparse whose mistakes (a wrong flag or value) are one `error:` line through `run_cli`,
    not a usage block."""
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's `main`, turning a UserError into one `error:` line and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except UserError as e:
        print(f"error: {clip(str(e), MAX_ERROR_CHARS)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. an output folder that cannot be written: one line, no traceback
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"error: {clip(where + (e.strerror or str(e)), MAX_ERROR_CHARS)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; files already written are complete, nothing is half-written",
              file=sys.stderr)
        sys.exit(130)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def clip(text: str, limit: int = 40) -> str:
    """`text`, or its first `limit` characters and how long it was: user text in a message stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quote(token: str, limit: int = 40) -> str:
    """repr() of a user's token, cut as `clip` does."""
    return repr(token) if len(token) <= limit else f"{token[:limit]!r}... ({len(token)} characters)"


# --------------------------------------------------------------------------- flag types

def finite_float(flag: str, positive: bool = False, nonnegative: bool = False) -> Callable[[str], float]:
    """argparse `type` for a float flag: finite (and positive or non-negative if asked), or a
    UserError naming the flag, e.g. `--lr inf: must be a finite number`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{flag} {clip(text)}: not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{flag} {clip(text)}: must be a finite number")
        if positive and value <= 0:
            raise UserError(f"{flag} {clip(text)}: must be positive")
        if nonnegative and value < 0:
            raise UserError(f"{flag} {clip(text)}: must be non-negative")
        return value
    return parse


def seed_type(flag: str = "--seed") -> Callable[[str], int]:
    """argparse `type` for a seed: an integer in [0, 2**32 - 1] (numpy's limit), or a UserError naming `flag`."""
    def parse(text: str) -> int:
        message = f"{flag} {clip(text)}: must be an integer from 0 to {MAX_SEED} (2**32 - 1)"
        if not re.fullmatch(r"\s*[+-]?\d{1,20}\s*", text):
            raise UserError(message)
        value = int(text)
        if not 0 <= value <= MAX_SEED:
            raise UserError(message)
        return value
    return parse


seed_int = seed_type("--seed")


def positive_int(flag: str) -> Callable[[str], int]:
    """argparse `type` for a count that must be at least 1, or a UserError naming `flag`."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*\+?\d{1,18}\s*", text) or int(text) < 1:
            raise UserError(f"{flag} {clip(text)}: must be an integer of at least 1")
        return int(text)
    return parse


# ---------------------------------------------------------------------------------- files

def _stale_temp_files(path: Path) -> list[Path]:
    """Temporary files `.NAME.<mkstemp's 8 characters>.tmp` that an interrupted write of `path` left."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    with os.scandir(path.parent) as entries:
        return [path.parent / e.name for e in entries
                if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file.
    Temporary files of an earlier, killed write of the same output are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temp_files(path):
        stale.unlink(missing_ok=True)
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


def require_file(path: str | Path, missing: str) -> Path:
    """`path` if it is a file; a folder or a missing path is a UserError (`PATH: {missing}`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    return path


def read_json(path: str | Path, what: str = "file") -> Any:
    path = require_file(path, f"{what} not found")
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of > 4300 digits
        raise UserError(f"{path}: not valid JSON ({clip(str(e), 200)})") from None


def _paths(value: str | Path | Iterable[str | Path] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [Path(value)]
    return [Path(v) for v in value]


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _unwritable_folder(path: Path) -> str | None:
    """Why an output file `path` could not be written (as a folder, below a file, in a read-only
    folder), or None; nothing is created."""
    if path.is_dir():
        return "is a directory, not a file"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Before any work: no output may be an input or another output (same file), and every output
    must be writable. Keys are the flags that name the paths (in messages); a value is a path, a
    list of paths or None."""
    written: list[tuple[str, Path]] = []
    for out_flag, out_value in outputs.items():
        for out in _paths(out_value):
            for other_flag, other in written:
                if _same_file(out, other):
                    raise UserError(f"{out_flag} {clip(str(out), 200)}: is also written as {other_flag} "
                                    f"{clip(str(other), 200)}; one would overwrite the other")
            written.append((out_flag, out))
            for in_flag, in_value in inputs.items():
                for inp in _paths(in_value):
                    if _same_file(out, inp):
                        raise UserError(f"{out_flag} {clip(str(out), 200)}: is the same file as {in_flag} "
                                        f"{clip(str(inp), 200)}; writing it would destroy that input")
            problem = _unwritable_folder(out)
            if problem:
                raise UserError(f"{out_flag} {clip(str(out), 200)}: cannot be written ({problem})")


def check_finite_model(model: torch.nn.Module, where: str) -> None:
    """UserError when any parameter holds NaN or inf (a diverged training must not be saved or scored)."""
    params = list(model.named_parameters())
    if not params:
        return
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
    if bool(finite.all()):
        return
    first = params[int((~finite).nonzero()[0])][0]
    raise UserError(f"{where}: parameters became non-finite (NaN or inf), first in {first}; "
                    "lower --lr")


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__}


def code_version(folder: str | Path = Path(__file__).resolve().parent) -> dict:
    """The git commit of the code in `folder` and whether its tracked files had uncommitted changes
    (None for both outside a git checkout): every run records which code produced it."""
    import subprocess
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20)
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0 or status.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


# ------------------------------------------------------------------------- seeds, devices

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AMP_MODES = ("fp32", "tf32", "bf16")


def set_precision(amp: str, device: torch.device, deterministic: bool = False) -> dict:
    """Set every precision switch explicitly and return them, to be recorded with the run.

    fp32: full fp32 matmuls and convolutions (cuDNN's TF32 default off); tf32: matmuls and cuDNN
    convolutions in TF32 on Ampere or newer GPUs (what the authors' PyTorch 1.7 did by default
    there; SPEC 8), the same as fp32 on a CPU; bf16: bf16 autocast, TF32 off. `deterministic`
    asks for bitwise-reproducible kernels (CUDA: deterministic algorithms, cuBLAS workspace,
    cuDNN without autotuning)."""
    if amp not in AMP_MODES:
        raise UserError(f"--amp {amp}: must be one of {', '.join(AMP_MODES)}")
    tf32 = amp == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False  # shapes vary (last batch, retention subsets)
    return {"amp": amp, "device": str(device), "autocast_dtype": "bfloat16" if amp == "bf16" else None,
            "matmul_tf32": tf32 and device.type == "cuda", "cudnn_tf32": tf32 and device.type == "cuda",
            "deterministic": deterministic}


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
    """0-based rank of each target: how many other classes score higher than it or equal to it.
    Ties count against the target, so a model with constant scores ranks every target last and
    a collapsed model cannot look perfect (the authors' top-k breaks ties by index instead). A
    NaN score of another class never beats the target; a non-finite target score ranks last."""
    target_score = logits.gather(1, targets.view(-1, 1))
    ranks = (logits >= target_score).sum(dim=1) - 1  # NaN >= x is False: NaN classes count as -inf
    return torch.where(torch.isfinite(target_score.view(-1)), ranks, logits.shape[1])


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
