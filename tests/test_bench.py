"""`normkit bench` and `normkit tune`: rows, table, JSON, forced backends (small shapes)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from normkit import bench, gpu_tune
from normkit.backends import gpu_launch
from normkit.cli import main


def _check_row(row: dict) -> None:
    assert row["torch_ms"] > 0 and row["normkit_ms"] > 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["normkit_ms"])
    op = bench.OPS[row["op"]]
    ideal = op.ideal_factor * torch.Size(row["shape"]).numel() * 4
    assert row["normkit_gbps"] == pytest.approx(ideal / row["normkit_ms"] / 1e6)
    assert row["normkit_pct_copy"] == pytest.approx(100 * row["normkit_gbps"] / row["copy_gbps"])
    assert row["torch_pct_copy"] == pytest.approx(100 * row["torch_gbps"] / row["copy_gbps"])
    assert row["max_abs_err"] <= 1e-3


def test_run_bench_rows_table_and_json(tmp_path):
    report = bench.run_bench(ops=["bn2d_train_fwdbwd", "gn_fwdbwd", "in_fwdbwd"],
                             shapes=[(4, 8, 6, 6)], quick=True, progress=False)
    rows = report["rows"]
    # in_fwdbwd has no channels_last row; the others have both layouts
    assert [(r["op"], r["layout"]) for r in rows] == [
        ("bn2d_train_fwdbwd", "contiguous"), ("bn2d_train_fwdbwd", "channels_last"),
        ("gn_fwdbwd", "contiguous"), ("gn_fwdbwd", "channels_last"), ("in_fwdbwd", "contiguous")]
    for row in rows:
        _check_row(row)
        assert row["backend"] == "cpu"
    low, high = report["copy_gbps_range"]
    assert 0 < low <= report["copy_gbps"] <= high
    assert sorted(r["copy_gbps"] for r in rows)[len(rows) // 2] == report["copy_gbps"]
    table = bench.format_table(report)
    assert "normkit %copy" in table and "gn_fwdbwd" in table
    path = tmp_path / "bench.json"
    bench.write_json(report, str(path))
    assert json.loads(path.read_text())["rows"][0]["op"] == "bn2d_train_fwdbwd"


def test_run_bench_with_a_forced_backend():
    report = bench.run_bench(ops=["bn2d_train_fwdbwd", "bn2d_eval_fwd"], shapes=[(2, 3, 4, 4)],
                             layouts=["contiguous"], quick=True, progress=False,
                             backend="triton")
    assert [r["backend"] for r in report["rows"]] == ["triton", "triton"]
    for row in report["rows"]:
        _check_row(row)


def test_cuda_shapes_add_the_large_batch():
    op = bench.OPS["bn2d_train_fwdbwd"]
    assert (bench.GPU_BATCH, 64, 112, 112) in bench.shapes_for(op, False, "cuda")
    assert (bench.GPU_BATCH, 64, 112, 112) not in bench.shapes_for(op, False, "cpu")


def test_bench_command_line(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["bench", "--ops", "bn2d_eval_fwd", "ln_fwdbwd", "--shapes", "4x3x8x8", "6x10",
                 "--quick", "--layouts", "contiguous", "--backend", "reference", "--json",
                 str(path)]) == 0
    assert "bn2d_eval_fwd" in capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]  # each op takes the shapes of its rank
    assert [(r["op"], r["shape"]) for r in rows] == [("bn2d_eval_fwd", [4, 3, 8, 8]),
                                                     ("ln_fwdbwd", [6, 10])]
    assert {r["backend"] for r in rows} == {"reference"}


def test_tune_sweeps_and_restores_constants():
    knobs = {"APPLY_BLOCK": (gpu_launch.APPLY_BLOCK, 256), "SPLIT_ELEMENTS": (64,)}
    before = {name: getattr(gpu_launch, name) for name in knobs}
    cases = [("bn2d_train_fwdbwd", (2, 3, 4, 4), torch.float32, "contiguous")]
    report = gpu_tune.tune(cases, device="cpu", reps=1, knobs=knobs, progress=False)
    assert {name: getattr(gpu_launch, name) for name in knobs} == before
    assert len(report["trials"]) == 3  # defaults, APPLY_BLOCK=256, SPLIT_ELEMENTS=64
    assert report["best_geomean_ms"] == min(t["geomean_ms"] for t in report["trials"])
    assert set(report["best"]) == set(knobs)
    text = gpu_tune.format_report(report)
    assert "APPLY_BLOCK = " in text and "SPLIT_ELEMENTS = " in text


def test_repetitions_alternate_between_contenders(monkeypatch):
    """median_times interleaves the repetitions (a slow spell hits every contender alike) and
    times each by its own calls: a call that takes 3/8 of CPU_MIN_REP_SECONDS runs twice per
    repetition, one that takes the whole of it once."""
    rep = 2.0 ** -8  # seconds; binary fractions keep the fake clock's sums exact
    monkeypatch.setattr(bench, "CPU_MIN_REP_SECONDS", rep)
    # a clock that moves only when a contender runs, by the contender's time, so the test does
    # not depend on how busy the machine is (with real busy-waits, a 1.5 ms call once measured
    # over 2 ms under CI load and ran once per repetition)
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    order = []

    def contender(name, seconds):
        def run():
            order.append(name)
            clock[0] += seconds
        return run

    fast, slow = contender("fast", rep * 3 / 8), contender("slow", rep)
    t_fast, t_slow = bench.median_times([fast, slow], "cpu", reps=3, warmup=1)
    timed = order[-9:]  # after warm-up and the one-call probes: 3 x (fast, fast, slow)
    assert timed == ["fast", "fast", "slow"] * 3
    assert t_fast == rep * 3 / 8 and t_slow == rep
