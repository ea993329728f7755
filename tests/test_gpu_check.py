"""scripts/gpu_check.py on the CPU: with the CPU as the "device under test" every in-process
comparison (checks a-d and g) passes, and a small injected difference on the device side (one
weight 1e-3 relative) makes each of a-d fail; the script-driven checks build command lines the
scripts accept. The script-driven checks themselves and the benches are not run here (slow)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

CPU = torch.device("cpu")
SMALL_AMP = {"items": 300, "channels": 16, "dilations": (1, 2), "rows": (8, 32)}  # bf16 is slow on most CPUs
F64_CHECKS = {"a": gpu_check.check_task1, "b": gpu_check.check_retention, "c": gpu_check.check_chunked_ce,
              "d": gpu_check.check_chunked_retention}


@pytest.mark.parametrize("name", sorted(F64_CHECKS))
def test_float64_check_passes_cpu_against_cpu_and_fails_on_a_1e3_weight_change(name):
    check = F64_CHECKS[name]
    ok = check(CPU)
    assert ok.status == "PASS", ok.detail
    assert "tol 1e-09" in ok.detail
    bad = check(CPU, perturb=gpu_check.perturb_weight(1e-3))
    assert bad.status == "FAIL", bad.detail
    assert "over:" in bad.detail


def test_float64_check_catches_a_gradient_bug_with_the_weights_unchanged():
    """A wrong backward alone (weights and forward exact): the gradients and updates show it."""
    def wrong_backward(model):
        conv = model.blocks[1].conv2
        conv.weight.register_hook(lambda g: g * (1 + 1e-6))
    bad = gpu_check.check_task1(CPU, perturb=wrong_backward)
    assert bad.status == "FAIL" and "grad blocks.1.conv2.weight" in bad.detail, bad.detail
    assert "weight blocks.1.conv2.weight (before step 1)" not in bad.detail


def test_amp_check_passes_on_cpu_and_fails_when_the_device_model_differs():
    ok = gpu_check.check_amp(CPU, **SMALL_AMP)
    assert ok.status == "PASS", ok.detail
    for part in ("task 1 fp32 vs float64 cpu", "task 1 tf32 vs fp32", "task 3 bf16 vs fp32"):
        assert part in ok.detail

    def head(model):  # the heads' logits 1% larger on the device: fp32 no longer matches float64
        with torch.no_grad():
            model.heads[-1].weight.mul_(1.01)
    bad = gpu_check.check_amp(CPU, perturb=head, **SMALL_AMP)
    assert bad.status == "FAIL" and "fp32 vs float64 cpu" in bad.detail, bad.detail


def test_chunking_is_really_forced_and_restored():
    import teracon
    original = teracon.next_item_loss
    assert "blocks of" in gpu_check.chunking_description(96, 300, CPU, gpu_check.CE_BUDGET) \
        or "budget" in gpu_check.chunking_description(96, 300, CPU, gpu_check.CE_BUDGET)
    with gpu_check.forced_ce_chunking(gpu_check.CE_BUDGET):
        pass
    assert teracon.next_item_loss is original


def test_diff_tolerances_and_missing_gradients():
    d, one = gpu_check.Diff(), torch.ones(3, dtype=torch.float64)
    d.add("grad", "x", one, one * (1 + 1e-10), 1e-9)
    d.add("grad", "zero", torch.zeros(2), torch.zeros(2), 1e-9)
    assert d.ok, d.failures
    d.add("grad", "y", one * (1 + 1e-8), one, 1e-9)
    d.add("grad", "z", None, torch.ones(1), 1e-9)
    d.add("grad", "nan", torch.tensor([float("nan")]), torch.ones(1), 1e-9)
    assert [f.split()[1] for f in d.failures] == ["y", "z:", "nan:"]


def _parse(cmd):
    """The scripts' own parser on a command line (train scripts) or evaluate.py's flags."""
    script = Path(cmd[1]).name
    if script == "evaluate.py":
        return script, None
    task = 1 if script == "train_task1.py" else 2
    args = cli.build_parser(task).parse_args(cmd[2:])
    return script, cli.resolve_args(args, task)


@pytest.mark.parametrize("method", list(gpu_check.METHODS))
def test_method_commands_are_accepted_by_the_scripts(tmp_path, method):
    t1, t2 = gpu_check.write_synthetic(tmp_path / "data")
    cmds = gpu_check.method_commands(method, t1, t2, tmp_path / "out", "cuda")
    assert list(cmds) == ["task1", "task2", "evaluate"]
    for name, cmd in cmds.items():
        assert cmd[0] == sys.executable and (ROOT / Path(cmd[1]).name).is_file()
        assert cmd[cmd.index("--device") + 1] == "cuda"
        script, args = _parse(cmd)
        if args is not None:
            assert args.method == method and args.device == "cuda"
    task2 = _parse(cmds["task2"])[1]
    assert task2.paths == str(tmp_path / "out" / "task1.pt")
    assert cmds["evaluate"][cmds["evaluate"].index("--paths") + 1] == str(tmp_path / "out" / "task2.pt")


def test_resume_commands_and_synthetic_files(tmp_path):
    t1, t2 = gpu_check.write_synthetic(tmp_path / "data", lines1=50, lines2=60, length=12)
    lines1, lines2 = t1.read_text().splitlines(), t2.read_text().splitlines()
    assert len(lines1) == 50 and all(len(line.split(",")) == 12 for line in lines1)
    assert all(",," in line and len(line.split(",,")[0].split(",")) == 12 for line in lines2)
    assert any(line.startswith("0,") for line in lines1)  # left padding
    cmds = gpu_check.resume_commands(t1, t2, tmp_path, "cuda")
    for name in ("straight", "killed", "resume"):
        args = _parse(cmds[name])[1]
        assert args.save_every == 1 and args.deterministic and args.device == "cuda"
    assert _parse(cmds["resume"])[1].resume and not _parse(cmds["killed"])[1].resume
    assert _parse(cmds["killed"])[1].savepath == _parse(cmds["resume"])[1].savepath
    assert _parse(cmds["straight"])[1].savepath != _parse(cmds["killed"])[1].savepath


def test_speed_commands_use_real_flags(tmp_path):
    import bench
    import bench_authors
    cmds = gpu_check.speed_commands("cuda", tmp_path, str(tmp_path / "authors"))
    a = bench.build_parser().parse_args(cmds["bench"][2:])
    assert a.paper and a.device == "cuda" and a.repeats == 1
    b = bench_authors.build_parser().parse_args(cmds["authors"][2:])
    assert b.batch == [1024] and b.length == 100 and b.no_memory


def test_main_selects_checks_and_reports(capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "a", "h", "--quick"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gpu_check: torch")
    assert out[1].startswith("PASS a task 1") and out[2].startswith("SKIP h speed")
    assert out[-1].startswith("gpu_check cpu: 1 PASS, 0 FAIL, 1 SKIP")
    assert gpu_check.main(["--device", "nonsense"]) == 2
