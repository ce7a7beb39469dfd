"""Strict JSON: NaN and infinity never reach a JSON file or line."""

from __future__ import annotations

import json

import pytest

from longnet.utils.atomic import atomic_write_json
from longnet.utils.strict_json import first_non_finite, to_json


def test_to_json_is_json_dumps_for_finite_values():
    value = {"b": [1, 2.5, None, True], "a": {"x": "y"}}
    assert to_json(value) == json.dumps(value)
    assert to_json(value, indent=2, sort_keys=True) == json.dumps(value, indent=2, sort_keys=True)


def test_first_non_finite_finds_the_path():
    assert first_non_finite({"a": [1.0, {"b": float("-inf")}]}) == ('$["a"][1]["b"]', float("-inf"))
    assert first_non_finite({"a": (1, 2.0), "b": "nan"}) is None
    where, number = first_non_finite([float("nan")])
    assert where == "$[0]" and number != number


def test_atomic_write_json_refuses_nan_and_leaves_the_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"loss": 1.5})
    with pytest.raises(ValueError, match=r'\$\["loss"\] is nan'):
        atomic_write_json(path, {"loss": float("nan")})
    assert json.loads(path.read_text()) == {"loss": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
