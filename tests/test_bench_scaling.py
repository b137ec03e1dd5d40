"""benchmarks/bench_scaling.py: the measurement core on tiny shapes (structure, not timings)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "benchmarks" / "bench_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scaling"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scaling", None)


def _check_row(row: dict, job: dict) -> None:
    for key in ("model", "criterion", "samples"):
        assert row[key] == job[key]
    assert "error" not in row
    assert row["forward_s"] > 0 and row["criterion_s"] > 0
    assert row["forward_peak_mb"] > 0 and row["peak_mb"] > 0
    assert 0 <= row["extra_mb"] <= row["peak_mb"] and 0 <= row["forward_extra_mb"] <= row["forward_peak_mb"]
    # the ratios come from the two numbers of the same run (both rounded in the row)
    assert row["x_forward"] == pytest.approx(row["criterion_s"] / row["forward_s"], rel=1e-2, abs=2e-3)
    assert row["x_forward_memory"] == pytest.approx(row["peak_mb"] / row["forward_peak_mb"], rel=1e-2)
    assert row["memory_method"] in ("VmHWM after clear_refs", "ru_maxrss")


def test_measure_in_process(bench) -> None:
    job = {"model": "tiny-vit-a", "criterion": "layer_similarity", "samples": 8, "dtype": "float32", "threads": 1}
    row = bench.measure(job)
    _check_row(row, job)
    assert row["info"]["layers"] == bench.QUICK_MODELS["tiny-vit-a"]["vision"]["num_hidden_layers"]
    assert row["params"] == sum(p.numel() for p in bench.build_model("tiny-vit-a", torch.float32).parameters())


def test_measure_in_forked_child_with_profile(bench, tmp_path) -> None:
    model = bench.build_model("tiny-vit-a", torch.bfloat16)
    profile = tmp_path / "profile.json"
    job = {"model": "tiny-vit-a", "criterion": "id_profile", "samples": 8, "dtype": "bfloat16", "threads": 1,
           "profile_out": str(profile)}
    row = bench.run_child(job, model, timeout=120)
    _check_row(row, job)
    assert row["child_wall_s"] > 0
    assert profile.is_file() and row["info"]["modules"] > 0  # written by the child for the Taylor/ID step
    before = [p.clone() for p in model.parameters()]
    step = bench.run_child({**job, "criterion": "taylor_idw_step", "profile_in": str(profile)}, model, timeout=120)
    _check_row(step, {**job, "criterion": "taylor_idw_step"})
    assert step["info"]["params_removed"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the child pruned its own copy


def test_peak_memory_is_per_block(bench) -> None:
    with bench.PeakMemory() as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    with bench.PeakMemory() as small:
        pass
    assert big.peak_mb > 0
    if big.method == "VmHWM after clear_refs":
        assert big.extra_mb >= 60
        assert small.extra_mb < 20  # the high-water mark of the first block does not carry over


def test_table_lists_rows_and_errors(bench) -> None:
    ok = {"model": "m", "criterion": "divprune", "samples": 8, "criterion_s": 2.0, "forward_s": 1.0, "x_forward": 2.0,
          "peak_mb": 300.0, "forward_peak_mb": 200.0, "x_forward_memory": 1.5, "extra_mb": 100.0, "forward_extra_mb": 1.0}
    bad = {"model": "m", "criterion": "id_profile", "samples": 8, "error": "Traceback\nDataError: too few"}
    report = {"models": {"m": {}}, "results": [ok, bad], "tp_step": [], "runs": [{"wall_s": 60.0}], "wall_s_runs": [60.0]}
    text = bench.table(report)
    assert "| divprune | m | 8 | 2 | 2.00 | 300 | 1.50 | 100 (1) |" in text
    assert "error: DataError: too few" in text
    assert text.index("id_profile") < text.index("divprune")  # criteria in their fixed order
