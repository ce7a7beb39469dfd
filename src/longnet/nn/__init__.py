"""Modules with (or around) parameters: attention modules, norms, positions."""

from longnet.nn.attention import DilatedAttention
from longnet.nn.multihead import MultiheadDilatedAttention
from longnet.nn.positions import NoPositions, RotaryPositions, XPosPositions

__all__ = ["DilatedAttention", "MultiheadDilatedAttention", "RotaryPositions", "XPosPositions",
           "NoPositions"]
