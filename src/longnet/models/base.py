"""What the LM and the encoder share: the block stack, counting, FLOPs, save/load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longnet.models.blocks import LongNetBlock, magneto_init_
from longnet.models.checkpoint import load_weights, read_config, save_model
from longnet.models.config import LongNetConfig
from longnet.ops.pattern import DilatedPattern

__all__ = ["LongNetBase", "check_padding_mask", "check_token_ids"]


def check_padding_mask(mask: torch.Tensor | None, shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``mask`` is None or a bool (B, N) tensor (True = real)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(
            mask.shape) != tuple(shape):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise ValueError(f"key_padding_mask must be a bool tensor of shape {tuple(shape)} "
                         f"(True = real token), got {got}")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise ``ValueError`` naming the offending id and ``vocab_size`` unless every id of
    ``input_ids`` lies in ``[0, vocab_size)`` (an embedding lookup would fail deep in torch).

    Costs one reduction (``aminmax``) and one host sync (a GPU waits for it). Skipped while
    ``torch.compile`` / ``torch.export`` trace the model: a data-dependent check would break the
    graph, so compiled callers check their ids before the compiled call if they need to.
    """
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if high >= vocab_size:
        raise ValueError(f"{name} holds token id {high} (the largest), but the model's vocabulary has "
                         f"{vocab_size} ids (0 to {vocab_size - 1}): were the ids made by another "
                         "tokenizer?")
    if low < 0:
        raise ValueError(f"{name} holds token id {low} (the smallest); token ids lie in [0, {vocab_size}) "
                         "(the model's vocab_size)")


class LongNetBase(nn.Module):
    """A stack of :class:`LongNetBlock` with a final LayerNorm; subclasses add the ends.

    Subclasses set ``is_causal`` (class attribute), build their own input/output layers, and
    list tied parameter names in ``tied_keys``.
    """

    is_causal: bool = False

    def __init__(self, config: LongNetConfig):
        super().__init__()
        if not isinstance(config, LongNetConfig):
            raise TypeError(f"config must be a LongNetConfig, got {type(config).__name__}")
        self.config = config
        self.blocks = nn.ModuleList(
            LongNetBlock(config, is_causal=self.is_causal, layer=i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    @property
    def tied_keys(self) -> tuple[str, ...]:
        return ()

    def _init_weights(self) -> None:
        magneto_init_(self, self.config.gamma)

    # ------------------------------------------------------------------------------- trunk
    def _trunk(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
               position_offset: int) -> torch.Tensor:
        """Blocks and final norm over x (B, N, E); padded positions start from 0."""
        check_padding_mask(key_padding_mask, x.shape[:2])
        if key_padding_mask is not None:
            x = torch.where(key_padding_mask.unsqueeze(-1), x, torch.zeros_like(x))
        x = self.drop(x)
        use_ckpt = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, key_padding_mask, position_offset, use_reentrant=False)
            else:
                x = block(x, key_padding_mask, position_offset)
        return self.norm(x)

    # ---------------------------------------------------------------------------- counting
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each tied tensor counted once; ``exclude_embeddings`` leaves out the token
        embedding (and with it a tied LM head)."""
        seen: set[int] = set()
        total = 0
        skip = set()
        if exclude_embeddings:
            skip = {id(p) for m in self.modules() if isinstance(m, nn.Embedding)
                    for p in m.parameters()}
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def _matmul_params(self) -> int:
        """Weights that take part in a matmul per token (block linears, input projection, head)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

        ``6 * P`` for the matmul weights ``P`` (every linear of the blocks, the input projection,
        the LM head, tied or not: ``2 * P`` forward, ``4 * P`` backward), plus the attention
        matmuls of the pattern (:meth:`DilatedPattern.flops` with ``backward=True``: forward x 3.5
        in the FlashAttention convention, half the pairs when causal; dense attention counts all
        ``N^2`` pairs the same way) divided by ``seq_len``. Norms, activations and softmax are not
        counted. Use it for MFU: ``tokens_per_second * flops_per_token / peak_flops``.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        c = self.config
        kw = dict(is_causal=self.is_causal, backward=True)
        attn = sum(DilatedPattern.dense_flops(seq_len, c.head_dim, c.num_heads, **kw) if pattern is None
                   else pattern.flops(seq_len, c.head_dim, c.num_heads, **kw) for pattern in c.patterns())
        return 6.0 * self._matmul_params() + attn / seq_len

    # ------------------------------------------------------------------------------ files
    def _extra(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomically).

        ``state_dict``: weights to write instead of the module's own (e.g. the full weights
        gathered from FSDP2 shards)."""
        # the class that defines the model (a wrapper such as FSDP2 subclasses it)
        model_type = next(c for c in type(self).__mro__ if c.__module__.startswith("longnet.")).__name__
        return save_model(self, directory, model_type=model_type, config=self.config,
                          extra=self._extra(), tied=self.tied_keys, state_dict=state_dict)

    @classmethod
    def _from_config(cls, config: LongNetConfig, extra: dict[str, Any]):
        return cls(config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location="cpu", *, verify: bool = True):
        """Load a model written by :meth:`save_pretrained` (or a run folder, or one of its
        ``checkpoints/step-*``); raises :class:`CheckpointError`.

        Args:
            directory: the folder holding ``model.safetensors`` and ``config.json``.
            map_location: device to put the model on.
            verify: check the files against the folder's ``manifest.json`` when it has one (size
                and SHA-256) and refuse weights that are not finite, naming the file and the
                first bad tensor (:func:`longnet.models.checkpoint.verify_weights`). It costs
                one more read and SHA-256 of the files and one sum per tensor: loading the
                ``base`` preset (123.7M parameters, 495 MB) took 3.0 s instead of 2.3 s on one
                shared CPU thread with a manifest, 2.5 s without one (``small``: 0.39 / 0.26 /
                0.28 s; ``docs/design.md``, "Verified loads"). ``False`` skips both checks.
        """
        config, extra = read_config(directory, cls.__name__)
        model = cls._from_config(config, extra)
        load_weights(model, directory, model.tied_keys, verify=verify)
        return model.to(map_location)
