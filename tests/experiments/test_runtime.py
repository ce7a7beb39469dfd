"""``longnet experiment runtime``: the pattern, the fit, and the quick run end to end."""

from __future__ import annotations

import json

import pytest

from longnet.cli.main import main
from longnet.experiments.runtime import RuntimePlan, fit_exponent


def test_pattern_grows_with_the_length_and_keeps_keys_per_query():
    plan = RuntimePlan()
    assert plan.lengths[0] == 2048 and plan.lengths[-1] == 1 << 22
    assert plan.pattern(2048) == ([2048], [1])  # one dense block
    segments, rates = plan.pattern(8192)
    assert segments == [2048, 4096, 8192] and rates == [1, 2, 4]
    segments, rates = plan.pattern(1 << 22)
    assert segments[-1] == 1 << 22 and {w // r for w, r in zip(segments, rates)} == {2048}


def test_fit_recovers_known_exponents():
    lengths = [1024, 2048, 4096, 8192]
    assert fit_exponent(lengths, [3.0 * n ** 1.0 for n in lengths]) == pytest.approx(1.0)
    assert fit_exponent(lengths, [0.5] * 4) == pytest.approx(0.0, abs=1e-12)
    assert fit_exponent([1024], [1.0]) is None


@pytest.mark.parametrize("overrides,name", [(dict(tokens=3000), "tokens"), (dict(min_length=100), "min_length"),
                                            (dict(max_length=1 << 23), "max_length"), (dict(heads=0), "heads")])
def test_plan_rejects_bad_fields(overrides, name):
    with pytest.raises(ValueError, match=name):
        RuntimePlan(**overrides)


def test_quick_run_end_to_end(tmp_path, capsys):
    assert main(["experiment", "runtime", "--quick", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert last["metric"] == "cpu_s" and set(last["exponents"]) == {"dilated", "dense"}
    assert len(last["seconds"]["dilated"]) == 6  # 1K ... 32K
    assert 1 <= len(last["seconds"]["dense"]) <= 6
    doc = json.loads((tmp_path / "runtime.json").read_text())
    assert all(p["cpu_s"] > 0 for p in doc["points"])
    assert "growth exponent" in "\n".join(out)


def test_presets_refuse_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        RuntimePlan.preset("huge")
    with pytest.raises(ValueError, match=r"unknown RuntimePlan fields \['nope'\]"):
        RuntimePlan.preset("default", nope=1)
    assert RuntimePlan.preset("quick", heads=None).heads == 1  # None keeps the preset's value
