"""The methods compared on one backbone and one training loop (`--method`).

One class per method says everything that is particular to it: which masks its model uses, how
the model of a task is built, the step it trains, the hooks around each optimiser step, what
follows the fit (CONURE's retraining), what it adds to a checkpoint and how a checkpoint serves
each of its tasks. Adding a method means adding a class here and an entry in `METHODS`.

- `teracon`: the paper's method; `teracon-nokr` (alpha = 0) and `teracon-norel` (plain masks)
  are its ablations.
- `fineall`: fine-tune everything on each new task, no masks, no retention (forgets).
- `sinmo`: one model per task, trained from scratch on that task alone.
- `hat`: Hard Attention to the Task (Serra et al., ICML 2018).
- `conure`: CONURE (Yuan et al., SIGIR 2021): prune, retrain and freeze per task.
- `peterrec`: PeterRec (Yuan et al., SIGIR 2020): the task-1 model frozen, per-task model patches.
- `piggyback`: Piggyback (Mallya et al., ECCV 2018): the backbone frozen, per-task binary weight masks.
- `mtl`: multi-task learning, the reference that trains every task jointly (not continual).
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

import data_loader as dl
from nextitnet import Binarize, NextItNet
from teracon import NewTaskStep, RetentionStep, Step, Task1Step
from utils import UserError


class Teracon:
    """TERACON (Kim et al., KDD 2023): relation-aware masks and knowledge retention (Sec. 4)."""
    name = "teracon"
    relation = True   # relation-aware masks (eq. 12-13); False: plain sigmoid(s e_t) (eq. 3)
    masked = True     # task masks at all; False: all ones
    retention = True  # pseudo-labels of the frozen previous model (Sec. 4.3)

    def __init__(self, args: argparse.Namespace, task: int, prev: dict | None, device: torch.device):
        self.args, self.task, self.prev, self.device = args, task, prev, device

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> None:
        """Adjust the run's flags to the method before they are recorded (default: none)."""

    # ---- the model of this task ------------------------------------------------------
    def build(self, num_items: int, num_classes: int) -> tuple[NextItNet, NextItNet | None]:
        """(model, frozen teacher or None): task 1 starts fresh; task n grows the task n-1 model
        by one task (SPEC 4) and, with retention, keeps a frozen copy as the teacher."""
        if self.prev is None:
            return self.fresh_model(num_items, num_classes), None
        teacher = None
        if self.retention and self.args.alpha > 0:
            teacher = NextItNet.from_checkpoint(self.prev, self.args.paths).to(self.device).eval().requires_grad_(False)
        model = NextItNet.from_checkpoint(self.prev, self.args.paths)
        model.add_task(num_classes)
        return model, teacher

    def fresh_model(self, num_items: int, num_classes: int, config: dict | None = None) -> NextItNet:
        config = config or {"channels": self.args.channels, "dilations": self.args.dilations}
        return NextItNet(num_items, [num_classes], channels=config["channels"], dilations=tuple(config["dilations"]),
                         relation=self.relation, masked=self.masked, first_task=self.task)

    def prepare(self, model: NextItNet) -> None:
        """After the model is on its device and before its optimiser exists (default: nothing)."""

    def step(self, model: NextItNet, teacher: NextItNet | None) -> Step:
        if self.task == 1:
            return Task1Step(model, self.args.mask_reg)
        if teacher is not None:
            return RetentionStep(model, teacher, self.args.alpha, np.random.default_rng([self.args.seed, 1]),
                                 min_rows=self.args.min_retention_rows, chunk_rows=self.args.chunk_rows)
        return NewTaskStep(model, self.penalty)

    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None

    def hooks(self):
        """What runs around each optimiser step (`before_step(s)`, `after_step()`), or None."""
        return None

    def after_fit(self, model: NextItNet, reload_best: Callable[[], None], fit: Callable[..., dict]) -> dict | None:
        """What follows the fit (CONURE's prune-and-retrain); returns the new summary or None."""
        return None

    def extras(self) -> dict:
        """The method's own checkpoint entries, computed at save time."""
        return {}

    def parameters(self) -> list[torch.Tensor]:
        """Trained tensors the method keeps outside the model (default: none)."""
        return []

    def state_dict(self) -> dict:
        """The method's own state that `--resume` must restore (default: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- its checkpoint entries --------------------------------------------------------
    @classmethod
    def checkpoint_problem(cls, ckpt: dict) -> str | None:
        """What is wrong with the method's own entries of a checkpoint (`extras`), or None (a
        config without a conv layout raises `LayoutError`)."""
        return None

    @classmethod
    def upgrade_checkpoint(cls, ckpt: dict) -> None:
        """Move the method's own entries of a teracon/1 checkpoint where teracon/2 keeps them."""

    # ---- serving a checkpoint ----------------------------------------------------------
    @classmethod
    def serve(cls, ckpt: dict, device: torch.device, source: str = "checkpoint") -> Iterator[tuple[NextItNet, int]]:
        """(model, head) ready to evaluate each task of `ckpt`, in task order."""
        model = NextItNet.from_checkpoint(ckpt, source).to(device)
        for head in range(len(ckpt["tasks"])):
            yield model, head


