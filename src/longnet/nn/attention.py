"""Parameter-free module around :func:`longnet.dilated_attention`."""

from __future__ import annotations

import torch
from torch import nn

from longnet.ops.dilated import dilated_attention
from longnet.ops.pattern import DilatedPattern

__all__ = ["DilatedAttention"]


class DilatedAttention(nn.Module):
    """Dilated attention as a module: ``forward(query, key, value, ...)`` like SDPA.

    Args:
        segment_lengths, dilation_rates: the pattern's branches (validated here, once).
        is_causal: default causality, overridable per call.
        dropout: attention dropout probability, applied in training mode only.
        scale: score scale, default ``1 / sqrt(head_dim)``.
        backend: kernel family, see :func:`longnet.dilated_attention`.
    """

    def __init__(self, segment_lengths, dilation_rates=None, *, is_causal: bool = False,
                 dropout: float = 0.0, scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.is_causal = bool(is_causal)
        self.dropout = float(dropout)
        self.scale = scale
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None,
                enable_gqa: bool = False, return_lse: bool = False):
        return dilated_attention(
            query, key, value, segment_lengths=self.pattern, is_causal=(
                self.is_causal if is_causal is None else is_causal),
            scale=self.scale, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=enable_gqa,
            return_lse=return_lse, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.pattern!r}, is_causal={self.is_causal}, dropout={self.dropout}"
