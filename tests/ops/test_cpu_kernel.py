"""longnet's CPU attention kernel (C++, float32) against a float64 reference, and its selection.

The kernel is called directly with tiny blocks so that every tiling boundary (query blocks, key
blocks, the causal diagonal inside a key block) is crossed on small inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet.ops.backends import BACKENDS, get_backend
from longnet.ops.backends import cpu_kernel as ck

pytestmark = pytest.mark.skipif(ck.cpu_kernel_error() is not None,
                                reason=f"CPU kernel not built: {ck.cpu_kernel_error()}")


def _reference(q, k, v, causal, scale, lse=None):
    """float64 (out, lse) of attention; with ``lse`` given, probabilities use it (merged lse)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        Lq, Lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
    own = torch.logsumexp(s, -1)
    p = torch.exp(s - (own if lse is None else lse.double()).unsqueeze(-1))
    return p @ v, own


def _grads(q, k, v, causal, scale, dout, out, lse):
    """Gradients of sum(dout * O) where O = P V and P = exp(S - lse) with out/lse held fixed (the
    backward a merge needs): dV = P^T dO, dS = P (dO V^T - rowsum(dO * out))."""
    q, k, v, dout, out = (t.double() for t in (q, k, v, dout, out))
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        Lq, Lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(s - lse.double().unsqueeze(-1))
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-1, -2) @ q, dv


def _close(a, b, tol=2e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.abs().max().item() if b.numel() else 0.0), err


@pytest.fixture(params=["direct BLAS", "through ATen"])
def blas_route(request):
    """Each test of the kernel's numbers runs with block products calling sgemm_ directly (where the BLAS
    exports it) and through ATen (as on builds where it does not)."""
    ext = ck.load_cpu_kernel()
    was = ext.direct_blas_calls(-1)
    if request.param == "direct BLAS" and not was:
        pytest.skip("torch's BLAS does not export sgemm_ here")
    ext.direct_blas_calls(int(request.param == "direct BLAS"))
    yield request.param
    ext.direct_blas_calls(int(was))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), G=st.integers(1, 3), L=st.integers(1, 23), extra_k=st.integers(0, 9),
       D=st.sampled_from([1, 3, 8, 16]), causal=st.booleans(), bq=st.sampled_from([1, 3, 4, 128]),
       bk=st.sampled_from([1, 2, 5, 1024]), bd=st.sampled_from([1, 2, 3, 64]), negative_scale=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_float64_reference(blas_route, B, G, L, extra_k, D, causal, bq, bk, bd, negative_scale, seed):
    g = torch.Generator().manual_seed(seed)
    Lk = L + extra_k  # causal: key j <= query i (top-left aligned, as PyTorch's CPU kernel)
    q = torch.randn(B, G, L, D, generator=g)
    k, v = (torch.randn(B, G, Lk, D, generator=g) for _ in range(2))
    scale = (-1.0 if negative_scale else 1.0) / math.sqrt(D)
    ext = ck.load_cpu_kernel()
    out, lse = ext.attention_forward(q, k, v, causal, scale, bq, bk, bd)
    ref_out, ref_lse = _reference(q, k, v, causal, scale)
    _close(out, ref_out)
    _close(lse, ref_lse)
    dout = torch.randn(B, G, L, D, generator=g)
    dq, dk, dv = ext.attention_backward(dout, q, k, v, out, lse, causal, scale, bq, bk)
    for got, want in zip((dq, dk, dv), _grads(q, k, v, causal, scale, dout, out, lse)):
        _close(got, want, 5e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), G=st.integers(1, 3), L=st.integers(1, 23), extra_k=st.integers(0, 9),
       D=st.sampled_from([1, 3, 16]), causal=st.booleans(), bq=st.sampled_from([1, 4, 128]),
       bk=st.sampled_from([1, 5, 1024]), bd=st.sampled_from([1, 3, 64]), empty_rows=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_forward_into_writes_and_merges_like_merge_partials(blas_route, B, G, L, extra_k, D, causal, bq, bk, bd, empty_rows,
                                                           seed):
    """The fused epilogue: written into strided views of an accumulator, or merged with what they
    hold by the log-sum-exp rule (float64 reference: merge_partials), rows without mass included."""
    from longnet.ops.merge import merge_partials

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, G, L, D, generator=g)
    k, v = (torch.randn(B, G, L + extra_k, D, generator=g) for _ in range(2))
    scale = 1.0 / math.sqrt(D)
    ext = ck.load_cpu_kernel()
    ref_out, ref_lse = _reference(q, k, v, causal, scale)
    # accumulators laid out (B, L, G, D) / (B, L, G) as the operator's are: strided (B, G, L, ...) views
    acc_o = torch.randn(B, L, G, D, generator=g)
    acc_l = torch.randn(B, L, G, generator=g)
    acc_o[:, :empty_rows], acc_l[:, :empty_rows] = 0.0, float("-inf")  # rows no earlier branch reached
    old_o, old_l = acc_o.transpose(1, 2).double().clone(), acc_l.transpose(1, 2).double().clone()
    ext.attention_forward_into(q, k, v, acc_o.transpose(1, 2), acc_l.transpose(1, 2), True, causal, scale, bq, bk, bd)
    want_o, want_l = merge_partials(old_o, old_l, ref_out, ref_lse)
    _close(acc_o.transpose(1, 2), want_o)
    _close(acc_l.transpose(1, 2), want_l)
    ext.attention_forward_into(q, k, v, acc_o.transpose(1, 2), acc_l.transpose(1, 2), False, causal, scale, bq, bk, bd)
    _close(acc_o.transpose(1, 2), ref_out)
    _close(acc_l.transpose(1, 2), ref_lse)


