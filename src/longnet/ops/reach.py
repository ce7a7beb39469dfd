"""Reach of dilated attention: how many layers carry token ``i``'s information to position ``j``.

Definitions (the pattern's rules are in :mod:`longnet.ops.pattern`):

- **One layer.** Position ``j`` reads position ``i`` when some head keeps both in the same
  segment of some branch; causal attention also needs ``i <= j``. Head ``h`` keeps the offset
  ``h % r`` of a branch with rate ``r``, so the heads together keep the offsets
  ``0 .. min(H, r) - 1`` of it: with ``H < r`` the other residues of that branch are read by no one.
- **Layers.** Heads mix through the output projection, so consecutive layers may use different
  heads, and the residual stream keeps what a position holds. ``hops(i, j)`` is the fewest
  layers that carry ``i`` to ``j``: the shortest-path length from ``i`` to ``j`` in the
  one-layer graph. ``hops(i, i) = 0``.
- **Pairs.** Causal: the ``N (N + 1) / 2`` ordered pairs ``i <= j``; non-causal: all ``N^2``
  ordered pairs. The diagonal counts in both, as pairs reached in 0 hops, so that
  ``pairs = reached + unreachable`` always. ``max_hops`` is the largest ``hops`` over the pairs,
  ``math.inf`` if any pair has no path; ``unreachable_pairs`` counts the pairs with no path.

Method (exact; no ``N x N`` matrix):

1. **Blocks.** Let ``M = lcm(min(w_b, N))`` over the branches. A multiple of ``M`` is a segment
   boundary of every branch, so no edge crosses it: the positions split into ``N // M`` identical
   blocks of length ``M`` and a shorter tail (the same pattern at length ``N mod M``), and pairs
   in different blocks are unreachable (non-causal too). Each distinct block is analysed once and
   its counts are multiplied. For the paper's pattern ``M = 32768`` for every ``N >= 32768``.
2. **Classes.** Inside a block, cut at every segment boundary of every branch into *cells*.
   Within a cell, which groups ``(branch, segment, kept offset)`` a position belongs to depends
   only on its offset mod ``L = lcm(r_b)``, so a cell splits into at most ``L`` *classes*,
   arithmetic progressions of step ``L`` whose members are interchangeable. ``C``, the number of
   classes, is at most ``L`` times the number of cells (paper pattern: 16 cells x 12 = 192).
3. **Non-causal.** Two classes are adjacent when they share a group; ``hops(i, j)`` is the
   breadth-first distance between their classes (1 between two members of one class that lies in
   some group). One BFS per class: ``O(C^3)`` with boolean matrix products.
4. **Causal.** Paths only move forward, so for a source ``i`` the positions of a class reached
   within ``k`` layers are a *suffix* of the class: the state is one threshold per class. One
   layer maps thresholds ``t`` to ``t'_K = first member of K >= min over groups G containing K of
   (earliest reached position in G)``. The sources of a block are processed in vectorised
   chunks; each layer costs ``O(C * branches)`` per source, and the positions first reached at
   layer ``k`` are counted per distance bucket in closed form (members of a progression in an
   interval).

Cost: non-causal ``O(C^3 + M * C * buckets)``; causal ``O(M * C * (branches * depth + buckets))``
with ``depth`` the largest finite hop count. Paper pattern, 12 heads: ``M = 32768``, ``C = 192``,
depth 3, a few seconds at any ``N`` on 2 CPU cores (docs/reach.md). Exact at every ``N``, but
fast only while the block ``M`` and the class count ``C`` stay small: nested segment lengths
(each dividing the next, as in the paper and the presets) keep ``M = max w``. Segment lengths
with a large lcm (for example the Gigapath slide pattern, ``M >= N``) leave one block of ``N``
tokens with ``C ~ N / min(w) * L`` classes, and the causal cost grows like ``N^2 * L / min(w)``:
16 s at ``N = 2^15``, minutes at ``2^17``, hours at ``2^20``. Sources of one class inside one
cell see translated thresholds, which a faster method could exploit; this module does not, so
for such patterns analyse a shorter ``N``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["ReachReport", "reach", "max_hops", "unreachable_pairs", "hops_from", "log2_edges", "work"]

_INF = np.int64(1 << 61)  # "not reached"; far above any position, no overflow when adding L
_CHUNK = 1024  # sources processed together (memory ~ _CHUNK * C * 8 bytes per array)


# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ReachReport:
    """Hop counts of every pair of a pattern at one length and head count.

    Attributes:
        length: sequence length ``N``.
        num_heads: heads ``H``.
        causal: whether only pairs ``i <= j`` (and forward paths) count.
        block: length ``M`` of the independent blocks (``N`` when the sequence is one block).
        pairs: pairs considered (``N (N + 1) / 2`` causal, ``N^2`` non-causal, diagonal included).
        unreachable: pairs with no path.
        hop_counts: ``hop_counts[k]`` pairs reached in exactly ``k`` layers (``k = 0``: diagonal).
        distance_edges: lower bounds of the distance buckets ``|j - i|``, starting at 0; bucket
            ``b`` covers ``[edges[b], edges[b + 1])``, the last one up to ``N - 1``.
        distance_hops: per bucket, pairs reached in exactly ``k`` layers, ``k = 0 ..``.
        distance_unreachable: per bucket, pairs with no path.
        examples: unreachable pairs ``(i, j)``, ``i < j``: for each source ``i`` its nearest
            unreachable ``j``, ordered by ``(j - i, i)``, the first few.
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
            "block": self.block, "pairs": self.pairs, "unreachable_pairs": self.unreachable,
            "unreachable_fraction": self.unreachable_fraction,
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


