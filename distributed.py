"""Data parallelism under `torchrun`: PyTorch's torch.distributed, NCCL on CUDA, gloo on a CPU.

    torchrun --standalone --nproc_per_node 2 train_task1.py --dataset ml-100k ...

Every rank runs the same program on the same data with the same generators, so every rank
draws the same batch order, retention subsets and s, and holds the same weights. `--batch`
stays the global batch: each step's rows (for TERACON every past task's subset, then the
batch) are cut into one contiguous part per rank (`Shard.part`), each part's loss is weighted
by the whole batch's denominators, and `all_reduce_gradients` sums the parts' gradients, so
every rank takes the one-process step up to float rounding (`--chunk_rows` is the same split
inside one process). Evaluation sums its metrics the same way. Rank 0 alone writes files and
logs; the others log errors only.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import UserError, resolve_device

log = logging.getLogger("teracon")

TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer ends the run with an error


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` ranks: its part of every batch."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def part(self, n: int) -> slice:
        """This rank's contiguous part of n rows: sizes differ by at most one, rank order."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


SINGLE = Shard()


def env_shard() -> Shard:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (one process without them)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise UserError(f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local_rank}: not a valid torchrun layout")
    return Shard(rank, world, local_rank)


def init(device_name: str) -> tuple[Shard, torch.device]:
    """The shard and device of this process; under torchrun also joins the process group (NCCL
    with one GPU per local rank on CUDA, gloo on a CPU). Ranks other than 0 log errors only."""
    shard = env_shard()
    if not shard.parallel:
        return shard, resolve_device(device_name)
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device_name}: under torchrun each rank takes its own device; use auto, "
                        "cpu or cuda (rank r uses cuda:LOCAL_RANK)")
    device = resolve_device(device_name)
    if device.type == "cuda":
        if shard.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {shard.local_rank}: only {torch.cuda.device_count()} CUDA device(s) on "
                            "this node (use --nproc_per_node at most that)")
        device = torch.device("cuda", shard.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # reproduce.py runs its stages in one process group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if dist.get_world_size() != shard.world or dist.get_rank() != shard.rank:
        raise UserError("the process group does not match RANK and WORLD_SIZE")
    if not shard.main:
        log.setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped_by_launcher(shard))
    return shard, device


def stopped_by_launcher(shard: Shard) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: one error line, not a silent death."""
    raise UserError(f"rank {shard.rank}: stopped by torchrun (SIGTERM: another rank failed, or the job was "
                    "cancelled); the files rank 0 wrote are complete: rerun the same command with --resume")


def all_reduce_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' gradients of `params` and their losses; returns the summed loss.

    A parameter that got a gradient on some rank gets the sum everywhere (zeros where its rank
    had none); one that got none anywhere keeps none, so that Adam skips it as it would in one
    process (a past head whose subset was empty)."""
    head = torch.cat([loss.detach().double().reshape(1),
                      torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=loss.device)])
    collective(dist.all_reduce, head)
    for p, got in zip(params, head[1:].tolist()):
        if got and p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
    for work in works:
        collective(work.wait)
    return head[0]


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Metric sums (the same keys on every rank) summed over the ranks, in float64."""
    values = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    collective(dist.all_reduce, values)
    return dict(zip(sums, values.tolist()))


def broadcast_model(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's weights (after rank 0 alone has read them from a file)."""
    for tensor in model.state_dict().values():
        collective(dist.broadcast, tensor, 0)


def barrier(shard: Shard) -> None:
    """Wait for every rank (no-op in one process): files rank 0 wrote are complete after it."""
    if shard.parallel:
        collective(dist.barrier)


def collective(op, *args):
    """Run a collective; a rank that died or timed out ends this one with one error line."""
    try:
        return op(*args)
    except RuntimeError as e:  # gloo and NCCL errors (DistBackendError among them)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's source-file prefix
        raise UserError(f"rank {dist.get_rank()}: lost another rank of the run ({first[:160]}); the "
                        "resumable state rank 0 wrote last is intact: rerun the same command with --resume") from None


def finish(shard: Shard) -> None:
    """Leave the process group at the end of a script."""
    if shard.parallel and dist.is_initialized():
        dist.destroy_process_group()
