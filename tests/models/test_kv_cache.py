"""Layer caches of the generation cache: slots (in place) and dense, against full attention."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import DilatedPattern, dilated_attention
from longnet.models.cache import DenseLayerCache, SlotLayerCache
from longnet.ops.reference_cache import DilatedLayerCache


def _full(q, k, v, pattern):
    return dilated_attention(q, k, v, segment_lengths=pattern, is_causal=True, enable_gqa=True)


def _run(cache, q, k, v, chunks, valid=None, pos=None):
    N = q.shape[2]
    pos = torch.arange(N).expand(q.shape[0], N) if pos is None else pos
    t, i, outs = 0, 0, []
    while t < N:
        n = min(chunks[i % len(chunks)], N - t)
        i += 1
        sl = slice(t, t + n)
        outs.append(cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], pos[:, sl],
                                 None if valid is None else valid[:, sl]))
        t += n
    return torch.cat(outs, 2)


@settings(max_examples=60, deadline=None)
@given(
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=3),
    N=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (3, 3), (4, 2), (6, 1)]),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
    max_chunk=st.integers(1, 6),
    kind=st.sampled_from(["slots", "compact"]),
)
def test_caches_in_chunks_equal_full_attention(branches, N, heads, chunks, seed, max_chunk, kind):
    """The slot cache (generation's) and the compact one (ops.reference_cache, a test reference)."""
    pattern = DilatedPattern([w for w, _ in branches], [r for _, r in branches])
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, N, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, N, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, N, 5, generator=g, dtype=torch.float64)
    if kind == "compact":
        cache = DilatedLayerCache(pattern, 2, H, 5, dtype=torch.float64)
    else:
        cache = SlotLayerCache(pattern, 2, H, 5, dtype=torch.float64)
        cache.max_chunk = max_chunk  # unaligned chunks run in sub-chunks of this many rows
    out = _run(cache, q, k, v, chunks)
    torch.testing.assert_close(out, _full(q, k, v, pattern), rtol=1e-10, atol=1e-12)


def test_slot_cache_chunk_crossing_an_aligned_start_splits_there():
    pattern = DilatedPattern([4, 8], [1, 2])
    q, k, v = torch.randn(3, 1, 2, 30, 4, dtype=torch.float64).unbind(0)
    cache = SlotLayerCache(pattern, 1, 2, 4, dtype=torch.float64)
    cache.max_chunk = 2
    out = _run(cache, q, k, v, [5, 13, 12])  # 5..17 runs 3 rows over the slots, then aligned
    torch.testing.assert_close(out, _full(q, k, v, pattern), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda H, D: SlotLayerCache(DilatedPattern([3, 6], [1, 2]), 2, H, D, dtype=torch.float64),
    lambda H, D: DenseLayerCache(2, H, D, dtype=torch.float64),
])
def test_left_padded_batch_attends_each_sequence_as_if_alone(make):
    H, D = 2, 4
    a = torch.randn(1, H, 9, D, dtype=torch.float64)
    b = torch.randn(1, H, 6, D, dtype=torch.float64)
    x = torch.cat([a, torch.cat([torch.zeros(1, H, 3, D, dtype=torch.float64), b], 2)], 0)
    pos = torch.stack([torch.arange(9), torch.arange(-3, 6)])
    valid = pos >= 0
    cache = make(H, D)
    out = _run(cache, x, x, x, [5, 1, 3], valid, pos)
    if isinstance(cache, DenseLayerCache):
        def ref(t):
            return F.scaled_dot_product_attention(t, t, t, is_causal=True)
    else:
        def ref(t):
            return _full(t, t, t, DilatedPattern([3, 6], [1, 2]))
    torch.testing.assert_close(out[0:1], ref(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1:2, :, 3:], ref(b), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("chunks", [[1], [4, 1, 7]])
def test_dense_cache_equals_causal_attention_with_gqa(chunks):
    q = torch.randn(2, 4, 23, 6, dtype=torch.float64)
    k = torch.randn(2, 2, 23, 6, dtype=torch.float64)
    v = torch.randn(2, 2, 23, 6, dtype=torch.float64)
    out = _run(DenseLayerCache(2, 4, 6, num_kv_heads=2, dtype=torch.float64), q, k, v, chunks)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_slot_cache_is_preallocated_at_the_compact_caches_bound():
    pattern = DilatedPattern([4, 8, 16], [1, 2, 4])
    H, D = 4, 3
    slots = SlotLayerCache(pattern, 1, H, D)
    compact = DilatedLayerCache(pattern, 1, H, D)
    x = torch.randn(1, H, 40, D)
    sizes = []
    for t in range(40):
        for c in (slots, compact):
            c.attend(x[:, :, t:t + 1], x[:, :, t:t + 1], x[:, :, t:t + 1], torch.tensor([[t]]))
        sizes.append(compact.nbytes)
    assert slots.nbytes == max(sizes) == sum(
        H * pattern.max_cached_positions(b) * (2 * D * 4 + 8) for b in range(3))


def test_bad_shapes_raise():
    # the slot cache shares longnet.ops.cache_tokens.new_tokens (tested in tests/ops/test_cache.py)
    cache = SlotLayerCache(DilatedPattern([4], [1]), 1, 2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        cache.attend(torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3),
                     torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        DenseLayerCache(1, 2, 3).attend(torch.randn(1, 2, 1, 3), torch.randn(1, 1, 1, 3),
                                        torch.randn(1, 1, 1, 3), torch.zeros(1, 1, dtype=torch.long))
