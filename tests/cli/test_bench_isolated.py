"""The per-process benchmark harness: fresh processes, alternating rounds, settled medians."""

from __future__ import annotations

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
