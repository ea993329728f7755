"""Piggyback (`--method piggyback`, issue 19): binary weight masks per task with a straight-
through gradient, the backbone frozen after task 1, masks stored at one bit a weight."""
from __future__ import annotations

import pytest
import torch

from checkpoint import load_checkpoint
from evaluate import evaluate_checkpoint
from methods import pack_bits, unpack_bits
from nextitnet import PIGGYBACK_THRESHOLD, Binarize, CausalConv1d
from test_peterrec import train_chain
from utils import UserError

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tasks 1-3 with piggyback; lr 1e-2 so that scores cross the threshold."""
    d = tmp_path_factory.mktemp("piggyback")
    train_chain(d, "piggyback", "--epochs", "3")
    return d


def test_binarize_is_binary_forward_and_straight_through_backward():
    """Scores 0.01, 0.005, 0.001, -1 -> mask 1, 0, 0, 0 (threshold 5e-3, strictly above); the
    gradient reaching the scores is the incoming gradient unchanged."""
    scores = torch.tensor([0.01, PIGGYBACK_THRESHOLD, 0.001, -1.0], requires_grad=True)
    mask = Binarize.apply(scores)
    assert mask.tolist() == [1.0, 0.0, 0.0, 0.0]
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_masked_conv_uses_w_times_mask_and_gives_scores_dl_dw_times_w():
    """A conv with scores: its output is the conv with weight W * mask, and the scores' gradient
    is dL/d(W * mask) * W (the straight-through estimator through the product)."""
    torch.manual_seed(0)
    conv = CausalConv1d(3, 3, 3, dilation=1)
    conv.scores = (torch.rand(conv.weight.shape) * 0.02).requires_grad_(True)
    x = torch.randn(2, 5, 3)
    out = conv(x)
    (out ** 2).sum().backward()
    mask = (conv.scores.detach() > PIGGYBACK_THRESHOLD).float()
    w_eff = (conv.weight.detach() * mask).requires_grad_(True)
    plain = CausalConv1d(3, 3, 3, dilation=1)
    with torch.no_grad():
        plain.bias.copy_(conv.bias)
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (2, 0)), w_eff, plain.bias).transpose(1, 2)
    (ref ** 2).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(conv.scores.grad, w_eff.grad * conv.weight.detach(), atol=1e-6)
    assert 0 < mask.mean() < 1  # the mask really drops some weights here


def test_pack_bits_round_trip_at_one_bit_a_weight():
    mask = torch.rand(8, 8, 3) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (8 * 8 * 3 + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_the_backbone_stays_bit_identical_and_the_masks_are_stored_per_task(chain):
    """Across tasks 2 and 3 every weight but the new heads is unchanged bit for bit; the task-2
    checkpoint holds one packed mask per conv, carried unchanged into the task-3 checkpoint,
    which adds task 3's; the masks learned something (not all ones)."""
    c1, c2, c3 = (load_checkpoint(chain / f"task{t}.pt") for t in (1, 2, 3))
    for key, value in c1["state_dict"].items():
        if not key.startswith("heads.") and not key.startswith("task_masks."):
            assert torch.equal(c2["state_dict"][key], value) and torch.equal(c3["state_dict"][key], value), key
    assert c1["piggyback_masks"] == [] and len(c2["piggyback_masks"]) == 1 and len(c3["piggyback_masks"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(c2["piggyback_masks"][0], c3["piggyback_masks"][0]))
    shape = c1["state_dict"]["blocks.0.conv1.weight"].shape
    masks = [unpack_bits(m, shape) for task in c3["piggyback_masks"] for m in task]
    assert all(m.dtype == torch.bool for m in masks) and any(not m.all() for m in masks)


def test_every_task_is_served_with_its_own_mask_and_nothing_is_forgotten(chain):
    """evaluate.py on the task-3 checkpoint: each task's test metrics equal those right after it
    was trained (task 1 unmasked, tasks 2 and 3 with their stored masks)."""
    rows = evaluate_checkpoint(chain / "task3.pt", "cpu")
    assert [r["task"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["now"] == pytest.approx(row["after_training"], abs=1e-12), row["task"]


def test_a_broken_mask_entry_is_one_error(chain, tmp_path):
    """A checkpoint whose piggyback_masks lacks a task is refused with a message naming it."""
    ckpt = torch.load(chain / "task3.pt", weights_only=True)
    ckpt["piggyback_masks"] = ckpt["piggyback_masks"][:1]
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"broken\.pt: not a TERACON checkpoint \(piggyback_masks is not 2 list"):
        load_checkpoint(tmp_path / "broken.pt")
