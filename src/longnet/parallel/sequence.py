"""Sequence parallelism applied to a model from outside (as torchtitan's ``parallelize``).

Model code is single-device: each :class:`~longnet.nn.MultiheadDilatedAttention` calls its
``attention_fn`` (``None``: :func:`longnet.dilated_attention`) and offsets its positions by
``sequence_rank * local_length`` (0 by default). :func:`parallelize_sequence` sets both on every
attention module of a model, once, so a forward reads two plain attributes and nothing else::

    model = parallelize_sequence(model, group)   # in place; returns model
    logits = model(tokens_chunk)                 # (B, n): every attention call is sequence parallel

:func:`sequence_parallel` does the same for the duration of a ``with`` block and restores the
single-device setting afterwards.

Hugging Face models work the same way: an :class:`~longnet.integrations.hf_train.HFCausalLM`, or a
transformers model with ``attn_implementation="dilated"``, gets ``longnet_attention_fn`` and
``longnet_sequence_rank`` on every attention module and ``sequence_rank`` on the adapter (which
then passes the chunk's global ``position_ids``); see :mod:`longnet.integrations.hf_parallel`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch.distributed as dist
from torch import nn

__all__ = ["parallelize_sequence", "unparallelize_sequence", "sequence_parallel"]


def _targets(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """What sequence parallelism sets: LongNet attention modules, transformers attention modules,
    and the :class:`~longnet.integrations.hf_train.HFCausalLM` adapters owning positions."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hf_attention, owners = [], []
    if "transformers" in sys.modules:  # a transformers model exists only once transformers is imported
        from longnet.integrations.hf_parallel import sequence_parallel_targets

        hf_attention, owners = sequence_parallel_targets(model)
    longnet_attention = _attention_modules(model, required=not hf_attention)
    return longnet_attention, hf_attention, owners


def _attention_modules(model: nn.Module, required: bool = True) -> list[nn.Module]:
    from longnet.nn.multihead import MultiheadDilatedAttention

    mods = [m for m in model.modules() if isinstance(m, MultiheadDilatedAttention)]
    if not mods and required:
        raise ValueError(f"model ({type(model).__name__}) has no MultiheadDilatedAttention (nor a "
                         "transformers model with dilated attention) to make sequence parallel")
    dense = [name for name, m in model.named_modules() if m in mods and m.dense]
    if dense:
        raise ValueError(f"dense attention cannot run sequence-parallel (modules {dense[:3]}); use "
                         "attention='dilated' (a single branch (N, 1) is dense attention)")
    compat = [name for name, m in model.named_modules() if m in mods and m.semantics != "paper"]
    if compat:
        raise ValueError(f"torchscale semantics cannot run sequence-parallel (modules {compat[:3]})")
    shifted = [name for name, m in model.named_modules() if m in mods and m.pattern.shift]
    if shifted:
        raise ValueError(f"shifted segments cannot run sequence-parallel (modules {shifted[:3]}); "
                         "use a model without LongNetConfig.shift_segments")
    return mods


def _bound_attention(group, check_chunks: bool) -> Callable:
    """The sequence-parallel operator over ``group`` with :func:`longnet.dilated_attention`'s
    signature (dropout and ``return_lse`` refused). The model holds ``group`` weakly
    (:class:`~longnet.parallel.comm.GroupRef`): it never outlives ``destroy_process_group``."""
    from longnet.parallel.attention import dilated_attention
    from longnet.parallel.comm import GroupRef

    ref = GroupRef(group)

    def attention(query, key, value, *, segment_lengths, dilation_rates=None, is_causal=False,
                  scale=None, key_padding_mask=None, dropout_p=0.0, enable_gqa=False,
                  return_lse=False, backend="auto"):
        if dropout_p:
            raise ValueError("attention dropout is not supported under sequence parallelism "
                             f"(dropout_p={dropout_p}); use dropout_p=0")
        if return_lse:
            raise ValueError("return_lse is not supported under sequence parallelism")
        return dilated_attention(query, key, value, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, is_causal=is_causal, scale=scale,
                                 key_padding_mask=key_padding_mask, enable_gqa=enable_gqa,
                                 group=ref.get(), backend=backend, check_chunks=check_chunks)

    return attention


def _set(model: nn.Module, fn: Callable | None, rank: int) -> None:
    longnet_attention, hf_attention, owners = _targets(model)
    for m in longnet_attention:
        m.attention_fn, m.sequence_rank = fn, rank
    for m in hf_attention:
        m.longnet_attention_fn, m.longnet_sequence_rank = fn, rank
    for m in owners:
        m.sequence_rank = rank


def parallelize_sequence(model: nn.Module, group=None, *, check_chunks: bool = True) -> nn.Module:
    """Make every dilated attention of ``model`` sequence parallel over ``group`` (in place).

    Rank ``i`` of ``group`` then passes positions ``[i*n, (i+1)*n)`` of each sequence; attention is
    exact across ranks and positions (XPos/RoPE) are this chunk's global ones. ``group`` defaults to
    the world; ``torch.distributed`` must be initialised. Returns ``model``.

    ``model`` holds LongNet attention (:class:`~longnet.nn.MultiheadDilatedAttention`) or a Hugging
    Face causal LM with dilated attention: an :class:`~longnet.integrations.hf_train.HFCausalLM`
    (which offsets its positions itself), or a transformers model with
    ``attn_implementation="dilated"`` (whose caller passes ``position_ids = i*n + arange(n)``).
    Refused with ``ValueError``: dense or torchscale-semantics LongNet attention, shifted segments,
    transformers attention that is not the dilated one or has dropout; at forward time, a padding
    mask or a KV cache on a transformers model.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallelize_sequence needs an initialised torch.distributed "
                           "(longnet.parallel.init_distributed)")
    rank = dist.get_rank(dist.group.WORLD if group is None else group)
    if rank < 0:
        raise ValueError("this rank is not a member of group")
    fn = _bound_attention(group, bool(check_chunks))  # None: the default group at each call
    _set(model, fn, rank)
    return model


def unparallelize_sequence(model: nn.Module) -> nn.Module:
    """Undo :func:`parallelize_sequence`: single-device attention and positions again."""
    _set(model, None, 0)
    return model


@contextlib.contextmanager
def sequence_parallel(model: nn.Module, group=None, *, check_chunks: bool = True
                      ) -> Iterator[nn.Module]:
    """:func:`parallelize_sequence` inside the block, :func:`unparallelize_sequence` after it."""
    parallelize_sequence(model, group, check_chunks=check_chunks)
    try:
        yield model
    finally:
        unparallelize_sequence(model)