def _check_args(pattern, length, num_heads, causal):
    from longnet.ops.pattern import DilatedPattern

    if not isinstance(pattern, DilatedPattern):
        raise TypeError(f"pattern must be a DilatedPattern, got {type(pattern).__name__}")
    length = _check_int("length", length)
    num_heads = _check_int("num_heads", num_heads)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return length, num_heads


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


# ---------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class _Block:
    """Classes of one block of length ``n``: arithmetic progressions ``first + L * m <= last``."""

    n: int
    L: int
    first: np.ndarray  # (C,)
    last: np.ndarray  # (C,)
    class_of: np.ndarray  # (n,) class of every position
    groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # per branch: cols, starts, back
    incidence: np.ndarray  # (C, G) bool: class in group

    @property
    def num_classes(self) -> int:
        return len(self.first)


def _block(n: int, segments: Sequence[int], rates: Sequence[int], num_heads: int) -> _Block:
    """Cells, classes and group membership of positions ``[0, n)``; segments ``[s w, (s+1) w)``."""
    L = math.lcm(*rates)
    starts = np.unique(np.concatenate([np.arange(0, n, w, dtype=np.int64) for w in segments]))
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
    groups, columns = [], []
    for w, r in zip(segments, rates):
        seg = starts[cell] // w
        rel = (first - seg * w) % r
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
    incidence = np.concatenate(columns, axis=1)
    return _Block(n, L, first, last, class_of, tuple(groups), incidence)


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
    """Pairs ``i < j`` per (hop, distance bucket) and per-bucket totals, for one block."""

    def __init__(self, edges: np.ndarray, n: int):
        self.lo = np.maximum(edges, 1)
        self.hi = np.append(edges[1:], max(n, 1))
        self.rows: list[np.ndarray] = [np.zeros(len(edges), dtype=np.int64)]  # index = hop

    def add(self, hop: int, src: np.ndarray, first: np.ndarray, L: int, lo: np.ndarray,
            hi: np.ndarray) -> None:
        """Members of progressions ``first + L m`` in ``[lo, hi)``, all at ``hop`` from ``src``."""
        while len(self.rows) <= hop:
            self.rows.append(np.zeros(len(self.lo), dtype=np.int64))
        row = self.rows[hop]
        for b in range(len(self.lo)):
            a = np.maximum(lo, src + self.lo[b])
            z = np.minimum(hi, src + self.hi[b])
            row[b] += int(_members(first, L, a, z).sum())


