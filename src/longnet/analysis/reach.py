"""Reach of dilated attention: how many layers carry token ``i``'s information to position ``j``.

Definitions (the pattern's rules are in :mod:`longnet.ops.pattern`; ``pattern.reads`` is the
ground truth for one layer):

- **One layer.** Position ``j`` reads position ``i`` when some head keeps both in the same
  segment of some branch; causal attention also needs ``i <= j``. Head ``h`` keeps the offset
  ``h % r`` of a branch with rate ``r`` (counted from the segment start, which a shifted pattern
  moves), so the heads together keep the offsets ``0 .. min(H, r) - 1`` of it: with ``H < r``
  the other residues of that branch are read by no one.
- **Layers.** Heads mix through the output projection, so consecutive layers may use different
  heads, and the residual stream keeps what a position holds. The model's layers may use
  different patterns ``P_0, P_1, ...`` (``LongNetConfig(shift_segments=True)`` alternates an
  unshifted and a shifted one). After layer ``t`` (counted from 0, the first layer) the
  positions holding ``i``'s information are ``R_t = R_{t-1} + {j : j reads some k in R_{t-1}
  under P_t}`` with ``R_{-1} = {i}``; ``hops(i, j)`` is the fewest layers, ``t + 1`` for the
  first ``t`` with ``j in R_t`` (``hops(i, i) = 0``). Equivalently: some path uses layer ``t``'s
  pattern at hop ``t`` (a path may stay put for a layer). A list of patterns is **cycled**
  (layer ``t`` uses ``P_{t mod len}``); without a depth bound (``layers=None``) a pair is
  unreachable when no number of layers connects it, with ``layers=L`` when the first ``L``
  layers do not. One pattern is the list of one: every layer alike, a shortest path.
- **Pairs.** Causal: the ``N (N + 1) / 2`` ordered pairs ``i <= j``; non-causal: all ``N^2``
  ordered pairs (with different layer patterns ``i -> j`` and ``j -> i`` may differ, both are
  counted). The diagonal counts in both, as pairs reached in 0 hops, so that
  ``pairs = reached + unreachable`` always. ``max_hops`` is the largest ``hops`` over the pairs,
  ``math.inf`` if any pair has no path; ``unreachable_pairs`` counts the pairs with no path.

Method (exact; no ``N x N`` matrix):

1. **Pieces.** A position that starts a segment in every branch of every layer's pattern is a
   cut: no edge crosses it, so the sequence splits into independent pieces and pairs in
   different pieces are unreachable (non-causal too). An unshifted pattern has a cut at every
   multiple of ``M = lcm(min(w_b, N))``; a shifted one (shift ``s``) at ``k M - s``, so a short
   first piece, then pieces of ``M``. Alternating shifted and unshifted layers leave no cut
   inside ``max w``, so the paper's pattern at ``N <= 32768`` is one piece. Pieces of one length
   and one local layout (all but a shifted first one start every segment at their start) are
   analysed once and their counts multiplied.
2. **Classes.** Inside a piece, cut at every segment boundary of every branch of every layer's
   pattern into *cells*. Within a cell, which groups ``(layer pattern, branch, segment, kept
   offset)`` a position belongs to depends only on its offset mod ``L = lcm(all r)``, so a cell
   splits into at most ``L`` *classes*, arithmetic progressions of step ``L`` whose members are
   interchangeable in every layer. ``C``, the number of classes, is at most ``L`` times the
   number of cells (paper pattern, unshifted: 16 cells x 12 = 192; with the shifted layers: 32
   cells, 384 classes).
3. **Non-causal.** From a source in class ``c``, the positions reached after each layer are
   whole classes (plus the source), so the state is one boolean per class and a layer is one
   boolean matrix product with that layer's class adjacency (two classes sharing a group): one
   product of ``C x C`` matrices per layer for all source classes at once.
4. **Causal.** Paths only move forward, so for a source ``i`` the positions of a class reached
   within ``k`` layers are a *suffix* of the class: the state is one threshold per class. Layer
   ``t`` maps thresholds to ``t'_K = first member of K >= min over groups G of layer t's pattern
   containing K of (earliest reached position in G)``. The sources of a piece are processed in
   vectorised chunks; each layer costs ``O(C * branches)`` per source, and the positions first
   reached at layer ``k`` are counted per distance bucket in closed form (members of a
   progression in an interval).
5. **Stopping.** With every layer alike the first layer that reaches nothing new is a fixed
   point. With several patterns, the state is fixed once a run of layers that reach nothing new
   has applied every distinct pattern of the list; or at the depth bound ``layers``.

Cost: non-causal ``O(depth * C^3 + M * C * buckets)``; causal ``O(M * C * (branches * depth +
buckets))`` with ``M`` the longest piece and ``depth`` the largest finite hop count. Paper
pattern, 12 heads: ``M = 32768``, ``C = 192``, depth 3, a few seconds at any ``N`` on 2 CPU cores
(``docs/reach.md``, "Method and cost"). Exact at every ``N``, but fast only while the
piece ``M`` and the class count
``C`` stay small: nested segment lengths (each dividing the next, as in the paper and the
presets) keep ``M = max w`` for one pattern. Two limits:

- Alternating shifted and unshifted layers remove the cuts at ``k M`` (the point of shifting),
  so beyond ``max w`` the whole sequence is one piece of ``N`` tokens with ``C ~ N / (min w / 2)
  * L`` classes, and the causal cost grows like ``N^2``: fine up to a few times ``max w``, slow
  for the paper's pattern at ``N = 1M``. (Sources one period ``M`` apart see translated
  structure except near the end of the sequence; this module does not exploit it.)
- Segment lengths with a large lcm (for example the Gigapath slide pattern, ``M >= N``) leave
  one piece with ``C ~ N / min(w) * L`` classes: 16 s at ``N = 2^15``, minutes at ``2^17``, hours
  at ``2^20``. Analyse a shorter ``N`` there.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from longnet.ops.pattern import DilatedPattern

__all__ = ["ReachReport", "reach", "max_hops", "unreachable_pairs", "hops_from", "log2_edges", "work",
           "alternating_shift"]

_INF = np.int64(1 << 61)  # "not reached"; far above any position, no overflow when adding L
_CHUNK = 1024  # sources processed together (memory ~ _CHUNK * C * 8 bytes per array)


# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ReachReport:
    """Hop counts of every pair of a pattern (or a cycle of layer patterns) at one length and
    head count.

    Attributes:
        length: sequence length ``N``.
        num_heads: heads ``H``.
        causal: whether only pairs ``i <= j`` (and forward paths) count.
        block: length of the longest independent piece (``N`` when the sequence is one piece).
        pairs: pairs considered (``N (N + 1) / 2`` causal, ``N^2`` non-causal, diagonal included).
        unreachable: pairs with no path (within ``layers`` layers when bounded).
        hop_counts: ``hop_counts[k]`` pairs reached in exactly ``k`` layers (``k = 0``: diagonal).
        distance_edges: lower bounds of the distance buckets ``|j - i|``, starting at 0; bucket
            ``b`` covers ``[edges[b], edges[b + 1])``, the last one up to ``N - 1``.
        distance_hops: per bucket, pairs reached in exactly ``k`` layers, ``k = 0 ..``.
        distance_unreachable: per bucket, pairs with no path.
        examples: unreachable pairs ``(i, j)``, ``i < j``: for each source ``i`` its nearest
            unreachable ``j > i``, ordered by ``(j - i, i)``, the first few.
        pieces: ``(start, length, count)`` of each kind of independent piece: ``count`` pieces
            of ``length`` tokens, the first starting at ``start``.
        layers: the depth bound, ``None`` when unbounded.
        shifts: the ``shift`` of each pattern in the (cycled) list of layer patterns.
    """

    length: int
    num_heads: int
    causal: bool
    block: int
    pairs: int
    unreachable: int
    hop_counts: tuple[int, ...]
    distance_edges: tuple[int, ...]
    distance_hops: tuple[tuple[int, ...], ...]
    distance_unreachable: tuple[int, ...]
    examples: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[int, int, int], ...] = ()
    layers: int | None = None
    shifts: tuple[int, ...] = (0,)

    @property
    def max_hops(self) -> float:
        """Largest hop count over all pairs; ``math.inf`` when some pair is unreachable."""
        return math.inf if self.unreachable else self.max_reachable_hops

    @property
    def max_reachable_hops(self) -> int:
        """Largest hop count over the pairs that have a path."""
        return len(self.hop_counts) - 1

    @property
    def unreachable_fraction(self) -> float:
        return self.unreachable / self.pairs

    def distance_buckets(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` of each distance bucket, ``hi`` exclusive."""
        edges = list(self.distance_edges) + [self.length]
        return [(edges[b], edges[b + 1]) for b in range(len(self.distance_edges))]

    def to_dict(self) -> dict:
        """JSON-ready summary; ``max_hops`` is ``None`` when infinite."""
        rows = []
        for (lo, hi), hops, bad in zip(self.distance_buckets(), self.distance_hops,
                                       self.distance_unreachable):
            rows.append({"lo": lo, "hi": hi, "pairs": sum(hops) + bad, "unreachable": bad,
                         "hops": list(hops)})
        return {
            "seq_len": self.length, "heads": self.num_heads, "causal": self.causal,
            "layers": self.layers, "shifts": list(self.shifts),
            "block": self.block, "pieces": [list(p) for p in self.pieces], "pairs": self.pairs,
            "unreachable_pairs": self.unreachable, "unreachable_fraction": self.unreachable_fraction,
            "max_hops": None if self.unreachable else self.max_reachable_hops,
            "max_reachable_hops": self.max_reachable_hops, "hop_counts": list(self.hop_counts),
            "examples": [list(e) for e in self.examples], "distance_table": rows,
        }


