"""Reach of dilated attention: the structured algorithm against BFS over an explicit N x N graph,
and against the real model (which inputs change which logits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet import LongNetConfig, LongNetLM
from longnet.analysis import alternating_shift, hops_from, log2_edges, max_hops, reach, unreachable_pairs
from longnet.models.config import PRESETS
from longnet.ops.pattern import DilatedPattern


# ------------------------------------------------------------------------------ brute force
def one_layer(pattern: DilatedPattern, N: int, H: int, causal: bool) -> np.ndarray:
    """A[i, j]: position j reads position i in one layer, from ``pattern.reads`` (every head,
    every branch)."""
    q = torch.arange(N).view(1, N, 1)
    k = torch.arange(N).view(1, 1, N)
    h = torch.arange(H).view(H, 1, 1)
    A = torch.zeros(N, N, dtype=torch.bool)
    for b in range(len(pattern)):
        A |= pattern.reads(b, q, k, h, N, is_causal=causal).any(dim=0)  # [j, i]
    return A.T.numpy()


def all_hops(patterns, N: int, H: int, causal: bool, layers=None) -> np.ndarray:
    """dist[i, j]: fewest layers from i to j (inf: none), layer t using ``patterns[t % len]``
    (one pattern: every layer), breadth-first over explicit adjacency matrices."""
    patterns = [patterns] if isinstance(patterns, DilatedPattern) else list(patterns)
    adj = [one_layer(p, N, H, causal).astype(np.int64) for p in patterns]
    reached = np.eye(N, dtype=bool)
    dist = np.where(reached, 0.0, np.inf)
    t = quiet = 0
    while (layers is None or t < layers) and quiet < len(adj):
        nxt = reached | ((reached.astype(np.int64) @ adj[t % len(adj)]) > 0)
        t += 1
        new = nxt & ~reached
        dist[new] = t
        quiet = 0 if new.any() else quiet + 1
        reached = nxt
    return dist


def expected_report(dist: np.ndarray, causal: bool, edges) -> dict:
    N = len(dist)
    i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    scope = (i <= j) if causal else np.ones_like(dist, dtype=bool)
    d = np.abs(j - i)[scope]
    h = dist[scope]
    finite = np.isfinite(h)
    depth = int(h[finite].max())
    bucket = np.searchsorted(np.asarray(edges), d, side="right") - 1
    table = np.zeros((len(edges), depth + 1), dtype=np.int64)
    np.add.at(table, (bucket[finite], h[finite].astype(int)), 1)
    bad = np.bincount(bucket[~finite], minlength=len(edges))
    return dict(pairs=int(scope.sum()), unreachable=int((~finite).sum()),
                max_hops=math.inf if (~finite).any() else depth,
                hop_counts=tuple(int(x) for x in table.sum(axis=0)),
                distance_hops=tuple(tuple(int(x) for x in row) for row in table),
                distance_unreachable=tuple(int(x) for x in bad))


def nearest_unreachable(dist: np.ndarray, k: int) -> tuple[tuple[int, int], ...]:
    """Each source's nearest unreachable j > i, ordered by (j - i, i), the first k."""
    out = []
    for i in range(len(dist)):
        bad = np.flatnonzero(np.isinf(dist[i, i + 1:]))
        if len(bad):
            out.append((int(bad[0]) + 1, i, i + 1 + int(bad[0])))
    return tuple((i, j) for _, i, j in sorted(out)[:k])


# ------------------------------------------------------------------------------ strategies
@st.composite
def cases(draw, max_n=48):
    nb = draw(st.integers(1, 4))
    w = draw(st.lists(st.integers(1, 20), min_size=nb, max_size=nb))
    r = draw(st.lists(st.integers(1, 6), min_size=nb, max_size=nb))
    H = draw(st.integers(1, 7))
    N = draw(st.integers(1, max_n))
    shift = draw(st.sampled_from([0, 0, draw(st.integers(1, 25))]))
    return DilatedPattern(w, r, shift=shift), N, H


@st.composite
def layer_cycles(draw, max_n=40):
    """A list of 1-3 layer patterns: the shifted/unshifted alternation of one random pattern, or
    unrelated random patterns with random shifts; and a depth bound (or none)."""
    pattern, N, H = draw(cases(max_n=max_n))
    if draw(st.booleans()):
        patterns = alternating_shift(DilatedPattern(pattern.segment_lengths, pattern.dilation_rates),
                                     draw(st.integers(1, 3)))
    else:
        patterns = [pattern] + [draw(cases(max_n=1))[0] for _ in range(draw(st.integers(0, 2)))]
    layers = draw(st.one_of(st.none(), st.integers(1, 6)))
    return patterns, N, H, layers


