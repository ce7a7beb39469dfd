"""Fixtures for the trainer and CLI tests: a synthetic corpus and a micro model (fast on CPU)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

_SRC = Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

MICRO_MODEL = {"embed_dim": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64,
               "segment_lengths": [8, 16], "dilation_rates": [1, 2]}
"""A 2-layer, 32-wide LongNet with two dilated branches (~30K parameters with vocab 300)."""


def write_corpus(root: Path, files: int = 120, lines: int = 30, seed: int = 0) -> Path:
    """Python-like files with learnable regularities (templates, matched names)."""
    rng = random.Random(seed)
    names = ["x", "y", "data", "value", "result", "items", "count", "name", "path", "buf"]
    funcs = ["len", "sum", "max", "min", "sorted", "list", "str", "int"]
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        out = [f"# module {f}", "import os", ""]
        for i in range(lines):
            a, b = rng.choice(names), rng.choice(names)
            kind = rng.randrange(4)
            if kind == 0:
                out.append(f"def {a}_{i}({b}):\n    return {rng.choice(funcs)}({b})\n")
            elif kind == 1:
                out.append(f"for {a} in {b}:\n    print({a})")
            elif kind == 2:
                out.append(f"{a} = {rng.choice(funcs)}({b}) + {rng.randint(0, 9)}")
            else:
                out.append(f"if {a} is None:\n    {a} = {b}")
        (root / f"mod{f:03d}.py").write_text("\n".join(out) + "\n", encoding="utf-8")
    return root


def micro_args(data: Path, cache: Path, out: Path, *extra: str, steps: int = 12) -> list[str]:
    """``longnet train`` arguments for the micro model on ``data``."""
    import json

    return ["train", "--data", str(data), "--cache-dir", str(cache), "--out", str(out),
            "--vocab-size", "300", "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "2",
            "--max-steps", str(steps), "--eval-every", "6", "--eval-tokens", "256", "--save-every", "6",
            "--model-overrides", json.dumps(MICRO_MODEL), "--no-progress", *extra]



@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "code")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus, cache) -> Path:
    """A micro run trained for 12 steps (shared: copy it before changing anything)."""
    from longnet.cli.main import main

    out = tmp_path_factory.mktemp("runs") / "micro"
    assert main(micro_args(corpus, cache, out)) == 0
    return out


@pytest.fixture
def micro_model() -> dict:
    """A fresh copy of :data:`MICRO_MODEL` (test modules cannot import conftest reliably)."""
    return dict(MICRO_MODEL)


@pytest.fixture(scope="session")
def micro():
    """The :func:`micro_args` builder (fixtures carry it to tests/cli as well)."""
    return micro_args
