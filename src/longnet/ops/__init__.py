"""The dilated attention operator: the pattern, its kernels and registered ops."""

from longnet.ops.dilated import (
    dilated_attention,
    dilated_attention_backward,
    dilated_attention_forward,
)
from longnet.ops.pattern import DilatedPattern

__all__ = [
    "DilatedPattern",
    "dilated_attention",
    "dilated_attention_forward",
    "dilated_attention_backward",
]
