"""The CLI tests share tests/train's fixtures: synthetic corpus, cache, micro model, trained run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
_spec = importlib.util.spec_from_file_location("_longnet_train_fixtures", _path)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

corpus = _fixtures.corpus
cache = _fixtures.cache
trained_run = _fixtures.trained_run
micro = _fixtures.micro
micro_model = _fixtures.micro_model
