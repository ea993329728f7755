"""Run one of the authors' TERACON scripts (train_task1.py, train_teracon.py,
inference_past_tasks.py) as they ship, on a CPU, with three run-time adaptations (issue 22):

* `torch.Tensor.get_device` returns the tensor's device (their mask code moves index tensors to
  its result, which is -1 for a CPU tensor);
* their `--gpu_num` flag accepts the string `cpu` (they parse it as an int, yet test for 'cpu');
* `torch.Tensor.view` falls back to `.reshape` when the tensor is not contiguous (their
  `.view(-1, C)` on a sliced or permuted output fails on current PyTorch).

Nothing of their code is copied or edited: the script is executed from their checkout with
`runpy`, their folder first on `sys.path` (so that their `utils`, `data_loader` and `teracon` are
imported, not ours), in a process of its own.

    python scripts/run_authors.py --authors /tmp/teracon_authors train_teracon.py --gpu_num cpu ...
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_task1.py", "train_teracon.py", "inference_past_tasks.py")


def gpu_num(text: str) -> int | str:
    """Their `--gpu_num`, which also accepts `cpu`."""
    return text if text == "cpu" else int(text)


def patch_argparse() -> None:
    """Their parsers declare `--gpu_num` with `type=int`; give it `gpu_num` instead."""
    original = argparse.ArgumentParser.add_argument

    def add_argument(self, *names, **kwargs):
        if "--gpu_num" in names:
            kwargs["type"] = gpu_num
        return original(self, *names, **kwargs)
    argparse.ArgumentParser.add_argument = add_argument


def patch_view(torch) -> None:
    """`Tensor.view`, falling back to `reshape` for a tensor that is not contiguous."""
    original = torch.Tensor.view

    def view(self, *shape):
        try:
            return original(self, *shape)
        except RuntimeError:
            if self.is_contiguous():
                raise
            return self.reshape(*shape)
    torch.Tensor.view = view


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--authors" or argv[2] not in SCRIPTS:
        sys.exit(f"usage: run_authors.py --authors DIR {{{','.join(SCRIPTS)}}} [their flags]")
    authors, script, flags = Path(argv[1]).resolve(), argv[2], argv[3:]
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: E402
    from bench_authors import tensor_get_device_is_device  # stdlib, numpy and torch only
    sys.path.remove(str(ROOT))
    sys.path[0] = str(authors)  # their modules first: their utils, data_loader, teracon
    patch_argparse()
    patch_view(torch)
    sys.argv = [str(authors / script), *flags]
    with tensor_get_device_is_device():
        runpy.run_path(str(authors / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