class TeraconNoKR(Teracon):
    """Ablation: no knowledge retention (alpha = 0, recorded so in the run's arguments)."""
    name = "teracon-nokr"
    retention = False

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> None:
        args.alpha = 0.0


class TeraconNoRel(Teracon):
    """Ablation: plain masks sigmoid(s e_t) instead of relation-aware ones."""
    name = "teracon-norel"
    relation = False


class FineAll(Teracon):
    """Fine-tune every parameter on each new task; no masks, no retention (forgets)."""
    name = "fineall"
    masked = False
    retention = False


class SinMo(Teracon):
    """One model per task, trained from scratch on that task alone; the checkpoint of task n
    carries the models of tasks 1..n-1 as `members`."""
    name = "sinmo"
    masked = False
    retention = False

    def build(self, num_items: int, num_classes: int) -> tuple[NextItNet, NextItNet | None]:
        return self.fresh_model(num_items, num_classes, self.prev["config"] if self.prev else None), None

    def extras(self) -> dict:
        if self.prev is None:
            return {}
        return {"members": self.prev.get("members", []) + [{"config": self.prev["config"],
                                                            "state_dict": self.prev["state_dict"]}]}

    @classmethod
    def upgrade_checkpoint(cls, ckpt: dict) -> None:
        """teracon/1's one-task models did not say which task they serve: member i is task i + 1's."""
        for i, member in enumerate(ckpt.get("members", [])):
            member["config"].setdefault("first_task", i + 1)
        ckpt["config"].setdefault("first_task", len(ckpt["tasks"]))

    @classmethod
    def serve(cls, ckpt: dict, device: torch.device, source: str = "checkpoint") -> Iterator[tuple[NextItNet, int]]:
        members = ckpt.get("members", []) + [ckpt]
        if len(members) != len(ckpt["tasks"]):
            raise UserError(f"{source}: sinmo checkpoint has {len(members)} models for {len(ckpt['tasks'])} tasks")
        for member in members:
            yield NextItNet.from_checkpoint(member, source).to(device), 0


