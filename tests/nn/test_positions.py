"""RoPE and XPos: relative (scores depend on distance only), the XPos decay, overflow checks."""

import math

import pytest
import torch

from longnet.nn.positions import NoPositions, RotaryPositions, XPosPositions, build_positions


def _scores(pos, q, k, offset, **kw):
    qr = pos.rotate(q, offset, is_query=True, **kw)
    kr = pos.rotate(k, offset, is_query=False, **kw)
    return qr @ kr.transpose(-1, -2)  # (B, H, N, N)


@pytest.mark.parametrize("make", [
    lambda: RotaryPositions(10),
    lambda: XPosPositions(10),
    lambda: XPosPositions(10, block=8),
    lambda: XPosPositions(10, scale_base=64.0, block=6),
])
@pytest.mark.parametrize("shift", [1, 37, 1000])
def test_scores_invariant_to_shifting_both_positions(make, shift):
    pos = make()
    q = torch.randn(2, 3, 21, 10, dtype=torch.float64)
    k = torch.randn(2, 3, 21, 10, dtype=torch.float64)
    s0 = _scores(pos, q, k, 0)
    s1 = _scores(pos, q, k, shift)
    torch.testing.assert_close(s1, s0, rtol=1e-9, atol=1e-9)


def test_scores_depend_on_distance_only():
    """Same vectors at every position: the score matrix is Toeplitz (constant diagonals)."""
    for pos in (RotaryPositions(8), XPosPositions(8, scale_base=32.0)):
        q = torch.randn(8, dtype=torch.float64).expand(1, 1, 15, 8)
        k = torch.randn(8, dtype=torch.float64).expand(1, 1, 15, 8)
        s = _scores(pos, q, k, 3)[0, 0]
        for d in range(-14, 15):
            diag = torch.diagonal(s, d)
            torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-9, atol=1e-9)


def test_xpos_blocks_give_the_same_scores_inside_a_block():
    """Measuring from each block's centre changes nothing for pairs in one block."""
    plain, blocked = XPosPositions(12), XPosPositions(12, block=8)
    q = torch.randn(1, 2, 32, 12, dtype=torch.float64)
    k = torch.randn(1, 2, 32, 12, dtype=torch.float64)
    s_plain, s_block = _scores(plain, q, k, 0), _scores(blocked, q, k, 0)
    blk = torch.arange(32) // 8
    same = blk[:, None] == blk[None, :]
    torch.testing.assert_close(s_block[..., same], s_plain[..., same], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(s_block[..., ~same], s_plain[..., ~same])
    # a cache with absolute segments anchors the blocks at 0 whatever the offset
    s_abs = _scores(blocked, q[:, :, 8:], k[:, :, 8:], 8, block_origin=0)
    torch.testing.assert_close(s_abs, s_block[:, :, 8:, 8:], rtol=1e-9, atol=1e-9)


def test_xpos_decay_formula():
    """One channel pair: score(m, n) = zeta^((m - n)/s) cos(m - n), zeta = gamma/(1 + gamma)."""
    s_base, gamma = 16.0, 0.4
    pos = XPosPositions(2, scale_base=s_base, gamma=gamma)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 9, 2)
    s = _scores(pos, q, q, 0)[0, 0]
    m = torch.arange(9, dtype=torch.float64)
    dist = m[:, None] - m[None, :]
    zeta = gamma / (1 + gamma)
    torch.testing.assert_close(s, zeta ** (dist / s_base) * torch.cos(dist), rtol=1e-12,
                               atol=1e-12)


def test_rope_is_a_rotation():
    x = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    y = RotaryPositions(16).rotate(x, 5, is_query=True)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y, x)


def test_low_precision_keeps_dtype_and_is_close():
    x = torch.randn(1, 2, 33, 16)
    for pos in (RotaryPositions(16), XPosPositions(16, block=16)):
        y = pos.rotate(x.bfloat16(), 7, is_query=False)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), pos.rotate(x, 7, is_query=False), rtol=2e-2,
                                   atol=2e-2)


def test_xpos_overflow_is_refused():
    pos = XPosPositions(16)  # no blocks: exponent grows with the absolute position
    x = torch.randn(1, 1, 4, 16)
    pos.rotate(x, 30000, is_query=True)  # e^73: fine in float32
    with pytest.raises(ValueError, match="XPos"):
        pos.rotate(x, 40000, is_query=True)
    with pytest.raises(ValueError, match="XPos"):
        pos.rotate(x.half(), 3000, is_query=True)
    # with blocks the exponent stays within block / 2 at any position
    XPosPositions(16, block=4096).rotate(x, 10 ** 7, is_query=True)
    assert XPosPositions(16, block=8).max_exponent(10 ** 6, 10 ** 6 + 99) == pytest.approx(
        4 / 512 * -math.log(0.4 / 1.4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryPositions(7)
    with pytest.raises(ValueError, match="position_offset"):
        RotaryPositions(8).rotate(torch.randn(1, 1, 2, 8), -1, is_query=True)
    with pytest.raises(ValueError, match="position"):
        build_positions("alibi", 8)
    q = torch.randn(1, 1, 3, 8)
    assert NoPositions()(q, q)[0] is q


@pytest.mark.parametrize("make", [lambda: RotaryPositions(8), lambda: XPosPositions(8, block=8)])
def test_explicit_per_sequence_positions(make):
    """(B, N) positions give each sequence its own positions (a cache of left-padded prompts)."""
    pos = make()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
    y = pos.rotate(x, is_query=True, positions=positions)
    torch.testing.assert_close(y[0], pos.rotate(x[:1], 0, is_query=True, block_origin=0)[0])
    torch.testing.assert_close(y[1], pos.rotate(x[1:], 9, is_query=True, block_origin=0)[0])
    torch.testing.assert_close(pos.rotate(x, is_query=False, positions=positions[1]),
                               pos.rotate(x, 9, is_query=False, block_origin=0))
    with pytest.raises(ValueError, match="positions"):
        pos.rotate(x, is_query=True, positions=positions[:, :4])
    with pytest.raises(ValueError, match="XPos"):
        XPosPositions(8).rotate(x.float(), is_query=True, positions=positions * 10 ** 4)
