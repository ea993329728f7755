"""Throughput benchmark of TERACON's training steps and evaluation (issue #5).

Times, with the project's own code (`NextItNet`, `Task1Step`, `RetentionStep`, `evaluate`):

* task 1: one training step of `Task1Step` (next-item loss on every position through
  `next_item_loss`, chunked over the items when the logits would be large) at batch `--batch1`;
  then, on the gradients that step left, one `step()` of Adam as the timed step ran it and of
  Adam(foreach=False) and Adam(foreach=True) (and fused on CUDA) over the task-1 parameters
  (about 330M at TTL's 646k items), each with its share of the step (`--no-adam`: skip);
* task n (n in `--tasks`): one training step of `RetentionStep` (one pass, no micro-batching)
  at batch `--batchn`, with the
  sampling ratio of every past task pinned to each value of `--rhos` (the step updates rho
  itself, so it is reset before every call);
* evaluation: one `evaluate` call over `--batch-eval` sequences, for task 1 (scores over all
  items) and for the largest task n of `--tasks` (relation-aware masks, 1000-class head).

One timed training step is what the training loop does per batch, `trainer.train_step`: the
step's forward and backward under `trainer.autocast`, `optimizer.step` (Adam as
`trainer.make_optimizer` builds it), and the clamp of the task embeddings. Every case is timed `--repeats` times after `--warmup` untimed runs; the table
shows the median (and the min-max spread, to judge noise: other processes may share the CPU,
and with 2 OpenMP threads on 2 busy cores a step can take several times longer; `--threads`
sets torch's thread count). Data are random item ids; the mask scale is fixed (s = 25 in
training, smax = 50 in evaluation), which does not change the work.

FLOP counting (analytic, dense matmul work only; embedding look-ups, LayerNorm, masks,
softmax, Adam and the mask/relation computations are not counted):

* a causal conv costs 2*k*C*C FLOPs per position (k taps, C channels), and every backbone
  pass runs 2 convs in each of the 8 blocks on every position it is given;
* a head costs 2*C*K FLOPs per row whose logits are computed (K classes);
* training counts forward + backward as 3x the forward FLOPs; the frozen teacher of task n
  counts its forward only;
* task 1: B*(L-1) positions through the backbone and the all-item head;
* task n: the student pass has B + sum_i floor(rho_i*B) rows of L positions (the new task's
  rows plus the replayed subsets of the n-1 past tasks), the new head on B rows and each past
  head on its subset; the teacher pass has sum_i floor(rho_i*B) rows, forward only;
* evaluation counts the forward only (B*(L-1) positions for task 1, B*L for task n).
  The recomputation that the chunked `next_item_loss` does in backward (every block's logits
  once more, a 4th head GEMM) is real work but not counted: it is overhead, not useful FLOPs,
  so the chunked task-1 step can reach at most 3/4 of the matmul rate.

The achieved FLOP/s (of the median time) is also given as a fraction of the dense matmul
FLOP/s this process measures on the same device for the same dtype: a large square
`torch.matmul` (2048^3 on CPU, shrunk while one call takes over ~1 s, e.g. for bf16 on a CPU
without native bf16; 8192^3 on CUDA), in fp32 or bf16 as `--amp`, the best of 5 calls,
measured before and after the cases and the better of the two kept (other processes may
share the machine). On a CPU the same is also given per CPU-second (`time.process_time`, all
threads of this process: the step's FLOPs per CPU-second over the matmul's), column
`%mm/cpu-s`: while other processes take cores away it changes far less than the wall-clock
ratio, most of all with `--threads 1` (waiting OpenMP threads spin and count). The JSON also holds the rate of a GEMM of the convolution's shape
([M, kC] x [kC, C] through F.linear under autocast; the model itself runs F.conv2d over a channels-last view) for comparison.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset before every case); on CPU
the resident-set high-water mark of the whole process (`resource.getrusage().ru_maxrss`),
reset before every case through /proc/self/clear_refs where Linux allows it (kind
`rss_case`), otherwise the process-wide high-water mark since start (kind `rss_process`),
which never goes down, so a case can show the peak of an earlier, bigger one. Task 1's peak is
read right after its timed steps, before the Adam comparison.

Shapes: `--paper` uses the paper's (C 256, dilations [1,4,1,4,1,4,1,4], kernel 3, lengths 50
and 100, batch 32 for task 1 and 1024 for task n, 1.7k and 646k items, tasks 2..10, rho 0.05
and 0.3); `--quick` small ones that finish in about a minute on a 2-core CPU in fp32. Without
either, CUDA gets the paper shapes and the CPU the quick ones. Any shape flag overrides the
preset. This is a benchmark, not a test: nothing passes or fails on time.

Examples:
    python bench.py --quick
    python bench.py --quick --amp bf16 --json bench_bf16.json
    python bench.py --device cuda --cases taskn --tasks 2 6 10 --items 646000 --lengths 100
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data_loader as dl
from nextitnet import CHANNELS, DILATIONS, KERNEL, NextItNet
from chunked_ce import chunk_block
from teracon import RetentionStep, Task1Step, subset_sizes
from trainer import autocast, evaluate, make_optimizer, train_step
from utils import atomic_write_text, resolve_device

log = logging.getLogger("bench")

OTHER_HEAD = 1000      # classes of every head of tasks n >= 2
S_TRAIN = 25.0         # annealing scale used in the timed steps (time does not depend on it)
SMAX = 50.0
PRESETS = {
    "paper": {"items": [1700, 646000], "lengths": [50, 100], "tasks": list(range(2, 11)),
              "rhos": [0.05, 0.3], "batch1": 32, "batchn": 1024, "batch_eval": 1024,
              "repeats": 5, "warmup": 2},
    "quick": {"items": [1700], "lengths": [50], "tasks": [2, 6], "rhos": [0.05, 0.3],
              "batch1": 32, "batchn": 128, "batch_eval": 256, "repeats": 3, "warmup": 1},
}
CASES = ("task1", "taskn", "eval")


# ------------------------------------------------------------------------ FLOP counts

def conv_flops_per_position(channels: int, kernel: int, blocks: int) -> int:
    """Forward matmul FLOPs of one backbone position: 2 convs per block, 2*k*C*C each."""
    return 2 * blocks * 2 * kernel * channels * channels


def head_flops(rows: int, channels: int, classes: int) -> int:
    return 2 * channels * classes * rows


def task1_flops(batch: int, length: int, items: int, channels: int, kernel: int, blocks: int) -> int:
    """Training (3x forward) of task 1: B*(L-1) positions, all-item head on each."""
    positions = batch * (length - 1)
    forward = positions * conv_flops_per_position(channels, kernel, blocks) + head_flops(positions, channels, items)
    return 3 * forward


def subset_size(rho: float, batch: int) -> int:
    """Rows replayed for a past task (`teracon.subset_sizes`, the rule `sample_subsets` draws by)."""
    return subset_sizes(np.array([rho]), batch)[0]


def taskn_flops(batch: int, length: int, items: int, task: int, rho: float, channels: int,
                kernel: int, blocks: int) -> dict[str, int]:
    """Training of task n: student pass 3x forward, teacher pass forward only."""
    sub = subset_size(rho, batch)
    past = task - 1
    per_pos = conv_flops_per_position(channels, kernel, blocks)
    past_heads = head_flops(sub, channels, items) + (past - 1) * head_flops(sub, channels, OTHER_HEAD)
    student_rows, teacher_rows = batch + past * sub, past * sub
    student = student_rows * length * per_pos + head_flops(batch, channels, OTHER_HEAD) + past_heads
    teacher = teacher_rows * length * per_pos + past_heads
    return {"flops": 3 * student + teacher, "rows_student": student_rows, "rows_teacher": teacher_rows,
            "subset_rows": sub}


def eval_flops(batch: int, length: int, classes: int, first: bool, channels: int, kernel: int,
               blocks: int) -> int:
    positions = batch * (length - 1 if first else length)
    return positions * conv_flops_per_position(channels, kernel, blocks) + head_flops(batch, channels, classes)


# ------------------------------------------------------------------------ measurement

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int,
               cpu_times: list[float] | None = None) -> list[float]:
    """Wall seconds of each of `repeats` calls after `warmup`; the process's CPU seconds of each
    (all threads) are appended to `cpu_times` when given."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - start_cpu)
    return times


