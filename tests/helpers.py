"""Shared helpers of the test suite: tiny synthetic task files and a script runner.

The synthetic data have learnable structure: items follow a fixed cycle, so the next item,
the click target and the class label are functions of the last item of the source.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_ITEMS = 30
SEQ_LEN = 8


def raw_item(k: int) -> int:
    """Raw id of the k-th item: not contiguous and not starting at 1, to exercise the index."""
    return 1000 + 13 * k


def _sequence(rng: np.random.Generator, length: int, num_items: int) -> tuple[list[int], int]:
    """A left-padded cycle walk; returns (raw ids, cycle position of the last item)."""
    pad = int(rng.integers(0, 3))
    start = int(rng.integers(0, num_items))
    ks = [(start + j) % num_items for j in range(length - pad)]
    return [0] * pad + [raw_item(k) for k in ks], ks[-1]


def write_task1(path: Path, lines: int = 200, length: int = SEQ_LEN, num_items: int = NUM_ITEMS,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [",".join(map(str, _sequence(rng, length, num_items)[0])) for _ in range(lines)]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_task_ranking(path: Path, lines: int = 200, length: int = SEQ_LEN, num_items: int = NUM_ITEMS,
                       seed: int = 1) -> Path:
    """Task-n file whose targets are item ids (about 30 classes: ranking metrics); every
    fourth line has two targets."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(lines):
        seq, k = _sequence(rng, length, num_items)
        targets = [raw_item((k + 1) % num_items)]
        if i % 4 == 0:
            targets.append(raw_item((k + 2) % num_items))
        rows.append(",".join(map(str, seq)) + ",," + ",".join(map(str, targets)))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_task_classes(path: Path, lines: int = 200, length: int = SEQ_LEN, num_items: int = NUM_ITEMS,
                       seed: int = 2) -> Path:
    """Task-n file with 3 classes (raw labels 5, 7, 9): accuracy metric."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(lines):
        seq, k = _sequence(rng, length, num_items)
        rows.append(",".join(map(str, seq)) + ",," + str((5, 7, 9)[k % 3]))
    path.write_text("\n".join(rows) + "\n")
    return path


def run_script(script: str, *args: str, cwd: Path | str | None = None, timeout: float = 300,
               env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a repository script with this interpreter (`env`: extra environment variables);
    returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    return proc.returncode, proc.stdout, proc.stderr


def run_script_in_process(script: str, *args: str, cwd: Path | str | None = None) -> tuple[int, str, str]:
    """`run_script` without the new interpreter: runs the script file as `__main__` (its own
    `if __name__ == "__main__"` block, so `utils.run_cli`'s error handling included) with
    `sys.argv` set, in `cwd`, and returns (exit status, stdout, stderr) as the process would:
    stdout and stderr are captured, log records go to stderr as `logging.basicConfig` sends
    them (INFO and up), Python warnings are printed to stderr under the interpreter's default
    filters. An exception that would have ended the process with a traceback propagates.
    Saves the ~2.5 s that each new interpreter spends importing torch."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    saved_level, saved_argv, saved_cwd = root.level, sys.argv, os.getcwd()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                 ("ignore", ImportWarning), ("ignore", ResourceWarning)):
            warnings.simplefilter(action, category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        sys.argv = [str(ROOT / script), *map(str, args)]
        try:
            if cwd is not None:
                os.chdir(cwd)
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code + "\n")
        finally:
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            root.removeHandler(handler)
            root.setLevel(saved_level)
    return rc, out.getvalue(), err.getvalue()


def in_process_runner(calls: list[list[str]], task1_flags: list[str]):
    """A stand-in for reproduce's `subprocess.run`: runs the training script's `cli.main` in this
    process with the argv reproduce built (saves ~6 s of interpreter and torch start-up per
    stage), recorded in `calls` as built; task 1 stages get `task1_flags` appended (the last
    value of a flag wins: e.g. a small model instead of the preset's; later stages take the
    checkpoint's). A UserError becomes exit status 2, as in the scripts; anything else
    (KeyboardInterrupt included) propagates."""
    import cli
    from utils import UserError

    def run(cmd, *args, **kwargs):
        assert not args and not kwargs and cmd[0] == sys.executable
        script, argv = Path(cmd[1]), list(cmd[2:])
        assert script.parent == ROOT and script.name in ("train_task1.py", "train_teracon.py"), cmd
        calls.append([script.name, *argv])
        try:
            cli.main([*argv, *task1_flags], task=1) if script.name == "train_task1.py" else cli.main(argv)
        except UserError:
            return subprocess.CompletedProcess(cmd, 2)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden temporary files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def relation_masks_by_hand(model, s: float):
    """The paper's relation-aware masks (eq. 12-13, SPEC 4) of every task of a NextItNet, computed
    here in float64 from its parameters one task and masked layer at a time:
    E_t = [e_t; e_j; -e_j for every j != t, in increasing j] (rows), h = tanh(s * E_t),
    a = w_t . h + b_t for every channel, m = sigmoid(s * a). Returns [T, M, C] float64."""
    import torch

    e = model.task_masks.task_embedding.detach().double()   # [T, M, C]
    w = model.task_masks.relation_weight.detach().double()  # [T, M, 2T-1]
    b = model.task_masks.relation_bias.detach().double()    # [T, M]
    tasks, layers, channels = e.shape
    out = torch.empty(tasks, layers, channels, dtype=torch.float64)
    for t in range(tasks):
        for m in range(layers):
            rows = [e[t, m]]
            for j in range(tasks):
                if j != t:
                    rows += [e[j, m], -e[j, m]]
            h = torch.tanh(s * torch.stack(rows))           # [2T-1, C]
            a = (w[t, m][:, None] * h).sum(dim=0) + b[t, m]  # [C]
            out[t, m] = 1.0 / (1.0 + torch.exp(-s * a))
    return out
