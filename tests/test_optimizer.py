"""The optimiser of every training run (trainer.make_optimizer): on a CPU the foreach Adam must
give the very update of the per-tensor loop that trained the committed results."""
from __future__ import annotations

import torch

from trainer import make_optimizer

SHAPES = [(3000, 16), (16,), (3, 16, 16), (1,)]


def _train(optimizer_of, steps: int = 7) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    optimizer = optimizer_of(params)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for j, p in enumerate(params):
            # a parameter without a gradient on some steps (a past task's head): Adam skips it
            p.grad = None if (step % 3 == 1 and j == 2) else torch.randn(p.shape, generator=g) * 10.0 ** -j
        optimizer.step()
    return [p.detach().clone() for p in params], optimizer.state_dict()


def test_cpu_optimizer_is_foreach_adam_bit_identical_to_the_per_tensor_loop() -> None:
    ours, ours_state = _train(lambda ps: make_optimizer(ps, 1e-3, torch.device("cpu")))
    loop, loop_state = _train(lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.0, foreach=False))
    assert ours_state["param_groups"][0]["foreach"] is True
    assert ours_state["param_groups"][0]["weight_decay"] == 0.0
    for a, b in zip(ours, loop):
        assert torch.equal(a, b)
    for k, st in loop_state["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours_state["state"][k][name], st[name])
    assert ours_state["state"][2]["step"].item() == 7 - 2  # skipped at steps 1 and 4


def test_adam_update_of_one_step_by_hand() -> None:
    """Adam's first step moves every weight by lr * sign(g) (bias-corrected m / sqrt(v) = g/|g|),
    up to eps: the update rule itself, not just agreement between two torch paths."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = make_optimizer([p], 0.1, torch.device("cpu"))
    p.grad = torch.tensor([3.0, -0.25, 1e-3], dtype=torch.float64)
    opt.step()
    g = torch.tensor([3.0, -0.25, 1e-3], dtype=torch.float64)
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) - 0.1 * g / (g.abs() + 1e-8)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12)