def _reset_rss_peak() -> bool:
    """Hand freed heap back to the OS (glibc `malloc_trim`) and reset the process's RSS
    high-water mark to the current RSS (Linux >= 4.0); False where the reset is not allowed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of one case: CUDA allocator peak, or the process RSS high-water mark
    (`start` is the allocated bytes or the RSS when the case began)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind, self.start = "cuda_max_allocated", int(torch.cuda.memory_allocated(self.device))
        else:
            self.kind = "rss_case" if _reset_rss_peak() else "rss_process"
            self.start = _rss_now()
        return self

    def __exit__(self, *exc):
        self.bytes = peak_bytes(self.device)
        return False


def peak_bytes(device: torch.device) -> int:
    """The peak `PeakMemory` reports, read now: CUDA max allocated or the process's RSS high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # KiB on Linux


def matmul_reference(dtype: torch.dtype, device: torch.device, max_size: int, channels: int,
                     budget_s: float = 1.0) -> dict:
    """Dense matmul FLOP/s of a square torch.matmul, grown up to `max_size` while one call stays
    under `budget_s` (CPUs without native bf16 can be 100x slower than fp32); the best of 5
    calls, since it stands for the peak. Also, for information, the model's own conv GEMM
    ([M, kC] x [kC, C], F.linear on fp32 inputs under `autocast` with that dtype, as the model
    runs it)."""
    amp = "bf16" if dtype == torch.bfloat16 else "fp32"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def best_rate(fn, flops: float, repeats: int) -> float:
        return flops / min(time_calls(fn, device, 1, repeats))

    cpu: list[float] = []

    def square(n: int, repeats: int) -> float:
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        cpu.clear()
        return 2.0 * n ** 3 / min(time_calls(lambda: torch.matmul(a, b), device, 1, repeats, cpu))

    n = min(256, max_size)
    rate = square(n, 1)
    while n * 2 <= max_size and 2.0 * (2 * n) ** 3 / rate < budget_s:
        n *= 2
        rate = square(n, 1)
    out = {"dtype": amp, "size": n, "flops_per_s": square(n, 5)}
    if device.type == "cpu":  # FLOPs per CPU-second (all threads): what sharing the CPU changes least
        out["flops_per_cpu_s"] = 2.0 * n ** 3 / min(cpu)

    m, kc = 8192, KERNEL * channels
    x = torch.randn(m, kc, generator=gen).to(device)
    w = torch.randn(channels, kc, generator=gen).to(device)

    def conv_gemm():
        with autocast(device, amp):
            F.linear(x, w)

    out["conv_gemm"] = {"shape": [m, kc, channels], "amp": amp,
                        "flops_per_s": best_rate(conv_gemm, 2.0 * m * kc * channels, 3)}
    return out


