"""bench.py at the smallest shapes, every case kind, against hand counts; FLOP formulas; bench_authors' argument handling."""
import json

import pytest

import bench


# Hand counts for the smoke test's shapes: C 16, kernel 3, 8 blocks (the default dilations), 40 items,
# length 5, task n = 3 with rho 0.5, batches 3 (task 1), 6 (task n), 4 (evaluation), 1000-class heads.
PER_POSITION = 8 * 2 * (2 * 3 * 16 * 16)                                 # 24576: 16 convs of 2kC^2
TASK1 = 3 * (3 * 4 * PER_POSITION + 2 * 16 * 40 * 3 * 4)                # 3 x (12 positions + their head)
PAST_HEADS = 2 * 16 * 40 * 3 + 2 * 16 * 1000 * 3                        # 3 replayed rows of each past task
STUDENT = (6 + 3 + 3) * 5 * PER_POSITION + 2 * 16 * 1000 * 6 + PAST_HEADS
TEACHER = (3 + 3) * 5 * PER_POSITION + PAST_HEADS
EVAL1 = 4 * 4 * PER_POSITION + 2 * 16 * 40 * 4                          # B(L-1) positions, head on B rows
EVAL3 = 4 * 5 * PER_POSITION + 2 * 16 * 1000 * 4


def test_bench_smoke(tmp_path, capsys):
    """Smallest shapes, three repeats, every case kind. The JSON's FLOP counts are the ones
    counted by hand above (task 1 930,816; task 3 at rho 0.5 3 x 1,766,400 + 837,120; evaluation
    398,336 and 619,520), the rows of task n 6 + 2 x floor(0.5 x 6) and 2 x 3, the task-1
    parameters (embedding 40x16, 8 blocks of two 3-tap 16x16 convs with bias and two LayerNorms,
    mask and relation parameters of one task, head 16x40 + 40); median_s is the middle of the
    three times, seq/s and FLOP/s follow from it, and the fraction of the matmul rate lies in
    (0, 1) for these tiny steps (a count off by the 3x of training or a factor C would leave it
    or the hand counts)."""
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--quick", "--channels", "16", "--items", "40", "--lengths", "5",
                         "--tasks", "3", "--rhos", "0.5", "--batch1", "3", "--batchn", "6", "--batch-eval", "4",
                         "--repeats", "3", "--warmup", "0", "--matmul-size", "64", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["amp"] == "fp32"
    assert {"fp32", "bf16"} <= set(data["meta"]["matmul"])
    assert [r["case"] for r in data["results"]] == ["task1 N=40 L=5", "taskn N=40 L=5 n=3 rho=0.5",
                                                    "eval N=40 L=5 task=1", "eval N=40 L=5 task=3"]
    assert [r["flops"] for r in data["results"]] == [TASK1, 3 * STUDENT + TEACHER, EVAL1, EVAL3]
    assert (TASK1, 3 * STUDENT + TEACHER, EVAL1, EVAL3) == (930816, 6136320, 398336, 619520)
    reference = data["meta"]["matmul"]["fp32"]["flops_per_s"]
    for r, batch in zip(data["results"], (3, 6, 4, 4)):
        assert "error" not in r, r
        times = r["times"]
        assert len(times) == 3 and min(times) > 0 and r["peak_mem_bytes"] > 0
        assert r["batch"] == batch and r["median_s"] == sorted(times)[1] and r["min_s"] == min(times)
        assert r["seq_per_s"] == pytest.approx(batch / sorted(times)[1], rel=1e-12)
        assert r["flops_per_s"] == pytest.approx(r["flops"] / sorted(times)[1], rel=1e-12)
        assert r["frac_of_matmul"] == pytest.approx(r["flops_per_s"] / reference, rel=1e-12)
        assert 0 < r["frac_of_matmul"] < 1
    t1, tn = data["results"][0], data["results"][1]
    assert t1["positions"] == 12 and t1["full_logits_bytes"] == 12 * 40 * 4 * 2
    assert t1["params"] == 40 * 16 + 8 * 2 * (16 * 16 * 3 + 16 + 2 * 16) + 16 * 16 + 16 + 16 + 16 * 40 + 40
    assert (tn["rows_student"], tn["rows_teacher"], tn["subset_rows"]) == (12, 6, 3)
    assert tn["task1_replay_logits_bytes"] == 3 * 40 * 4
    assert set(t1["adam"]) == {"in_step", "foreach=False", "foreach=True"}  # no fused Adam on a CPU
    printed = capsys.readouterr().out
    assert all(r["case"] in printed for r in result["results"])