def hat_penalty(mask: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
    """HAT's sparsity regulariser (Serra et al. eq. 5): sum m (1 - a_<t) / sum (1 - a_<t)."""
    free = 1.0 - cumulative
    return (mask * free).sum() / free.sum().clamp_min(1e-8)


class HAT(Teracon):
    """Hard Attention to the Task (Serra et al., ICML 2018): plain annealed masks; the past tasks'
    cumulative mask a_<t [M, C] blocks the weights they use (eq. 6-7); embedding-gradient
    compensation; sparsity regulariser weighted by --hat_reg.

    A conv weight (out o, in i) is gated by 1 - min(a_out[o], a_in[i]); the first conv of a
    block reads the unmasked residual stream (a_in = 1), so the item embedding, which writes
    that stream, is frozen after task 1, like the past tasks' heads. HAT scales gradients for
    SGD; with Adam, which normalises them, we scale each parameter's *update* by its gate.
    """
    name = "hat"
    relation = False
    retention = False
    THRES_COSH = 50.0

    def prepare(self, model: NextItNet) -> None:
        self.model = model
        self.cumulative = self.prev["hat_cumulative"].to(self.device) if self.prev is not None else None
        self.gates: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._before: list[torch.Tensor] = []
        if self.cumulative is None:
            return
        a = self.cumulative
        model.item_embedding.weight.requires_grad_(False)
        for head in model.heads[:-1]:
            head.requires_grad_(False)
        for b, block in enumerate(model.blocks):
            free1, free2 = 1.0 - a[2 * b], 1.0 - a[2 * b + 1]
            self.gates += [(block.conv1.weight, free1[:, None, None]),
                           (block.conv2.weight, (1.0 - torch.minimum(a[2 * b + 1][:, None], a[2 * b][None, :]))[..., None])]
            self.gates += [(p, free1) for p in (block.conv1.bias, block.ln1.weight, block.ln1.bias)]
            self.gates += [(p, free2) for p in (block.conv2.bias, block.ln2.weight, block.ln2.bias)]

    def penalty(self, masks: torch.Tensor) -> torch.Tensor:
        return self.args.hat_reg * hat_penalty(masks[-1], self.cumulative)

    def hooks(self):
        return self

    @torch.no_grad()
    def before_step(self, s: float) -> None:
        for p, gate in self.gates:
            p.grad *= gate
        self._before = [p.detach().clone() for p, _ in self.gates]
        # Compensate the sigmoid's flat gradient at small s (HAT's embedding-gradient compensation).
        t = self.model.num_tasks - 1
        e = self.model.task_masks.task_embedding
        num = torch.cosh(torch.clamp(s * e[t], -self.THRES_COSH, self.THRES_COSH)) + 1
        den = torch.cosh(e[t]) + 1
        e.grad[t] *= self.args.smax / s * num / den

    @torch.no_grad()
    def after_step(self) -> None:
        for (p, gate), old in zip(self.gates, self._before):
            p.copy_(old + gate * (p - old))

    @classmethod
    def checkpoint_problem(cls, ckpt: dict) -> str | None:
        layers, channels, _ = conv_layout(ckpt)
        cumulative = ckpt.get("hat_cumulative")
        if not isinstance(cumulative, torch.Tensor) or tuple(cumulative.shape) != (layers, channels):
            return f"hat_cumulative is not a [{layers}, {channels}] tensor"
        return None

    @torch.no_grad()
    def extras(self) -> dict:
        """a_<=t = max(a_<t, m_t at s = smax), stored in the checkpoint for the next task."""
        mask = self.model.masks(self.args.smax)[-1].detach().cpu()
        return {"hat_cumulative": mask if self.cumulative is None else torch.maximum(self.cumulative.cpu(), mask)}


class Conure(Teracon):
    """CONURE (Yuan et al., SIGIR 2021): each conv weight belongs to one task (`owner`, 0 = free).
    Task t trains the free weights, keeps the largest (1 - --prune_ratio) of them by magnitude as
    its own, zeroes the rest and retrains its own; later tasks never change them. Item embedding,
    layer norms and conv biases are frozen after task 1, as are past heads. Task t is served with
    the free weights and those of tasks <= t."""
    name = "conure"
    masked = False
    retention = False

    def prepare(self, model: NextItNet) -> None:
        self.model, self.phase = model, "train"
        if self.prev is not None:
            self.owner = [o.to(self.device) for o in self.prev["conure_owner"]]
        else:
            self.owner = [torch.zeros(conv.weight.shape, dtype=torch.int16, device=self.device) for conv in model.convs()]
        if self.task > 1:
            frozen = [model.item_embedding.weight] + [p for h in model.heads[:-1] for p in h.parameters()]
            for block in model.blocks:
                frozen += [block.conv1.bias, block.conv2.bias, *block.ln1.parameters(), *block.ln2.parameters()]
            for p in frozen:
                p.requires_grad_(False)

    def hooks(self):
        return self

    @torch.no_grad()
    def before_step(self, s: float) -> None:
        """Only the free weights train (then, after pruning, only this task's): Adam leaves a
        weight whose gradient was always exactly zero where it is."""
        trainable = 0 if self.phase == "train" else self.task
        for conv, owner in zip(self.model.convs(), self.owner):
            conv.weight.grad *= owner == trainable

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def prune(self) -> None:
        """Keep the largest free weights of every conv as this task's; zero the others."""
        for conv, owner in zip(self.model.convs(), self.owner):
            free = owner == 0
            keep = int(round((1.0 - self.args.prune_ratio) * int(free.sum())))
            magnitude = torch.where(free, conv.weight.abs(), torch.full_like(conv.weight, -1.0))
            top = torch.topk(magnitude.flatten(), keep).indices
            owner.view(-1)[top] = self.task
            conv.weight[owner == 0] = 0.0
        self.phase = "retrain"

    def after_fit(self, model: NextItNet, reload_best: Callable[[], None], fit: Callable[..., dict]) -> dict | None:
        """Prune the best model, then retrain the weights it keeps."""
        reload_best()
        self.prune()
        return fit(epochs=self.args.retrain_epochs, phase="retrain")

    def extras(self) -> dict:
        return {"conure_owner": [o.cpu() for o in self.owner]}

    @classmethod
    def checkpoint_problem(cls, ckpt: dict) -> str | None:
        layers, channels, kernel = conv_layout(ckpt)
        owner = ckpt.get("conure_owner")
        if not (isinstance(owner, list) and len(owner) == layers and all(
                isinstance(o, torch.Tensor) and tuple(o.shape) == (channels, channels, kernel) for o in owner)):
            return f"conure_owner is not {layers} tensors of shape [{channels}, {channels}, {kernel}]"
        return None

    @classmethod
    def upgrade_checkpoint(cls, ckpt: dict) -> None:
        """teracon/1 kept the owners as conv buffers (`blocks.B.convK.owner`); now `conure_owner`,
        in the model's conv order."""
        owners = sorted((k for k in ckpt["state_dict"] if k.endswith(".owner")), key=lambda k: (int(k.split(".")[1]), k))
        if owners:
            ckpt["conure_owner"] = [ckpt["state_dict"].pop(k) for k in owners]

    def state_dict(self) -> dict:
        return {"owner": [o.cpu() for o in self.owner], "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.owner = [o.to(self.device) for o in state["owner"]]
        self.phase = state["phase"]

    @classmethod
    def serve(cls, ckpt: dict, device: torch.device, source: str = "checkpoint") -> Iterator[tuple[NextItNet, int]]:
        model = NextItNet.from_checkpoint(ckpt, source).to(device)
        owner = [o.to(device) for o in ckpt["conure_owner"]]
        for head in range(len(ckpt["tasks"])):
            with weights_of_task(model, owner, head + 1):
                yield model, head


class LayoutError(ValueError):
    """A checkpoint config without the conv layout a method's entries are checked against."""


def conv_layout(ckpt: dict) -> tuple[int, int, int]:
    """(masked layers, channels, kernel) of a checkpoint's backbone."""
    try:
        return 2 * len(ckpt["config"]["dilations"]), int(ckpt["config"]["channels"]), int(ckpt["config"].get("kernel", 3))
    except (KeyError, TypeError, ValueError):
        raise LayoutError("config lacks channels or dilations") from None


class PeterRec(Teracon):
    """PeterRec (Yuan et al., SIGIR 2020): the task-1 model is frozen; each later task adds its
    own model patches (`nextitnet.ModelPatch`, serial after every conv, the authors' causal
    'serial' variant, width `--patch_size`, default C/4 as their cardinality-1 patch) and its
    head, and trains only those: no forgetting, no transfer between later tasks. Their code also
    retrains each block's second layer norm; we train the patches and the head only (the paper's
    statement) and freeze the layer norms with the rest."""
    name = "peterrec"
    masked = False
    retention = False

    def build(self, num_items: int, num_classes: int) -> tuple[NextItNet, NextItNet | None]:
        model, _ = super().build(num_items, num_classes)
        if self.prev is not None:
            model.patch_size = model.patch_size or self.args.patch_size or model.channels // 4
            model.add_patches(model.num_tasks - 1)
        return model, None

    def prepare(self, model: NextItNet) -> None:
        if self.prev is None:
            return
        own = [*model.patches_of(model.num_tasks - 1).parameters(), *model.heads[-1].parameters()]
        model.requires_grad_(False)
        for p in own:
            p.requires_grad_(True)


class Piggyback(Teracon):
    """Piggyback (Mallya, Davis, Lazebnik, ECCV 2018): the backbone is frozen after task 1; each
    later task learns real-valued scores for every conv weight, initialised to 1e-2 and
    thresholded at 5e-3 into a binary mask (`nextitnet.Binarize`, a straight-through gradient),
    and runs with W * mask_t; it trains the scores and its head. The masks of every task are
    stored in the checkpoint at one bit a weight (`piggyback_masks`: per later task, per conv,
    np.packbits of the flattened mask). Our choices: the item embedding, conv biases and layer
    norms stay frozen and unmasked (Piggyback masks the weights of its convolutions and linear
    layers); the scores train with the task's --lr (Piggyback's paper used 1e-4 for them)."""
    name = "piggyback"
    masked = False
    retention = False
    SCORE_INIT = 1e-2

    def prepare(self, model: NextItNet) -> None:
        self.scores = []
        if self.prev is None:
            return
        model.requires_grad_(False)
        model.heads[-1].requires_grad_(True)
        for conv in model.convs():
            conv.scores = torch.full_like(conv.weight, self.SCORE_INIT).requires_grad_(True)
            self.scores.append(conv.scores)

    def parameters(self) -> list[torch.Tensor]:
        return self.scores

    def masks(self) -> list[torch.Tensor]:
        """This task's binary masks (bool), one per conv."""
        return [Binarize.apply(s.detach()).bool().cpu() for s in self.scores]

    def extras(self) -> dict:
        if self.prev is None:
            return {"piggyback_masks": []}
        return {"piggyback_masks": self.prev["piggyback_masks"] + [[pack_bits(m) for m in self.masks()]]}

    def state_dict(self) -> dict:
        return {"scores": [s.detach().cpu() for s in self.scores]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for s, saved in zip(self.scores, state["scores"]):
                s.copy_(saved)

    @classmethod
    def checkpoint_problem(cls, ckpt: dict) -> str | None:
        layers, channels, kernel = conv_layout(ckpt)
        masks, size = ckpt.get("piggyback_masks"), (channels * channels * kernel + 7) // 8
        if not (isinstance(masks, list) and len(masks) == len(ckpt["tasks"]) - 1 and all(
                isinstance(task, list) and len(task) == layers and all(
                    isinstance(m, torch.Tensor) and m.dtype == torch.uint8 and tuple(m.shape) == (size,) for m in task)
                for task in masks)):
            return (f"piggyback_masks is not {len(ckpt['tasks']) - 1} list(s) of {layers} packed masks of {size} bytes")
        return None

    @classmethod
    def serve(cls, ckpt: dict, device: torch.device, source: str = "checkpoint") -> Iterator[tuple[NextItNet, int]]:
        model = NextItNet.from_checkpoint(ckpt, source).to(device)
        for head in range(len(ckpt["tasks"])):
            for i, conv in enumerate(model.convs()):
                conv.scores = None if head == 0 else unpack_bits(ckpt["piggyback_masks"][head - 1][i],
                                                                 conv.weight.shape).to(device, conv.weight.dtype)
            yield model, head


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor at one bit an element (uint8, flattened, zero-padded to whole bytes)."""
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`pack_bits` undone: a bool tensor of `shape`."""
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool)).reshape(shape)


class MTL(Teracon):
    """Multi-task learning: the reference that sees every task at once, not a continual method.
    At task n one backbone starts again from the task-1 model and, with fresh heads for tasks
    2..n and task 1's own, trains on the training data of tasks 1..n jointly (`JointStep`: each
    step adds one batch of every earlier task to the newest task's batch, the losses summed; an
    epoch lasts until every task's training split has been seen once). Model selection on the
    newest task's validation metric, as for every method. The task-1 weights it restarts from
    travel in every later checkpoint (`mtl_start`). Under torchrun every task's batch is split
    across the ranks."""
    name = "mtl"
    masked = False
    retention = False

    def start(self) -> dict:
        """The task-1 model (config and weights) every task n restarts from."""
        return self.prev.get("mtl_start") or {"config": self.prev["config"], "state_dict": self.prev["state_dict"]}

    def build(self, num_items: int, num_classes: int) -> tuple[NextItNet, NextItNet | None]:
        if self.prev is None:
            return self.fresh_model(num_items, num_classes), None
        model = NextItNet.from_checkpoint(self.start(), self.args.paths)
        for entry in self.prev["tasks"][1:]:
            model.add_task(entry["num_classes"])
        model.add_task(num_classes)
        return model, None

    def step(self, model: NextItNet, teacher: NextItNet | None) -> Step:
        if self.task == 1:
            return Task1Step(model, self.args.mask_reg)
        earlier, items = [], None
        for entry in self.prev["tasks"]:  # every earlier task's data, exactly as it was trained
            data, items = dl.load_trained_task(entry, items)
            earlier.append(data)
        return JointStep(model, earlier, np.random.default_rng([self.args.seed, 3]), self.args.batch)

    def extras(self) -> dict:
        return {} if self.prev is None else {"mtl_start": self.start()}

    @classmethod
    def checkpoint_problem(cls, ckpt: dict) -> str | None:
        start = ckpt.get("mtl_start")
        if len(ckpt["tasks"]) > 1 and not (isinstance(start, dict) and isinstance(start.get("config"), dict)
                                           and isinstance(start.get("state_dict"), dict)):
            return "mtl_start is not a {config, state_dict} dict"
        return None


class JointStep(Step):
    """MTL's step: the newest task's cross-entropy on the batch plus, for every earlier task i
    (head i), its loss on the next batch of its own shuffled training split (task 1: the
    next-item loss on every position), all summed. Each earlier split is cycled in a fresh
    random order, batch by batch (the last batch of a pass partial)."""

    def __init__(self, model: NextItNet, earlier: list[dl.TaskData], rng: np.random.Generator, batch: int):
        self.model, self.earlier, self.rng, self.batch = model, earlier, rng, batch
        self.orders = [np.zeros(0, dtype=np.int64) for _ in earlier]
        self.cursors = [0] * len(earlier)

    def next_rows(self, i: int) -> np.ndarray:
        if self.cursors[i] >= len(self.orders[i]):
            self.orders[i], self.cursors[i] = self.rng.permutation(self.earlier[i].splits["train"]), 0
        rows = self.orders[i][self.cursors[i]:self.cursors[i] + self.batch]
        self.cursors[i] += len(rows)
        return rows

    def epoch_batches(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """The newest task's batches, cycled until the largest earlier split fits in the epoch."""
        need = max([len(batches)] + [-(-len(d.splits["train"]) // self.batch) for d in self.earlier])
        return [batches[b % len(batches)] for b in range(need)] if batches else batches

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, s: float) -> torch.Tensor:
        masks = self.model.masks(s)  # all ones: MTL has no task masks
        loss = self.task_loss(self.model.num_tasks - 1, src, tgt, masks)
        for i, data in enumerate(self.earlier):
            seqs, targets = data.batch(self.next_rows(i), src.device)
            loss = loss + self.task_loss(i, seqs, targets, masks)
        return loss

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "orders": [torch.from_numpy(o) for o in self.orders],
                "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.orders = [o.numpy() for o in state["orders"]]
        self.cursors = list(state["cursors"])


@contextmanager
def weights_of_task(model: NextItNet, owner: list[torch.Tensor], task: int) -> Iterator[None]:
    """Inside: every conv weight owned by a task after `task` (1-based) is zero."""
    with torch.no_grad():
        saved = [conv.weight.detach().clone() for conv in model.convs()]
        for conv, o in zip(model.convs(), owner):
            conv.weight.mul_(o <= task)
    try:
        yield
    finally:
        with torch.no_grad():
            for conv, w in zip(model.convs(), saved):
                conv.weight.copy_(w)


METHODS: dict[str, type[Teracon]] = {m.name: m for m in (Teracon, TeraconNoKR, TeraconNoRel, FineAll, SinMo, HAT, Conure,
                                                         PeterRec, Piggyback, MTL)}