# ------------------------------------------------------------------------ the cases

class PinnedRho:
    """A retention step whose sampling ratios are held at the benchmark's rho on every call."""

    def __init__(self, step: RetentionStep, rho: np.ndarray):
        self.step, self.rho, self.shard = step, rho, step.shard

    def backward(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        self.step.rho = self.rho.copy()
        return self.step.backward(src, tgt, s)


def training_step(model: NextItNet, step, optimizer: torch.optim.Optimizer, src: torch.Tensor, tgt: torch.Tensor,
                  device: torch.device, amp: str):
    """One batch exactly as `trainer.train` runs it (`trainer.train_step`), as a callable."""
    return lambda: train_step(model, step, optimizer, src, tgt, S_TRAIN, device, amp)


def adam_variants(device: torch.device) -> dict[str, dict]:
    """The Adam settings compared: the per-tensor loop, foreach, and (CUDA) the fused kernel."""
    variants = {"foreach=False": {"foreach": False}, "foreach=True": {"foreach": True}}
    if device.type == "cuda":
        variants["fused=True"] = {"fused": True}
    return variants


def time_adam(model: NextItNet, in_step: dict, step_s: float, device: torch.device, warmup: int,
              repeats: int) -> dict:
    """Median time of one `step()` of each `adam_variants` on the parameters' current gradients,
    with its share of a step that used it, t / (step_s - t_in_step + t), next to `in_step` (the
    timed step's own optimiser, {"settings", "median_s"}). The steps move the parameters."""
    out = {"in_step": {**in_step, "share_of_step": in_step["median_s"] / step_s}}
    for name, kwargs in adam_variants(device).items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0, **kwargs)
        t = statistics.median(time_calls(opt.step, device, max(1, warmup), repeats))
        del opt  # its moments (2 x the parameters) go before the next one's
        gc.collect()
        out[name] = {"median_s": t, "share_of_step": t / (step_s - in_step["median_s"] + t)}
    return out


