"""The slot rule of the bounded caches per key/value head (longnet.ops.kv_slots), against the
selection rule written out head by head (DilatedPattern.keeps)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import DilatedPattern
from longnet.models.cache import SlotLayerCache
from longnet.ops.kv_slots import kv_slot_layout, slot_of_offset
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS

patterns = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 13)), min_size=1, max_size=4).map(
    lambda bs: DilatedPattern([w for w, _ in bs], [r for _, r in bs]))
heads = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 4])).map(lambda kg: (kg[0] * kg[1], kg[0]))


@settings(max_examples=200, deadline=None)
@given(pattern=patterns, heads=heads)
def test_each_kv_head_keeps_its_groups_offsets_once_in_dense_slots(pattern, heads):
    H, Hkv = heads
    G = H // Hkv
    layout = kv_slot_layout(pattern, H, Hkv)
    rank = layout.rank_table()
    m = layout.residue_counts()
    held = layout.slot_offsets()  # (Hkv, total): the inverse map
    assert held.shape == (Hkv, layout.total)
    for b, (w, r) in enumerate(pattern.branches):
        offsets = torch.arange(w)
        counts = []
        for j in range(Hkv):
            group = torch.arange(j * G, (j + 1) * G)
            wanted = pattern.keeps(b, offsets.view(-1, 1), group.view(1, -1)).any(1)  # (w,)
            ranks = rank[b, j, offsets % r]
            assert torch.equal(ranks >= 0, wanted)
            slots = slot_of_offset(offsets[wanted], r, m[b], ranks[wanted])
            # increasing with the offset and exactly 0 .. count-1: each kept position once
            assert torch.equal(slots, torch.arange(int(wanted.sum())))
            first = layout.firsts[b]
            branch = held[j, first:first + layout.sizes[b]]
            assert torch.equal(branch[slots], offsets[wanted]) and bool((branch[len(slots):] == -1).all())
            assert m[b] == min(G, r) == len(layout.residues[b][j])
            counts.append(int(wanted.sum()))
        assert layout.sizes[b] == max(counts) <= min(w, G * pattern.max_cached_positions(b))
        if G == 1:  # no GQA: the per-query-head bound
            assert layout.sizes[b] == pattern.max_cached_positions(b)
        if r == 1:  # every head of the group reads every position: held once, not G times
            assert layout.sizes[b] == w


@settings(max_examples=30, deadline=None)
@given(pattern=patterns, heads=heads, batch=st.integers(1, 3), head_dim=st.integers(1, 9),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_nbytes_is_the_slot_caches_tensors(pattern, heads, batch, head_dim, dtype):
    H, Hkv = heads
    cache = SlotLayerCache(pattern, batch, H, head_dim, num_kv_heads=Hkv, dtype=dtype)
    real = cache.keys.nbytes + cache.values.nbytes + cache.positions.nbytes
    assert cache.keys.shape == (batch, Hkv, kv_slot_layout(pattern, H, Hkv).total, head_dim)
    assert kv_slot_layout(pattern, H, Hkv).nbytes(batch, head_dim, dtype) == real
    assert cache.nbytes == cache.max_nbytes == real


def test_the_papers_pattern_with_four_query_heads_per_kv_head():
    """(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12); 32 query heads, 8 kv heads."""
    pattern = DilatedPattern(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)
    per_query_head = kv_slot_layout(pattern, 32, 32).sizes
    assert per_query_head == (2048, 2048, 2048, 2731, 2731)
    # r = 1, 2, 4: the group covers every residue -> w; r = 6: residues {0..3} of 16384 = 6 * 2730
    # + 4 hold 2731 each; r = 12: {0..3} of 32768 = 12 * 2730 + 8 likewise
    assert kv_slot_layout(pattern, 32, 8).sizes == (2048, 4096, 8192, 4 * 2731, 4 * 2731)
    assert kv_slot_layout(pattern, 32, 8).residues[3][:3] == ((0, 1, 2, 3), (0, 1, 4, 5), (2, 3, 4, 5))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_heads=0), "num_heads"), (dict(num_heads=True), "num_heads"),
    (dict(num_heads=4, num_kv_heads=0), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=2.0), "num_kv_heads"),
])
def test_bad_head_counts_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        kv_slot_layout(DilatedPattern([4], [2]), **kwargs)
    with pytest.raises(ValueError, match=name):
        SlotLayerCache(DilatedPattern([4], [2]), 1, kwargs["num_heads"], 3,
                       num_kv_heads=kwargs.get("num_kv_heads"))
