"""Smoke test of bench.py: smallest shapes, one repeat, every case kind; checks the JSON."""
import json
import math

import bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--quick", "--channels", "16", "--items", "40", "--lengths", "5",
                         "--tasks", "3", "--rhos", "0.5", "--batch1", "3", "--batchn", "6", "--batch-eval", "4",
                         "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["amp"] == "fp32"
    assert {"fp32", "bf16"} <= set(data["meta"]["matmul"])
    assert [r["kind"] for r in data["results"]] == ["task1", "taskn", "eval", "eval"]
    for r in data["results"]:
        assert "error" not in r, r
        for key in ("case", "times", "median_s", "seq_per_s", "flops", "flops_per_s", "frac_of_matmul",
                    "peak_mem_bytes", "peak_mem_kind"):
            assert key in r, key
        assert len(r["times"]) == 1 and r["median_s"] > 0 and r["peak_mem_bytes"] > 0
        assert math.isclose(r["seq_per_s"], r["batch"] / r["median_s"])
    t1, tn = data["results"][0], data["results"][1]
    assert t1["full_logits_bytes"] == 3 * 4 * 40 * 4 * 2
    # rows: 6 new-task rows + 2 past tasks x floor(0.5 * 6)
    assert (tn["rows_student"], tn["rows_teacher"]) == (12, 6)
    assert result["results"][0]["case"] in capsys.readouterr().out


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