def case_task1(a, device: torch.device, items: int, length: int) -> dict:
    torch.manual_seed(0)
    model = NextItNet(items, [items], channels=a.channels).to(device)
    step = Task1Step(model, mask_reg=0.75)
    optimizer = make_optimizer(list(model.parameters()), 1e-3, device)
    src = torch.randint(1, items, (a.batch1, length), device=device)
    tgt = torch.full((a.batch1,), -1, device=device)
    positions = a.batch1 * (length - 1)
    block = chunk_block(positions, items, device)  # next_item_loss's choice, before the model's memory is used
    run = training_step(model, step, optimizer, src, tgt, device, a.amp)
    cpu_times: list[float] = []
    times = time_calls(run, device, a.warmup, a.repeats, cpu_times)
    row = {"batch": a.batch1, "times": times, "cpu_times": cpu_times,
           "flops": task1_flops(a.batch1, length, items, a.channels, KERNEL, len(DILATIONS)),
           "positions": positions, "ce_chunked": block is not None, "ce_block_items": block,
           # what unchunked logits and their gradient would hold, fp32
           "full_logits_bytes": positions * items * 4 * 2,
           "peak_mem_step_bytes": peak_bytes(device),
           "params": sum(p.numel() for p in model.parameters())}
    if a.adam:  # on the gradients the last timed step left
        in_step = {"settings": {k: optimizer.defaults.get(k) for k in ("foreach", "fused")},
                   "median_s": statistics.median(time_calls(optimizer.step, device, 0, a.repeats))}
        del run, optimizer
        gc.collect()
        row["adam"] = time_adam(model, in_step, statistics.median(times), device, a.warmup, a.repeats)
    return row


def case_taskn(a, device: torch.device, items: int, length: int, task: int, rho: float) -> dict:
    torch.manual_seed(0)
    teacher = NextItNet(items, [items] + [OTHER_HEAD] * (task - 2), channels=a.channels).to(device)
    model = copy.deepcopy(teacher)
    model.add_task(OTHER_HEAD)
    teacher.eval().requires_grad_(False)
    step = PinnedRho(RetentionStep(model, teacher, alpha=0.7, rng=np.random.default_rng(0)), np.full(task - 1, rho))
    optimizer = make_optimizer(list(model.parameters()), 1e-4, device)
    src = torch.randint(1, items, (a.batchn, length), device=device)
    tgt = torch.randint(0, OTHER_HEAD, (a.batchn,), device=device)
    run = training_step(model, step, optimizer, src, tgt, device, a.amp)
    cpu_times: list[float] = []
    times = time_calls(run, device, a.warmup, a.repeats, cpu_times)
    counts = taskn_flops(a.batchn, length, items, task, rho, a.channels, KERNEL, len(DILATIONS))
    return {"batch": a.batchn, "times": times, "cpu_times": cpu_times, **counts,
            # one copy of the replayed task-1 logits (student, teacher and the gradient each hold one)
            "task1_replay_logits_bytes": counts["subset_rows"] * items * 4}


