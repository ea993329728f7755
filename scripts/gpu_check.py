"""GPU check: the project's training and evaluation on a CUDA device agree with the CPU (issue 17).

    python scripts/gpu_check.py --device cuda            # the full check, at most 8 minutes on an H200
    python scripts/gpu_check.py --device cpu --quick     # a dry run of the check itself: CPU against CPU
    python scripts/gpu_check.py --checks a b c           # some checks only

One line per check, `PASS`, `FAIL` or `SKIP`, with its worst differences and its seconds; exit
status 1 if any check fails (2: no such device). The checks, in the order they run:

  a  task 1 (Task1Step, tiny model): the loss, every parameter's gradient, the weights and the
     Adam updates of three `trainer.train_step` calls (the optimiser of `trainer.make_optimizer`:
     fused Adam on CUDA, the per-tensor loop on the CPU) equal the CPU's, in float64 on both sides;
  b  task 3 with knowledge retention (RetentionStep, teacher = a task-2 model, the same subset
     generator seed on both sides): the same, plus rho after every step;
  c  task 1's chunked cross-entropy (`teracon.next_item_loss` with a small element budget forced):
     loss and gradients equal the unchunked cross-entropy (float64, on the device and against the
     CPU); fp32 chunked against the float64 reference; bf16 autocast chunked against fp32; and a
     whole Task1Step with the chunking forced against the same step unchunked;
  g  precision: `--amp fp32` on the device against the float64 CPU reference, and `--amp tf32` and
     `--amp bf16` against fp32 on the device: the losses of three steps (task 1 and task 3);
  d  the micro-batched retention step (chunk_rows 64) against one pass (chunk_rows 0) on the
     device, float64: losses, gradients, weights and rho of three steps;
  e  every method of `methods.METHODS` through the real scripts on tiny synthetic data in the
     CONURE format: train_task1.py, train_teracon_t2.py and evaluate.py with --device DEV exit 0
     and every metric is finite;
  f  kill and resume on the device: a task-2 run with --save_every 1 --deterministic killed (SIGKILL)
     in its second epoch, then --resume, ends with the same weights as an uninterrupted run, bit for
     bit; its checkpoint evaluated by evaluate.py with --device cpu and with --device DEV gives the
     same metrics within 2 examples' worth per metric (near-ties may rank differently in fp32);
  h  speed (figures, not a test): one repeat of `bench.py --paper` (tasks 2, 6, 10) on the device,
     and `bench_authors.py` at the paper's task-n shape if the authors' checkout is present (SKIP
     otherwise; that script runs on the CPU only). A crash is a FAIL, a timeout a SKIP.

Why float64 (a-d): the device and the CPU then differ only by float64 rounding (about 1e-16 per
operation, 1e-13 after the few thousand operations of a tiny model), so a tolerance of 1e-9 leaves
four orders of magnitude of margin while any real bug (an index, a mask, a dilation, a race, a
wrong optimiser update) changes results by far more than 1e-9; TF32 and bf16 play no part. The
comparison functions take `perturb`, a function applied to the device-side model (or head) before
the steps, so a test can show that a 1e-3 relative change of one weight is caught.

Budget (`--budget`, default 480 s): every check has its own timeout, cut to what is left of the
budget; a check that does not fit is a SKIP. Expected on an H200: a-d and g a few seconds each
(plus CUDA start-up), e about 1-2 minutes (methods run 4 at a time), f under a minute, h the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import teracon  # noqa: E402
from methods import METHODS  # noqa: E402
from nextitnet import NextItNet  # noqa: E402
from teracon import RetentionStep, Task1Step, anneal_s  # noqa: E402
from trainer import autocast, make_optimizer, train_step  # noqa: E402
from utils import set_precision  # noqa: E402

# ---------------------------------------------------------------------------- tolerances
# Every comparison is per parameter (and per step): ||got - want|| / max(||want||, NORM_FLOOR).
RTOL_F64 = 1e-9          # float64 on both sides: rounding differences are ~1e-13 (see the docstring)
NORM_FLOOR = 1e-12       # below this norm a reference counts as zero (absolute differences < 1e-21 pass)
RTOL_FP32 = 1e-4         # fp32 (TF32 off) against float64: fp32 rounds at 6e-8 per operation; reordered
                         # sums over a few hundred terms stay near 1e-6, and 1e-4 also catches TF32 left on
                         # where full fp32 was asked for in most cases (TF32 inputs round at 4.9e-4)
RTOL_TF32 = 1e-2         # --amp tf32 losses against fp32: TF32 keeps 10 mantissa bits (4.9e-4 per input
                         # rounding, fp32 accumulation); a mean cross-entropy over hundreds of positions
                         # moves by ~1e-4..1e-3, so 1e-2 leaves a margin of 10 and flags a wrong computation
RTOL_BF16 = 5e-2         # --amp bf16 losses against fp32: bf16 keeps 7 mantissa bits (3.9e-3 per rounding,
                         # masks and heads' losses in fp32); expected ~1e-3..1e-2; 5e-2 flags a broken path
                         # (e.g. masks or the loss computed in bf16), not rounding
RTOL_CE_BF16 = 3e-2      # chunked cross-entropy under bf16 autocast (bf16 GEMMs, fp32 log-sum-exp) against the
                         # unchunked one under the same autocast: both round the logits and the backward GEMMs'
                         # inputs to bf16 (3.9e-3 each), in different places; a few roundings apart
EVAL_EXAMPLES = 2        # f: CPU and device evaluation of one checkpoint may differ by this many examples
                         # per metric (fp32 near-ties can order differently), i.e. |diff| <= 2 / n_test
BUDGET_S = 480           # the whole check: 8 minutes
SMAX = 50.0
CE_BUDGET = 7 * 96       # c: logits held at once when chunking is forced (96 positions, 300 items)

Perturb = Callable[[nn.Module], None]


@dataclass
class Result:
    check: str
    status: str       # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.detail} [{self.seconds:.1f} s]"


def perturb_weight(rel: float = 1e-3) -> Perturb:
    """A perturbation for the tests: the first conv weight of a NextItNet (the weight of a plain
    module such as a head) times 1 + rel."""
    @torch.no_grad()
    def apply(module: nn.Module) -> None:
        if isinstance(module, NextItNet):
            module.blocks[0].conv1.weight.mul_(1.0 + rel)
        else:
            module.weight.mul_(1.0 + rel)
    return apply


# ---------------------------------------------------------------------------- comparison

class Diff:
    """Relative differences of named tensors against a reference, the worst of each kind and
    every one above its tolerance."""

    def __init__(self) -> None:
        self.worst: dict[str, tuple[float, str]] = {}
        self.failures: list[str] = []

    def add(self, kind: str, name: str, got, want, rtol: float) -> None:
        if got is None or want is None:
            if (got is None) != (want is None):
                self.failures.append(f"{kind} {name}: {'missing' if got is None else 'present'} on the device side only")
            return
        got = torch.as_tensor(got).detach().to("cpu", torch.float64)
        want = torch.as_tensor(want).detach().to("cpu", torch.float64)
        if got.shape != want.shape:
            self.failures.append(f"{kind} {name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
            self.failures.append(f"{kind} {name}: not finite")
            return
        err = float((got - want).norm() / max(float(want.norm()), NORM_FLOOR))
        if err > self.worst.get(kind, (-1.0, ""))[0]:
            self.worst[kind] = (err, name)
        if not err <= rtol:
            self.failures.append(f"{kind} {name} {err:.1e} > {rtol:g}")

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self, rtol: float | None = None) -> str:
        worst = ", ".join(f"{k} {e:.1e}" for k, (e, _) in self.worst.items())
        text = f"worst rel. diff {worst or '-'}" + (f" (tol {rtol:g})" if rtol is not None else "")
        if self.failures:
            text += f"; {len(self.failures)} over: " + "; ".join(self.failures[:4])
        return text


def result(check: str, parts: list[tuple[str, Diff, float]]) -> Result:
    ok = all(d.ok for _, d, _ in parts)
    return Result(check, "PASS" if ok else "FAIL", " | ".join(f"{label}: {d.summary(tol)}" for label, d, tol in parts))


# ---------------------------------------------------------------------------- models, data, steps

@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded inside, restored after (the models' initialisers use it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def grown_models(items: int, channels: int, dilations: tuple[int, ...], heads: list[int],
                 seed: int = 0) -> list[NextItNet]:
    """The models of tasks 1..T (CPU, fp32), each grown from the previous one as the task scripts do
    (`add_task`); every weight of task t's model is moved by small seeded noise before task t+1
    grows from it, so that a teacher differs from its student's initialisation as after training,
    and every head has logits of std ~1 (at init they are ~0.01 and the loss is log K whatever
    the backbone computes, which would hide a wrong backbone from a loss comparison)."""
    def confident(model: NextItNet) -> NextItNet:  # the newest head's logits of std ~1, not ~0.01 as at init
        with torch.no_grad():
            model.heads[-1].weight.normal_(0.0, channels ** -0.5)
        return model

    with seeded(seed):
        model = confident(NextItNet(items, [heads[0]], channels=channels, dilations=dilations))
        models = [model]
        for k in heads[1:]:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * p.std().clamp_min(0.1) * torch.randn_like(p))
            model = copy.deepcopy(model)
            model.add_task(k)
            models.append(confident(model))
    return models


def make_batches(n: int, rows: int, length: int, items: int, classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches (CPU): sources [rows, length] of ids 1..items-1, each row left-padded with 0 to
    0-3 positions; targets [rows] in 0..classes-1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(1, items, (rows, length), generator=g)
        pad = torch.randint(0, 4, (rows, 1), generator=g)
        src = torch.where(torch.arange(length)[None, :] < pad, torch.zeros_like(src), src)
        out.append((src, torch.randint(0, classes, (rows,), generator=g)))
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters()}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().to("cpu", copy=True) for k, p in model.named_parameters()}


def run_steps(model: NextItNet, make_step: Callable[[NextItNet], teracon.Step], batches, device: torch.device,
              amp: str = "fp32", lr: float = 1e-3) -> list[dict]:
    """`trainer.train_step` on each batch (s annealed over the batches as eq. 19, Adam of
    `trainer.make_optimizer`); per step the loss, gradients, weights (and rho of a retention step);
    record 0 holds the weights before the first step."""
    step = make_step(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr, device)
    records = [{"weights": params_of(model)}]
    for b, (src, tgt) in enumerate(batches):
        s = anneal_s(b, len(batches), SMAX)
        loss = train_step(model, step, optimizer, src.to(device), tgt.to(device), s, device, amp)
        record = {"loss": loss, "grads": grads_of(model), "weights": params_of(model)}
        if isinstance(step, RetentionStep):
            record["rho"] = torch.as_tensor(np.array(step.rho, dtype=np.float64))
        records.append(record)
    return records


def compare_runs(diff: Diff, got: list[dict], want: list[dict], rtol: float) -> Diff:
    """Step by step: loss, every gradient, every weight and every update (weights minus the previous
    step's: the optimiser's own work, which the weights alone show only diluted), rho."""
    for name, w in want[0]["weights"].items():
        diff.add("weight", f"{name} (before step 1)", got[0]["weights"][name], w, rtol)
    for i in range(1, len(want)):
        g, w = got[i], want[i]
        if g["loss"] is None or w["loss"] is None:
            diff.failures.append(f"step {i}: non-finite loss (device {g['loss']}, reference {w['loss']})")
            continue
        diff.add("loss", f"step {i}", torch.tensor(g["loss"]), torch.tensor(w["loss"]), rtol)
        for name in w["grads"]:
            diff.add("grad", f"{name} step {i}", g["grads"][name], w["grads"][name], rtol)
            diff.add("weight", f"{name} step {i}", g["weights"][name], w["weights"][name], rtol)
            diff.add("update", f"{name} step {i}", g["weights"][name] - got[i - 1]["weights"][name],
                     w["weights"][name] - want[i - 1]["weights"][name], rtol)
        if "rho" in w:
            diff.add("rho", f"step {i}", g.get("rho"), w["rho"], rtol)
    return diff


def on(model: NextItNet, device: torch.device, dtype: torch.dtype, perturb: Perturb | None = None) -> NextItNet:
    """A copy of `model` on `device` in `dtype`, perturbed if asked."""
    out = copy.deepcopy(model).to(device=device, dtype=dtype)
    if perturb is not None:
        perturb(out)
    return out


def retention_factory(teacher: NextItNet, device: torch.device, dtype: torch.dtype, chunk_rows: int = 0,
                      seed: int = 7) -> Callable[[NextItNet], RetentionStep]:
    """Steps with knowledge retention from a frozen copy of `teacher`; the subsets' generator is
    seeded the same on every side, so both sides label the same rows."""
    def make(model: NextItNet) -> RetentionStep:
        frozen = copy.deepcopy(teacher).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return RetentionStep(model, frozen, teracon.ALPHA, np.random.default_rng(seed), chunk_rows=chunk_rows)
    return make


# ---------------------------------------------------------------------------- a-d, g: in-process checks

TINY = {"items": 300, "channels": 16, "dilations": (1, 2)}
F64 = torch.float64
CPU = torch.device("cpu")


def check_task1(device: torch.device, perturb: Perturb | None = None) -> Result:
    """a: three task-1 steps, float64, device against CPU."""
    [model] = grown_models(TINY["items"], TINY["channels"], TINY["dilations"], [TINY["items"]])
    batches = make_batches(3, 32, 13, TINY["items"], 1, seed=1)
    step = lambda m: Task1Step(m, 0.75)  # noqa: E731
    want = run_steps(on(model, CPU, F64), step, batches, CPU)
    got = run_steps(on(model, device, F64, perturb), step, batches, device)
    return result("a task 1, 3 steps, float64", [(f"{device} vs cpu", compare_runs(Diff(), got, want, RTOL_F64), RTOL_F64)])


def task3_setup():
    models = grown_models(TINY["items"], TINY["channels"], TINY["dilations"], [TINY["items"], 25, 7])
    return models[1], models[2]  # teacher (task 2), student (task 3)


def check_retention(device: torch.device, perturb: Perturb | None = None) -> Result:
    """b: three task-3 steps with knowledge retention, float64, device against CPU."""
    teacher, student = task3_setup()
    batches = make_batches(3, 64, 12, TINY["items"], 7, seed=2)
    want = run_steps(on(student, CPU, F64), retention_factory(teacher, CPU, F64), batches, CPU, lr=1e-4)
    got = run_steps(on(student, device, F64, perturb), retention_factory(teacher, device, F64), batches, device, lr=1e-4)
    return result("b task 3 + retention, 3 steps, float64",
                  [(f"{device} vs cpu", compare_runs(Diff(), got, want, RTOL_F64), RTOL_F64)])


def check_chunked_retention(device: torch.device, perturb: Perturb | None = None) -> Result:
    """d: the micro-batched retention step (chunk_rows 64) against one pass, on the device, float64."""
    teacher, student = task3_setup()
    batches = make_batches(3, 96, 12, TINY["items"], 7, seed=3)  # 96 + 2 x 86 stacked rows: 5 chunks
    want = run_steps(on(student, device, F64), retention_factory(teacher, device, F64, 0), batches, device, lr=1e-4)
    got = run_steps(on(student, device, F64, perturb), retention_factory(teacher, device, F64, 64), batches, device,
                    lr=1e-4)
    return result("d chunk_rows 64 vs 0, 3 steps, float64",
                  [(f"{device}", compare_runs(Diff(), got, want, RTOL_F64), RTOL_F64)])


def _ce_budget_knob() -> str:
    """How `next_item_loss` takes a budget: its `chunk_elements` argument, else its module's
    CE_CHUNK_ELEMENTS constant (both forms have existed)."""
    fn = teracon.next_item_loss
    if "chunk_elements" in inspect.signature(fn).parameters:
        return "argument"
    if hasattr(sys.modules[fn.__module__], "CE_CHUNK_ELEMENTS"):
        return "constant"
    raise RuntimeError("next_item_loss has neither a chunk_elements argument nor a CE_CHUNK_ELEMENTS constant")


@contextlib.contextmanager
def forced_ce_chunking(budget: int) -> Iterator[Callable]:
    """Inside, `teracon.next_item_loss` (the function Task1Step calls) holds at most `budget` logits
    at once; yields the chunked loss function (hidden, head, targets) -> loss."""
    original = teracon.next_item_loss
    module = sys.modules[original.__module__]
    if _ce_budget_knob() == "argument":
        def chunked(hidden, head, targets, *args, **kwargs):
            kwargs["chunk_elements"] = budget
            return original(hidden, head, targets, **kwargs)
        teracon.next_item_loss = chunked
        try:
            yield chunked
        finally:
            teracon.next_item_loss = original
    else:
        saved = module.CE_CHUNK_ELEMENTS
        module.CE_CHUNK_ELEMENTS = budget
        try:
            yield original
        finally:
            module.CE_CHUNK_ELEMENTS = saved


def chunking_description(rows: int, items: int, device: torch.device, budget: int) -> str:
    """What the forced budget makes `next_item_loss` do, where the code says (chunked_ce.chunk_block)."""
    module = sys.modules[teracon.next_item_loss.__module__]
    block_of = getattr(module, "chunk_block", None)
    if block_of is not None:
        block = block_of(rows, items, device, budget)
        if block is None:
            raise RuntimeError(f"a budget of {budget} logits does not make next_item_loss chunk [{rows}, {items}]")
        return f"{-(-items // block)} blocks of {block} items"
    return f"budget {budget} logits"


def ce_and_grads(loss_fn, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, amp: str = "fp32") -> dict:
    h = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with autocast(h.device, amp):
        loss = loss_fn(h, head, targets)
    loss.backward()
    return {"loss": loss.detach(), "hidden": h.grad, "weight": head.weight.grad, "bias": head.bias.grad}


def add_all(diff: Diff, got: dict, want: dict, rtol: float, prefix: str = "") -> Diff:
    for k in want:
        diff.add("loss" if k == "loss" else "grad", prefix + k, got[k], want[k], rtol)
    return diff


def check_chunked_ce(device: torch.device, perturb: Perturb | None = None) -> Result:
    """c: task 1's chunked cross-entropy with a small budget forced, against the unchunked one."""
    positions, items, channels = 96, TINY["items"], TINY["channels"]
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(positions, channels, generator=g, dtype=F64)
    targets = torch.randint(0, items, (positions,), generator=g)
    targets[:3] = torch.tensor([0, items - 1, CE_BUDGET // positions])  # padding, last item, a block edge
    with seeded(4):
        head = nn.Linear(channels, items).double()
    with torch.no_grad():
        head.weight.mul_(5.0)  # logits with a std of about 3: a softmax that is neither flat nor one-hot

    def plain(h, m, t):
        return F.cross_entropy(m(h), t)

    def head_on(dtype):
        m = copy.deepcopy(head).to(device=device, dtype=dtype)
        if perturb is not None:
            perturb(m)
        return m

    how = chunking_description(positions, items, device, CE_BUDGET)
    parts = []
    with forced_ce_chunking(CE_BUDGET) as chunked:
        # float64: chunked on the device against unchunked on the device and on the CPU
        want_cpu = ce_and_grads(plain, hidden, copy.deepcopy(head), targets)
        want_dev = ce_and_grads(plain, hidden.to(device), copy.deepcopy(head).to(device), targets.to(device))
        got = ce_and_grads(chunked, hidden.to(device), head_on(F64), targets.to(device))
        parts.append((f"float64 chunked ({how}) vs unchunked {device}", add_all(Diff(), got, want_dev, RTOL_F64), RTOL_F64))
        parts.append((f"vs cpu", add_all(Diff(), got, want_cpu, RTOL_F64), RTOL_F64))
        # fp32 chunked against the float64 reference; bf16 autocast chunked against fp32 unchunked
        h32, t_dev = hidden.float().to(device), targets.to(device)
        got32 = ce_and_grads(chunked, h32, head_on(torch.float32), t_dev)
        parts.append(("fp32 chunked vs float64", add_all(Diff(), got32, want_cpu, RTOL_FP32), RTOL_FP32))
        ref16 = ce_and_grads(plain, h32, copy.deepcopy(head).to(device=device, dtype=torch.float32), t_dev, amp="bf16")
        got16 = ce_and_grads(chunked, h32, head_on(torch.float32), t_dev, amp="bf16")
        parts.append(("bf16 autocast chunked vs unchunked", add_all(Diff(), got16, ref16, RTOL_CE_BF16), RTOL_CE_BF16))
        # a whole task-1 step with the chunking forced (teracon.next_item_loss patched) ...
        [model] = grown_models(TINY["items"], TINY["channels"], TINY["dilations"], [TINY["items"]], seed=5)
        batches = make_batches(1, 8, 13, TINY["items"], 1, seed=5)  # 8 x 12 = 96 positions
        step = lambda m: Task1Step(m, 0.75)  # noqa: E731
        got_step = run_steps(on(model, device, F64, perturb), step, batches, device)
    # ... against the same step unchunked
    want_step = run_steps(on(model, device, F64), step, batches, device)
    parts.append(("Task1Step chunked vs unchunked", compare_runs(Diff(), got_step, want_step, RTOL_F64), RTOL_F64))
    return result("c chunked cross-entropy", parts)


@contextlib.contextmanager
def precision_restored() -> Iterator[None]:
    """The global precision switches that `utils.set_precision` sets, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, det,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved
        torch.use_deterministic_algorithms(det)


def losses(records: list[dict]) -> torch.Tensor:
    return torch.tensor([math.nan if r["loss"] is None else r["loss"] for r in records[1:]], dtype=F64)


def check_amp(device: torch.device, perturb: Perturb | None = None, items: int = 2000, channels: int = 64,
              dilations: tuple[int, ...] = (1, 4, 1, 4), rows: tuple[int, int] = (32, 128)) -> Result:
    """g: --amp fp32 against float64 on the CPU; --amp tf32 and bf16 against fp32 on the device
    (losses of three steps, task 1 and task 3), by default on a model where TF32 and bf16 round
    visibly (a test may pass smaller sizes: bf16 is slow on CPUs without native support)."""
    models = grown_models(items, channels, dilations, [items, 30, 9], seed=6)
    cases = {"task 1": (models[0], lambda dev, dt: (lambda m: Task1Step(m, 0.75)), make_batches(3, rows[0], 21, items, 1, 7), 1e-3),
             "task 3": (models[2], lambda dev, dt: retention_factory(models[1], dev, dt),
                        make_batches(3, rows[1], 20, items, 9, 8), 1e-4)}
    parts, notes = [], []
    with precision_restored():
        for case, (model, factory, batches, lr) in cases.items():
            set_precision("fp32", CPU)
            ref = losses(run_steps(on(model, CPU, F64), factory(CPU, F64), batches, CPU, lr=lr))
            by_amp = {}
            for amp in ("fp32", "tf32", "bf16"):
                set_precision(amp, device)
                by_amp[amp] = losses(run_steps(on(model, device, torch.float32, perturb), factory(device, torch.float32),
                                               batches, device, amp=amp, lr=lr))
            for amp, want, tol in (("fp32", ref, RTOL_FP32), ("tf32", by_amp["fp32"], RTOL_TF32),
                                   ("bf16", by_amp["fp32"], RTOL_BF16)):
                d = Diff()
                for i in range(len(want)):
                    d.add("loss", f"step {i + 1}", by_amp[amp][i:i + 1], want[i:i + 1], tol)
                parts.append((f"{case} {amp} vs {'float64 cpu' if amp == 'fp32' else 'fp32'}", d, tol))
            if device.type == "cuda" and torch.equal(by_amp["tf32"], by_amp["fp32"]):
                notes.append(f"{case}: tf32 losses bit-identical to fp32 (is TF32 in effect?)")
    out = result("g precision --amp", parts)
    if notes:
        out.detail += " | NOTE " + "; ".join(notes)
    return out


IN_PROCESS = {"a": check_task1, "b": check_retention, "c": check_chunked_ce, "g": check_amp, "d": check_chunked_retention}


# ---------------------------------------------------------------------------- e, f: the real scripts

def write_synthetic(folder: Path, lines1: int = 300, lines2: int = 400, length: int = 12, items: int = 60,
                    classes: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """Tiny task files in the CONURE format, with structure to learn: task 1 = comma-separated raw
    item ids per line, left-padded with 0 (items walk a cycle with steps 1-2); task 2 =
    `SOURCE,,TARGET`, the target a function of the last item (`classes` raw labels 500, 503, ...)."""
    rng = np.random.default_rng(seed)
    raw = lambda k: 100 + 7 * k  # noqa: E731  (raw ids neither contiguous nor from 1: the index maps them)

    def sequence() -> tuple[list[int], int]:
        pad = int(rng.integers(0, 3))
        k, ks = int(rng.integers(0, items)), []
        for _ in range(length - pad):
            ks.append(k)
            k = (k + int(rng.integers(1, 3))) % items
        return [0] * pad + [raw(x) for x in ks], ks[-1]

    folder.mkdir(parents=True, exist_ok=True)
    t1, t2 = folder / "task1.csv", folder / "task2.csv"
    t1.write_text("".join(",".join(map(str, sequence()[0])) + "\n" for _ in range(lines1)))
    rows = []
    for _ in range(lines2):
        seq, last = sequence()
        rows.append(",".join(map(str, seq)) + ",," + str(500 + 3 * (last % classes)))
    t2.write_text("\n".join(rows) + "\n")
    return t1, t2


def method_commands(method: str, t1: Path, t2: Path, out: Path, device: str, python: str = sys.executable,
                    epochs: int = 2) -> dict[str, list[str]]:
    """The command lines of check e for one method: task 1, task 2 and evaluate.py, writing under `out`."""
    common = ["--device", device, "--method", method, "--seed", "0", "--quiet", "--eval_batch", "256",
              "--datapath_index", str(out / "index.json")]
    return {
        "task1": [python, str(ROOT / "train_task1.py"), "--datapath", str(t1), "--savepath", str(out / "task1"),
                  "--channels", "16", "--dilations", "1", "2", "--epochs", str(epochs), "--batch", "32", *common],
        "task2": [python, str(ROOT / "train_teracon_t2.py"), "--datapath", str(t2), "--savepath", str(out / "task2"),
                  "--paths", str(out / "task1.pt"), "--epochs", str(epochs), "--batch", "64", "--lr", "1e-3",
                  "--retrain_epochs", "1", *common],
        "evaluate": [python, str(ROOT / "evaluate.py"), "--paths", str(out / "task2.pt"), "--device", device,
                     "--json", str(out / "eval.json")],
    }


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1.0))


def tail(text: str, n: int = 300) -> str:
    text = " ".join(text.strip().split())
    return text[-n:]


def finite_metrics(metrics: dict | None) -> bool:
    return bool(metrics) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())


def run_method(method: str, t1: Path, t2: Path, out: Path, device: str, deadline: float) -> str | None:
    """Check e for one method: None if every script exits 0 with finite metrics, else why not."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, cmd in method_commands(method, t1, t2, out, device).items():
        start = time.time()
        try:
            proc = run(cmd, deadline - time.time())
        except subprocess.TimeoutExpired:
            return f"{method}: {name} timed out"
        seconds[name] = time.time() - start
        if proc.returncode != 0:
            return f"{method}: {name} exit {proc.returncode}: {tail(proc.stderr)}"
    summary = json.loads((out / "task2.json").read_text())
    rows = json.loads((out / "eval.json").read_text())["rows"]
    if not summary.get("finished") or not finite_metrics(summary.get("test")):
        return f"{method}: task-2 summary unfinished or non-finite test metrics {summary.get('test')}"
    bad = [r["task"] for r in rows if not finite_metrics(r["now"])]
    if len(rows) != 2 or bad:
        return f"{method}: evaluate.py rows {[r['task'] for r in rows]}, non-finite for tasks {bad}"
    return None


def check_methods(device: str, tmp: Path, deadline: float, methods: list[str] | None = None) -> Result:
    """e: every method, task 1 then task 2 then evaluate.py, through the real scripts on the device."""
    methods = methods or list(METHODS)
    t1, t2 = write_synthetic(tmp / "e_data")
    workers = 4 if device.startswith("cuda") else 1
    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(lambda m: run_method(m, t1, t2, tmp / f"e_{m}", device, deadline), methods))
    bad = [p for p in problems if p]
    detail = f"{len(methods) - len(bad)}/{len(methods)} methods ({', '.join(methods)}) ran task 1, task 2 and evaluate.py"
    if bad:
        detail += "; " + "; ".join(bad)
    return Result("e methods through the scripts", "FAIL" if bad else "PASS", detail)


def resume_commands(t1: Path, t2: Path, tmp: Path, device: str, python: str = sys.executable,
                    epochs: int = 4) -> dict[str, list[str]]:
    """The command lines of check f: task 1 once, then task 2 straight (folder A) and killed and
    resumed (folder B), both with --save_every 1 --deterministic."""
    common = ["--device", device, "--seed", "1", "--quiet", "--datapath_index", str(tmp / "index.json")]
    task2 = [python, str(ROOT / "train_teracon_t2.py"), "--datapath", str(t2), "--paths", str(tmp / "task1.pt"),
             "--epochs", str(epochs), "--batch", "32", "--lr", "1e-3", "--save_every", "1", "--deterministic",
             *common]
    return {"task1": [python, str(ROOT / "train_task1.py"), "--datapath", str(t1), "--savepath", str(tmp / "task1"),
                      "--channels", "16", "--dilations", "1", "2", "--epochs", "1", "--batch", "32", *common],
            "straight": task2 + ["--savepath", str(tmp / "A" / "task2")],
            "killed": task2 + ["--savepath", str(tmp / "B" / "task2")],
            "resume": task2 + ["--savepath", str(tmp / "B" / "task2"), "--resume"]}


def kill_in_epoch(cmd: list[str], state: Path, epoch: int, deadline: float) -> str | None:
    """Start `cmd`; SIGKILL it once its resumable state says it is inside `epoch` (or later); None
    if it was killed, else why not."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and time.time() < deadline:
            if state.is_file():
                try:  # the state is replaced atomically: a read sees a whole file
                    progress = torch.load(state, map_location="cpu", weights_only=True)["progress"]
                except Exception:  # noqa: BLE001  (replaced while being opened: read the next one)
                    progress = None
                if progress is not None and progress["epoch"] >= epoch and progress["batch"] >= 1:
                    proc.kill()
                    proc.wait()
                    return None
            time.sleep(0.002)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            return "timed out before it could be killed"
        return f"finished (exit {proc.returncode}) before it could be killed: {tail(proc.stderr.read())}"
    finally:
        if proc.stderr:
            proc.stderr.close()


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def check_resume(device: str, tmp: Path, deadline: float) -> Result:
    """f: kill and resume bit for bit on the device; the checkpoint evaluated on the CPU and the device."""
    t1, t2 = write_synthetic(tmp / "f_data", lines1=300, lines2=800, seed=1)
    tmp = tmp / "f"
    for sub in ("A", "B"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    cmds = resume_commands(t1, t2, tmp, device)
    for name in ("task1", "straight"):
        proc = run(cmds[name], deadline - time.time())
        if proc.returncode != 0:
            return Result("f kill and resume", "FAIL", f"{name} exit {proc.returncode}: {tail(proc.stderr)}")
    why = kill_in_epoch(cmds["killed"], tmp / "B" / "task2.resume.pt", 2, deadline)
    if why:
        return Result("f kill and resume", "FAIL", f"the run to interrupt {why}")
    progress = torch.load(tmp / "B" / "task2.resume.pt", map_location="cpu", weights_only=True)["progress"]
    proc = run(cmds["resume"], deadline - time.time())
    if proc.returncode != 0:
        return Result("f kill and resume", "FAIL", f"--resume exit {proc.returncode}: {tail(proc.stderr)}")
    a, b = state_dict_of(tmp / "A" / "task2.pt"), state_dict_of(tmp / "B" / "task2.pt")
    differ = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))
    worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ if k in b), default=0.0)
    problems = [f"{len(differ)} tensors differ after resuming (max abs {worst:.1e}): {differ[:3]}"] if differ else []
    if set(a) != set(b):
        problems.append("the checkpoints hold different tensors")
    # evaluate.py on the CPU and on the device, and against the test metrics recorded in training
    evals = {}
    for where in ("cpu", device):
        out = tmp / f"eval_{where.replace(':', '_')}.json"
        proc = run([sys.executable, str(ROOT / "evaluate.py"), "--paths", str(tmp / "B" / "task2.pt"),
                    "--device", where, "--json", str(out)], deadline - time.time())
        if proc.returncode != 0:
            return Result("f kill and resume", "FAIL", f"evaluate.py --device {where} exit {proc.returncode}: "
                          f"{tail(proc.stderr)}")
        evals[where] = json.loads(out.read_text())["rows"]
    tasks = torch.load(tmp / "B" / "task2.pt", map_location="cpu", weights_only=True)["tasks"]
    worst_eval = 0.0
    for row_cpu, row_dev, entry in zip(evals["cpu"], evals[device], tasks):
        tol = EVAL_EXAMPLES / max(entry["split_sizes"]["test"], 1)
        # the test metrics recorded in training belong to the checkpoint's weights for its last task
        # only (an earlier task's were taken with that task's model)
        pairs = [("cpu", row_cpu["now"])] + ([("training", row_dev["after_training"])] if entry is tasks[-1] else [])
        for label, want in pairs:
            for k, v in row_dev["now"].items():
                diff = abs(v - want.get(k, math.nan)) if want else math.nan
                worst_eval = max(worst_eval, diff) if math.isfinite(diff) else math.inf
                if not diff <= tol:
                    problems.append(f"task {entry['task']} {k}: {device} {v:.4f} vs {label} {want.get(k) if want else None}"
                                    f" (tol {tol:.4f})")
    detail = (f"killed at epoch {progress['epoch']} batch {progress['batch']}, resumed: "
              f"{'bit-identical weights' if not differ else 'weights DIFFER'}; evaluate.py cpu vs {device} "
              f"and (task 2) vs training's test metrics: worst |diff| {worst_eval:.4f} (tol {EVAL_EXAMPLES} examples)")
    if problems:
        detail += "; " + "; ".join(problems[:4])
    return Result("f kill and resume", "FAIL" if problems else "PASS", detail)


# ---------------------------------------------------------------------------- h: speed

def speed_commands(device: str, tmp: Path, authors: str) -> dict[str, list[str]]:
    return {"bench": [sys.executable, str(ROOT / "bench.py"), "--paper", "--device", device, "--tasks", "2", "6", "10",
                      "--repeats", "1", "--warmup", "1", "--json", str(tmp / "bench.json")],
            "authors": [sys.executable, str(ROOT / "bench_authors.py"), "--authors", authors, "--cases", "taskn",
                        "--task", "6", "--batch", "1024", "--length", "100", "--repeats", "1", "--warmup", "0",
                        "--no-memory", "--json", str(tmp / "bench_authors.json")]}


def run_bench(name: str, cmd: list[str], timeout: float, note: str = "") -> Result:
    start = time.time()
    try:
        proc = run(cmd, timeout)
    except subprocess.TimeoutExpired as e:  # the table comes at the end: show the cases' log lines so far
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        print("\n".join((text(e.stdout) + text(e.stderr)).rstrip().splitlines()[-40:]), flush=True)
        return Result(name, "SKIP", f"timed out after {timeout:.0f} s (the figures it logged so far are above)",
                      time.time() - start)
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        return Result(name, "FAIL", f"exit {proc.returncode}: {tail(proc.stderr)}", time.time() - start)
    errors = [line.strip() for line in proc.stdout.splitlines() if " error: " in line]
    detail = f"ran ({' '.join(cmd[2:])}); figures above{note}"
    if errors:
        detail += f"; {len(errors)} case(s) failed: {'; '.join(errors[:3])}"
    return Result(name, "PASS", detail, time.time() - start)


def check_speed(device: str, tmp: Path, deadline: float, authors: str) -> list[Result]:
    cmds = speed_commands(device, tmp, authors)
    results = [run_bench("h speed: bench.py --paper", cmds["bench"], min(240.0, deadline - time.time() - 60))]
    checkout = Path(authors)
    missing = [f for f in ("teracon.py", "generator_hat_other.py", "utils.py") if not (checkout / f).is_file()]
    left = deadline - time.time()
    if missing:
        results.append(Result("h speed: bench_authors.py", "SKIP", f"no authors' checkout at {authors} (missing "
                              f"{', '.join(missing)}; git clone https://github.com/Sein-Kim/TERACON there, or --authors DIR)"))
    elif left < 30:
        results.append(Result("h speed: bench_authors.py", "SKIP", f"{left:.0f} s left of the budget"))
    else:
        results.append(run_bench("h speed: bench_authors.py", cmds["authors"], left - 5,
                                 " (bench_authors.py runs on the CPU only: these are the machine's CPU figures)"))
    return results


# ---------------------------------------------------------------------------- main

class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the in-process check after `seconds` (SIGALRM; main thread on POSIX only)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


TIMEOUTS = {"a": 60, "b": 60, "c": 90, "g": 120, "d": 60, "e": 200, "f": 150}  # seconds, on CUDA
CPU_SLOWER = 4  # a dry run on the CPU (methods one at a time, slow bf16) gets 4 times longer
ORDER = ("a", "b", "c", "g", "d", "e", "f", "h")


def header(device: torch.device) -> str:
    from utils import code_version
    code = code_version(ROOT)
    parts = [f"torch {torch.__version__}", f"code {str(code['commit'])[:10]}{' (dirty)' if code['dirty'] else ''}"]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        parts += [f"{torch.cuda.get_device_name(device)} (sm {cap[0]}{cap[1]})", f"CUDA {torch.version.cuda}",
                  f"cuDNN {torch.backends.cudnn.version()}"]
    else:
        parts += [f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"]
    return "gpu_check: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device under test (default %(default)s; cpu: a dry run)")
    p.add_argument("--quick", action="store_true", help="check e with the teracon method only, no speed figures (h)")
    p.add_argument("--checks", nargs="+", choices=ORDER, default=list(ORDER), help="which checks (default all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="check e: these methods (default all)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (default %(default)s)")
    p.add_argument("--authors", default=os.environ.get("TERACON_AUTHORS_DIR", "/tmp/teracon_authors"),
                   help="checkout of github:Sein-Kim/TERACON for bench_authors.py (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of e, f and h")
    a = p.parse_args(argv)
    start = time.time()
    deadline = start + a.budget
    try:
        device = torch.device(a.device)
    except RuntimeError:
        print(f"error: --device {a.device}: not a device", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}: no CUDA device here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    print(header(device), flush=True)
    set_precision("fp32", device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results: list[Result] = []

    def report(r: Result) -> None:
        results.append(r)
        print(r.line(), flush=True)

    try:
        for check in [c for c in ORDER if c in a.checks]:
            left = deadline - time.time()
            if check == "h":
                if a.quick:
                    report(Result("h speed", "SKIP", "--quick"))
                elif left < 60:
                    report(Result("h speed", "SKIP", f"{left:.0f} s left of the {a.budget:.0f} s budget"))
                else:
                    for r in check_speed(a.device, tmp, deadline, a.authors):
                        report(r)
                continue
            if left < 10:
                report(Result(check, "SKIP", f"{left:.0f} s left of the {a.budget:.0f} s budget"))
                continue
            limit = min(TIMEOUTS[check] * (1 if device.type == "cuda" else CPU_SLOWER), left)
            t0 = time.time()
            try:
                if check in IN_PROCESS:
                    with time_limit(limit):
                        r = IN_PROCESS[check](device)
                elif check == "e":
                    r = check_methods(a.device, tmp, t0 + limit, ["teracon"] if a.quick and not a.methods else a.methods)
                else:
                    r = check_resume(a.device, tmp, t0 + limit)
            except (CheckTimeout, subprocess.TimeoutExpired):
                r = Result(check, "FAIL", f"timed out after {limit:.0f} s")
            except Exception as e:  # noqa: BLE001  (a crash of a check is its failure; the others still run)
                r = Result(check, "FAIL", f"crashed: {type(e).__name__}: {tail(str(e))}")
            r.seconds = time.time() - t0
            report(r)
    finally:
        if a.keep:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check {a.device}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
          f"in {time.time() - start:.0f} s (budget {a.budget:.0f} s)", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
