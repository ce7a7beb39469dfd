import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import DilatedPattern
from longnet.testing.reference import count_matrix


def test_kept_positions_follow_the_paper():
    p = DilatedPattern([4, 8], [1, 2])
    assert p.kept_positions(8, head=0, branch=1) == [0, 2, 4, 6]
    assert p.kept_positions(8, head=1, branch=1) == [1, 3, 5, 7]
    assert p.kept_positions(10, head=1, branch=0) == list(range(10))
    # w > N: one segment of length N; w % r != 0: offsets restart at each segment
    q = DilatedPattern([5], [2])
    assert q.kept_positions(12, head=1, branch=0) == [1, 3, 6, 8, 11]


@pytest.mark.parametrize("N,w,r,H", [(12, 5, 2, 3), (16, 4, 4, 5), (7, 20, 3, 4), (1, 3, 2, 2)])
def test_layout_matches_kept_positions(N, w, r, H):
    p = DilatedPattern([w], [r])
    lay = p.layout(0, N, H)
    for h in range(H):
        idx = lay.index[h]
        got = idx if lay.valid is None else idx[lay.valid[h]]
        assert got.tolist() == p.kept_positions(N, h, 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [1, 7, 16, 29])
def test_flops_equal_four_d_times_pairs_of_the_count_matrix(N, causal):
    p = DilatedPattern([4, 6, 32], [1, 3, 4])
    H, D = 5, 3
    pairs = count_matrix(p, N, H, is_causal=causal).sum().item()
    assert p.flops(N, D, H, is_causal=causal) == pytest.approx(4 * D * pairs)
    assert p.flops(N, D, H, is_causal=causal, backward=True) == pytest.approx(3.5 * 4 * D * pairs)


def test_paper_flop_ratios():
    p = DilatedPattern([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
    ratios = {n: p.dense_flops(n, 64) / p.flops(n, 64) for n in (8192, 16384, 32768, 131072)}
    assert ratios[8192] == pytest.approx(2.1, rel=0.05)
    assert ratios[16384] == pytest.approx(3.9, rel=0.05)
    assert ratios[32768] == pytest.approx(7.7, rel=0.05)
    assert ratios[131072] == pytest.approx(31, rel=0.05)


def test_max_cached_positions():
    p = DilatedPattern([8, 10], [1, 3])
    assert [p.max_cached_positions(b) for b in range(2)] == [8, 4]


@pytest.mark.parametrize("w,r,exc,word", [
    ([], [], ValueError, "segment_lengths"),
    ([4, 8], [1], ValueError, "same length"),
    ([0], [1], ValueError, "segment_lengths"),
    ([4], [-1], ValueError, "dilation_rates"),
    ([4.0], [1], TypeError, "segment_lengths"),
    ([4], ["2"], TypeError, "dilation_rates"),
    ([True], [1], TypeError, "segment_lengths"),
    ("48", [1], TypeError, "segment_lengths"),
])
def test_bad_patterns_name_the_argument(w, r, exc, word):
    with pytest.raises(exc, match=word):
        DilatedPattern(w, r)


def test_pattern_accepts_tensors_and_single_ints():
    assert DilatedPattern(torch.tensor([4, 8]), (1, 2)).branches == ((4, 1), (8, 2))
    assert DilatedPattern(4, 2).branches == ((4, 2),)


# ------------------------------------------------------------------------- shifted segments
@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 12), r=st.integers(1, 4), shift=st.integers(0, 30), N=st.integers(1, 40),
       H=st.integers(1, 5), causal=st.booleans())
def test_shifted_reads_match_an_explicit_segment_list(w, r, shift, N, H, causal):
    """Segments [k w - s, (k + 1) w - s) clipped to [0, N), s = shift mod min(w, N) (0 when one
    segment covers the sequence); head h keeps the positions at offset h mod r of each (unclipped)
    segment; queries read kept keys of their segment."""
    p = DilatedPattern([w], [r], shift=shift)
    we = min(w, N)
    s = 0 if we >= N else shift % we
    seg_of = {pos: (pos + s) // we for pos in range(N)}
    for h in range(H):
        for i in range(N):
            for j in range(N):
                want = (seg_of[i] == seg_of[j] and (i + s) % we % r == h % r
                        and (j + s) % we % r == h % r and (not causal or j <= i))
                got = bool(p.reads(0, torch.tensor(i), torch.tensor(j), h, N, is_causal=causal))
                assert got == want, (h, i, j)


@settings(max_examples=40, deadline=None)
@given(ws=st.lists(st.integers(1, 12), min_size=1, max_size=3), shift=st.integers(0, 20),
       N=st.integers(1, 40), H=st.integers(1, 4), causal=st.booleans())
def test_shifted_flops_count_the_pairs_read(ws, shift, N, H, causal):
    from longnet.testing.reference import count_matrix

    p = DilatedPattern(ws, [1 + i for i in range(len(ws))], shift=shift)
    pairs = count_matrix(p, N, H, is_causal=causal).sum().item()
    assert p.flops(N, 1, H, is_causal=causal) == pytest.approx(4.0 * pairs)
