"""LongNet decoder-only language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longnet.models.base import LongNetBase, check_token_ids
from longnet.models.cache import make_cache as _make_cache
from longnet.models.config import LongNetConfig
from longnet.models.generation import generate as _generate

__all__ = ["LongNetLM", "LMOutput"]

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """Output of :meth:`LongNetLM.forward`.

    Attributes:
        logits: (B, N, vocab_size), in the compute dtype.
        loss: mean next-token cross-entropy over the counted targets (float32 scalar), or
            ``None`` without labels.
        num_tokens: how many targets the loss averages over (0-d long tensor), or ``None``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


# a pytree node, so that torch.export / torch.compile outputs may hold it
torch.export.register_dataclass(LMOutput, serialized_type_name="longnet.LMOutput")


class LongNetLM(LongNetBase):
    """Token embedding, causal LongNet blocks, final LayerNorm, LM head (tied by default).

    No position reads a later one, in any branch and across every segment boundary.
    """

    is_causal = True

    def __init__(self, config: LongNetConfig):
        if config.vocab_size is None:
            raise ValueError("LongNetConfig.vocab_size must be set for a language model, got None")
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.embed_dim ** -0.5)

    @property
    def tied_keys(self) -> tuple[str, ...]:
        return ("lm_head.weight",) if self.config.tie_embeddings else ()

    # generation (longnet.models.generation / .cache): a bounded dilated KV cache, decoding
    make_cache = _make_cache
    generate = _generate

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                position_offset: int = 0) -> LMOutput:
        """Logits, and the loss when ``labels`` are given.

        Args:
            input_ids: (B, N) long token ids.
            labels: (B, N) long, ALREADY ALIGNED with ``input_ids``: ``labels[:, t]`` is the
                target predicted at position ``t`` (normally ``input_ids[:, t + 1]``; the caller
                shifts). Targets equal to -100 are ignored, and so is every position where
                ``key_padding_mask`` is False.
            key_padding_mask: (B, N) bool, True = real token; padded keys are never read.
            position_offset: absolute position of ``input_ids[:, 0]`` (continuing a sequence).

        Raises:
            ValueError: ``input_ids`` of another shape or dtype, or ids outside
                ``[0, vocab_size)`` (:func:`~longnet.models.base.check_token_ids`, one reduction;
                not checked inside ``torch.compile``).

        Returns:
            :class:`LMOutput`: ``logits`` (B, N, vocab_size); ``loss`` the mean cross-entropy over
            the counted targets, computed in float32 (0 with a zero gradient when none count);
            ``num_tokens`` how many counted.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be (batch, length) int64/int32, got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.vocab_size)
        x = self.embed(input_ids)  # (B, N, E)
        h = self._trunk(x, key_padding_mask, position_offset)
        logits = self.lm_head(h)  # (B, N, V)
        if labels is None:
            return LMOutput(logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        labels = labels.long()
        if key_padding_mask is not None:
            labels = labels.masked_fill(~key_padding_mask, IGNORE_INDEX)
        counted = labels != IGNORE_INDEX
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="none")
        n = counted.sum()
        loss = per_token.sum() / n.clamp(min=1)
        return LMOutput(logits, loss, n)
