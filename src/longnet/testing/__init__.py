"""Simple references the tests compare longnet's fast paths against. Not for real work.

- :func:`reference_dilated_attention`, :func:`count_matrix`: dense dilated attention (one softmax
  over a count-weighted ``N x N`` score matrix), run in float64; ``O(N^2)`` memory and time.
- :class:`DilatedLayerCache`: a second, independent bounded generation cache, compared with the
  slot cache that generation uses (:class:`longnet.models.cache.SlotLayerCache`).
"""

from longnet.testing.reference import count_matrix, reference_dilated_attention
from longnet.testing.reference_cache import DilatedLayerCache

__all__ = ["reference_dilated_attention", "count_matrix", "DilatedLayerCache"]
