"""NextItNet backbone with TERACON's task-specific soft masks (SPEC 3-4, paper Sec. 4.1-4.2).

Shapes: B batch rows, L positions, C channels, T tasks known to the model, M = 2 * blocks
masked layers (layer 2b is block b's first conv, 2b+1 its second).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

CHANNELS = 256
DILATIONS = (1, 4, 1, 4, 1, 4, 1, 4)
KERNEL = 3
EMB_INIT = (0.0, 2.0)   # task embeddings ~ U(0, 2)
EMB_CLAMP = 6.0         # |e_t| <= 6 after every step
PIGGYBACK_THRESHOLD = 5e-3  # Piggyback (Mallya et al., ECCV 2018): a weight is kept where its score exceeds this


class Binarize(torch.autograd.Function):
    """Piggyback's mask: 1 where a score exceeds PIGGYBACK_THRESHOLD, else 0; the gradient passes
    straight through to the scores (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores > PIGGYBACK_THRESHOLD).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class CausalConv1d(nn.Conv1d):
    """Dilated causal convolution on [B, L, C]: left zero-padding (k-1)*d, one convolution.

    [B, L, C] is, read as [B, C, 1, L], a tensor in channels-last memory format, so the
    convolution runs as `F.conv2d` over that view with the [C_out, C_in, 1, k] view of this
    module's [C_out, C_in, k] weight: oneDNN (and cuDNN) read and write the channels-last layout
    directly, and the output is a contiguous [B, L, C] for the LayerNorm after it. `F.conv1d`
    has no channels-last path (a 3-D tensor has no such memory format): it needs the
    transposed [B, C, L], and the LayerNorm then copies its output back, in forward and backward
    (about 20% of a block's time on a CPU). Neither builds the k taps ([B, L, kC], the im2col of
    a GEMM formulation); the convolution saves only its padded input. With `scores` set
    (Piggyback: the real-valued scores of the task in use, a plain tensor, not a parameter of
    the conv), the weight is W * Binarize(scores).
    """
    scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, d = self.kernel_size[0], self.dilation[0]
        weight = self.weight if self.scores is None else self.weight * Binarize.apply(self.scores)
        xp = F.pad(x.unsqueeze(1).permute(0, 3, 1, 2), ((k - 1) * d, 0))        # [B, C, 1, (k-1)d + L]
        out = F.conv2d(xp, weight.unsqueeze(2), self.bias, dilation=(1, d))   # [B, C_out, 1, L]
        return out.permute(0, 2, 3, 1).squeeze(1)                              # [B, L, C_out]


class ModelPatch(nn.Module):
    """PeterRec's model patch (Yuan et al., SIGIR 2020, Sec. 3.3): a bottleneck residual
    x + W_up GELU(W_down x) over the channels, C -> k -> C, weights ~ N(0, 0.02), biases 0, so a
    fresh patch is close to the identity."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.down, self.up = nn.Linear(channels, size), nn.Linear(size, channels)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class ResidualBlock(nn.Module):
    """conv(d) -> LN -> ReLU -> * m1 -> conv(2d) -> LN -> ReLU -> * m2, plus the input (SPEC 3);
    with `patches` (PeterRec), each conv's output first goes through its model patch."""

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv1d(channels, channels, kernel, dilation=dilation)
        self.ln1 = nn.LayerNorm(channels, eps=1e-8)
        self.conv2 = CausalConv1d(channels, channels, kernel, dilation=2 * dilation)
        self.ln2 = nn.LayerNorm(channels, eps=1e-8)

    def forward(self, x: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor,
                patches: tuple[ModelPatch, ModelPatch] | None = None) -> torch.Tensor:
        """x [B, L, C]; masks [B or 1, C], broadcast over positions."""
        if patches is None:
            out = F.relu(self.ln1(self.conv1(x))) * mask1.unsqueeze(1)
            return F.relu(self.ln2(self.conv2(out))) * mask2.unsqueeze(1) + x
        out = F.relu(self.ln1(patches[0](self.conv1(x)))) * mask1.unsqueeze(1)
        return F.relu(self.ln2(patches[1](self.conv2(out)))) * mask2.unsqueeze(1) + x


