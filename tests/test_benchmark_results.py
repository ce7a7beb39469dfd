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
    import importlib.util

    path = REPO / "benchmarks" / "gigapath_slide.py"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location("gigapath_slide", path))
    mod.__spec__.loader.exec_module(mod)
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
