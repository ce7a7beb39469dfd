"""Analysis of dilated attention patterns, built on :mod:`longnet.ops` (which never imports it).

- :func:`reach`, :class:`ReachReport`: exact hop counts between every pair of positions through
  stacked layers (max hops, pairs no number of layers connects, hops against distance); the
  ``longnet reach`` command prints them.
- :func:`max_hops`, :func:`unreachable_pairs`, :func:`hops_from`: the single numbers.
- :func:`alternating_shift`: the layer patterns of ``LongNetConfig(shift_segments=True)``.
- :func:`work`, :func:`log2_edges`: the analysis's size, its distance buckets.
"""

from longnet.analysis.reach import (
    ReachReport,
    alternating_shift,
    hops_from,
    log2_edges,
    max_hops,
    reach,
    unreachable_pairs,
    work,
)

__all__ = ["ReachReport", "reach", "max_hops", "unreachable_pairs", "hops_from", "log2_edges", "work",
           "alternating_shift"]
