"""LongNet encoder over sequences of embeddings (slides of tiles, image patches, documents)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from longnet.models.base import LongNetBase, check_padding_mask
from longnet.models.checkpoint import CheckpointError
from longnet.models.config import LongNetConfig

__all__ = ["LongNetEncoder"]


class LongNetEncoder(LongNetBase):
    """Bidirectional LongNet blocks over input embeddings (B, N, input_dim).

    Args:
        config: the blocks' configuration (``vocab_size`` is unused). ``position="xpos"`` is
            refused: XPos's decay is defined for causal attention (for a key after the query it
            grows with distance); use ``"rope"``, or ``"none"`` with positions in the inputs.
        input_dim: width of the inputs; a linear projection to ``embed_dim`` when it differs
            (default ``embed_dim``: no projection).

    With a ``key_padding_mask`` real positions never read padded ones, so sequences of different
    lengths batch together: outputs at real positions equal those of the unpadded sequence.
    """

    is_causal = False

    def __init__(self, config: LongNetConfig, input_dim: int | None = None):
        if config.position == "xpos":
            raise ValueError("LongNetConfig.position 'xpos' is for causal models; use 'rope' or "
                             "'none' for LongNetEncoder")
        if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(
                input_dim, int) or input_dim < 1):
            raise ValueError(f"input_dim must be a positive int or None, got {input_dim!r}")
        super().__init__(config)
        self.input_dim = config.embed_dim if input_dim is None else input_dim
        self.input_proj = (nn.Linear(self.input_dim, config.embed_dim)
                           if self.input_dim != config.embed_dim else None)
        self._init_weights()
        if self.input_proj is not None:
            torch.nn.init.xavier_uniform_(self.input_proj.weight)

    def _extra(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim}

    @classmethod
    def _from_config(cls, config: LongNetConfig, extra: dict[str, Any]):
        unknown = sorted(set(extra) - {"input_dim"})
        if unknown:
            raise CheckpointError(f"config.json: unknown encoder settings {unknown}")
        try:
            return cls(config, input_dim=extra.get("input_dim"))
        except ValueError as err:
            raise CheckpointError(f"config.json: {err}") from err

    def forward(self, embeddings: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                return_pooled: bool = False):
        """Encode ``embeddings`` (B, N, input_dim).

        Args:
            key_padding_mask: (B, N) bool, True = real position. Padded positions are ignored by
                every real one; their outputs are unspecified (finite).
            return_pooled: also return the masked mean over real positions (B, embed_dim).

        Returns:
            (B, N, embed_dim), or ``(hidden, pooled)`` with ``return_pooled``.
        """
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.input_dim:
            raise ValueError(f"embeddings must be (batch, length, {self.input_dim}), "
                             f"got {tuple(embeddings.shape)}")
        check_padding_mask(key_padding_mask, embeddings.shape[:2])
        x = embeddings
        if key_padding_mask is not None:  # NaN/inf in padding must not reach the projection
            x = torch.where(key_padding_mask.unsqueeze(-1), x, torch.zeros_like(x))
        if self.input_proj is not None:
            x = self.input_proj(x)  # (B, N, E)
        h = self._trunk(x, key_padding_mask, 0)
        if not return_pooled:
            return h
        if key_padding_mask is None:
            return h, h.mean(dim=1)
        real = key_padding_mask.unsqueeze(-1)  # (B, N, 1)
        total = torch.where(real, h, torch.zeros_like(h)).sum(1)  # (B, E)
        pooled = total / real.sum(1).clamp(min=1).to(h.dtype)
        return h, pooled
