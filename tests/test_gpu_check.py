"""benchmarks/gpu_check.sh: valid bash, steps under their own timeouts, a summary of every step.

The full ``--dry-run`` (every step at tiny sizes on CPU, ~1-2 min on a shared 2-core machine) is
marked slow; the default run checks the script's own logic with cheap steps.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["pytest", "attention", "train_8k", "train_32k", "decode", "anchors"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout(1)")


def _run(tmp_path, *args, timeout=300, **env):
    full = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHONPATH": str(REPO / "src"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def _summary(tmp_path) -> tuple[Path, dict]:
    (folder,) = tmp_path.glob("gpu_check_dryrun-cpu-*")
    return folder, json.loads((folder / "summary.json").read_text())


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_help_and_a_bad_argument(tmp_path):
    shown = _run(tmp_path, "--help")
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "GPU_CHECK_STEPS" in shown.stdout
    bad = _run(tmp_path, "--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    assert not list(tmp_path.iterdir())


def test_a_step_past_its_timeout_does_not_stop_the_next(tmp_path):
    # attention cannot even import torch in 1 s; the unknown step after it is still reported.
    # GPU_CHECK_DRY_RUN=1 does what --dry-run does.
    res = _run(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="attention bogus", GPU_CHECK_TIMEOUT_ATTENTION="1")
    assert res.returncode == 1 and "DRY RUN" in res.stdout
    folder, summary = _summary(tmp_path)
    assert summary["dry_run"] is True
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("attention", "timeout"),
                                                                    ("bogus", "unknown step")]
    assert summary["steps"][0]["rc"] in (124, 137)  # 137: SIGINT landed where an import swallowed it
    assert (folder / "attention.log").exists() and (folder / "env.txt").exists()
    assert "attention  timeout" in (folder / "summary.txt").read_text()


def test_the_anchors_step_runs_anchors_py_with_its_own_timeout(tmp_path):
    """A default step: the log shows the anchors.py command it ran, cut at GPU_CHECK_TIMEOUT_ANCHORS."""
    res = _run(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="anchors", GPU_CHECK_TIMEOUT_ANCHORS="1")
    assert res.returncode == 1
    folder, summary = _summary(tmp_path)
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("anchors", "timeout")]
    log = (folder / "anchors.log").read_text()
    assert "benchmarks/anchors.py --device cpu" in log and "--flex-max-seq-len" in log
    shown = _run(tmp_path / "help", "--help")
    assert "anchors" in shown.stdout.split("GPU_CHECK_STEPS")[1].splitlines()[0]


def test_a_python_without_torch_is_a_clear_error(tmp_path):
    res = _run(tmp_path, "--dry-run", GPU_CHECK_PYTHON="false")
    assert res.returncode == 2 and "GPU_CHECK_PYTHON" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_dry_run_passes_every_step(tmp_path):
    res = _run(tmp_path, "--dry-run", timeout=900)
    folder, summary = _summary(tmp_path)
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [(s, "passed") for s in STEPS], res.stdout
    assert res.returncode == 0
    names = {p.name for p in folder.iterdir()}
    assert {f"{s}.log" for s in STEPS} <= names
    assert any(n.startswith("attention_cpu-") and n.endswith(".json") for n in names)
    assert any(n.startswith("train_speed_cpu-") and n.endswith("_8k.json") for n in names)
    assert any(n.startswith("train_speed_cpu-") and n.endswith("_32k.json") for n in names)
    assert "decode-cpu.json" in names
    for log in ("train_8k.log", "train_32k.log"):
        last = json.loads((folder / log).read_text().strip().splitlines()[-1])
        assert last["presets"]["tiny"]["status"] == {"eager": "ok", "compiled": "ok"}
