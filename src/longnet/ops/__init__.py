"""The dilated attention operator: pattern, kernels, reference."""

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
