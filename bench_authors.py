#!/usr/bin/env python3
"""Side by side: one training step of the authors' public TERACON code and one of ours, at
identical shapes, in one process (issue #10, item 4).

The authors' code (github:Sein-Kim/TERACON) is imported, unchanged, from a checkout given by
`--authors`; nothing of it is copied here. Their modules are loaded from their files under
private module names (`authors_teracon`, ...), because their `teracon.py` and `utils.py`
share names with ours. The one run-time adaptation: while their step runs,
`torch.Tensor.get_device` returns the tensor's device (their mask code moves index tensors
to `Tensor.get_device`'s result, which is -1 on a CPU); 'cpu' is passed where they take a GPU
number. It is restored afterwards, so our step runs under plain torch.

What one step is, on both sides (random item ids; s = 25; Adam):

* task 1: the next-item cross-entropy on every position of `--batch1` sequences of
  `--length` positions over `--items` items. Authors: their `generator_hat_other`
  NextItNet, the loop body of their train_task1.py (no mask regulariser: it is commented out
  there). Ours: `teracon.Task1Step` (with the project's default mask regulariser 0.75, a
  mean over [1, 16, C] masks: negligible work).
* task n (`--task`, default 6, i.e. 5 past tasks): `--batch` sequences of `--length`
  positions, the new task's cross-entropy on the whole batch plus 0.7 x the rho-weighted MSE
  between student and frozen teacher logits of every past task on its random subset of
  floor(rho * batch) rows, rho = `--rho` for every past task. Authors: the loop body of their
  train_teracon.py (one teacher and one student pass per past task, task 1 on the sequences
  without their last item, then their `sample_ratio`). Ours: `teracon.RetentionStep` (its rho
  pinned to `--rho` before every call, since it updates rho itself).
* head sizes per task: items, 300, 200, 8, 2, 21, 10, ... (task 6's new head: 21 classes),
  the same on both sides.

Ours runs the project's own training-loop body (`trainer.train_step`, as `trainer.train`:
the loss under `trainer.autocast` for each `--amp`, zero_grad, backward, Adam, clamp of the
task embeddings). The authors' side is always fp32 (their code has no mixed precision).

Timing: one round runs every variant once (authors, then ours per `--amp`; the order is
reversed every other round so that drift in machine load hits both alike); `--warmup`
untimed rounds, then `--repeats` timed ones; the median is reported, with min-max.

Peak memory (unless `--no-memory`): every (case, variant) is run again in a fresh
subprocess that imports torch, builds that variant's models and batch, records its resident
set size (RSS), runs `--memory-steps` steps and reports the kernel's RSS high-water mark of
that process (`VmHWM` in /proc/self/status; not `getrusage().ru_maxrss`, which Linux carries
over from the parent across fork and exec and so would show the parent's peak). `peak` is
that whole-process high-water mark (Python, torch, models, optimizer state, activations);
`step` is peak minus the RSS before the first step, i.e. what the step itself adds. The
subprocesses run one at a time after the timing.

usage:
    python bench_authors.py --authors /tmp/teracon_authors --batch 1024 128 --amp fp32 bf16
    python bench_authors.py --authors DIR --cases task1 --repeats 5 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

AUTHORS_REPO = "https://github.com/Sein-Kim/TERACON"
AUTHORS_FILES = ("teracon.py", "generator_hat_other.py", "utils.py")
HEAD_SIZES = (300, 200, 8, 2, 21, 10, 10, 10, 10)  # heads of tasks 2, 3, ... (task 1: all items)
S_TRAIN = 25.0
ALPHA = 0.7
CASES = ("taskn", "task1")


# ------------------------------------------------------------------------ arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time one training step of the authors' TERACON code (imported unchanged from a "
        "checkout) and of ours at identical shapes, in one process; print both, the ratio "
        "authors/ours, and the peak memory of each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--authors", default=os.environ.get("TERACON_AUTHORS_DIR", "/tmp/teracon_authors"),
                   help="checkout of github:Sein-Kim/TERACON (env TERACON_AUTHORS_DIR)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which steps to time")
    p.add_argument("--batch", nargs="+", type=int, default=[1024], help="task-n batch size(s)")
    p.add_argument("--batch1", type=int, default=32, help="task-1 batch size")
    p.add_argument("--amp", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="precision(s) of our step (trainer.autocast); the authors' is fp32")
    p.add_argument("--task", type=int, default=6, help="task n of the task-n step (n-1 past tasks)")
    p.add_argument("--rho", type=float, default=0.05, help="sampling ratio of every past task")
    p.add_argument("--items", type=int, default=1426, help="items (task-1 head size)")
    p.add_argument("--length", type=int, default=50, help="positions a sequence is encoded over")
    p.add_argument("--channels", type=int, default=256, help="channels C")
    p.add_argument("--chunk_rows", type=int, default=-1, help="our task-n step's micro-batch rows, as the "
                   "training scripts' flag: -1 = auto (cli.auto_chunk_rows), 0 = one pass (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-steps", type=int, default=1, help="steps each memory subprocess runs")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("CASE", "BATCH", "VARIANT"), help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    problems = []
    if a.task < 2 or a.task > 1 + len(HEAD_SIZES):
        problems.append(f"--task {a.task}: must be in 2..{1 + len(HEAD_SIZES)}")
    if not 0.0 <= a.rho <= 1.0:
        problems.append(f"--rho {a.rho}: must be in [0, 1]")
    for key in ("batch1", "items", "channels", "repeats", "memory_steps"):
        if getattr(a, key) < 1:
            problems.append(f"--{key.replace('_', '-')} {getattr(a, key)}: must be at least 1")
    problems += [f"--batch {b}: must be at least 1" for b in a.batch if b < 1]
    if a.length < 2:
        problems.append(f"--length {a.length}: need at least 2")
    if a.chunk_rows < -1:
        problems.append(f"--chunk_rows {a.chunk_rows}: must be -1 (auto), 0 (one pass) or positive")
    if a.warmup < 0:
        problems.append(f"--warmup {a.warmup}: must be at least 0")
    if a.threads is not None and a.threads < 1:
        problems.append(f"--threads {a.threads}: must be at least 1")
    if problems:
        raise SystemExit("bench_authors.py: " + "; ".join(problems))
    a.amp = list(dict.fromkeys(a.amp))
    return a


def checkout_error(path: str) -> str | None:
    """None if `path` holds the authors' files, else a one-line message saying how to get them."""
    missing = [f for f in AUTHORS_FILES if not (Path(path) / f).is_file()]
    if not missing:
        return None
    return (f"error: no checkout of the authors' TERACON code at {path} (missing {', '.join(missing)}); "
            f"get it with `git clone {AUTHORS_REPO} {path}` and pass --authors {path}")


