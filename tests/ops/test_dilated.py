"""The operator against the dense float64 reference, on random configurations."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longnet
from longnet import DilatedPattern, dilated_attention
from longnet.ops import backends as backends_mod
from longnet.ops.dilated import _dropout_dilated_attention
from longnet.testing.reference import reference_dilated_attention

CPU_BACKENDS = ["cpu_flash", "math"]


def _inputs(B, H, Hkv, N, D, dtype=torch.float64, pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    kpm = (torch.rand(B, N, generator=g) > 0.3) if pad else None
    return q, k, v, kpm


def _compare(q, k, v, kpm, ws, rs, causal, backend, rtol, scale=None):
    """Output, lse and all three gradients (through out and lse) against the reference."""
    out, lse = dilated_attention(q, k, v, segment_lengths=ws, dilation_rates=rs,
                                 is_causal=causal, key_padding_mask=kpm, scale=scale,
                                 enable_gqa=True, return_lse=True, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = reference_dilated_attention(q64, k64, v64, ws, rs, is_causal=causal,
                                               key_padding_mask=kpm, scale=scale,
                                               enable_gqa=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.all(lse[~finite] == float("-inf"))
    tol = lambda ref: rtol * (ref.abs().max().item() + 1.0)  # noqa: E731
    assert (out.double() - r_out).abs().max().item() <= tol(r_out)
    assert (lse[finite].double() - r_lse[finite]).abs().max().item() <= tol(r_lse[finite]) \
        if finite.any() else True
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64) * finite
    ours = torch.autograd.grad(
        (out.double() * g_out).sum() + (lse.double().nan_to_num(0, 0, 0) * g_lse).sum(),
        (q, k, v))
    ref = torch.autograd.grad(
        (r_out * g_out).sum() + (r_lse.nan_to_num(0, 0, 0) * g_lse).sum(), (q64, k64, v64))
    for name, a, b in zip("qkv", ours, ref):
        assert torch.isfinite(a).all(), name
        assert (a.double() - b).abs().max().item() <= tol(b), name


branch = st.tuples(st.integers(1, 40), st.integers(1, 6))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    branches=st.lists(branch, min_size=1, max_size=4),
    N=st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 3, 5, 31, 37, 47])),
    heads=st.sampled_from([(1, 1), (2, 2), (3, 3), (4, 2), (6, 3), (6, 1), (5, 5)]),
    D=st.integers(1, 9),
    B=st.integers(1, 2),
    causal=st.booleans(),
    pad=st.booleans(),
    backend=st.sampled_from(CPU_BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(branches, N, heads, D, B, causal, pad, backend, seed):
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    q, k, v, kpm = _inputs(B, heads[0], heads[1], N, D, pad=pad, seed=seed)
    _compare(q, k, v, kpm, ws, rs, causal, backend, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    branches=st.lists(branch, min_size=1, max_size=3),
    N=st.integers(1, 40),
    causal=st.booleans(),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float32(branches, N, causal, pad, seed):
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    q, k, v, kpm = _inputs(2, 4, 2, N, 8, dtype=torch.float32, pad=pad, seed=seed)
    _compare(q, k, v, kpm, ws, rs, causal, "auto", rtol=2e-5)


@settings(max_examples=30, deadline=None)
@given(
    branches=st.lists(branch, min_size=1, max_size=4),
    N=st.integers(1, 40),
    heads=st.sampled_from([(2, 2), (4, 2), (6, 3), (3, 1)]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_kernel_merging_in_its_epilogue_matches_reference(branches, N, heads, causal, seed):
    """``cpu_kernel`` merges each call into the accumulators itself (``forward_into``)."""
    if backends_mod.BACKENDS["cpu_kernel"].unsupported_reason(torch.zeros(1), has_mask=False):
        pytest.skip("CPU kernel not built")
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    q, k, v, _ = _inputs(2, heads[0], heads[1], N, 8, dtype=torch.float32, seed=seed)
    _compare(q, k, v, None, ws, rs, causal, "cpu_kernel", rtol=2e-5)


def test_paper_like_pattern_with_uneven_tail():
    # several branches, the last one wider than N, N prime, w % r != 0
    q, k, v, kpm = _inputs(1, 6, 6, 97, 7, pad=True)
    _compare(q, k, v, kpm, [8, 16, 30, 128], [1, 2, 4, 6], True, "cpu_flash", rtol=1e-10)
    _compare(q, k, v, None, [8, 16, 30, 128], [1, 2, 4, 6], False, "cpu_flash", rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_custom_scale(causal):
    q, k, v, _ = _inputs(1, 2, 2, 11, 4)
    _compare(q, k, v, None, [4, 8], [1, 2], causal, "auto", rtol=1e-10, scale=0.37)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N", [1, 13, 64])
def test_single_dense_branch_equals_sdpa(backend, N):
    q, k, v, _ = _inputs(2, 3, 3, N, 5)
    for causal in (False, True):
        ours = dilated_attention(q, k, v, segment_lengths=[max(N, 1) * 2], dilation_rates=[1],
                                 is_causal=causal, backend=backend)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        g1 = torch.autograd.grad(ours.sum(), (q, k, v))
        g2 = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_single_dense_branch_with_padding_equals_sdpa_on_real_queries():
    q, k, v, kpm = _inputs(2, 2, 2, 19, 4, pad=True)
    kpm[:, 0] = True  # every query keeps at least one key
    ours = dilated_attention(q, k, v, segment_lengths=[64], dilation_rates=[1],
                             key_padding_mask=kpm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gqa_equals_repeated_heads():
    q, k, v, _ = _inputs(1, 6, 2, 21, 4)
    ours = dilated_attention(q, k, v, segment_lengths=[4, 9], dilation_rates=[1, 3],
                             is_causal=True, enable_gqa=True)
    rep = dilated_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                            segment_lengths=[4, 9], dilation_rates=[1, 3], is_causal=True)
    torch.testing.assert_close(ours, rep, rtol=1e-12, atol=1e-12)


def test_gradcheck_tiny():
    q, k, v, kpm = _inputs(1, 2, 1, 7, 3, pad=True)
    kpm[0, :2] = True

    def fn(q, k, v):
        out, lse = dilated_attention(q, k, v, segment_lengths=[3, 5], dilation_rates=[1, 2],
                                     key_padding_mask=kpm, enable_gqa=True, return_lse=True)
        return out, lse.nan_to_num(0.0, 0.0, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_query_kept_by_no_branch_outputs_zero():
    # r = 2 with one head: odd positions of head 0 are never kept... head 0 keeps offset 0 only
    q, k, v, _ = _inputs(1, 1, 1, 6, 2)
    out, lse = dilated_attention(q, k, v, segment_lengths=[6], dilation_rates=[2],
                                 return_lse=True)
    assert torch.all(out[0, 0, 1::2] == 0)
    assert torch.all(lse[0, 0, 1::2] == float("-inf"))
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0, 0, 1::2] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_all_padding_rows_are_finite(causal):
    q, k, v, _ = _inputs(2, 2, 2, 10, 4)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1] = False  # the whole second sequence is padding
    kpm[0, 3:7] = False
    out = dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2],
                            is_causal=causal, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # padded keys take part in nothing
    assert torch.all(k.grad[:, :, 3:7] == 0) and torch.all(v.grad[:, :, 3:7] == 0)
    assert torch.all(k.grad[1] == 0)


def test_bfloat16_error_within_twice_sdpa_error():
    torch.manual_seed(0)
    ws, rs = [16, 32, 64], [1, 2, 4]
    q, k, v, _ = _inputs(2, 4, 4, 96, 32)
    q, k, v = (t.detach() for t in (q, k, v))
    ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True)
    ours = dilated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), segment_lengths=ws,
                             dilation_rates=rs, is_causal=True)
    # PyTorch's own bf16 error on the same function: SDPA with the log-count bias
    from longnet.testing.reference import count_matrix
    bias = count_matrix(DilatedPattern(ws, rs), 96, 4, is_causal=True).log()
    sdpa = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                          attn_mask=bias.bfloat16())
    err = (ours.double() - ref).abs().mean().item()
    base = (sdpa.double() - ref).abs().mean().item()
    assert ours.dtype == torch.bfloat16
    assert err <= 2 * base, (err, base)


def test_kernels_never_see_more_rows_than_a_segment(monkeypatch):
    """Memory stays O(N): every kernel call is at most ceil(w/r) keys long, never N x N."""
    seen = []
    math_be = backends_mod.BACKENDS["math"]
    real = math_be.forward

    def spy(q, k, v, mask, is_causal, scale):
        seen.append(k.shape[2])
        return real(q, k, v, mask, is_causal, scale)

    monkeypatch.setattr(math_be, "forward", spy)
    q, k, v, _ = _inputs(1, 4, 4, 200, 4)
    dilated_attention(q, k, v, segment_lengths=[8, 32, 64], dilation_rates=[1, 4, 8],
                      backend="math")
    assert seen and max(seen) == 8  # keys per call: ceil(w / r), never N = 200


def test_dropout_is_applied_only_when_asked_and_is_seeded():
    q, k, v, _ = _inputs(1, 2, 2, 16, 4)
    kw = dict(segment_lengths=[4, 8], dilation_rates=[1, 2])
    plain = dilated_attention(q, k, v, **kw)
    torch.manual_seed(3)
    a = dilated_attention(q, k, v, dropout_p=0.5, **kw)
    torch.manual_seed(3)
    b = dilated_attention(q, k, v, dropout_p=0.5, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain)
    a.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_path_without_dropout_matches_reference(causal):
    q, k, v, kpm = _inputs(2, 4, 2, 23, 5, pad=True)
    pat = DilatedPattern([5, 8, 40], [1, 2, 3])
    out, lse = _dropout_dilated_attention(q, k, v, pat, causal, 0.4, kpm, 0.0)
    ref, rlse = reference_dilated_attention(q, k, v, pat, None, is_causal=causal, scale=0.4,
                                            key_padding_mask=kpm, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_module_wraps_the_function():
    q, k, v, _ = _inputs(1, 2, 2, 12, 4)
    m = longnet.DilatedAttention([4, 8], [1, 2], is_causal=True, dropout=0.3)
    m.eval()
    torch.testing.assert_close(
        m(q, k, v), dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2],
                                      is_causal=True))
    assert "DilatedPattern" in repr(m)


# ------------------------------------------------------------------------------------ bad input
def _good():
    q = torch.randn(1, 4, 8, 4)
    return q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)


@pytest.mark.parametrize("change,exc,word", [
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "query must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :5], v, {}), ValueError, "key length"),
    (lambda q, k, v: (q, k[..., :3], v, {}), ValueError, "key head dim"),
    (lambda q, k, v: (q, k.double(), v, {}), TypeError, "key dtype"),
    (lambda q, k, v: (q, torch.randn(2, 2, 8, 4), v, {}), ValueError, "key batch size"),
    (lambda q, k, v: (q, k, v[:, :1], {}), ValueError, "value"),
    (lambda q, k, v: (q, k, v, {"enable_gqa": False}), ValueError, "enable_gqa"),
    (lambda q, k, v: (q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), {}), ValueError,
     "multiple"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(1, 7, dtype=torch.bool)}),
     ValueError, "key_padding_mask"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(1, 8)}), TypeError,
     "key_padding_mask"),
    (lambda q, k, v: (q, k, v, {"scale": -1.0}), ValueError, "scale"),
    (lambda q, k, v: (q, k, v, {"dropout_p": 1.5}), ValueError, "dropout_p"),
    (lambda q, k, v: (q, k, v, {"is_causal": 1}), TypeError, "is_causal"),
    (lambda q, k, v: (q.long(), k, v, {}), TypeError, "query"),
    (lambda q, k, v: ([1.0], k, v, {}), TypeError, "query"),
    (lambda q, k, v: (q, k, v, {"segment_lengths": [4, 8]}), ValueError, "same length"),
    (lambda q, k, v: (q, k, v, {"dilation_rates": [0]}), ValueError, "dilation_rates"),
    (lambda q, k, v: (q, k, v, {"backend": "cuda"}), ValueError, "backend 'cuda'"),
    (lambda q, k, v: (q, k, v, {"backend": "nope"}), ValueError, "backend must be"),
])
def test_bad_input_names_the_argument(change, exc, word):
    q, k, v = _good()
    q, k, v, extra = change(q, k, v)
    kw = dict(segment_lengths=[4], dilation_rates=[1], enable_gqa=True)
    kw.update(extra)
    with pytest.raises(exc, match=word):
        dilated_attention(q, k, v, **kw)


def test_named_backend_that_is_missing_raises_instead_of_falling_back(monkeypatch):
    from longnet.ops.backends import cpu_flash
    monkeypatch.setattr(cpu_flash, "_ops", lambda: (None, None))
    q, k, v = _good()
    with pytest.raises(ValueError, match="cpu_flash"):
        dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1], enable_gqa=True,
                          backend="cpu_flash")
    # auto falls back to the tested math kernel and stays exact
    out = dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1], enable_gqa=True)
    assert torch.isfinite(out).all()


def test_nan_inputs_propagate_only_to_rows_that_read_them():
    q, k, v, _ = _inputs(1, 1, 1, 8, 2)
    v = v.detach().clone()
    v[0, 0, 5] = float("nan")
    out = dilated_attention(q.detach(), k.detach(), v, segment_lengths=[4], dilation_rates=[1])
    assert torch.isfinite(out[0, 0, :4]).all()
    assert torch.isnan(out[0, 0, 4:]).all()


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2),
                                        (torch.float16, 5e-3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_cuda_matches_reference(dtype, rtol, causal, pad):
    q, k, v, kpm = _inputs(2, 4, 2, 97, 64, dtype=torch.float64, pad=pad)
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v))
    kpm = None if kpm is None else kpm.cuda()
    _compare(q, k, v, kpm, [16, 32, 64], [1, 2, 3], causal, "cuda", rtol=rtol)


@pytest.mark.cuda
def test_cuda_flash_used_for_aligned_bf16():
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    out = dilated_attention(q, q, q, segment_lengths=[32, 64], dilation_rates=[1, 2],
                            is_causal=True, backend="cuda_flash")
    ref, _ = reference_dilated_attention(q.double(), q.double(), q.double(), [32, 64], [1, 2],
                                         is_causal=True)
    assert (out.double() - ref).abs().max().item() < 3e-2 * (1 + ref.abs().max().item())
    assert math.isfinite(out.float().sum().item())


@pytest.mark.parametrize("causal", [True, False])
def test_segments_split_over_several_calls_give_the_same_result(monkeypatch, causal):
    # on CPU full segments are split into calls of at most CPU_CALL_BYTES of output rows; with a
    # tiny budget every segment is its own call (float32 inputs: the cpu_kernel path for causal)
    import longnet.ops.calls as calls

    q, k, v, _ = _inputs(2, 4, 2, 61, 8, dtype=torch.float32, pad=False, seed=3)
    monkeypatch.setattr(calls, "CPU_CALL_BYTES", 1)
    # 4 query heads on 2 key/value heads at r = 1: two head sets of 2 heads, 7 segments + a tail
    plan = calls.plan_branch(DilatedPattern([8, 16], [1, 2]), 0, q, k, is_causal=causal)
    assert len(plan) == 2 * (7 + 1)
    _compare(q, k, v, None, [8, 16, 64], [1, 2, 4], causal, "auto", rtol=2e-5)
    q64, k64, v64, kpm = _inputs(1, 3, 3, 50, 5, pad=True, seed=4)
    _compare(q64, k64, v64, kpm, [8, 16], [1, 2], causal, "cpu_flash", rtol=1e-10)
