"""GPU check: the first training losses of task 1 and task 2 on CUDA equal the CPU ones.

    python scripts/gpu_check.py            # needs a CUDA device
    python scripts/gpu_check.py cpu        # dry run of the check itself: CPU against CPU

Builds a tiny synthetic dataset, then for task 1 and task 2 computes the loss of the first batch
with identical weights on the CPU and on CUDA (fp32, then bf16 autocast) and prints both and
their relative difference. Exit status 1 if fp32 differs by more than 1e-4 (relative).
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data_loader as dl  # noqa: E402
from nextitnet import NextItNet  # noqa: E402
from prepare_data import make_synthetic  # noqa: E402
from teracon import RetentionStep, Task1Step, anneal_s  # noqa: E402
from trainer import autocast  # noqa: E402


def first_loss(step_factory, model: NextItNet, data: dl.TaskData, device: torch.device, amp: str) -> float:
    model = copy.deepcopy(model).to(device)
    step = step_factory(model, device)
    src, tgt = data.batch(data.splits["train"][:256], device)
    with autocast(device, amp):
        loss = step.loss(src, tgt, anneal_s(3, 10.0, 50.0))
    loss.backward()
    return loss.item()


def main() -> int:
    cpu, cuda = torch.device("cpu"), torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if cuda.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if cuda.type == 'cuda' else cuda}")
    tmp = Path(tempfile.mkdtemp())
    manifest = dl.load_manifest(str(make_synthetic(tmp, users=600, items=200, seq_len=20, num_tasks=2, seed=0)))
    task1, items = dl.load_task1(manifest["tasks"][0]["file"], seed=0)
    task2 = dl.load_task(2, manifest["tasks"][1]["file"], items, seed=0)
    torch.manual_seed(0)
    model1 = NextItNet(len(items) + 1, [task1.num_classes])
    model2 = copy.deepcopy(model1)
    model2.add_task(task2.num_classes)

    def task2_step(model, device):
        teacher = copy.deepcopy(model1).to(device).eval().requires_grad_(False)
        return RetentionStep(model, teacher, 0.7, np.random.default_rng(0))

    worst = 0.0
    for name, model, data, factory in (("task 1", model1, task1, lambda m, d: Task1Step(m, 0.75)),
                                       ("task 2", model2, task2, task2_step)):
        for amp in ("fp32", "bf16"):
            a = first_loss(factory, model, data, cpu, amp)
            b = first_loss(factory, model, data, cuda, amp)
            rel = abs(a - b) / abs(a)
            if amp == "fp32":
                worst = max(worst, rel)
            print(f"{name} {amp}: cpu {a:.6f}  {cuda} {b:.6f}  relative difference {rel:.2e}")
    print("PASS" if worst <= 1e-4 else "FAIL", f"(fp32 worst relative difference {worst:.2e}, tolerance 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