def _propagate(T: np.ndarray, blk: _Block) -> np.ndarray:
    """For each class, the earliest reached position over the groups that contain it."""
    x = np.full_like(T, _INF)
    for cols, starts, back in blk.groups:
        if len(cols) == 0:
            continue
        m = np.minimum.reduceat(T[:, cols], starts, axis=1)
        x[:, cols] = np.minimum(x[:, cols], m[:, back])
    return x


def _causal_chunk(blk: _Block, src: np.ndarray, tally: _Tally | None):
    """Run forward paths from ``src`` to their fixed point; return final thresholds (S, C).

    ``D[s, K]`` is the first member ``> src[s]`` of class ``K`` reached so far (members after it
    are reached too); ``_INF`` when none is.
    """
    S = len(src)
    rows = np.arange(S)
    k0 = blk.class_of[src]
    first, last, L = blk.first[None, :], blk.last[None, :], blk.L
    D = np.full((S, blk.num_classes), _INF, dtype=np.int64)
    after = src[:, None] + 1
    hop = 0
    while True:
        T = D.copy()
        T[rows, k0] = src
        E = _ceil(np.maximum(_propagate(T, blk), after), first, last, L)
        changed = E < D
        if not changed.any():
            return D
        hop += 1
        if tally is not None:
            s, k = np.nonzero(changed)
            tally.add(hop, src[s], blk.first[k], L, E[s, k], np.minimum(D[s, k], blk.last[k] + 1))
        D = np.minimum(D, E)


def _class_hops(blk: _Block) -> np.ndarray:
    """Non-causal: hops between members of two classes (``-1``: none); the diagonal entry is for
    two different members of one class."""
    C = blk.num_classes
    adj = (blk.incidence.astype(np.float32) @ blk.incidence.T.astype(np.float32)) > 0
    adjf = adj.astype(np.float32)
    dist = np.full((C, C), -1, dtype=np.int64)
    reached = np.eye(C, dtype=bool)
    frontier = reached.copy()
    level = 0
    while frontier.any():
        level += 1
        nxt = (frontier.astype(np.float32) @ adjf) > 0
        new = nxt & ~reached
        dist[new] = level
        reached |= nxt
        frontier = new
    np.fill_diagonal(dist, np.where(np.diag(adj), 1, -1))
    return dist


# ---------------------------------------------------------------------------------- one block
@dataclass
class _BlockResult:
    rows: list[np.ndarray]  # pairs i < j per hop (index >= 1) and bucket
    reached_by_bucket: np.ndarray  # pairs i < j with a path, per bucket
    nearest: np.ndarray  # (n,) nearest unreachable j > i inside the block, _INF if none


def _analyse_block(blk: _Block, causal: bool, edges: np.ndarray,
                   progress: Callable[[int], None] | None) -> _BlockResult:
    tally = _Tally(edges, blk.n)
    nearest = np.full(blk.n, _INF, dtype=np.int64)
    class_hops = None if causal else _class_hops(blk)
    first, last, L = blk.first[None, :], blk.last[None, :], blk.L
    for start in range(0, blk.n, _CHUNK):
        src = np.arange(start, min(start + _CHUNK, blk.n), dtype=np.int64)
        nxt = _ceil(src[:, None] + 1, first, last, L)  # first member > i of every class
        if causal:
            D = _causal_chunk(blk, src, tally)
            missing = nxt < D
        else:
            h = class_hops[blk.class_of[src]]  # (S, C)
            for hop in np.unique(h[h > 0]):
                s, k = np.nonzero(h == hop)
                tally.add(int(hop), src[s], blk.first[k], L, nxt[s, k], blk.last[k] + 1)
            missing = (h < 0) & (nxt < _INF)
        nearest[src] = np.where(missing, nxt, _INF).min(axis=1)
        if progress is not None:
            progress(len(src))
    rows = tally.rows
    reached = np.sum(rows[1:], axis=0) if len(rows) > 1 else np.zeros_like(rows[0])
    return _BlockResult(rows, reached, nearest)


