"""Bad input found in review: each is one UserError naming the file, never a traceback."""
import json

import numpy as np
import pytest
import torch

import helpers  # noqa: F401  (puts the repo root on sys.path)
import data_loader as dl
import evaluate
from checkpoint import load_checkpoint
from nextitnet import NextItNet
from utils import UserError


def test_empty_item_index_is_refused(tmp_path):
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"items": []}))
    with pytest.raises(UserError, match="index.json"):
        dl.load_item_index(path)


def test_task_file_with_one_item_sources_is_refused(tmp_path):
    """Task 1's pseudo-labels read position -2 of a source, so sources need two items."""
    path = tmp_path / "t2.csv"
    path.write_text("1,,5\n2,,6\n")
    with pytest.raises(UserError, match="t2.csv: sources need at least 2 items"):
        dl.load_task(2, path, np.array([1, 2]), seed=0)


def test_checkpoint_without_config_or_index_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {}, "tasks": []}, path)
    with pytest.raises(UserError, match="bad.pt: not a TERACON checkpoint .*config"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_refused():
    model = NextItNet(20, [20], channels=8, dilations=(1,))
    ckpt = {"config": dict(model.config(), channels=16), "state_dict": model.state_dict()}
    with pytest.raises(UserError, match="ckpt.pt: weights do not fit"):
        NextItNet.from_checkpoint(ckpt, "ckpt.pt")


def test_evaluate_refuses_a_zero_batch(tmp_path):
    with pytest.raises(UserError, match="--eval_batch 0"):
        evaluate.main(["--paths", str(tmp_path / "x.pt"), "--eval_batch", "0"])
