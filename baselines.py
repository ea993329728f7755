"""The methods TERACON is compared with, on the same backbone and training routine (`--method`).

- `teracon`: the paper's method; `teracon-nokr` (alpha = 0) and `teracon-norel` (plain masks)
  are its ablations.
- `fineall`: fine-tune everything on each new task, no masks, no retention (forgets).
- `sinmo`: one model per task, trained from scratch on that task alone.
- `hat`: Hard Attention to the Task (Serra et al., ICML 2018).
- `conure`: CONURE (Yuan et al., SIGIR 2021): prune, retrain and freeze per task.
"""
from __future__ import annotations

import torch

from nextitnet import NextItNet

# Model options of each method (see NextItNet) and whether it distils from the previous model.
METHODS: dict[str, dict] = {
    "teracon":       {"relation": True,  "masked": True,  "owned": False, "retention": True},
    "teracon-nokr":  {"relation": True,  "masked": True,  "owned": False, "retention": False},
    "teracon-norel": {"relation": False, "masked": True,  "owned": False, "retention": True},
    "hat":           {"relation": False, "masked": True,  "owned": False, "retention": False},
    "fineall":       {"relation": True,  "masked": False, "owned": False, "retention": False},
    "sinmo":         {"relation": True,  "masked": False, "owned": False, "retention": False},
    "conure":        {"relation": True,  "masked": False, "owned": True,  "retention": False},
}


def model_options(method: str) -> dict:
    return {k: v for k, v in METHODS[method].items() if k != "retention"}


def mask_penalty(mask: torch.Tensor, cumulative: torch.Tensor | None = None) -> torch.Tensor:
    """HAT's sparsity regulariser (Serra et al. eq. 5): sum m (1 - a_<t) / sum (1 - a_<t).

    With no past tasks it is the mean of the masks: the authors' task-1 `0.75 * mean(masks)`.
    """
    if cumulative is None:
        return mask.mean()
    free = 1.0 - cumulative
    return (mask * free).sum() / free.sum().clamp_min(1e-8)


class HAT:
    """Past tasks' cumulative masks a_<t [M, C] block the weights they use (Serra et al. eq. 6-7).

    A conv weight (out o, in i) is gated by 1 - min(a_out[o], a_in[i]); the first conv of a
    block reads the unmasked residual stream (a_in = 1), so the item embedding, which writes
    that stream, is frozen after task 1, like the past tasks' heads. HAT scales gradients for
    SGD; with Adam, which normalises them, we scale each parameter's *update* by its gate.
    """
    THRES_COSH = 50.0

    def __init__(self, model: NextItNet, cumulative: torch.Tensor | None, smax: float, mask_reg: float):
        self.model, self.smax, self.mask_reg = model, smax, mask_reg
        self.cumulative = cumulative
        self.gates: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if cumulative is not None:
            a = cumulative
            model.item_embedding.weight.requires_grad_(False)
            for head in model.heads[:-1]:
                head.requires_grad_(False)
            for b, block in enumerate(model.blocks):
                free1, free2 = 1.0 - a[2 * b], 1.0 - a[2 * b + 1]
                self.gates += [(block.conv1.weight, free1[:, None, None]),
                               (block.conv2.weight, (1.0 - torch.minimum(a[2 * b + 1][:, None], a[2 * b][None, :]))[..., None])]
                self.gates += [(p, free1) for p in (block.conv1.bias, block.ln1.weight, block.ln1.bias)]
                self.gates += [(p, free2) for p in (block.conv2.bias, block.ln2.weight, block.ln2.bias)]
        self._before: list[torch.Tensor] = []

    def penalty(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_reg * mask_penalty(masks[-1], self.cumulative)

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
        e.grad[t] *= self.smax / s * num / den

    @torch.no_grad()
    def after_step(self) -> None:
        for (p, gate), old in zip(self.gates, self._before):
            p.copy_(old + gate * (p - old))

    @torch.no_grad()
    def updated_cumulative(self) -> torch.Tensor:
        """a_<=t = max(a_<t, m_t at s = smax), stored in the checkpoint for the next task."""
        mask = self.model.masks(self.smax)[-1].detach().cpu()
        return mask if self.cumulative is None else torch.maximum(self.cumulative.cpu(), mask)


class Conure:
    """Each conv weight belongs to one task (`owner`, 0 = free). Task t trains the free weights,
    keeps the largest (1 - prune_ratio) of them by magnitude as its own, zeroes the rest and
    retrains its own; later tasks never change them. Item embedding, layer norms and conv biases
    are frozen after task 1, as are past heads."""

    def __init__(self, model: NextItNet, task: int, prune_ratio: float):
        self.model, self.task, self.prune_ratio = model, task, prune_ratio
        self.phase = "train"
        if task > 1:
            frozen = [model.item_embedding.weight] + [p for h in model.heads[:-1] for p in h.parameters()]
            for block in model.blocks:
                frozen += [block.conv1.bias, block.conv2.bias, *block.ln1.parameters(), *block.ln2.parameters()]
            for p in frozen:
                p.requires_grad_(False)
        model.serve(task)

    @torch.no_grad()
    def before_step(self, s: float) -> None:
        """Only the free weights train (then, after pruning, only this task's): Adam leaves a
        weight whose gradient was always exactly zero where it is."""
        trainable = 0 if self.phase == "train" else self.task
        for conv in self.model.convs():
            conv.weight.grad *= conv.owner == trainable

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def prune(self) -> None:
        """Keep the largest free weights of every conv as this task's; zero the others."""
        for conv in self.model.convs():
            free = conv.owner == 0
            keep = int(round((1.0 - self.prune_ratio) * int(free.sum())))
            magnitude = torch.where(free, conv.weight.abs(), torch.full_like(conv.weight, -1.0))
            top = torch.topk(magnitude.flatten(), keep).indices
            conv.owner.view(-1)[top] = self.task
            conv.weight[conv.owner == 0] = 0.0
        self.phase = "retrain"