def _examples(parts, results, want: int) -> list[tuple[int, int]]:
    """Each source's nearest unreachable target (inside its block, or the next block's first
    position), ordered by ``(distance, source)``; the first ``want``."""
    if want == 0:
        return []
    cands = []
    for (n, copies, offset), res in zip(parts, results):
        i = np.arange(n, dtype=np.int64)
        inside = res.nearest - i  # huge where none
        with_next = copies - 1 + (1 if len(parts) > 1 and offset == 0 else 0)
        for c in range(copies):
            d = np.minimum(inside, n - i) if c < with_next else inside
            if c >= want and c < with_next:  # later copies only repeat larger sources
                continue
            keep = np.flatnonzero(d < _INF // 2)
            order = np.lexsort((keep, d[keep]))[:want]
            g = offset + c * n + keep[order]
            cands += [(int(dd), int(gi), int(gi + dd)) for dd, gi in zip(d[keep][order], g)]
    return [(i, j) for _, i, j in sorted(cands)[:want]]


def _pairs_at_distance(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``sum_{d=lo}^{hi-1} max(0, n - d)``: pairs ``i < j`` of ``[0, n)`` at distance in [lo, hi)."""
    a = np.minimum(lo, n)
    b = np.minimum(hi, n)
    # sum_{d=a}^{b-1} (n - d)
    return np.where(b > a, (b - a) * n - (b * (b - 1) - a * (a - 1)) // 2, 0)


# ---------------------------------------------------------------------------------- public
def reach(pattern, length: int, num_heads: int, causal: bool = True, *, distance_edges="log2",
          examples: int = 5, progress: Callable[[int, int], None] | None = None) -> ReachReport:
    """Exact hop counts of all pairs of ``pattern`` at ``length`` with ``num_heads`` heads.

    Args:
        pattern: a :class:`~longnet.ops.pattern.DilatedPattern`.
        length: sequence length ``N``.
        num_heads: heads ``H`` (head ``h`` keeps offset ``h % r`` of each branch).
        causal: count pairs ``i <= j`` along forward paths only (a causal LM), else all pairs.
        distance_edges: ``"log2"`` (buckets 0, 1, 2-3, 4-7, ...), ``None`` (one bucket for the
            diagonal, one for the rest) or increasing ints starting at 0, below ``length``.
        examples: how many unreachable pairs to return.
        progress: called as ``progress(done, total)`` with the sources processed so far.

    Returns:
        :class:`ReachReport`. See the module docstring for the definitions and the method.
    """
    N, H = _check_args(pattern, length, num_heads, causal)
    want = _check_int("examples", examples, lo=0)
    edges = _check_edges(distance_edges, N)
    segments = [pattern.effective_segment(b, N) for b in range(len(pattern))]
    rates = list(pattern.dilation_rates)
    M = math.lcm(*segments)
    parts = [(N, 1, 0)] if M >= N else [(M, N // M, 0)] + ([(N % M, 1, N - N % M)] if N % M else [])
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
    for n, copies, _ in parts:
        res = _analyse_block(_block(n, segments, rates, H), causal, edges, tick)
        results.append(res)
        for hop, row in enumerate(res.rows):
            while len(rows) <= hop:
                rows.append(np.zeros(nb, dtype=np.int64))
            rows[hop] += copies * row
        reached += copies * res.reached_by_bucket
    lo = np.maximum(edges, 1)
    hi = np.append(edges[1:], N)
    all_pairs = _pairs_at_distance(N, lo, hi)  # pairs i < j per bucket
    mult = 1 if causal else 2  # non-causal: (i, j) and (j, i) have the same hops
    hops_table = [mult * r for r in rows]
    hops_table[0][0] = N  # the diagonal, 0 hops
    bad = mult * (all_pairs - reached)
    while len(hops_table) > 1 and not hops_table[-1].any():
        hops_table.pop()
    pairs = N * (N + 1) // 2 if causal else N * N
    return ReachReport(
        length=N, num_heads=H, causal=causal, block=min(M, N), pairs=pairs,
        unreachable=int(bad.sum()),
        hop_counts=tuple(int(r.sum()) for r in hops_table),
        distance_edges=tuple(int(e) for e in edges),
        distance_hops=tuple(tuple(int(hops_table[k][b]) for k in range(len(hops_table)))
                            for b in range(nb)),
        distance_unreachable=tuple(int(x) for x in bad),
        examples=tuple(_examples(parts, results, want)),
    )


def work(pattern, length: int, num_heads: int) -> tuple[int, int]:
    """``(block, classes)``: the block length ``M`` the analysis runs on and its class count ``C``
    (the causal cost is about ``M * C * branches * depth``; see the module docstring)."""
    N, H = _check_args(pattern, length, num_heads, True)
    segments = [pattern.effective_segment(b, N) for b in range(len(pattern))]
    M = min(math.lcm(*segments), N)
    L = math.lcm(*pattern.dilation_rates)
    starts = np.unique(np.concatenate([np.arange(0, M, w, dtype=np.int64) for w in segments]))
    return M, int(np.minimum(np.diff(np.append(starts, M)), L).sum())


def max_hops(pattern, length: int, num_heads: int, causal: bool = True) -> float:
    """Largest, over pairs, of the fewest layers carrying ``i`` to ``j``; ``math.inf`` if a pair
    has no path (see :func:`reach`)."""
    r = reach(pattern, length, num_heads, causal, distance_edges=None, examples=0)
    return r.max_hops


def unreachable_pairs(pattern, length: int, num_heads: int, causal: bool = True) -> int:
    """Pairs (causal: ``i <= j``) with no path through any number of layers (see :func:`reach`)."""
    return reach(pattern, length, num_heads, causal, distance_edges=None, examples=0).unreachable


def hops_from(pattern, length: int, num_heads: int, source: int, causal: bool = True) -> np.ndarray:
    """Hops from ``source`` to every position: float array of length ``N``, ``inf`` where no path
    (causal: every ``j < source``)."""
    N, H = _check_args(pattern, length, num_heads, causal)
    source = _check_int("source", source, lo=0)
    if source >= N:
        raise ValueError(f"source must be < length={N}, got {source}")
    segments = [pattern.effective_segment(b, N) for b in range(len(pattern))]
    M = math.lcm(*segments)
    offset = 0 if M >= N else source // M * M
    n = N - offset if M >= N or N - offset < M else M
    blk = _block(n, segments, list(pattern.dilation_rates), H)
    i = source - offset
    out = np.full(N, np.inf)
    out[source] = 0.0
    pos = np.arange(n)
    cls = blk.class_of
    if causal:
        src = np.array([i], dtype=np.int64)
        rows = np.arange(1)
        D = np.full((1, blk.num_classes), _INF, dtype=np.int64)
        hop = 0
        while True:
            T = D.copy()
            T[rows, cls[src]] = src
            E = _ceil(np.maximum(_propagate(T, blk), i + 1), blk.first[None], blk.last[None], blk.L)
            if not (E < D).any():
                break
            hop += 1
            new = (pos >= E[0][cls]) & (pos < D[0][cls]) & (pos > i)
            out[offset + pos[new]] = hop
            D = np.minimum(D, E)
    else:
        h = _class_hops(blk)[cls[i]][cls]
        mask = (h > 0) & (pos != i)
        out[offset + pos[mask]] = h[mask]
    return out
