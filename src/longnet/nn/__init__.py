"""Modules with (or around) parameters: attention modules, norms, positions."""

from longnet.nn.attention import DilatedAttention

__all__ = ["DilatedAttention"]