def relation_stack(num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row t lists (task, sign) of E_t = [e_t; e_j; -e_j for j != t, increasing j] (eq. 12)."""
    index, sign = [], []
    for t in range(num_tasks):
        others = [j for j in range(num_tasks) if j != t]
        index.append([t] + [j for j in others for _ in (0, 1)])
        sign.append([1.0] + [s for _ in others for s in (1.0, -1.0)])
    return torch.tensor(index), torch.tensor(sign)


class TaskMasks(nn.Module):
    """Task embeddings e_t of every masked layer and the relation MLPs (Sec. 4.1-4.2).

    `plain_mask` is sigmoid(s * e_t) (eq. 3); `relation_mask` is eq. 12-13:
    sigmoid(s * (w_t . tanh(s * E_t) + b_t)), one Linear(2T-1 -> 1) per task and layer.
    Both return every task's masks at once: [T, M, C].
    """

    def __init__(self, num_tasks: int, num_layers: int, channels: int):
        super().__init__()
        self.task_embedding = nn.Parameter(torch.empty(num_tasks, num_layers, channels).uniform_(*EMB_INIT))
        self.relation_weight = nn.Parameter(torch.empty(num_tasks, num_layers, 2 * num_tasks - 1))
        self.relation_bias = nn.Parameter(torch.empty(num_tasks, num_layers))
        self.reset_relation()
        index, sign = relation_stack(num_tasks)
        self.register_buffer("stack_index", index, persistent=False)
        self.register_buffer("stack_sign", sign, persistent=False)

    @property
    def num_tasks(self) -> int:
        return self.task_embedding.shape[0]

    def reset_relation(self) -> None:
        """Fresh relation MLPs: w ~ N(0, 0.01), b = 0.1 (SPEC 4)."""
        with torch.no_grad():
            self.relation_weight.normal_(0.0, 0.01)
            self.relation_bias.fill_(0.1)

    def plain_mask(self, s: float) -> torch.Tensor:
        return torch.sigmoid(s * self.task_embedding)

    def relation_mask(self, s: float) -> torch.Tensor:
        stacked = self.task_embedding[self.stack_index] * self.stack_sign[:, :, None, None]  # [T, 2T-1, M, C]
        h = torch.tanh(s * stacked)
        a = torch.einsum("tkmc,tmk->tmc", h, self.relation_weight) + self.relation_bias[..., None]
        return torch.sigmoid(s * a)

    def forward(self, s: float, relation: bool = True) -> torch.Tensor:
        """Masks of every task [T, M, C]; a one-task model always uses plain masks (SPEC 4)."""
        if relation and self.num_tasks > 1:
            return self.relation_mask(s)
        return self.plain_mask(s)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.task_embedding.clamp_(-EMB_CLAMP, EMB_CLAMP)


def init_head(head: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01)
        head.bias.fill_(0.1)
    return head


class NextItNet(nn.Module):
    """Item embedding, dilated residual blocks, task masks and one linear head per task.

    `relation=False` uses plain masks for every task (HAT, the teracon-norel ablation);
    `masked=False` uses no masks (all ones: fine-tuning, SinMo, CONURE). `first_task` is the
    task number of head 0 (1, except for SinMo's one-task models of later tasks). `patches`
    (PeterRec) holds, for some tasks t (0-based), one model patch of width `patch_size` per conv:
    task t runs through its own.
    """

    def __init__(self, num_items: int, head_sizes: list[int], channels: int = CHANNELS,
                 dilations: tuple[int, ...] = DILATIONS, kernel: int = KERNEL, relation: bool = True,
                 masked: bool = True, first_task: int = 1, patch_size: int = 0, patched_tasks: list[int] = ()):
        super().__init__()
        self.first_task = first_task
        self.num_items, self.channels = num_items, channels
        self.dilations, self.kernel = tuple(dilations), kernel
        self.relation, self.masked = relation, masked
        self.item_embedding = nn.Embedding(num_items, channels)
        bound = math.sqrt(1.0 / num_items)
        nn.init.uniform_(self.item_embedding.weight, -bound, bound)
        self.blocks = nn.ModuleList(ResidualBlock(channels, kernel, d) for d in self.dilations)
        self.task_masks = TaskMasks(len(head_sizes), 2 * len(self.dilations), channels)
        self.heads = nn.ModuleList(init_head(nn.Linear(channels, k)) for k in head_sizes)
        self.patch_size, self.patches = patch_size, nn.ModuleDict()
        for t in patched_tasks:
            self.add_patches(t)

    # ---- construction ------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def config(self) -> dict:
        config = {"num_items": self.num_items, "head_sizes": [h.out_features for h in self.heads],
                  "channels": self.channels, "dilations": list(self.dilations), "kernel": self.kernel,
                  "relation": self.relation, "masked": self.masked, "first_task": self.first_task}
        if self.patches:
            config.update(patch_size=self.patch_size, patched_tasks=sorted(int(t) for t in self.patches))
        return config

    @classmethod
    def from_checkpoint(cls, ckpt: dict, source: str = "checkpoint") -> "NextItNet":
        try:
            cfg = dict(ckpt["config"])
            model = cls(cfg.pop("num_items"), cfg.pop("head_sizes"), **cfg)
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{source}: weights do not fit the model config it records ({type(e).__name__})") from None
        return model

    def add_task(self, num_classes: int) -> None:
        """Grow from T to T+1 tasks: a new task embedding and head; every relation MLP is
        re-initialised (its input width 2T-1 changes); all other weights carry over (SPEC 4)."""
        old = self.task_masks
        new = TaskMasks(old.num_tasks + 1, old.task_embedding.shape[1], self.channels)
        with torch.no_grad():
            new.task_embedding[:-1] = old.task_embedding
        self.task_masks = new.to(old.task_embedding.device)
        self.heads.append(init_head(nn.Linear(self.channels, num_classes)).to(old.task_embedding.device))

    def add_patches(self, task: int) -> None:
        """Fresh model patches for task `task` (0-based), one per conv, on the model's device."""
        device = self.item_embedding.weight.device
        self.patches[str(task)] = nn.ModuleList(ModelPatch(self.channels, self.patch_size)
                                                for _ in range(2 * len(self.blocks))).to(device)

    def patches_of(self, task: int) -> nn.ModuleList | None:
        return self.patches[str(task)] if str(task) in self.patches else None

    # ---- forward -----------------------------------------------------------------------
    def masks(self, s: float) -> torch.Tensor:
        """Every task's masks [T, M, C] at annealing scale s (all ones for an unmasked model),
        always in fp32: under bf16 autocast, sigmoid(s * ...) at s up to 50 loses the mask."""
        if not self.masked:
            return torch.ones_like(self.task_masks.task_embedding)
        with torch.autocast(self.task_masks.task_embedding.device.type, enabled=False):
            return self.task_masks(s, self.relation)

    def convs(self) -> list[CausalConv1d]:
        return [conv for block in self.blocks for conv in (block.conv1, block.conv2)]

    def encode(self, seq: torch.Tensor, masks: torch.Tensor, patches: nn.ModuleList | None = None) -> torch.Tensor:
        """Hidden states [B, L, C] of item sequences [B, L] under per-row masks [B or 1, M, C],
        through one task's model `patches` if given."""
        x = self.item_embedding(seq)
        for b, block in enumerate(self.blocks):
            x = block(x, masks[:, 2 * b], masks[:, 2 * b + 1], None if patches is None else patches[2 * b:2 * b + 2])
        return x

    def task_logits(self, seqs: torch.Tensor, groups: list[tuple[int, torch.Tensor | None]],
                    masks: torch.Tensor, fp32_heads: bool = False) -> list[torch.Tensor | None]:
        """Logits of task t (0-based) for the rows `rows` of `seqs` [B, L], for every (t, rows)
        of `groups` (rows None = all), in one backbone pass with per-row masks from `masks`
        [T, M, C]; None for an empty group.

        `seqs` are whole example sequences: task 1 (next item) reads position -2, the prediction
        of the last item from the rest (the same as the last position of `seqs[:, :-1]`, as the
        network is causal; SPEC 5.2); every other task reads the last position. `fp32_heads` runs
        the heads in fp32 even under autocast (evaluation: bf16 logits tie and distort the ranks).
        """
        all_rows = torch.arange(len(seqs), device=seqs.device)
        rows = [all_rows if r is None else torch.as_tensor(r, device=seqs.device, dtype=torch.long) for _, r in groups]
        if len(groups) == 1 and groups[0][1] is None:  # one task on every row: its mask, broadcast
            t = groups[0][0]
            hidden = self.encode(seqs, masks[t:t + 1], self.patches_of(t))
        else:
            if any(self.patches_of(t) is not None for t, _ in groups):
                raise ValueError("rows of several tasks in one pass: model patches serve one task at a time")
            task_of_row = torch.cat([torch.full((len(r),), t, device=seqs.device) for (t, _), r in zip(groups, rows)])
            hidden = self.encode(seqs[torch.cat(rows)], masks.index_select(0, task_of_row))  # CUDA: deterministic only with --deterministic
        logits, start = [], 0
        for (t, _), r in zip(groups, rows):
            position = -2 if self.first_task + t == 1 else -1
            h = hidden[start:start + len(r), position]
            if not len(r):
                logits.append(None)
            elif fp32_heads:
                with torch.autocast(seqs.device.type, enabled=False):
                    logits.append(self.heads[t](h.float()))
            else:
                logits.append(self.heads[t](h))
            start += len(r)
        return logits
