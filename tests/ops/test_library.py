"""The registered op (torch.library): opcheck, compile/export without breaks, and the call plan."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet import DilatedPattern, dilated_attention
from longnet.ops.calls import head_sets, plan_branch
from longnet.ops.library import dilated_attention_backward_op, dilated_attention_op
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.testing.reference import reference_dilated_attention


def _qkv(B, H, Hkv, N, D, layout="bhnd", dtype=torch.float64, seed=0):
    """Inputs in a given memory layout: "bhnd" contiguous, "bnhd" as a model's projections give
    them (transposed views), "slice" a non-dense slice of a longer buffer."""
    g = torch.Generator().manual_seed(seed)

    def make(h):
        if layout == "bnhd":
            t = torch.randn(B, N, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        elif layout == "slice":
            t = torch.randn(B, h, N + 3, D + 2, generator=g, dtype=torch.float64)[:, :, 1:N + 1, :D]
        else:
            t = torch.randn(B, h, N, D, generator=g, dtype=torch.float64)
        return t.to(dtype).requires_grad_()

    return make(H), make(Hkv), make(Hkv)


CASES = [  # (B, H, Hkv, N, D, ws, rs, shift, causal, pad)
    (2, 4, 2, 37, 8, [8, 16], [1, 2], 0, True, False),
    (1, 6, 3, 50, 4, [5, 12, 64], [1, 3, 4], 0, False, True),
    (2, 3, 3, 23, 5, [4, 8], [2, 3], 0, True, True),
    (2, 4, 2, 41, 4, [8, 16], [1, 2], 4, True, True),
]


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    B, H, Hkv, N, D, ws, rs, shift, causal, pad = case
    q, k, v = _qkv(B, H, Hkv, N, D, layout="bnhd")
    kpm = (torch.rand(B, N, generator=torch.Generator().manual_seed(1)) > 0.3) if pad else None
    torch.library.opcheck(dilated_attention_op, (q, k, v, kpm, ws, rs, shift, causal, 0.37, "auto"))
    out, lse = dilated_attention_op(q, k, v, kpm, ws, rs, shift, causal, 0.37, "auto")
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
            torch.randn_like(lse), kpm, ws, rs, shift, causal, 0.37, "auto")
    torch.library.opcheck(dilated_attention_backward_op, args)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), group=st.integers(1, 3), N=st.integers(1, 70),
       D=st.integers(1, 6), branches=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 5)),
                                               min_size=1, max_size=3),
       causal=st.booleans(), layout=st.sampled_from(["bhnd", "bnhd", "slice"]),
       shift=st.sampled_from([0, 0, 1, 3, 17]), seed=st.integers(0, 99))
def test_head_batched_calls_match_the_reference_in_every_layout(B, Hkv, group, N, D, branches,
                                                                 causal, layout, shift, seed):
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    pattern = DilatedPattern(ws, rs, shift=shift)
    q, k, v = _qkv(B, Hkv * group, Hkv, N, D, layout=layout, seed=seed)
    out, lse = dilated_attention(q, k, v, segment_lengths=pattern, is_causal=causal,
                                 enable_gqa=True, return_lse=True)
    ref, r_lse = reference_dilated_attention(q, k, v, pattern, None, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    finite = torch.isfinite(r_lse)
    torch.testing.assert_close(lse[finite], r_lse[finite], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + lse[finite].sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum() + r_lse[finite].sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("Hkv", [12, 4, 1])
def test_cuda_plan_batches_heads(layout, B, Hkv):
    # the paper's pattern at N = 40,000 (a tail segment in every branch) on 12 heads: per branch
    # min(lcm(r, g), H) head sets, each one call for the full segments and one for the tail; with
    # the model's (B, N, H, D) layout and B > 1 the tail keeps batch and segments from folding into
    # one dimension, so the full segments take one call per batch row
    H, N, D = 12, 40_000, 8
    pattern = DilatedPattern(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)
    q, k, _ = (t.detach() for t in _qkv(B, H, Hkv, N, D, layout=layout, dtype=torch.float32))
    g = H // Hkv
    for b, r in enumerate(pattern.dilation_rates):
        calls = plan_branch(pattern, b, q, k, is_causal=True, device_type="cuda")
        sets = head_sets(H, Hkv, r)
        assert len(sets) == min(math.lcm(r, g), H)
        full = [1 if B == 1 or layout == "bhnd" or count == 1 else B for *_, count in sets]
        assert len(calls) == sum(full) + len(sets), (b, r, g)
    # CPU: the full segments may be cut into <= 8 MiB calls, never more calls than heads x pieces
    calls = plan_branch(pattern, 0, q, k, is_causal=True)
    assert len(calls) <= H * (N // 2048 + 1)


def _compiled_equals_eager(fn, *inputs):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    want = fn(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.square().sum(), inputs)
    g_want = torch.autograd.grad(want.square().sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_operator_compiles_to_one_graph_and_matches_eager():
    q, k, v = _qkv(2, 4, 2, 45, 8, layout="bnhd")

    def fn(q, k, v):
        out, lse = dilated_attention(q, k, v, segment_lengths=[8, 32], dilation_rates=[1, 4],
                                     is_causal=True, enable_gqa=True, return_lse=True)
        return out * 2 + lse.unsqueeze(-1)

    explained = torch._dynamo.explain(fn)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    _compiled_equals_eager(fn, q, k, v)


def test_export_keeps_the_op():
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 20, 4))

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2])

    ep = torch.export.export(M(), (q, k, v))
    targets = [str(n.target) for n in ep.graph.nodes]
    assert "longnet.dilated_attention.default" in targets
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v))
