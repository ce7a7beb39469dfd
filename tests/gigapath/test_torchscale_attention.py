"""torchscale's dilated attention (longnet.interop.torchscale) against torchscale's own module."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet.interop.torchscale import (
    check_torchscale_length,
    torchscale_dilated_attention,
    torchscale_head_offset,
)
from longnet.ops.pattern import DilatedPattern


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


# ------------------------------------------------------------------- the registered op, compile
def _padded_inputs(B=3, H=4, Hkv=2, N=23, D=8, lengths=(23, 9, 0), seed=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)  # model layout
    k, v = (torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    return [t.requires_grad_() for t in (q, k, v)], mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_registered_op_passes_opcheck(masked, is_causal):
    from longnet.interop.torchscale import torchscale_attention_backward_op, torchscale_attention_op

    (q, k, v), mask = _padded_inputs()
    mask = mask if masked else None
    args = (q, k, v, mask, [8, 16], [1, 2], is_causal, 0.35, "auto")
    torch.library.opcheck(torchscale_attention_op, args)
    out, lse = torchscale_attention_op(*args)
    back = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse.detach(), mask, [8, 16], [1, 2],
            is_causal, 0.35, "auto")
    torch.library.opcheck(torchscale_attention_backward_op, back)


def test_a_backend_object_gives_what_the_registered_op_gives():
    from longnet.ops.backends import BACKENDS

    (q, k, v), mask = _padded_inputs()
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), key_padding_mask=mask, enable_gqa=True)
    by_name = torchscale_dilated_attention(q, k, v, backend="math", **kw)
    by_object = torchscale_dilated_attention(q, k, v, backend=BACKENDS["math"], **kw)
    torch.testing.assert_close(by_name, by_object, rtol=0, atol=0)
    g = torch.randn_like(by_name)
    for a, b in zip(torch.autograd.grad(by_name, (q, k, v), g), torch.autograd.grad(by_object, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool((by_name[2] == 0).all())  # a row with no real token
    with pytest.raises(ValueError, match="backend must be"):
        torchscale_dilated_attention(q, k, v, backend="nope", **kw)


def test_torchscale_encoder_with_a_mask_compiles_to_one_graph_and_equals_eager():
    # the per-row lengths are read inside the registered op: no graph break on the mask's values
    from longnet import LongNetConfig, LongNetEncoder

    torch.manual_seed(0)
    cfg = LongNetConfig(embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64, segment_lengths=[8, 32],
                        dilation_rates=[1, 4], position="rope", semantics="torchscale")
    model = LongNetEncoder(cfg, input_dim=12)
    x = torch.randn(3, 45, 12)
    mask = torch.arange(45)[None] < torch.tensor([45, 30, 7])[:, None]

    def loss(m):
        hidden, pooled = m(x, key_padding_mask=mask, return_pooled=True)
        return hidden.square().mean() + pooled.sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, key_padding_mask=mask, return_pooled=True)
    assert explained.break_reasons == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    params = list(model.parameters())
    got_loss = loss(compiled)
    got = torch.autograd.grad(got_loss, params)
    want_loss = loss(model)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
