"""trajectory_authors.py (issue 22): the weight mapping between the authors' model layout and ours,
the comparison that must see a change in any one tensor, and its one-line errors. The authors'
code is not needed: a stand-in with their parameter layout (names and shapes of their
NextItNet_Decoder: Conv2d (C, C, 1, k), one Embedding(2, C) of task embeddings per block) is built
from torch modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trajectory_authors as ta
from nextitnet import NextItNet
from utils import run_cli

C, ITEMS, DILATIONS = 8, 11, (1, 2)


def their_layout(heads: tuple[int, ...] = (ITEMS,)) -> nn.Module:
    """generator_hat_other's layout for one task; teracon's (relation MLPs mlp1, mlp2 per block,
    one Linear(2T-1 -> 1) per task) for more."""
    model = nn.Module()
    model.embeding = nn.Embedding(ITEMS, C)
    blocks, tasks = [], len(heads)
    for d in DILATIONS:
        block = nn.Module()
        block.conv1 = nn.Conv2d(C, C, kernel_size=(1, 3), dilation=d)
        block.conv2 = nn.Conv2d(C, C, kernel_size=(1, 3), dilation=2 * d)
        block.ln1, block.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        block.ec = nn.ModuleList([nn.Embedding(2, C) for _ in range(tasks)])
        if tasks > 1:
            block.mlp1 = nn.ModuleList(nn.Linear(2 * tasks - 1, 1) for _ in range(tasks))
            block.mlp2 = nn.ModuleList(nn.Linear(2 * tasks - 1, 1) for _ in range(tasks))
        blocks.append(block)
    model.residual_blocks = nn.Sequential(*blocks)
    model.task_classifier = nn.ModuleList([nn.Linear(C, k) for k in heads])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_copy_weights_maps_every_tensor_and_block_rows_to_layers():
    torch.manual_seed(0)
    theirs, ours = their_layout(), NextItNet(ITEMS, [ITEMS], channels=C, dilations=DILATIONS)
    ta.copy_weights(theirs, ours)
    assert torch.equal(ours.blocks[1].conv2.weight, theirs.residual_blocks[1].conv2.weight[:, :, 0])
    assert torch.equal(ours.task_masks.task_embedding[0, 2], theirs.residual_blocks[1].ec[0].weight[0])
    assert torch.equal(ours.task_masks.task_embedding[0, 3], theirs.residual_blocks[1].ec[0].weight[1])
    assert torch.equal(ours.heads[0].bias, theirs.task_classifier[0].bias)
    assert ta.largest_relative_difference(theirs, ours) == (0.0, "")


def test_copy_weights_of_two_tasks_maps_the_relation_mlps_per_task_and_layer():
    torch.manual_seed(0)
    theirs, ours = their_layout((ITEMS, 5)), NextItNet(ITEMS, [ITEMS, 5], channels=C, dilations=DILATIONS)
    ta.copy_weights(theirs, ours)
    block = theirs.residual_blocks[1]
    assert torch.equal(ours.task_masks.task_embedding[1, 3], block.ec[1].weight[1])
    assert torch.equal(ours.task_masks.relation_weight[1, 2], block.mlp1[1].weight[0])   # task 2, block 1 mask 1
    assert torch.equal(ours.task_masks.relation_bias[0, 3], block.mlp2[0].bias[0])       # task 1, block 1 mask 2
    assert torch.equal(ours.heads[1].weight, theirs.task_classifier[1].weight)
    assert ta.largest_relative_difference(theirs, ours) == (0.0, "")
    with torch.no_grad():
        ours.task_masks.relation_weight[0, 0, 1] += 1.0
    assert ta.largest_relative_difference(theirs, ours)[1] == "task_masks.relation_weight"


@pytest.mark.parametrize("name", ["item_embedding.weight", "blocks.0.ln2.bias", "task_masks.task_embedding",
                                  "heads.0.weight"])
def test_largest_relative_difference_names_the_one_changed_tensor(name):
    torch.manual_seed(0)
    theirs, ours = their_layout(), NextItNet(ITEMS, [ITEMS], channels=C, dilations=DILATIONS)
    ta.copy_weights(theirs, ours)
    p = dict(ours.named_parameters())[name]
    with torch.no_grad():
        p.view(-1)[0] += 1e-3 * p.abs().max()
    rel, where = ta.largest_relative_difference(theirs, ours)
    assert where == name and rel == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("argv, says", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--authors", "/nonexistent"], "no checkout of the authors' TERACON code at /nonexistent"),
])
def test_bad_input_is_one_error_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(ta.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0]