def case_eval(a, device: torch.device, items: int, length: int, task: int) -> dict:
    torch.manual_seed(0)
    heads = [items] + [OTHER_HEAD] * (task - 1)
    model = NextItNet(items, heads, channels=a.channels).to(device)
    rows = a.batch_eval
    classes = heads[task - 1]
    sources = torch.randint(1, items, (rows, length))
    targets = torch.full((rows,), -1) if task == 1 else torch.randint(0, classes, (rows,))
    data = dl.TaskData(task=task, name=f"bench{task}", path="<random>", sources=sources, targets=targets,
                       line_of_example=torch.arange(rows), num_classes=classes,
                       labels=np.arange(classes), splits={"test": np.arange(rows)})
    cpu_times: list[float] = []
    times = time_calls(lambda: evaluate(model, data, "test", SMAX, device, a.batch_eval, a.amp),
                       device, a.warmup, a.repeats, cpu_times)
    return {"batch": rows, "times": times, "cpu_times": cpu_times,
            "flops": eval_flops(rows, length, classes, task == 1, a.channels, KERNEL, len(DILATIONS))}


def plan(a) -> list[tuple[str, dict]]:
    cases = []
    for items in a.items:
        for length in a.lengths:
            if "task1" in a.cases:
                cases.append(("task1", {"items": items, "length": length}))
            if "taskn" in a.cases:
                for task in a.tasks:
                    for rho in a.rhos:
                        cases.append(("taskn", {"items": items, "length": length, "task": task, "rho": rho}))
            if "eval" in a.cases:
                for task in sorted({1, max(a.tasks)}):
                    cases.append(("eval", {"items": items, "length": length, "task": task}))
    return cases


def case_name(kind: str, p: dict) -> str:
    extra = {"task1": "", "taskn": f" n={p.get('task')} rho={p.get('rho')}", "eval": f" task={p.get('task')}"}[kind]
    return f"{kind} N={p['items']} L={p['length']}{extra}"


# ------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time TERACON training steps (task 1, task n) and evaluation; report sequences/s, "
        "achieved FLOP/s (analytic count of convs and heads; training = 3x forward), its fraction of "
        "this device's dense matmul FLOP/s, and peak memory. Default shapes: the paper's on CUDA, "
        "--quick ones on the CPU (the paper's take very long there).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="small shapes, about a minute on a 2-core CPU (fp32): "
                        f"{PRESETS['quick']}")
    preset.add_argument("--paper", action="store_true", help=f"the paper's shapes: {PRESETS['paper']}")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="trainer.autocast precision")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases to run")
    p.add_argument("--items", nargs="+", type=int, help="item counts (task-1 head size) [preset]")
    p.add_argument("--lengths", nargs="+", type=int, help="sequence lengths (file length; task 1 encodes L-1) [preset]")
    p.add_argument("--tasks", nargs="+", type=int, help="task numbers n >= 2 for the task-n cases [preset]")
    p.add_argument("--rhos", nargs="+", type=float, help="fixed sampling ratio of every past task [preset]")
    p.add_argument("--batch1", type=int, help="task-1 batch [preset]")
    p.add_argument("--batchn", type=int, help="task-n batch [preset]")
    p.add_argument("--batch-eval", type=int, help="sequences per evaluation call (one batch) [preset]")
    p.add_argument("--repeats", type=int, help="timed repeats per case; the median is reported [preset]")
    p.add_argument("--warmup", type=int, help="untimed runs before timing [preset]")
    p.add_argument("--channels", type=int, default=CHANNELS, help="channels C (the paper uses 256)")
    p.add_argument("--matmul-size", type=int, help="largest square matmul for the reference FLOP/s "
                   "(default 8192 on CUDA, 2048 on CPU; shrunk on CPU so that one call stays under ~1 s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-adam", dest="adam", action="store_false",
                   help="task 1: skip the Adam comparison (foreach=False / True) after the timed steps")
    p.add_argument("--json", help="write all results to this JSON file")
    return p


