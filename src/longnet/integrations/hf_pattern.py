"""What the transformers integration's modules share: the pattern a config carries, and which
attention implementation names are longnet's dilated attention.

:mod:`longnet.integrations.transformers` (the attention and mask functions, registration) and
:mod:`longnet.integrations.hf_cache` (:class:`~longnet.integrations.hf_cache.DilatedCache`) both
import this module, and it imports neither, so the three form no import circle at any level.

The registered functions carry a mark (:data:`MARK`, set by
:mod:`longnet.integrations.transformers` on its attention and mask functions); :func:`registered_names`
finds the names under which both marked functions are registered, without importing them.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from longnet.ops.pattern import DilatedPattern

__all__ = ["MARK", "pattern_from_config", "registered_names", "is_dilated_implementation"]

MARK = "_longnet_dilated"
"""Attribute naming the role (``"attention"`` or ``"mask"``) of longnet's registered functions."""


def pattern_from_config(config) -> DilatedPattern:
    """The :class:`DilatedPattern` of a transformers config (``segment_lengths``, ``dilation_rates``).

    Raises ``ValueError`` naming the fields when they are missing.
    """
    w = getattr(config, "segment_lengths", None)
    r = getattr(config, "dilation_rates", None)
    if w is None or r is None:
        missing = [f for f, v in (("segment_lengths", w), ("dilation_rates", r)) if v is None]
        raise ValueError(
            f"dilated attention reads its pattern from the model config, which has no "
            f"{' / '.join('config.' + f for f in missing)}: set config.segment_lengths and "
            f"config.dilation_rates (e.g. config.segment_lengths = [2048, 4096]; "
            f"config.dilation_rates = [1, 2]) before using attn_implementation='dilated'")
    return DilatedPattern(w, r)


def is_dilated_implementation(name) -> bool:
    """True when ``name`` is an attention implementation under which longnet's dilated attention
    and its mask function are registered (:func:`longnet.hf.register`)."""
    if not isinstance(name, str):
        return False
    attention = AttentionInterface._global_mapping.get(name)
    mask = AttentionMaskInterface._global_mapping.get(name)
    return getattr(attention, MARK, None) == "attention" and getattr(mask, MARK, None) == "mask"


def registered_names() -> list[str]:
    """Names under which dilated attention is registered."""
    return sorted(k for k in AttentionInterface._global_mapping if is_dilated_implementation(k))
