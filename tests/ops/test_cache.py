"""Cached causal dilated attention equals full recomputation, token by token and in chunks."""

import pytest
import torch

from longnet import DilatedPattern, dilated_attention
from longnet.testing.reference_cache import DilatedLayerCache

# chunked decoding against full attention, with random patterns: tests/models/test_kv_cache.py
# (this cache and the slot cache in one property test)


def _full(q, k, v, pattern):
    return dilated_attention(q, k, v, segment_lengths=pattern, is_causal=True, enable_gqa=True)


def test_cache_size_is_bounded_by_the_pattern():
    pattern = DilatedPattern([4, 8, 16], [1, 2, 4])
    H, D = 4, 3
    cache = DilatedLayerCache(pattern, 1, H, D)
    sizes = []
    x = torch.randn(1, H, 100, D)
    for t in range(100):
        cache.attend(x[:, :, t:t + 1], x[:, :, t:t + 1], x[:, :, t:t + 1],
                     torch.tensor([[t]]))
        sizes.append(cache.nbytes)
    bound = sum(H * pattern.max_cached_positions(b) * (2 * D * 4 + 8) for b in range(3))
    assert max(sizes) <= bound
    assert max(sizes[16:]) == max(sizes)  # stops growing once the largest segment filled once
    assert sizes[15] == max(sizes)


def test_left_padded_batch_decodes_each_sequence_as_if_alone():
    pattern = DilatedPattern([3, 6], [1, 2])
    H, D = 2, 4
    a = torch.randn(1, H, 7, D, dtype=torch.float64)
    b = torch.randn(1, H, 4, D, dtype=torch.float64)
    # batch: sequence b is left-padded by 3 tokens
    q = torch.cat([a, torch.cat([torch.zeros(1, H, 3, D, dtype=torch.float64), b], 2)], 0)
    pos = torch.stack([torch.arange(7), torch.tensor([0, 0, 0, 0, 1, 2, 3])])
    valid = torch.stack([torch.ones(7, dtype=torch.bool),
                         torch.tensor([False] * 3 + [True] * 4)])
    cache = DilatedLayerCache(pattern, 2, H, D, dtype=torch.float64)
    out = torch.cat([cache.attend(q[:, :, :5], q[:, :, :5], q[:, :, :5], pos[:, :5], valid[:, :5]),
                     cache.attend(q[:, :, 5:], q[:, :, 5:], q[:, :, 5:], pos[:, 5:], valid[:, 5:])],
                    2)
    torch.testing.assert_close(out[0:1], _full(a, a, a, pattern), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1:2, :, 3:], _full(b, b, b, pattern), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out).all()


def test_bad_shapes_raise():
    cache = DilatedLayerCache(DilatedPattern([4], [1]), 1, 2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        cache.attend(torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3),
                     torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        cache.attend(torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3),
                     torch.zeros(1, 2, dtype=torch.long))
