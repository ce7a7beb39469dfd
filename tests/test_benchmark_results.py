"""The benchmark scripts under ``benchmarks/`` follow ``longnet bench``'s rule
(:func:`longnet.bench.results.claim_results`): a run that would replace an earlier results file
stops before measuring anything, unless ``--overwrite``. Every run here writes under ``tmp_path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longnet.bench.report import device_slug

REPO = Path(__file__).resolve().parents[1]
SLUG = device_slug(torch.device("cpu"))


@pytest.mark.parametrize("script, stem, extra", [
    ("decode.py", "decode-cpu", []),
    ("hf_decode.py", "hf_decode-cpu", []),
    ("gqa_cache_bytes.py", "gqa_cache_bytes", []),
    ("train_speed.py", f"train_speed_{SLUG}", ["--device", "cpu"]),
    ("profile_attention.py", f"profile_attention_{SLUG}_N16384_causal_fwdbwd_auto_t1", ["--threads", "1"]),
    ("anchors.py", f"anchors_{SLUG}", []),
    ("auto_backend.py", f"auto_backend_{SLUG}", []),
    ("auto_backend.py", f"auto_backend_{SLUG}_threads1", ["--threads", "1"]),
    ("kernel_efficiency.py", f"kernel_efficiency_{SLUG}", []),
])
def test_a_script_does_not_replace_earlier_results(script, stem, extra, tmp_path):
    earlier = tmp_path / f"{stem}.json"
    earlier.write_text("earlier results")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert str(earlier) in run.stderr and "--overwrite" in run.stderr, run.stderr[-2000:]
    assert earlier.read_text() == "earlier results" and sorted(tmp_path.iterdir()) == [earlier]


def test_gigapath_rows_are_the_median_round_of_alternated_processes():
    mod = _load_script("gigapath_slide")
    path = REPO / "benchmarks" / "gigapath_slide.py"
    rounds = [{"impl": "longnet", "tiles": 10, "mode": "float32", "seconds": s, "forward_peak": p}
              for s, p in ((3.0, 30), (1.0, 10), (2.0, 20), (9.0, 90))]
    row = mod._median_run(rounds)
    assert row["seconds"] == 2.5 and row["seconds_per_round"] == [3.0, 1.0, 2.0, 9.0]
    assert row["forward_peak"] == 20  # the memory of the median round (the lower middle one)
    assert mod._median_run(rounds[:1]) == rounds[0]
    assert mod._median_run([*rounds, {"impl": "longnet", "tiles": 10, "mode": "float32", "error": "x"}])["error"] == "x"
    run = subprocess.run([sys.executable, str(path), "--rounds", "0"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert run.returncode == 2 and "--rounds must be >= 1" in run.stderr


def _load_script(name: str):
    import importlib.util

    path = REPO / "benchmarks" / f"{name}.py"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    mod.__spec__.loader.exec_module(mod)
    return mod


def test_kernel_efficiency_reports_ratios_and_stops_when_a_case_fails(monkeypatch, tmp_path, capsys):
    import json

    mod = _load_script("kernel_efficiency")
    ms = {"cpu_kernel": 50.0, "cpu_flash": 100.0, "-": 40.0}  # the kernel at 0.8 of sgemm, 2x flash

    def fake(specs, **_):
        return [{"impl": s["impl"], "backend": s["backend"], "status": "ok", "flops": 1e9,
                 "median_ms": ms[s["backend"]], "rounds": 3} for s in specs]

    monkeypatch.setattr(mod, "run_isolated", fake)
    assert mod.main(["--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("kernel_efficiency_*.json")).read_text())
    assert [r["mode"] for r in doc["rows"]] == ["fwd", "fwdbwd"]
    assert doc["rows"][0]["kernel_over_sgemm"] == pytest.approx(0.8)
    assert doc["rows"][0]["kernel_over_flash"] == pytest.approx(2.0)
    assert '"kernel_over_sgemm"' in capsys.readouterr().out.strip().splitlines()[-1]

    def failing(specs, **_):
        return [dict(r, status="error: exit -9") if r["backend"] == "cpu_flash" else r for r in fake(specs)]

    monkeypatch.setattr(mod, "run_isolated", failing)
    with pytest.raises(SystemExit, match=r"a case failed, no ratio to report: dilated\[cpu_flash\]: error: exit -9"):
        mod.main(["--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists() or not list((tmp_path / "again").glob("*.json"))


def test_auto_backend_reports_paired_ratios_with_an_interval(monkeypatch, tmp_path):
    import json
    import statistics

    mod = _load_script("auto_backend")
    assert mod.paired_ratios([110.0, 90.0, 100.0], [100.0, 100.0]) == pytest.approx([1.1, 0.9])
    assert mod.bootstrap_median_ci([1.0]) is None
    assert mod.bootstrap_median_ci([1.02] * 5) == (1.02, 1.02)
    values = [0.9, 0.95, 1.0, 1.0, 1.05, 1.1, 1.3]
    lo, hi = mod.bootstrap_median_ci(values)
    assert min(values) <= lo <= statistics.median(values) <= hi <= max(values) and lo < hi
    assert mod.bootstrap_median_ci(values) == (lo, hi)  # seeded: the same interval every run

    # rounds: auto is 20% slower than cpu_kernel in the medians but level round by round in 3 of 5 rounds
    per_round = {"auto": [120.0, 120.0, 100.0, 100.0, 100.0], "cpu_kernel": [100.0] * 5,
                 "cpu_flash": [150.0] * 5}

    def fake(specs, **_):
        return [dict(s, status="ok", median_ms=statistics.median(per_round[s["backend"]]),
                     cpu_median_ms=None, process_medians_ms=per_round[s["backend"]], rounds=5) for s in specs]

    monkeypatch.setattr(mod, "run_isolated", fake)
    assert mod.main(["--out", str(tmp_path), "--seq-lens", "4096"]) == 0
    doc = json.loads(next(tmp_path.glob("auto_backend_*.json")).read_text())
    assert len(doc["rows"]) == 4 and doc["all_within_slack"]
    row = doc["rows"][0]
    assert row["best_named"] == "cpu_kernel" and row["auto_runs"] == "cpu_kernel"
    assert row["auto_over_best"] == pytest.approx(1.0) and row["paired_auto_over_best"] == pytest.approx(1.0)
    lo, hi = row["paired_ci90"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.2)


def test_auto_backend_scores_autos_choice_with_pooled_processes(monkeypatch, tmp_path, capsys):
    import json

    mod = _load_script("auto_backend")
    # auto and cpu_kernel run the same code: their processes pool; cpu_flash is the yardstick
    level = {"auto": [120.0, 120.0, 100.0, 100.0, 100.0], "cpu_kernel": [100.0] * 5, "cpu_flash": [150.0] * 5}
    assert mod.choice_over_best(level, "cpu_kernel") == (1.0, "auto")
    slower = {"auto": [110.0] * 5, "cpu_kernel": [100.0] * 5, "cpu_flash": [90.0] * 5}
    ratio, fastest = mod.choice_over_best(slower, "cpu_kernel")
    assert fastest == "cpu_flash" and ratio == pytest.approx(105.0 / 90.0)
    # what resolving "auto" costs is added to the choice
    ratio, _ = mod.choice_over_best(slower, "cpu_kernel", extra_ms=4.5)
    assert ratio == pytest.approx(109.5 / 90.0)
    assert mod.choice_over_best({"cpu_kernel": [1.0], "cpu_flash": [1.0]}, "cpu_kernel") is None
    assert mod.choice_over_best({"auto": [1.0], "cpu_flash": [1.0]}, "cpu_kernel") is None

    row = {"n": 4096, "causal": True, "mode": "fwdbwd", "process_medians_ms": slower, "auto_runs": "cpu_kernel"}
    scored = mod.score_row(row, slack=0.05, resolve_us=1000.0)  # two resolves in fwd+bwd: 2 ms
    assert scored["choice_over_best"] == pytest.approx(107.0 / 90.0, abs=1e-4)
    assert scored["choice_fastest"] == "cpu_flash" and not scored["choice_ok"]
    assert mod.score_row(dict(row, mode="fwd"), slack=0.05, resolve_us=1000.0)["choice_over_best"] == \
        pytest.approx(106.0 / 90.0, abs=1e-4)
    assert mod.auto_resolve_us("cpu", calls=200) > 0

    # --rescore recomputes a saved result in place, keeping the resolve cost it holds
    rows = [dict(row, ms={b: sum(t) / len(t) for b, t in level.items()}, best_named="cpu_kernel",
                 auto_over_best=1.0, ok=True, paired_auto_over_best=1.0, paired_ci90=None,
                 process_medians_ms=level),
            dict(row, mode="fwd", ms={b: sum(t) / len(t) for b, t in slower.items()}, best_named="cpu_flash",
                 auto_over_best=1.22, ok=False, paired_auto_over_best=1.22, paired_ci90=None)]
    saved = tmp_path / "auto_backend_cpu.json"
    saved.write_text(json.dumps({"device": "cpu", "head_dim": 64, "slack": 0.05, "auto_resolve_us": 0.0,
                                 "rows": rows, "all_within_slack": False}))
    assert mod.main(["--rescore", str(saved)]) == 0
    doc = json.loads(saved.read_text())
    assert doc["auto_resolve_us"] == 0.0
    assert [r["choice_ok"] for r in doc["rows"]] == [True, False]
    assert not doc["choice_all_within_slack"] and not doc["all_within_slack"]
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1])["choice_all_within_slack"] is False
    header = next(line for line in printed.splitlines() if line.strip().startswith("N"))
    assert header.index("auto") < header.index("cpu_kernel") < header.index("cpu_flash")
    # a file without the resolve cost gets it measured
    unmeasured = json.loads(saved.read_text())
    del unmeasured["auto_resolve_us"]
    saved.write_text(json.dumps(unmeasured))
    assert mod.main(["--rescore", str(saved)]) == 0
    assert json.loads(saved.read_text())["auto_resolve_us"] > 0
    with pytest.raises(SystemExit):
        mod.main(["--rescore", str(tmp_path / "missing.json")])