def test_forward_into_with_no_keys_leaves_rows_without_mass_alone():
    ext = ck.load_cpu_kernel()
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 0, 4)
    out, lse = torch.full((1, 2, 5, 4), 3.0), torch.full((1, 2, 5), 1.5)
    ext.attention_forward_into(q, k, k, out, lse, True, False, 0.5, 4, 8, 2)  # merged with nothing
    assert torch.equal(out, torch.full_like(out, 3.0)) and torch.equal(lse, torch.full_like(lse, 1.5))
    ext.attention_forward_into(q, k, k, out, lse, False, False, 0.5, 4, 8, 2)  # written: no key
    assert torch.equal(out, torch.zeros_like(out)) and torch.all(lse == float("-inf"))
    with pytest.raises(RuntimeError, match="lse must be"):
        ext.attention_forward_into(q, k, k, out, lse.double(), False, False, 0.5, 4, 8, 2)


def test_strided_and_expanded_views_and_merged_lse(blas_route):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 37, 3, 16, generator=g)  # (B, L, G, D): heads strided in memory
    q = base.transpose(1, 2)  # (B, G, L, D), not contiguous
    kv = torch.randn(2, 1, 37, 16, generator=g).expand(2, 3, 37, 16)  # a shared head: stride 0
    ext = ck.load_cpu_kernel()
    out, lse = ext.attention_forward(q, kv, kv, True, 0.25, 4, 8, 3)
    ref_out, ref_lse = _reference(q, kv, kv, True, 0.25)
    _close(out, ref_out)
    _close(lse, ref_lse)
    # backward from a merged lse (as if another branch added mass) and +inf rows (no contribution)
    merged = lse + 0.7
    merged[:, :, 5] = float("inf")
    dout = torch.randn(2, 3, 37, 16, generator=g)
    dq, dk, dv = ext.attention_backward(dout, q, kv, kv, out, merged, True, 0.25, 4, 8)
    want = _grads(q, kv, kv, True, 0.25, dout, out, merged)
    for got, w in zip((dq, dk, dv), want):
        _close(got, w, 5e-5)
    assert torch.equal(dq[:, :, 5], torch.zeros_like(dq[:, :, 5]))


def test_overlapping_and_odd_row_strides_match_the_reference(blas_route):
    """Rows with stride 0 (a key expanded along the sequence) and a one-row query whose row stride is
    smaller than its length: BLAS cannot take them as leading dimensions, the kernel still must."""
    g = torch.Generator().manual_seed(3)
    ext = ck.load_cpu_kernel()
    k = torch.randn(1, 2, 1, 8, generator=g).expand(1, 2, 9, 8)  # stride 0 along L
    v = torch.randn(1, 2, 9, 8, generator=g)
    q = torch.randn(1, 2, 6, 8, generator=g)
    one_row = torch.randn(64, generator=g).as_strided((1, 2, 1, 8), (64, 8, 1, 1))
    for qq in (q, one_row):
        for causal in (False, True):
            out, lse = ext.attention_forward(qq, k, v, causal, 0.3, 4, 5, 2)
            ref_out, ref_lse = _reference(qq, k, v, causal, 0.3)
            _close(out, ref_out)
            _close(lse, ref_lse)
            dout = torch.randn(qq.shape, generator=g)
            got = ext.attention_backward(dout, qq, k, v, out, lse, causal, 0.3, 4, 5)
            for a, b in zip(got, _grads(qq, k, v, causal, 0.3, dout, out, lse)):
                _close(a, b, 5e-5)


