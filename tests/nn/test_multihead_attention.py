"""MultiheadDilatedAttention against a hand-written float64 reference, and against dense SDPA."""

import pytest
import torch
import torch.nn.functional as F

from longnet import MultiheadDilatedAttention
from longnet.testing.reference import reference_dilated_attention

D64 = torch.float64


def _manual(mha, x, mask, is_causal, offset):
    """Projection, positions, dense reference of the pattern, sub-LN, output projection."""
    B, N, E = x.shape
    q = F.linear(x, mha.q_proj.weight, mha.q_proj.bias).view(B, N, mha.num_heads, -1)
    k = F.linear(x, mha.k_proj.weight, mha.k_proj.bias).view(B, N, mha.num_kv_heads, -1)
    v = F.linear(x, mha.v_proj.weight, mha.v_proj.bias).view(B, N, mha.num_kv_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = mha.positions.rotate(q, offset, is_query=True)
    k = mha.positions.rotate(k, offset, is_query=False)
    p = mha.pattern
    out, _ = reference_dilated_attention(q, k, v, p.segment_lengths, p.dilation_rates,
                                         is_causal=is_causal, key_padding_mask=mask,
                                         enable_gqa=mha.num_kv_heads < mha.num_heads)
    y = out.transpose(1, 2).reshape(B, N, E)
    y = F.layer_norm(y, (E,), mha.sub_ln.weight, mha.sub_ln.bias, mha.sub_ln.eps)
    return F.linear(y, mha.out_proj.weight, mha.out_proj.bias)


@pytest.mark.parametrize("position", ["xpos", "rope", "none"])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_manual_reference(position, is_causal, kv_heads):
    if position == "xpos" and not is_causal:
        is_causal = True
    mha = MultiheadDilatedAttention(24, 4, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4),
                                    num_kv_heads=kv_heads, position=position,
                                    is_causal=is_causal, dtype=D64)
    for prm in mha.parameters():  # LayerNorm weights away from (1, 0) so they are tested
        prm.data.normal_()
    x = torch.randn(2, 29, 24, dtype=D64)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, 20:] = False
    got = mha(x, key_padding_mask=mask, position_offset=3)
    want = _manual(mha, x, mask, is_causal, 3)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("position", ["xpos", "rope"])
def test_single_full_branch_equals_dense_sdpa(is_causal, position):
    kw = dict(num_kv_heads=2, position=position, dtype=D64)
    dil = MultiheadDilatedAttention(32, 4, segment_lengths=(64,), dilation_rates=(1,), **kw)
    dense = MultiheadDilatedAttention(32, 4, dense=True, **kw)
    dense.load_state_dict(dil.state_dict())
    x = torch.randn(3, 37, 32, dtype=D64)
    mask = torch.ones(3, 37, dtype=torch.bool)
    mask[0, 30:] = False
    for m in (None, mask):
        a = dil(x, key_padding_mask=m, is_causal=is_causal)
        b = dense(x, key_padding_mask=m, is_causal=is_causal)
        keep = slice(None) if m is None else m
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-10, atol=1e-10)


def test_dense_left_padding_stays_finite():
    mha = MultiheadDilatedAttention(16, 2, dense=True, position="rope")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    out = mha(torch.randn(2, 9, 16), key_padding_mask=mask, is_causal=True)
    assert torch.isfinite(out).all()


def test_pieces_compose_to_forward():
    mha = MultiheadDilatedAttention(16, 4, segment_lengths=(4, 8), dilation_rates=(1, 2),
                                    is_causal=True)
    x = torch.randn(2, 11, 16)
    q, k, v = mha.project(x)
    assert q.shape == (2, 4, 11, 4) and k.shape == v.shape == (2, 4, 11, 4)
    q, k = mha.apply_positions(q, k, 5)
    out = mha.output(mha.attend(q, k, v, is_causal=True))
    torch.testing.assert_close(out, mha(x, position_offset=5))


def test_no_sub_ln_and_no_bias():
    mha = MultiheadDilatedAttention(16, 4, segment_lengths=(8,), dilation_rates=(1,),
                                    bias=False, sub_ln=False)
    assert mha.sub_ln is None and mha.q_proj.bias is None
    assert mha(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadDilatedAttention(30, 4, segment_lengths=(8,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadDilatedAttention(32, 4, segment_lengths=(8,), dilation_rates=(1,),
                                  num_kv_heads=3)
    with pytest.raises(ValueError, match="segment_lengths"):
        MultiheadDilatedAttention(32, 4)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadDilatedAttention(32, 4, dense=True, dropout=1.5)
    mha = MultiheadDilatedAttention(32, 4, dense=True)
    with pytest.raises(ValueError, match="x must be"):
        mha(torch.randn(2, 5, 16))