@settings(max_examples=300, deadline=None)
@given(case=cases(), causal=st.booleans())
def test_matches_brute_force_exactly_per_distance(case, causal):
    pattern, N, H = case
    dist = all_hops(pattern, N, H, causal)
    edges = list(range(N))  # one bucket per distance: the whole (distance, hops) histogram
    want = expected_report(dist, causal, edges)
    got = reach(pattern, N, H, causal, distance_edges=edges, examples=3)
    assert (got.pairs, got.unreachable, got.max_hops) == (want["pairs"], want["unreachable"], want["max_hops"])
    assert got.hop_counts == want["hop_counts"]
    assert got.distance_hops == tuple(row + (0,) * (len(got.hop_counts) - len(row))
                                      for row in want["distance_hops"])
    assert got.distance_unreachable == want["distance_unreachable"]
    assert max_hops(pattern, N, H, causal) == want["max_hops"]
    assert unreachable_pairs(pattern, N, H, causal) == want["unreachable"]
    assert got.examples == nearest_unreachable(dist, 3)


@settings(max_examples=250, deadline=None)
@given(case=layer_cycles(), causal=st.booleans())
def test_layer_cycles_match_brute_force_exactly_per_distance(case, causal):
    """Different patterns per layer (cycled), with and without a depth bound: every (distance,
    hops) count, the unreachable pairs and the examples equal BFS over explicit adjacency."""
    patterns, N, H, layers = case
    dist = all_hops(patterns, N, H, causal, layers)
    edges = list(range(N))
    want = expected_report(dist, causal, edges)
    got = reach(patterns, N, H, causal, layers=layers, distance_edges=edges, examples=3)
    assert (got.pairs, got.unreachable, got.max_hops) == (want["pairs"], want["unreachable"], want["max_hops"])
    assert got.hop_counts == want["hop_counts"]
    assert got.distance_hops == tuple(row + (0,) * (len(got.hop_counts) - len(row))
                                      for row in want["distance_hops"])
    assert got.distance_unreachable == want["distance_unreachable"]
    assert got.examples == nearest_unreachable(dist, 3)
    assert max_hops(patterns, N, H, causal, layers=layers) == want["max_hops"]
    assert unreachable_pairs(patterns, N, H, causal, layers=layers) == want["unreachable"]
    i = N // 3
    np.testing.assert_array_equal(hops_from(patterns, N, H, i, causal, layers=layers), dist[i])


@settings(max_examples=60, deadline=None)
@given(case=cases(max_n=90), causal=st.booleans(), data=st.data())
def test_hops_from_one_source_matches_bfs(case, causal, data):
    pattern, N, H = case
    dist = all_hops(pattern, N, H, causal)
    i = data.draw(st.integers(0, N - 1))
    np.testing.assert_array_equal(hops_from(pattern, N, H, i, causal), dist[i])


@settings(max_examples=25, deadline=None)
@given(nested=st.lists(st.integers(1, 3), min_size=1, max_size=3), r=st.lists(st.integers(1, 4), min_size=4,
       max_size=4), H=st.integers(1, 5), extra=st.integers(0, 40), causal=st.booleans(),
       shift=st.integers(0, 30))
def test_many_identical_blocks_and_a_tail(nested, r, H, extra, causal, shift):
    """Nested segments (each a multiple of the last) give blocks of the largest one: N spans
    several blocks plus a tail, the case the algorithm multiplies instead of recomputing."""
    w = [2]
    for f in nested:
        w.append(w[-1] * f)
    pattern = DilatedPattern(w, r[: len(w)], shift=shift)
    N = 3 * w[-1] + extra
    got = reach(pattern, N, H, causal, distance_edges="log2", examples=4)
    s = shift % w[-1] if w[-1] < N else 0  # a shifted pattern: a short first piece, then blocks
    assert got.pieces[0][:2] == (0, w[-1] - s if s else min(w[-1], N))
    dist = all_hops(pattern, N, H, causal)
    want = expected_report(dist, causal, log2_edges(N))
    assert got.examples == nearest_unreachable(dist, 4)
    assert got.block == min(w[-1], N)
    assert (got.unreachable, got.hop_counts) == (want["unreachable"], want["hop_counts"])
    assert got.distance_unreachable == want["distance_unreachable"]


# ------------------------------------------------------------------------------ known facts
def test_token_seven_never_reaches_position_eight_causally():
    """Issue 11: segments [8, 16, 32], rates [1, 2, 4]: position 8 starts a segment and in the
    longer branches reads only its own residue; forward paths cannot bring token 7 to it."""
    p = DilatedPattern([8, 16, 32], [1, 2, 4])
    for H in (1, 2, 4, 8):
        assert hops_from(p, 64, H, 7)[8] == math.inf
        assert max_hops(p, 64, H) == math.inf
        assert (7, 8) in reach(p, 64, H).examples
        assert hops_from(p, 64, H, 7, causal=False)[8] < math.inf