def resolve(a: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    a.preset = "quick" if a.quick else "paper" if a.paper else ("paper" if device.type == "cuda" else "quick")
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.matmul_size is None:
        a.matmul_size = 8192 if device.type == "cuda" else 2048
    problems = [f"--tasks {t}: task-n cases need n >= 2" for t in a.tasks if t < 2]
    problems += [f"--rhos {r}: must be in [0, 1]" for r in a.rhos if not 0.0 <= r <= 1.0]
    problems += [f"--lengths {x}: need at least 2" for x in a.lengths if x < 2]
    problems += [f"--items {x}: need at least 2" for x in a.items if x < 2]
    problems += [f"--{k.replace('_', '-')} {getattr(a, k)}: must be at least 1"
                 for k in ("batch1", "batchn", "batch_eval", "repeats", "channels") if getattr(a, k) < 1]
    if a.threads is not None and a.threads < 1:
        problems.append(f"--threads {a.threads}: must be at least 1")
    if a.warmup < 0:
        problems.append(f"--warmup {a.warmup}: must be at least 0")
    if problems:
        raise SystemExit("bench.py: " + "; ".join(problems))
    return a


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(results: list[dict]) -> str:
    head = (f"{'case':<34} {'seq/s':>9} {'GFLOP':>9} {'GFLOP/s':>9} {'%matmul':>8} {'%mm/cpu-s':>9} "
            f"{'median s':>9} {'min-max s':>15} {'peak mem':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<34} error: {r['error']}")
            continue
        lines.append(f"{r['case']:<34} {r['seq_per_s']:>9.1f} {r['flops'] / 1e9:>9.1f} "
                     f"{r['flops_per_s'] / 1e9:>9.1f} {100 * r['frac_of_matmul']:>7.1f}% "
                     f"{_pct(r.get('frac_of_matmul_cpu')):>9} "
                     f"{r['median_s']:>9.4f} {min(r['times']):>7.3f}-{max(r['times']):<7.3f} "
                     f"{_fmt_bytes(r['peak_mem_bytes']):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    device = resolve_device(a.device)
    a = resolve(a, device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "preset": a.preset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "amp": a.amp,
            "shapes": {k: getattr(a, k) for k in ("items", "lengths", "tasks", "rhos", "batch1", "batchn",
                                                   "batch_eval", "repeats", "warmup", "channels")},
            "channels": a.channels, "dilations": list(DILATIONS), "kernel": KERNEL, "other_head": OTHER_HEAD,
            "flop_convention": "dense matmul FLOPs of convs (2*k*C*C per position per conv) and heads "
            "(2*C*K per row); training = 3x forward for the student, 1x for the teacher"}
    log.info("bench: device %s (%s), %d threads, amp %s, preset %s", device, meta["device_name"],
             meta["threads"], a.amp, a.preset)

    def measure_reference() -> dict:
        ref = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ref[name] = matmul_reference(dt, device, a.matmul_size, a.channels)
            log.info("matmul %s %d^3: %.1f GFLOP/s; conv GEMM %s under amp %s: %.1f GFLOP/s", name,
                     ref[name]["size"], ref[name]["flops_per_s"] / 1e9,
                     "x".join(map(str, ref[name]["conv_gemm"]["shape"])), name,
                     ref[name]["conv_gemm"]["flops_per_s"] / 1e9)
        return ref

    reference_before = measure_reference()

    runners = {"task1": case_task1, "taskn": case_taskn, "eval": case_eval}
    results = []
    for kind, params in plan(a):
        name = case_name(kind, params)
        log.info("running %s", name)
        row = {"case": name, "kind": kind, **params, "amp": a.amp}
        try:
            with PeakMemory(device) as mem:
                row.update(runners[kind](a, device, **params))
            med = statistics.median(row["times"])
            row.update(median_s=med, min_s=min(row["times"]), seq_per_s=row["batch"] / med,
                       flops_per_s=row["flops"] / med, flops_per_s_best=row["flops"] / min(row["times"]),
                       peak_mem_bytes=row.pop("peak_mem_step_bytes", mem.bytes), peak_mem_kind=mem.kind,
                       rss_start_bytes=mem.start)
            log.info("  %.4f s median (%s), %.1f seq/s, %.1f GFLOP/s, peak mem %s", med,
                     " ".join(f"{t:.3f}" for t in row["times"]), row["seq_per_s"], row["flops_per_s"] / 1e9,
                     _fmt_bytes(row["peak_mem_bytes"]))
        except (RuntimeError, MemoryError) as exc:  # out of memory: record it, keep the other cases
            text = str(exc)
            if not (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
                    or "can't allocate memory" in text):
                raise
            row["error"] = "out of memory: " + (text.splitlines()[0][:200] if text else type(exc).__name__)
            log.warning("%s: %s", name, row["error"])
        results.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # the reference again at the end, so that a burst of load from other processes during one
    # measurement does not set the scale: each dtype keeps its best rate of the two
    reference_after = measure_reference() if results else reference_before
    reference = {k: max(reference_before[k], reference_after[k], key=lambda r: r["flops_per_s"])
                 for k in reference_before}
    meta["matmul"] = reference
    meta["matmul_runs"] = {"before": reference_before, "after": reference_after}
    peak = reference[a.amp]["flops_per_s"]
    peak_cpu = max(reference_before[a.amp].get("flops_per_cpu_s", 0.0), reference_after[a.amp].get("flops_per_cpu_s", 0.0))
    for r in results:
        if "error" not in r:
            r["frac_of_matmul"] = r["flops_per_s"] / peak
            if peak_cpu and device.type == "cpu":
                r["flops_per_cpu_s"] = r["flops"] / statistics.median(r["cpu_times"])
                r["frac_of_matmul_cpu"] = r["flops_per_cpu_s"] / peak_cpu
    table = format_table(results)
    if device.type == "cuda":
        mem_note = "CUDA max allocated, reset per case"
    elif results and results[0].get("peak_mem_kind") == "rss_case":
        mem_note = "whole-process RSS high-water mark, reset per case (includes Python, torch, model)"
    else:
        mem_note = "whole-process RSS high-water mark since start (never goes down)"
    ref = reference[a.amp]
    print(f"\ndevice {device} ({meta['device_name']}, {meta['threads']} threads), amp {a.amp}; "
          f"matmul reference {ref['flops_per_s'] / 1e9:.1f} GFLOP/s ({a.amp} {ref['size']}^3, best); "
          f"median of {a.repeats} after {a.warmup} warm-up; peak mem: {mem_note}")
    print(table)
    for r in results:
        if r.get("kind") == "task1" and "error" not in r:
            how = f"chunked over items, {r['ce_block_items']} items a block" if r["ce_chunked"] else "not chunked"
            print(f"{r['case']}: logits {how} ({r['positions']} positions); full logits + grad would need "
                  f"{_fmt_bytes(r['full_logits_bytes'])}; {100 * r['frac_of_matmul']:.1f}% of the {a.amp} "
                  f"matmul rate ({_pct(r.get('frac_of_matmul_cpu'))} per CPU-second)")
            for name, v in r.get("adam", {}).items():
                label = "Adam as in the step (" + ", ".join(f"{k}={x}" for k, x in v["settings"].items()) + ")" \
                    if name == "in_step" else f"Adam({name})"
                print(f"  {label}: {v['median_s']:.3f} s, {100 * v['share_of_step']:.1f}% of the step "
                      f"({r['params'] / 1e6:.0f}M parameters)")
    out = {"meta": meta, "results": results}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps(out, indent=1))
        log.info("wrote %s", a.json)
    return out


if __name__ == "__main__":
    main()
