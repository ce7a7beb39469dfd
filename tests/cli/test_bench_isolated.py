"""The per-process benchmark harness: fresh processes, alternating rounds, settled medians."""

from __future__ import annotations

import os

import pytest

from longnet.bench import isolated

SPEC = {"impl": "dilated", "backend": "auto", "n": 64, "causal": True, "mode": "fwd", "heads": 2, "head_dim": 8,
        "batch_size": 1, "segment_lengths": [16, 32], "dilation_rates": [1, 2], "device": "cpu",
        "dtype": "float32", "warmup": 1, "repeats": 3, "seed": 0, "threads": 1, "keep_freed_memory": True}


def test_settled_needs_the_median_to_stop_moving():
    assert not isolated.settled([1.0], 0.02)
    assert isolated.settled([1.0, 1.0], 0.02)
    assert not isolated.settled([1.0, 2.0], 0.02)
    assert isolated.settled([1.0, 2.0, 1.01, 1.0, 1.02], 0.02)


def test_cases_run_in_alternating_rounds_of_fresh_processes(monkeypatch):
    seen = []

    def fake_spawn(spec, timeout_s):
        seen.append(spec["impl"])
        return {"median_ms": 10.0 if spec["impl"] == "dense" else 5.0, "times_ms": [5.0], "cpu_median_ms": 4.0,
                "peak_mb": 1.0, "threads": 1, "loadavg_1m": 0.5, "flops": 1e6}

    monkeypatch.setattr(isolated, "_spawn", fake_spawn)
    specs = [SPEC, dict(SPEC, impl="dense")]
    records = isolated.run_isolated(specs, min_rounds=3, max_rounds=5)
    assert seen == ["dilated", "dense", "dense", "dilated", "dilated", "dense"]  # A B, B A, A B; then settled
    assert [r["rounds"] for r in records] == [3, 3] and [r["median_ms"] for r in records] == [5.0, 10.0]
    with pytest.raises(ValueError, match="min_rounds"):
        isolated.run_isolated(specs, min_rounds=4, max_rounds=2)


def test_a_real_case_in_its_own_process_and_a_failing_one():
    good, bad = isolated.run_isolated([SPEC, dict(SPEC, backend="no_such_backend")], min_rounds=1, max_rounds=1)
    assert good["status"] == "ok" and good["rounds"] == 1 and good["median_ms"] > 0 and good["threads"] == 1
    assert good["flops"] > 0 and len(good["process_medians_ms"]) == 1
    assert bad["status"].startswith("error: exit 1") and "no_such_backend" in bad["status"]


def test_each_process_reports_how_long_it_waited_for_a_cpu(monkeypatch):
    waits = iter([12.5, 0.0, 3.0])

    def fake_spawn(spec, timeout_s):
        return {"median_ms": 5.0, "times_ms": [5.0], "cpu_median_ms": 4.0, "peak_mb": 1.0, "threads": 1,
                "loadavg_1m": 0.5, "flops": 1e6, "runqueue_wait_ms": next(waits), "steal_ms": 0.0}

    monkeypatch.setattr(isolated, "_spawn", fake_spawn)
    (rec,) = isolated.run_isolated([SPEC], min_rounds=3, max_rounds=3)
    assert rec["runqueue_wait_ms_per_process"] == [12.5, 0.0, 3.0] and rec["steal_ms_per_process"] == [0.0] * 3


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux /proc only")
def test_a_case_measures_its_wait_for_a_cpu_from_proc():
    out = isolated.run_case(dict(SPEC, repeats=1))
    assert out["runqueue_wait_ms"] >= 0.0 and out["steal_ms"] >= 0.0


def test_paper_spec_and_the_in_process_comparison_of_backends():
    import argparse
    import importlib.util
    from pathlib import Path

    args = argparse.Namespace(heads=2, head_dim=8, device="cpu", repeats=1, threads=1)
    spec = isolated.paper_spec(args, impl="dilated", n=64, causal=True, mode="fwd")
    assert spec["dtype"] == "float32" and spec["keep_freed_memory"] and spec["segment_lengths"][0] == 2048
    assert isolated.spec_config(dict(spec, backend="auto")).pattern.segment_lengths == tuple(spec["segment_lengths"])
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "auto_backend.py"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location("auto_backend", path))
    mod.__spec__.loader.exec_module(mod)
    records = mod._in_process([dict(spec, backend=b) for b in ("auto", "cpu_flash")], rounds=2)
    assert [r["backend"] for r in records] == ["auto", "cpu_flash"]
    assert all(r["status"] == "ok" and len(r["process_medians_ms"]) == 2 and r["median_ms"] > 0 for r in records)
