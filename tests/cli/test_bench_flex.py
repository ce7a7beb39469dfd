"""The FlexAttention anchor computes longnet's exact function (float64, eager Flex), and the
benchmark harness measures it, and sgemm, in processes of their own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import dilated_attention
from longnet.bench import isolated
from longnet.bench.flex import flex_available, flex_dilated_attention

pytestmark = pytest.mark.skipif(flex_available() is not None, reason="this torch has no FlexAttention")


@st.composite
def configs(draw):
    branches = draw(st.integers(1, 3))
    segs = sorted(draw(st.lists(st.integers(2, 40), min_size=branches, max_size=branches)))
    rates = [draw(st.integers(1, min(4, s))) for s in segs]
    return {"n": draw(st.integers(1, 70)), "heads": draw(st.integers(1, 4)), "dim": draw(st.sampled_from([3, 8])),
            "segs": segs, "rates": rates, "causal": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=25, deadline=None)
@given(configs())
def test_flex_computes_longnets_function(c):
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = (torch.randn(2, c["heads"], c["n"], c["dim"], generator=gen, dtype=torch.float64) for _ in range(3))
    ours = dilated_attention(q, k, v, segment_lengths=c["segs"], dilation_rates=c["rates"], is_causal=c["causal"])
    theirs = flex_dilated_attention(q, k, v, c["segs"], c["rates"], is_causal=c["causal"], compiled=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=1e-12)


def test_flex_refuses_what_it_cannot_compute():
    q = torch.randn(1, 4, 16, 8)
    with pytest.raises(ValueError, match="key heads"):
        flex_dilated_attention(q, q[:, :2], q[:, :2], [8], [1])
    with pytest.raises(ValueError, match="query must be a"):
        flex_dilated_attention(q[0], q, q, [8], [1])


SPEC = {"backend": "auto", "n": 128, "causal": True, "mode": "fwd", "heads": 2, "head_dim": 16, "batch_size": 1,
        "segment_lengths": [32, 64], "dilation_rates": [1, 2], "device": "cpu", "dtype": "float32", "warmup": 1,
        "repeats": 1, "seed": 0, "threads": 1, "keep_freed_memory": True}


def test_the_harness_runs_flex_checked_against_the_operator_and_sgemm():
    flex, sgemm = isolated.run_isolated([dict(SPEC, impl="flex"), dict(SPEC, impl="sgemm")], min_rounds=1,
                                        max_rounds=1, timeout_s=600)
    assert flex["status"] == "ok" and sgemm["status"] == "ok", (flex["status"], sgemm["status"])
    assert flex["max_abs_err"] < 1e-5 and flex["median_ms"] > 0
    assert sgemm["flops"] == 4.0 * 2 * 128 * 128 * 16 and "max_abs_err" not in sgemm