def test_hand_convention_is_what_torch_counts_in_the_model():
    """The convention of the hand counts, checked on the model itself: torch's FlopCounterMode,
    counting the convolutions and matmuls that a NextItNet (C 16, the 8 default blocks) runs to
    encode 3 sequences of 5 items and score their last position with a 40-item head, finds
    15 positions x PER_POSITION + 2 x 16 x 40 x 3 (bench.py's formulas give the same)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nextitnet import NextItNet
    torch.manual_seed(0)
    model = NextItNet(40, [40], channels=16)
    seqs = torch.randint(1, 40, (3, 5))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.heads[0](model.encode(seqs, model.masks(50.0))[:, -1])
    assert counter.get_total_flops() == 15 * PER_POSITION + 2 * 16 * 40 * 3 == 372480
    assert bench.eval_flops(3, 6, 40, True, 16, 3, 8) == 372480  # task 1 encodes L - 1 = 5 positions


def test_flop_counts():
    per_pos = 2 * 8 * 2 * 3 * 256 * 256
    assert bench.conv_flops_per_position(256, 3, 8) == per_pos
    assert bench.task1_flops(32, 50, 1700, 256, 3, 8) == 3 * 32 * 49 * (per_pos + 2 * 256 * 1700)
    c = bench.taskn_flops(1024, 100, 1700, 10, 0.05, 256, 3, 8)
    sub = 51
    assert c["rows_student"] == 1024 + 9 * sub and c["rows_teacher"] == 9 * sub
    heads_past = 2 * 256 * (1700 + 8 * 1000) * sub
    student = c["rows_student"] * 100 * per_pos + 2 * 256 * 1000 * 1024 + heads_past
    teacher = c["rows_teacher"] * 100 * per_pos + heads_past
    assert c["flops"] == 3 * student + teacher


# ------------------------------------------------------------------ bench_authors.py (no timing)

def test_bench_authors_missing_checkout_is_one_error_line(tmp_path, capsys):
    import pytest

    import bench_authors
    (tmp_path / "teracon.py").write_text("")  # a partial checkout is no checkout
    with pytest.raises(SystemExit) as exc:
        bench_authors.main(["--authors", str(tmp_path), "--no-memory"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "git clone https://github.com/Sein-Kim/TERACON" in err[0] and "generator_hat_other.py" in err[0]


def test_bench_authors_argument_parsing():
    import pytest

    import bench_authors
    a = bench_authors.parse_args(["--authors", "X"])
    assert (a.authors, a.batch, a.batch1, a.amp, a.task, a.rho) == ("X", [1024], 32, ["fp32"], 6, 0.05)
    assert (a.items, a.length, a.channels, a.cases, a.json) == (1426, 50, 256, ["taskn", "task1"], None)
    a = bench_authors.parse_args(["--batch", "1024", "128", "--amp", "fp32", "bf16", "bf16", "--repeats", "2",
                                  "--json", "o.json", "--cases", "task1"])
    assert (a.batch, a.amp, a.repeats, a.json, a.cases) == ([1024, 128], ["fp32", "bf16"], 2, "o.json", ["task1"])
    assert bench_authors.head_sizes(1426, 6) == [1426, 300, 200, 8, 2, 21]
    for bad in (["--task", "1"], ["--rho", "1.5"], ["--batch", "0"], ["--amp", "fp16"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench_authors.parse_args(bad)