# ---------------------------------------------------------------------------------- validation
def _check_int(name: str, value: object, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {int(value)}")
    return int(value)


def _check_patterns(pattern) -> list:
    if isinstance(pattern, DilatedPattern):
        return [pattern]
    if isinstance(pattern, (list, tuple)) and pattern and all(isinstance(p, DilatedPattern) for p in pattern):
        return list(pattern)
    raise TypeError(f"pattern must be a DilatedPattern or a non-empty list of them (one per layer, "
                    f"cycled), got {type(pattern).__name__}")


def _check_args(pattern, length, num_heads, causal, layers=None):
    patterns = _check_patterns(pattern)
    length = _check_int("length", length)
    num_heads = _check_int("num_heads", num_heads)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if layers is not None:
        layers = _check_int("layers", layers)
        patterns = patterns[:layers]  # the layers a bounded path can use
    return patterns, length, num_heads, layers


def log2_edges(length: int) -> tuple[int, ...]:
    """Distance buckets ``0, 1, 2, 4, 8, ...`` (powers of two below ``length``)."""
    length = _check_int("length", length)
    edges = [0]
    e = 1
    while e < length:
        edges.append(e)
        e *= 2
    return tuple(edges)


def _check_edges(edges, length: int) -> np.ndarray:
    if edges is None:
        return np.array([0] if length == 1 else [0, 1], dtype=np.int64)
    if isinstance(edges, str) and edges == "log2":
        return np.array(log2_edges(length), dtype=np.int64)
    try:
        arr = [int(e) for e in edges]
    except (TypeError, ValueError) as e:
        raise TypeError(f"distance_edges must be None, 'log2' or a sequence of ints, got {edges!r}") from e
    if not arr or arr[0] != 0 or any(b <= a for a, b in zip(arr, arr[1:])) or arr[-1] >= length:
        raise ValueError(f"distance_edges must start at 0, increase strictly and stay below "
                         f"length={length}, got {arr}")
    return np.array(arr, dtype=np.int64)


def alternating_shift(pattern, layers: int = 2) -> list:
    """The layer patterns of ``LongNetConfig(shift_segments=True)`` for ``pattern``: even layers
    unshifted, odd layers shifted by half the shortest segment (``layers`` of them)."""
    (p,) = _check_patterns(pattern)
    layers = _check_int("layers", layers)
    return [p.for_layer(t) for t in range(layers)]


# ---------------------------------------------------------------------------------- structure
# A layout is, per distinct layer pattern, a tuple of branches (w, r, s): effective segment
# length, rate, and local shift (segments of the branch start where (q + s) % w == 0).
Layout = tuple[tuple[tuple[int, int, int], ...], ...]


def _layouts(patterns: list, N: int) -> tuple[Layout, tuple[int, ...], tuple[int, ...]]:
    """Distinct layer layouts at length ``N``, the layout index of each layer of the cycle, and
    the cycle's shifts."""
    per_layer = [tuple((p.effective_segment(b, N), p.dilation_rates[b], p.branch_shift(b, N))
                       for b in range(len(p))) for p in patterns]
    distinct = list(dict.fromkeys(per_layer))
    return tuple(distinct), tuple(distinct.index(x) for x in per_layer), tuple(p.shift for p in patterns)


def _pieces(layout: Layout, N: int) -> list[tuple[int, bool, list[int]]]:
    """Independent pieces: ``(length, first, starts)`` for each kind, ``first`` when it is the
    piece at 0 with the layout's own shifts (the others start every segment at their start)."""
    branches = {(w, s) for lay in layout for (w, _, s) in lay}
    if any(w >= N for w, _ in branches):
        cuts = np.zeros(0, dtype=np.int64)
    else:
        w0, s0 = max(branches)
        cand = np.arange((w0 - s0) % w0 or w0, N, w0, dtype=np.int64)
        ok = np.ones(len(cand), dtype=bool)
        for w, s in branches:
            ok &= (cand + s) % w == 0
        cuts = cand[ok]
    bounds = np.concatenate([[0], cuts, [N]])
    starts, lengths = bounds[:-1], np.diff(bounds)
    shifted = any(s for w, s in branches)
    out: dict[tuple[int, bool], list[int]] = {}
    for st, n in zip(starts.tolist(), lengths.tolist()):
        out.setdefault((n, shifted and st == 0), []).append(st)
    return [(n, first, sts) for (n, first), sts in out.items()]


def _local(layout: Layout, first: bool) -> Layout:
    return layout if first else tuple(tuple((w, r, 0) for w, r, _ in lay) for lay in layout)


def _cell_starts(n: int, layout: Layout) -> np.ndarray:
    bounds = [np.zeros(1, dtype=np.int64)]
    for w, s in {(w, s) for lay in layout for (w, _, s) in lay}:
        bounds.append(np.arange((w - s) % w, n, w, dtype=np.int64))
    return np.unique(np.concatenate(bounds))


@dataclass(frozen=True)
class _Block:
    """Classes of one piece of length ``n``: arithmetic progressions ``first + L * m <= last``."""

    n: int
    L: int
    first: np.ndarray  # (C,)
    last: np.ndarray  # (C,)
    class_of: np.ndarray  # (n,) class of every position
    groups: tuple  # per layout, per branch: (cols, starts, back)
    incidence: tuple  # per layout: (C, G) bool, class in group

    @property
    def num_classes(self) -> int:
        return len(self.first)


def _block(n: int, layout: Layout, num_heads: int) -> _Block:
    """Cells, classes and group membership of positions ``[0, n)`` for every layer layout."""
    L = math.lcm(*(r for lay in layout for (_, r, _) in lay))
    starts = _cell_starts(n, layout)
    ends = np.append(starts[1:], n)
    per_cell = np.minimum(ends - starts, L)
    cell = np.repeat(np.arange(len(starts)), per_cell)
    offsets = np.concatenate([[0], np.cumsum(per_cell)[:-1]])
    rho = np.arange(len(cell)) - offsets[cell]
    first = starts[cell] + rho
    last = first + (ends[cell] - 1 - first) // L * L
    pos = np.arange(n, dtype=np.int64)
    pcell = np.searchsorted(starts, pos, side="right") - 1
    class_of = offsets[pcell] + (pos - starts[pcell]) % L
    all_groups, all_inc = [], []
    for lay in layout:
        groups, columns = [], []
        for w, r, s in lay:
            seg = (first + s) // w  # a cell lies inside one segment of every branch
            rel = (first + s - seg * w) % r
            gid = np.where(rel < min(num_heads, r), seg * r + rel, -1)
            cols = np.flatnonzero(gid >= 0)
            cols = cols[np.argsort(gid[cols], kind="stable")]
            g = gid[cols]
            new = np.flatnonzero(np.diff(g, prepend=-2) != 0)
            back = np.cumsum(np.diff(g, prepend=-2) != 0) - 1
            groups.append((cols, new, back))
            inc = np.zeros((len(first), len(new)), dtype=bool)
            inc[cols, back] = True
            columns.append(inc)
        all_groups.append(tuple(groups))
        all_inc.append(np.concatenate(columns, axis=1))
    return _Block(n, L, first, last, class_of, tuple(all_groups), tuple(all_inc))


def _ceil(x: np.ndarray, first: np.ndarray, last: np.ndarray, L: int) -> np.ndarray:
    """First member ``>= x`` of each class (broadcast), ``_INF`` when none."""
    v = first + (np.maximum(x - first, 0) + L - 1) // L * L
    return np.where(v <= last, v, _INF)


def _members(first: np.ndarray, L: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Members ``first + L m`` (``m >= 0``) in ``[lo, hi)``."""
    c_hi = (np.maximum(hi - first, 0) + L - 1) // L
    c_lo = (np.maximum(lo - first, 0) + L - 1) // L
    return np.maximum(c_hi - c_lo, 0)


# ---------------------------------------------------------------------------------- counting
class _Tally:
    """Pairs ``(i, j)``, ``j != i``, per (hop, distance bucket ``|j - i|``), for one piece."""

    def __init__(self, edges: np.ndarray, n: int):
        self.lo = np.maximum(edges, 1)
        self.hi = np.append(edges[1:], max(n, 1))
        self.rows: list[np.ndarray] = [np.zeros(len(edges), dtype=np.int64)]  # index = hop

    def add(self, hop: int, src: np.ndarray, first: np.ndarray, L: int, lo: np.ndarray,
            hi: np.ndarray, both: bool = False) -> None:
        """Members of progressions ``first + L m`` in ``[lo, hi)``, all at ``hop`` from ``src``:
        those after ``src`` only, or with ``both`` also those before it."""
        while len(self.rows) <= hop:
            self.rows.append(np.zeros(len(self.lo), dtype=np.int64))
        row = self.rows[hop]
        for b in range(len(self.lo)):
            a = np.maximum(lo, src + self.lo[b])
            z = np.minimum(hi, src + self.hi[b])
            row[b] += int(_members(first, L, a, z).sum())
            if both:
                a = np.maximum(lo, src - self.hi[b] + 1)
                z = np.minimum(hi, src - self.lo[b] + 1)
                row[b] += int(_members(first, L, a, z).sum())


def _propagate(T: np.ndarray, groups) -> np.ndarray:
    """For each class, the earliest reached position over the groups that contain it."""
    x = np.full_like(T, _INF)
    for cols, starts, back in groups:
        if len(cols) == 0:
            continue
        m = np.minimum.reduceat(T[:, cols], starts, axis=1)
        x[:, cols] = np.minimum(x[:, cols], m[:, back])
    return x


def _run_layers(step, cycle: tuple[int, ...], num_layouts: int, layers: int | None) -> None:
    """Call ``step(hop, layout)`` for layers ``1, 2, ...`` (layout of layer ``hop - 1``) until
    ``step`` has returned False (nothing new) for every distinct layout in a row, or ``layers``."""
    quiet: set[int] = set()
    hop = 0
    while layers is None or hop < layers:
        g = cycle[hop % len(cycle)]
        hop += 1
        if step(hop, g):
            quiet.clear()
        else:
            quiet.add(g)
            if len(quiet) == num_layouts:
                return


def _causal(blk: _Block, cycle, layers, src: np.ndarray, on_new) -> np.ndarray:
    """Run forward paths from ``src``; return the final thresholds (S, C).

    ``D[s, K]`` is the first member ``> src[s]`` of class ``K`` reached so far (members after it
    are reached too); ``_INF`` when none is. ``on_new(hop, s, k, lo, hi)``: members of class ``k``
    in ``[lo, hi)`` are first reached from ``src[s]`` at ``hop``.
    """
    S = len(src)
    rows = np.arange(S)
    k0 = blk.class_of[src]
    first, last, L = blk.first[None, :], blk.last[None, :], blk.L
    D = np.full((S, blk.num_classes), _INF, dtype=np.int64)
    after = src[:, None] + 1

    def step(hop: int, g: int) -> bool:
        nonlocal D
        T = D.copy()
        T[rows, k0] = src
        E = _ceil(np.maximum(_propagate(T, blk.groups[g]), after), first, last, L)
        changed = E < D
        if not changed.any():
            return False
        s, k = np.nonzero(changed)
        on_new(hop, s, k, E[s, k], np.minimum(D[s, k], blk.last[k] + 1))
        D = np.minimum(D, E)
        return True

    _run_layers(step, cycle, len(blk.groups), layers)
    return D


def _class_hops(blk: _Block, cycle, layers) -> np.ndarray:
    """Non-causal: ``[c, K]`` hops from a source in class ``c`` to the members of ``K`` (other
    than the source); ``-1``: none."""
    C = blk.num_classes
    adj = [((inc.astype(np.float32) @ inc.T.astype(np.float32)) > 0).astype(np.float32)
           for inc in blk.incidence]
    dist = np.full((C, C), -1, dtype=np.int64)
    reached = np.zeros((C, C), dtype=bool)
    eye = np.eye(C, dtype=bool)

    def step(hop: int, g: int) -> bool:
        nonlocal reached
        nxt = ((reached | eye).astype(np.float32) @ adj[g]) > 0
        new = nxt & ~reached
        if not new.any():
            return False
        dist[new] = hop
        reached |= nxt
        return True

    _run_layers(step, cycle, len(adj), layers)
    return dist


# ---------------------------------------------------------------------------------- one piece
@dataclass
class _BlockResult:
    rows: list[np.ndarray]  # pairs (i, j), j != i, per hop (index >= 1) and bucket
    reached_by_bucket: np.ndarray  # pairs j != i with a path, per bucket
    nearest: np.ndarray  # (n,) nearest unreachable j > i inside the piece, _INF if none


def _analyse_block(blk: _Block, cycle, layers, causal: bool, edges: np.ndarray,
                   progress: Callable[[int], None] | None) -> _BlockResult:
    tally = _Tally(edges, blk.n)
    nearest = np.full(blk.n, _INF, dtype=np.int64)
    class_hops = None if causal else _class_hops(blk, cycle, layers)
    first, last, L = blk.first[None, :], blk.last[None, :], blk.L
    for start in range(0, blk.n, _CHUNK):
        src = np.arange(start, min(start + _CHUNK, blk.n), dtype=np.int64)
        nxt = _ceil(src[:, None] + 1, first, last, L)  # first member > i of every class
        if causal:
            def on_new(hop, s, k, lo, hi, src=src):
                tally.add(hop, src[s], blk.first[k], L, lo, hi)

            D = _causal(blk, cycle, layers, src, on_new)
            missing = nxt < D
        else:
            h = class_hops[blk.class_of[src]]  # (S, C)
            for hop in np.unique(h[h > 0]):
                s, k = np.nonzero(h == hop)
                tally.add(int(hop), src[s], blk.first[k], L, blk.first[k], blk.last[k] + 1, both=True)
            missing = (h < 0) & (nxt < _INF)
        nearest[src] = np.where(missing, nxt, _INF).min(axis=1)
        if progress is not None:
            progress(len(src))
    rows = tally.rows
    reached = np.sum(rows[1:], axis=0) if len(rows) > 1 else np.zeros_like(rows[0])
    return _BlockResult(rows, reached, nearest)


def _examples(parts, results, N: int, want: int) -> list[tuple[int, int]]:
    """Each source's nearest unreachable target (inside its piece, or the next piece's first
    position), ordered by ``(distance, source)``; the first ``want``."""
    if want == 0:
        return []
    cands = []
    for (n, _, starts), res in zip(parts, results):
        i = np.arange(n, dtype=np.int64)
        inside = res.nearest - i  # huge where none
        with_next = [g0 for g0 in starts if g0 + n < N][:want]  # later ones repeat larger sources
        for g0 in with_next + [g0 for g0 in starts if g0 + n >= N]:
            d = np.minimum(inside, n - i) if g0 + n < N else inside
            keep = np.flatnonzero(d < _INF // 2)
            order = np.lexsort((keep, d[keep]))[:want]
            g = g0 + keep[order]
            cands += [(int(dd), int(gi), int(gi + dd)) for dd, gi in zip(d[keep][order], g)]
    return [(i, j) for _, i, j in sorted(cands)[:want]]


def _pairs_at_distance(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``sum_{d=lo}^{hi-1} max(0, n - d)``: pairs ``i < j`` of ``[0, n)`` at distance in [lo, hi)."""
    a = np.minimum(lo, n)
    b = np.minimum(hi, n)
    # sum_{d=a}^{b-1} (n - d)
    return np.where(b > a, (b - a) * n - (b * (b - 1) - a * (a - 1)) // 2, 0)


# ---------------------------------------------------------------------------------- public
def reach(pattern, length: int, num_heads: int, causal: bool = True, *, layers: int | None = None,
          distance_edges="log2", examples: int = 5,
          progress: Callable[[int, int], None] | None = None) -> ReachReport:
    """Exact hop counts of all pairs of ``pattern`` at ``length`` with ``num_heads`` heads.

    Args:
        pattern: a :class:`~longnet.ops.pattern.DilatedPattern` (every layer alike), or a list of
            them, layer ``t`` using ``pattern[t % len(pattern)]`` (e.g. ``config.patterns()``).
        length: sequence length ``N``.
        num_heads: heads ``H`` (head ``h`` keeps offset ``h % r`` of each branch).
        causal: count pairs ``i <= j`` along forward paths only (a causal LM), else all pairs.
        layers: count only paths through the first ``layers`` layers (``None``: any number).
        distance_edges: ``"log2"`` (buckets 0, 1, 2-3, 4-7, ...), ``None`` (one bucket for the
            diagonal, one for the rest) or increasing ints starting at 0, below ``length``.
        examples: how many unreachable pairs to return.
        progress: called as ``progress(done, total)`` with the sources processed so far.

    Returns:
        :class:`ReachReport`. See the module docstring for the definitions and the method.
    """
    patterns, N, H, layers = _check_args(pattern, length, num_heads, causal, layers)
    want = _check_int("examples", examples, lo=0)
    edges = _check_edges(distance_edges, N)
    layout, cycle, shifts = _layouts(patterns, N)
    parts = _pieces(layout, N)
    total_sources = sum(n for n, _, _ in parts)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total_sources)

    nb = len(edges)
    rows: list[np.ndarray] = [np.zeros(nb, dtype=np.int64)]
    reached = np.zeros(nb, dtype=np.int64)
    results = []
    for n, first, starts in parts:
        blk = _block(n, _local(layout, first), H)
        res = _analyse_block(blk, cycle, layers, causal, edges, tick)
        results.append(res)
        for hop, row in enumerate(res.rows):
            while len(rows) <= hop:
                rows.append(np.zeros(nb, dtype=np.int64))
            rows[hop] += len(starts) * row
        reached += len(starts) * res.reached_by_bucket
    lo = np.maximum(edges, 1)
    hi = np.append(edges[1:], N)
    all_pairs = _pairs_at_distance(N, lo, hi) * (1 if causal else 2)  # pairs j != i per bucket
    hops_table = list(rows)
    hops_table[0] = hops_table[0].copy()
    hops_table[0][0] = N  # the diagonal, 0 hops
    bad = all_pairs - reached
    while len(hops_table) > 1 and not hops_table[-1].any():
        hops_table.pop()
    pairs = N * (N + 1) // 2 if causal else N * N
    return ReachReport(
        length=N, num_heads=H, causal=causal, block=max(n for n, _, _ in parts), pairs=pairs,
        unreachable=int(bad.sum()),
        hop_counts=tuple(int(r.sum()) for r in hops_table),
        distance_edges=tuple(int(e) for e in edges),
        distance_hops=tuple(tuple(int(hops_table[k][b]) for k in range(len(hops_table)))
                            for b in range(nb)),
        distance_unreachable=tuple(int(x) for x in bad),
        examples=tuple(_examples(parts, results, N, want)),
        pieces=tuple(sorted((sts[0], n, len(sts)) for n, _, sts in parts)),
        layers=layers, shifts=shifts,
    )


def work(pattern, length: int, num_heads: int) -> tuple[int, int]:
    """``(block, classes)``: the longest piece the analysis runs on and its class count ``C``
    (the causal cost is about ``block * C * branches * depth``; see the module docstring)."""
    patterns, N, H, _ = _check_args(pattern, length, num_heads, True)
    layout, _, _ = _layouts(patterns, N)
    n, first, _ = max(_pieces(layout, N))
    lay = _local(layout, first)
    L = math.lcm(*(r for x in lay for (_, r, _) in x))
    starts = _cell_starts(n, lay)
    return n, int(np.minimum(np.diff(np.append(starts, n)), L).sum())


def max_hops(pattern, length: int, num_heads: int, causal: bool = True, *, layers: int | None = None) -> float:
    """Largest, over pairs, of the fewest layers carrying ``i`` to ``j``; ``math.inf`` if a pair
    has no path (see :func:`reach`; ``pattern`` may be a list of layer patterns, cycled)."""
    return reach(pattern, length, num_heads, causal, layers=layers, distance_edges=None, examples=0).max_hops


def unreachable_pairs(pattern, length: int, num_heads: int, causal: bool = True, *,
                      layers: int | None = None) -> int:
    """Pairs (causal: ``i <= j``) with no path through any number of layers, or through the first
    ``layers`` (see :func:`reach`; ``pattern`` may be a list of layer patterns, cycled)."""
    return reach(pattern, length, num_heads, causal, layers=layers, distance_edges=None,
                 examples=0).unreachable


def hops_from(pattern, length: int, num_heads: int, source: int, causal: bool = True, *,
              layers: int | None = None) -> np.ndarray:
    """Hops from ``source`` to every position: float array of length ``N``, ``inf`` where no path
    (causal: every ``j < source``)."""
    patterns, N, H, layers = _check_args(pattern, length, num_heads, causal, layers)
    source = _check_int("source", source, lo=0)
    if source >= N:
        raise ValueError(f"source must be < length={N}, got {source}")
    layout, cycle, _ = _layouts(patterns, N)
    offset, n, first = next((g0, n, first) for n, first, starts in _pieces(layout, N) for g0 in starts
                            if g0 <= source < g0 + n)
    blk = _block(n, _local(layout, first), H)
    i = source - offset
    out = np.full(N, np.inf)
    out[source] = 0.0
    pos = np.arange(n)
    cls = blk.class_of
    if causal:
        def on_new(hop, s, k, lo, hi):  # lo: a member of class k, so members step by L
            for a, z in zip(lo.tolist(), hi.tolist()):
                out[offset + np.arange(a, z, blk.L)] = hop

        _causal(blk, cycle, layers, np.array([i], dtype=np.int64), on_new)
    else:
        h = _class_hops(blk, cycle, layers)[cls[i]][cls]
        mask = (h > 0) & (pos != i)
        out[offset + pos[mask]] = h[mask]
    return out
