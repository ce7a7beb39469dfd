"""Layer caches of the generation cache: slots (in place) and dense, against full attention."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import DilatedPattern, dilated_attention
from longnet.models.cache import DenseLayerCache, SlotLayerCache
from longnet.testing.reference import reference_dilated_attention
from longnet.testing.reference_cache import DilatedLayerCache


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
    """The slot cache (generation's) and the compact one (longnet.testing.reference_cache, a test reference)."""
    pattern = DilatedPattern([w for w, _ in branches], [r for _, r in branches])
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, N, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, N, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, N, 5, generator=g, dtype=torch.float64)
    if kind == "compact":
        cache = DilatedLayerCache(pattern, 2, H, 5, num_kv_heads=Hkv, dtype=torch.float64)
    else:
        cache = SlotLayerCache(pattern, 2, H, 5, num_kv_heads=Hkv, dtype=torch.float64)
        cache.max_chunk = max_chunk  # unaligned chunks run in sub-chunks of this many rows
    out = _run(cache, q, k, v, chunks)
    torch.testing.assert_close(out, _full(q, k, v, pattern), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 7)), min_size=1, max_size=3),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    prompt=st.integers(0, 20),
    steps=st.integers(1, 25),
    seed=st.integers(0, 1000),
)
def test_slot_cache_decoding_with_gqa_equals_the_float64_reference_on_the_prefix(
        branches, kv_heads, group, prompt, steps, seed):
    """Per key/value head storage: each decoding step (after a prefill chunk of ``prompt``
    tokens) equals the dense float64 reference run on the whole prefix, at its last row."""
    pattern = DilatedPattern([w for w, _ in branches], [r for _, r in branches])
    H, Hkv, N, D = kv_heads * group, kv_heads, prompt + steps, 4
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, N, D, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, Hkv, N, D, generator=g, dtype=torch.float64).unbind(0)
    cache = SlotLayerCache(pattern, 2, H, D, num_kv_heads=Hkv, dtype=torch.float64)
    pos = torch.arange(N).expand(2, N)
    if prompt:
        cache.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], pos[:, :prompt])
    for t in range(prompt, N):
        out = cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1])
        ref, _ = reference_dilated_attention(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                             pattern.segment_lengths, pattern.dilation_rates,
                                             is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, ref[:, :, t:t + 1], rtol=0, atol=1e-12)
    assert cache.keys.shape[1] == Hkv  # stored per key/value head


@settings(max_examples=40, deadline=None)
@given(
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 7)), min_size=1, max_size=3),
    heads=st.sampled_from([(2, 1), (4, 1), (4, 2), (8, 2), (3, 3)]),
    N=st.integers(1, 40),
)
def test_slot_cache_holds_each_position_its_group_reads_once(branches, heads, N):
    """After ``N`` tokens, branch ``b`` of key/value head ``j`` holds exactly the positions of the
    last segment that some query head of the group keeps, each in one slot."""
    pattern = DilatedPattern([w for w, _ in branches], [r for _, r in branches])
    H, Hkv = heads
    G = H // Hkv
    cache = SlotLayerCache(pattern, 1, H, 2, num_kv_heads=Hkv)
    x = torch.randn(1, H, N, 2)
    for t in range(N):
        cache.attend(x[:, :, t:t + 1], x[:, :Hkv, t:t + 1], x[:, :Hkv, t:t + 1], torch.tensor([[t]]))
    for b, w in enumerate(pattern.segment_lengths):
        first, size = cache.offsets[b], cache.layout.sizes[b]
        segment = torch.arange((N - 1) // w * w, N)
        for j in range(Hkv):
            held = cache.positions[0, j, first:first + size]
            held = held[(held >= 0) & (held // w == (N - 1) // w)]
            group = torch.arange(j * G, (j + 1) * G).view(1, -1)
            wanted = segment[pattern.keeps(b, segment.view(-1, 1), group).any(1)]
            assert sorted(held.tolist()) == wanted.tolist()  # each once
    written = cache.positions[0] >= 0  # (Hkv, S): every slot holds the offset the layout assigns it
    assert torch.equal((cache.positions[0] % cache.slot_w)[written], cache.layout.slot_offsets()[written])


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