# ------------------------------------------------------------------------ the authors' side

def load_authors(path: str) -> dict:
    """Their modules, loaded from their files under private names (theirs are unchanged)."""
    mods = {}
    for name in ("generator_hat_other", "teracon", "utils"):
        spec = importlib.util.spec_from_file_location(f"authors_{name}", Path(path) / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


@contextlib.contextmanager
def tensor_get_device_is_device():
    """Their mask code moves tensors to `Tensor.get_device`'s result, -1 for a CPU tensor: return
    the device instead."""
    saved = torch.Tensor.get_device
    torch.Tensor.get_device = lambda self: self.device
    try:
        yield
    finally:
        torch.Tensor.get_device = saved


def head_sizes(items: int, tasks: int) -> list[int]:
    return [items, *HEAD_SIZES][:tasks]


def _model_para(a, sizes: list[int], num_task: int) -> dict:
    return {"item_size": a.items, "dilated_channels": a.channels, "dilations": [1, 4] * 4, "kernel_size": 3,
            "task_embs": [0, 2], "target_item_size": sizes, "num_task": num_task}


def authors_task1(a, mods: dict, batch: int):
    """Their train_task1.py loop body on one random batch: CE over every position, Adam."""
    torch.manual_seed(0)
    model = mods["generator_hat_other"].NextItNet_Decoder(_model_para(a, [a.items], 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0)
    seqs = torch.randint(1, a.items, (batch, a.length + 1))
    ce = nn.CrossEntropyLoss()

    def step():
        with tensor_get_device_is_device():
            opt.zero_grad()
            out, _ = model(seqs[:, :-1], S_TRAIN, [], 0, "cpu")
            loss = ce(out, seqs[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
    return step


def authors_taskn(a, mods: dict, batch: int):
    """Their train_teracon.py loop body on one random batch of task n = a.task."""
    torch.manual_seed(0)
    rng = random.Random(0)
    n = a.task
    sizes = head_sizes(a.items, n)
    net = mods["teracon"].NextItNet_Decoder
    model = net(_model_para(a, sizes, n))
    past = net(_model_para(a, sizes[:-1], n - 1))
    for q in past.parameters():
        q.requires_grad = False
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0)
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    seqs = torch.randint(1, a.items, (batch, a.length))
    target = torch.randint(0, sizes[-1], (batch,))
    rho = [a.rho] * (n - 1)
    sample_ratio = mods["utils"].sample_ratio

    def step():
        rows = []
        for r in rho:
            order = list(range(batch))
            rng.shuffle(order)
            rows.append(np.array(order[: int(batch * r)]))
        with tensor_get_device_is_device():
            opt.zero_grad()
            prev_out, prev_masks = [], []
            for i in range(n - 1):
                src = seqs[rows[i], :-1] if i == 0 else seqs[rows[i], :]
                o, m = past(src, S_TRAIN, [], i, "cpu", onecall=True, new_task=n - 1)
                prev_out.append(o)
                prev_masks.append(m)
            out, new_masks = model(seqs, S_TRAIN, [], n - 1, "cpu", onecall=True, new_task=n - 1)
            student = []
            for i in range(n - 1):
                src = seqs[rows[i], :-1] if i == 0 else seqs[rows[i], :]
                o, _ = model(src, S_TRAIN, [], i, "cpu", onecall=True, backward=True, new_task=n - 1)
                student.append(o)
            retention = sum(rho[i] / sum(rho) * mse(student[i], prev_out[i]) for i in range(n - 1))
            loss = ce(out, target) + ALPHA * retention
            [sample_ratio(prev_masks[i], new_masks) for i in range(n - 1)]
            loss.backward()
            opt.step()
    return step


# ------------------------------------------------------------------------ our side

def ours_task1(a, batch: int, amp: str):
    import bench
    from nextitnet import NextItNet
    from teracon import Task1Step
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = NextItNet(a.items, [a.items], channels=a.channels)
    step = Task1Step(model, mask_reg=0.75)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    src = torch.randint(1, a.items, (batch, a.length + 1))  # the step encodes src[:, :-1]
    tgt = torch.full((batch,), -1)
    return bench.training_step(model, step, opt, src, tgt, device, amp)


def ours_taskn(a, batch: int, amp: str):
    import bench
    from nextitnet import NextItNet
    from teracon import RetentionStep, auto_chunk_rows
    torch.manual_seed(0)
    device = torch.device("cpu")
    sizes = head_sizes(a.items, a.task)
    teacher = NextItNet(a.items, sizes[:-1], channels=a.channels)
    model = copy.deepcopy(teacher)
    model.add_task(sizes[-1])
    teacher.eval().requires_grad_(False)
    chunk_rows = a.chunk_rows if a.chunk_rows >= 0 else auto_chunk_rows(device, a.length, a.channels)
    step = bench.PinnedRho(RetentionStep(model, teacher, alpha=ALPHA, rng=np.random.default_rng(0),
                                         chunk_rows=chunk_rows),
                           np.full(a.task - 1, a.rho))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0.0)
    src = torch.randint(1, a.items, (batch, a.length))
    tgt = torch.randint(0, sizes[-1], (batch,))
    return bench.training_step(model, step, opt, src, tgt, device, amp)


def make_step(a, mods: dict | None, case: str, batch: int, variant: str):
    if variant == "authors":
        return (authors_task1 if case == "task1" else authors_taskn)(a, mods, batch)
    amp = variant.split("-", 1)[1]
    return (ours_task1 if case == "task1" else ours_taskn)(a, batch, amp)


# ------------------------------------------------------------------------ measurement

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _rss_high_water_bytes() -> int:
    """This process's own RSS high-water mark (VmHWM; ru_maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def memory_child(a) -> None:
    """In a fresh process: build one variant, run `--memory-steps` steps, print RSS figures."""
    case, batch, variant = a.memory_child
    mods = load_authors(a.authors) if variant == "authors" else None
    step = make_step(a, mods, case, int(batch), variant)
    before = _rss_bytes()
    for _ in range(a.memory_steps):
        step()
    peak = _rss_high_water_bytes()
    print(json.dumps({"rss_before_step": before, "peak_rss": peak}))


def measure_memory(a, case: str, batch: int, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", case, str(batch), variant,
           "--authors", a.authors, "--task", str(a.task), "--rho", str(a.rho), "--items", str(a.items),
           "--length", str(a.length), "--channels", str(a.channels), "--batch1", str(a.batch1),
           "--memory-steps", str(a.memory_steps), "--chunk_rows", str(a.chunk_rows)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["step_rss"] = out["peak_rss"] - out["rss_before_step"]
    return out


def time_round_robin(steps: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Every step once per round, order reversed every other round; times of the timed rounds."""
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {', '.join(native) if native else 'no AVX512-BF16/AMX'})"


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':<22} {'variant':<10} {'median s':>9} {'min-max s':>15} {'ms/seq':>7} "
            f"{'authors/ours':>12} {'peak GiB':>9} {'step GiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = r.get("memory", {})
        mem = {"peak_rss": None, "step_rss": None} if "error" in mem else mem
        ratio = f"{r['ratio_authors_over_ours']:.2f}x" if "ratio_authors_over_ours" in r else ""
        lines.append(f"{r['case']:<22} {r['variant']:<10} {r['median_s']:>9.3f} "
                     f"{min(r['times']):>7.3f}-{max(r['times']):<7.3f} {1000 * r['median_s'] / r['batch']:>7.2f} "
                     f"{ratio:>12} {_gib(mem.get('peak_rss')):>9} {_gib(mem.get('step_rss')):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    error = checkout_error(a.authors)
    if error:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if a.memory_child:
        memory_child(a)
        return {}
    mods = load_authors(a.authors)
    variants = ["authors"] + [f"ours-{amp}" for amp in a.amp]
    plan = [("taskn", b) for b in a.batch if "taskn" in a.cases] + [("task1", a.batch1)] * ("task1" in a.cases)
    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "cpu": cpu_name(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "authors": os.path.abspath(a.authors), "task": a.task, "rho": a.rho, "items": a.items,
            "length": a.length, "channels": a.channels, "head_sizes": head_sizes(a.items, a.task),
            "repeats": a.repeats, "warmup": a.warmup,
            "memory": None if a.no_memory else "fresh process per case and variant: peak = VmHWM after "
            f"building the models and running {a.memory_steps} step(s); step = peak - RSS before the first step"}
    print(f"cpu {meta['cpu']}, torch {meta['torch']} ({meta['cpu_capability']}), {meta['threads']} threads; "
          f"C {a.channels}, length {a.length}, {a.items} items, task {a.task}, rho {a.rho}; "
          f"median of {a.repeats} after {a.warmup} warm-up, variants alternated", flush=True)
    rows = []
    for case, batch in plan:
        name = f"task{a.task} B={batch}" if case == "taskn" else f"task1 B={batch}"
        steps = {v: make_step(a, mods, case, batch, v) for v in variants}
        times = time_round_robin(steps, a.warmup, a.repeats)
        del steps
        med = {v: statistics.median(t) for v, t in times.items()}
        for v in variants:
            row = {"case": name, "kind": case, "batch": batch, "variant": v, "times": times[v], "median_s": med[v]}
            if v != "authors":
                row["ratio_authors_over_ours"] = med["authors"] / med[v]
            rows.append(row)
            print(f"  {name} {v}: {med[v]:.3f} s ({' '.join(f'{t:.3f}' for t in times[v])})", flush=True)
    if not a.no_memory:
        for r in rows:
            r["memory"] = measure_memory(a, r["kind"], r["batch"], r["variant"])
    print(format_table(rows))
    for r in rows:
        if "error" in r.get("memory", {}):
            print(f"memory of {r['case']} {r['variant']}: {r['memory']['error']}")
    if not a.no_memory:
        print("peak: whole-process RSS high-water mark (VmHWM) of a fresh process that builds the models "
              f"and runs {a.memory_steps} step(s); step: peak minus the RSS before the first step")
    out = {"meta": meta, "results": rows}
    if a.json:
        from utils import atomic_write_text
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
