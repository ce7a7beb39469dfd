"""torchscale's dilated attention (longnet.ops.torchscale_compat) against torchscale's own module."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet.ops.pattern import DilatedPattern
from longnet.ops.torchscale_compat import (
    check_torchscale_length,
    torchscale_dilated_attention,
    torchscale_head_offset,
)


def _reference_module(ts, embed_dim, heads, segments, rates):
    args = ts.EncoderConfig(encoder_embed_dim=embed_dim, encoder_attention_heads=heads,
                            flash_attention=True, segment_length=str(list(segments)),
                            dilated_ratio=str(list(rates)))
    attn = ts.DilatedAttention(args, embed_dim, heads, self_attention=True, subln=False)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.bias.normal_()
    return attn.double()


def _ours(attn, x, segments, rates, heads, is_causal, **kw):
    B, N, E = x.shape

    def split(t):
        return t.view(B, N, heads, E // heads).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    o = torchscale_dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates,
                                     is_causal=is_causal, **kw)
    return attn.out_proj(o.transpose(1, 2).reshape(B, N, E))


def _compare(ts, N, heads, head_dim, segments, rates, is_causal, batch=2, grads=True):
    E = heads * head_dim
    attn = _reference_module(ts, E, heads, segments, rates)
    x = torch.randn(batch, N, E, dtype=torch.float64, requires_grad=True)
    ref = attn(x, x, x, is_causal=is_causal)[0]
    ours = _ours(attn, x, segments, rates, heads, is_causal)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    if not grads:
        return
    g = torch.randn_like(ref)
    params = [x, *attn.parameters()]
    want = torch.autograd.grad(ref, params, g)
    got = torch.autograd.grad(ours, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("N", [1, 7, 20, 33, 64, 97])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torchscale_forward_and_grad(torchscale_ref, N, is_causal):
    # w % r != 0 for every w < N is refused; these N stay below the first such w (30, r=4)
    segments, rates = (16, 30, 128), (1, 4, 8) if N <= 30 else (2, 2, 8)
    if N > 30:
        segments = (16, 32, 128)
    _compare(torchscale_ref, N, heads=4, head_dim=8, segments=segments, rates=rates,
             is_causal=is_causal)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 70), heads=st.integers(1, 6), data=st.data(), is_causal=st.booleans())
def test_matches_torchscale_random_patterns(torchscale_ref, N, heads, data, is_causal):
    nb = data.draw(st.integers(1, 3))
    rates = data.draw(st.lists(st.integers(1, 7), min_size=nb, max_size=nb))
    segments = []
    for r in rates:  # a segment shorter than N must be a multiple of r (else torchscale shifts)
        w = data.draw(st.integers(1, 80))
        segments.append(w if w >= N else max(r, w - w % r))
    _compare(torchscale_ref, N, heads=heads, head_dim=4, segments=segments, rates=rates,
             is_causal=is_causal, batch=1)


def test_gigapath_pattern_at_length_1025(torchscale_ref):
    # the released pattern: 1025 tokens pad the first branch's second segment with 1023 zeros
    _compare(torchscale_ref, 1025, heads=16, head_dim=2,
             segments=(1024, 5792, 32768, 185363, 1048576), rates=(1, 2, 4, 8, 16),
             is_causal=False, batch=1, grads=False)


def test_padded_batch_gives_each_row_its_own_output():
    torch.manual_seed(1)
    B, H, N, D = 3, 4, 23, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = [23, 9, 16]
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2))
    out = torchscale_dilated_attention(q, k, v, key_padding_mask=mask, **kw)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for i, n in enumerate(lengths):
        sub = [t[i:i + 1, :, :n].detach().requires_grad_() for t in (q, k, v)]
        alone = torchscale_dilated_attention(*sub, **kw)
        torch.testing.assert_close(out[i:i + 1, :, :n], alone, rtol=0, atol=1e-13)
        assert bool((out[i, :, n:] == 0).all())
        want = torch.autograd.grad(alone, sub, g[i:i + 1, :, :n])
        for got, w in zip((dq, dk, dv), want):
            torch.testing.assert_close(got[i:i + 1, :, :n], w, rtol=0, atol=1e-12)
            assert bool((got[i, :, n:] == 0).all())


def test_head_offsets_are_contiguous_blocks():
    assert [torchscale_head_offset(h, 16, 4) for h in range(16)] == [h // 4 for h in range(16)]
    assert [torchscale_head_offset(h, 12, 8) for h in range(12)] == [h // 2 for h in range(12)]
    assert [torchscale_head_offset(h, 3, 8) for h in range(3)] == [0, 1, 2]


def test_shifted_lengths_are_refused_naming_n():
    pattern = DilatedPattern((1024, 5792, 32768, 185363, 1048576), (1, 2, 4, 8, 16))
    check_torchscale_length(pattern, 185363)
    with pytest.raises(ValueError, match="N = 185364"):
        check_torchscale_length(pattern, 185364)
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match="N = 12"):
        torchscale_dilated_attention(q, q, q, segment_lengths=(10,), dilation_rates=(3,))


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 2, 8, 4)
    kw = dict(segment_lengths=(4,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="dropout_p"):
        torchscale_dilated_attention(q, q, q, dropout_p=0.1, **kw)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mask = torch.tensor([[True, False, True, True, True, True, True, True]])
        torchscale_dilated_attention(q, q, q, key_padding_mask=mask, **kw)
    with pytest.raises(ValueError, match="query must be 4-D"):
        torchscale_dilated_attention(q[0], q, q, **kw)
    with pytest.raises(ValueError, match="scale"):
        torchscale_dilated_attention(q, q, q, scale=-1.0, **kw)


def test_float32_close_to_float64():
    q, k, v = (torch.randn(2, 4, 50, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(segment_lengths=(16, 50), dilation_rates=(1, 4))
    want = torchscale_dilated_attention(q, k, v, **kw)
    got = torchscale_dilated_attention(q.float(), k.float(), v.float(), **kw)
    assert (got.double() - want).abs().max() < 1e-5 * math.sqrt(50)
