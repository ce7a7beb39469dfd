"""The public API type-checks under ``mypy --strict`` (skipped when mypy is not installed).

``tests/typecheck/public_api.py`` uses every public name of ``longnet`` (and the main ones of
``longnet.gigapath``, ``longnet.hf`` and ``longnet.parallel``) the way the documentation does;
``--follow-imports=silent`` checks those uses against longnet's signatures without checking
longnet's own bodies.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_type_checks_strict():
    pytest.importorskip("mypy", reason="mypy is not installed: pip install mypy")
    pytest.importorskip("transformers", reason="the typed usage includes longnet.hf: pip install -e '.[hf]'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    usage = ROOT / "tests" / "typecheck" / "public_api.py"
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", str(usage)],
                         cwd=ROOT,  # mypy's .mypy_cache there (it git-ignores itself) makes reruns fast
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