def test_issue_numbers_for_the_five_branch_pattern():
    p = DilatedPattern([8, 16, 32, 64, 128], [1, 2, 4, 8, 16])
    causal = reach(p, 128, 8, True)
    assert (causal.unreachable, causal.pairs) == (639, 8256)
    assert causal.unreachable == int(np.isinf(all_hops(p, 128, 8, True)[np.triu_indices(128)]).sum())
    assert unreachable_pairs(p, 128, 8, causal=False) == 0
    assert max_hops(p, 128, 8, causal=False) == 4 == all_hops(p, 128, 8, False).max()


def test_single_dense_branch_is_one_hop_inside_and_blind_across_blocks():
    p = DilatedPattern([16], [1])
    r = reach(p, 40, 3, causal=False, distance_edges=None)
    assert r.block == 16 and r.max_reachable_hops == 1
    assert r.unreachable == 40 * 40 - (16 * 16 * 2 + 8 * 8)
    assert r.examples[:3] == ((15, 16), (31, 32), (14, 16))


def test_shifted_layers_close_the_issue_blind_spots():
    """Issue 11's 639 causal blind spots (segments 8 ... 128, 8 heads, N = 128) are 0 when odd
    layers shift their segments by half the shortest one; token 7 reaches position 8."""
    p = DilatedPattern([8, 16, 32, 64, 128], [1, 2, 4, 8, 16])
    cycle = alternating_shift(p)
    got = reach(cycle, 128, 8, True)
    dist = all_hops(cycle, 128, 8, True)
    assert got.unreachable == 0 == int(np.isinf(dist[np.triu_indices(128)]).sum())
    assert got.max_hops == dist[np.triu_indices(128)].max() == 5
    assert hops_from(cycle, 128, 8, 7)[8] == dist[7, 8] == 2  # the shifted layer joins 7 and 8
    # a shifted pattern alone just moves the blind spots
    assert reach(cycle[1], 128, 8, True).unreachable > 0


def test_alternating_shift_is_the_configs_rule():
    for name in ("tiny", "small"):
        cfg = LongNetConfig(**PRESETS[name], shift_segments=True)
        assert alternating_shift(cfg.pattern(0), cfg.num_layers) == cfg.patterns()


# ------------------------------------------------------------------------------ the model agrees
@pytest.mark.parametrize("layers,shifted", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_model_jacobian_support_equals_paths_of_at_most_layers(layers, shifted):
    """In a LongNetLM with ``layers`` blocks, the logits at j depend on the token embedding at i
    exactly when some path carries i to j in at most ``layers`` hops (float64, random weights);
    with ``shift_segments`` the layers alternate unshifted and shifted patterns."""
    torch.manual_seed(layers)
    N, H = 26, 2
    cfg = LongNetConfig(vocab_size=11, embed_dim=16, num_layers=layers, num_heads=H, ffn_dim=24,
                        segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), max_train_length=16,
                        position="none", shift_segments=shifted)
    model = LongNetLM(cfg).to(torch.float64).eval()
    ids = torch.randint(0, 11, (1, N))
    emb = model.embed(ids).detach().requires_grad_(True)
    h = model._trunk(emb, None, 0)
    depends = np.zeros((N, N), dtype=bool)  # [i, j]: d h_j / d emb_i != 0
    for j in range(N):
        (g,) = torch.autograd.grad(h[0, j].sum() + h[0, j, 0], emb, retain_graph=True)
        depends[:, j] = (g[0].abs().amax(dim=-1) > 1e-12).numpy()
    dist = np.stack([hops_from(cfg.patterns(), N, H, i) for i in range(N)])
    np.testing.assert_array_equal(depends, dist <= layers)
    bounded = np.stack([hops_from(cfg.patterns(), N, H, i, layers=layers) for i in range(N)])
    np.testing.assert_array_equal(depends, np.isfinite(bounded))


# ------------------------------------------------------------------------------ bad input
def test_bad_arguments_name_the_argument():
    p = DilatedPattern([4], [1])
    with pytest.raises(TypeError, match="pattern"):
        reach([4], 8, 2)
    with pytest.raises(ValueError, match="length"):
        max_hops(p, 0, 2)
    with pytest.raises(TypeError, match="num_heads"):
        unreachable_pairs(p, 8, 2.0)
    with pytest.raises(TypeError, match="causal"):
        reach(p, 8, 2, causal="yes")
    with pytest.raises(ValueError, match="distance_edges"):
        reach(p, 8, 2, distance_edges=[1, 2])
    with pytest.raises(ValueError, match="source"):
        hops_from(p, 8, 2, 8)
    with pytest.raises(TypeError, match="pattern"):
        reach([], 8, 2)
    with pytest.raises(ValueError, match="layers"):
        reach([p, p], 8, 2, layers=0)