def test_the_kernel_runs_on_torchs_threads():
    """Built without OpenMP, ``at::parallel_for`` (inline) ran every item on the calling thread."""
    if not torch.backends.openmp.is_available():
        pytest.skip("this torch does not run on OpenMP")
    ext = ck.load_cpu_kernel()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ext.threads_used(64) == 2
        torch.set_num_threads(1)
        assert ext.threads_used(64) == 1
    finally:
        torch.set_num_threads(before)


def test_several_threads_on_one_problem_match_one_thread():
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, 1, 300, 8, generator=g) for _ in range(4))
    ext = ck.load_cpu_kernel()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    one = [*ext.attention_forward(q, k, v, True, 0.3, 16, 32, 5)]
    one += ext.attention_backward(dout, q, k, v, one[0], one[1], True, 0.3, 16, 32)
    torch.set_num_threads(2)  # query blocks split over threads, key gradients summed afterwards
    two = [*ext.attention_forward(q, k, v, True, 0.3, 16, 32, 5)]
    two += ext.attention_backward(dout, q, k, v, two[0], two[1], True, 0.3, 16, 32)
    torch.set_num_threads(3)  # an uneven split
    three = [*ext.attention_forward(q, k, v, True, 0.3, 16, 32, 5)]
    three += ext.attention_backward(dout, q, k, v, three[0], three[1], True, 0.3, 16, 32)
    torch.set_num_threads(before)
    for a, b, c in zip(one, two, three):
        _close(a, b, 1e-6)
        _close(a, c, 1e-6)


def test_backend_matches_cpu_flash_and_rejects_what_it_cannot_run():
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(2, 4, 200, 32, generator=g) for _ in range(4))
    ours, flash = BACKENDS["cpu_kernel"], BACKENDS["cpu_flash"]
    for causal in (True, False):
        o1, l1, _ = ours.forward(q, k, v, None, causal, 0.2)
        o2, l2, _ = flash.forward(q, k, v, None, causal, 0.2)
        _close(o1, o2)
        _close(l1, l2)
        for a, b in zip(ours.backward(dout, q, k, v, o1, l1, None, None, causal, 0.2),
                        flash.backward(dout, q, k, v, o2, l2, None, None, causal, 0.2)):
            _close(a, b, 5e-5)
    assert "float32" in ours.unsupported_reason(q.double(), has_mask=False)
    assert "mask" in ours.unsupported_reason(q, has_mask=True)
    with pytest.raises(ValueError, match="cpu_kernel"):
        get_backend("cpu_kernel", q.double())


def test_auto_picks_the_kernel_for_float32_without_a_mask_only(monkeypatch):
    q = torch.randn(1, 2, 8, 4)
    assert get_backend("auto", q, has_mask=False).name == "cpu_kernel"
    assert get_backend("auto", q, has_mask=False).name == "cpu_kernel"
    assert get_backend("auto", q, has_mask=True).name == "cpu_flash"
    assert get_backend("auto", q.double(), has_mask=False).name == "cpu_flash"
    monkeypatch.setenv("LONGNET_CPU_KERNEL", "0")
    assert get_backend("auto", q, has_mask=False).name == "cpu_flash"


def test_a_failed_build_falls_back_for_auto_and_raises_by_name(monkeypatch):
    monkeypatch.setattr(ck, "_state", {"error": "the CPU attention kernel could not be built (no g++)"})
    monkeypatch.setattr(ck, "_warned", False)
    q = torch.randn(1, 2, 8, 4)
    with pytest.warns(RuntimeWarning, match="no g\\+\\+"):
        assert get_backend("auto", q, has_mask=False).name == "cpu_flash"
    with pytest.raises(ValueError, match="no g\\+\\+"):
        get_backend("cpu_kernel", q, has_mask=False)
