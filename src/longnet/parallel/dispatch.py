"""The one point where single-device model code meets sequence parallelism.

Model code calls :func:`attention_function` instead of importing an operator, and
:func:`position_offset` where it builds positions (rotary/XPos, causal ids). Outside
:func:`sequence_parallel` they return :func:`longnet.dilated_attention` and 0; inside, the
sequence-parallel operator bound to the group and this rank's chunk start::

    with longnet.parallel.sequence_parallel(group):
        logits = model(tokens_chunk)  # (B, n) -> every attention call is sequence parallel
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch.distributed as dist

from longnet.ops.dilated import dilated_attention as _single_device

__all__ = ["SequenceParallelState", "sequence_parallel", "current", "attention_function",
           "position_offset"]


@dataclass(frozen=True)
class SequenceParallelState:
    """The active sequence-parallel group: ``rank`` of ``world`` ranks, in ``group``."""

    group: object
    rank: int
    world: int
    check_chunks: bool


_active: contextvars.ContextVar[SequenceParallelState | None] = contextvars.ContextVar(
    "longnet_sequence_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(group=None, *, check_chunks: bool = True
                      ) -> Iterator[SequenceParallelState]:
    """Make :func:`attention_function` return the sequence-parallel operator over ``group``.

    ``group`` defaults to the world; ``torch.distributed`` must be initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sequence_parallel needs an initialised torch.distributed "
                           "(longnet.parallel.init_distributed)")
    group = dist.group.WORLD if group is None else group
    state = SequenceParallelState(group, dist.get_rank(group), dist.get_world_size(group),
                                  bool(check_chunks))
    token = _active.set(state)
    try:
        yield state
    finally:
        _active.reset(token)


def current() -> SequenceParallelState | None:
    """The active state, or ``None`` outside :func:`sequence_parallel`."""
    return _active.get()


def attention_function() -> Callable:
    """The dilated attention to call now; the signature of :func:`longnet.dilated_attention`."""
    state = _active.get()
    if state is None:
        return _single_device

    def parallel(query, key, value, *, segment_lengths, dilation_rates=None, is_causal=False,
                 scale=None, key_padding_mask=None, dropout_p=0.0, enable_gqa=False,
                 return_lse=False, backend="auto"):
        from longnet.parallel.attention import dilated_attention
        if dropout_p:
            raise ValueError("attention dropout is not supported under sequence parallelism "
                             f"(dropout_p={dropout_p}); use dropout_p=0")
        if return_lse:
            raise ValueError("return_lse is not supported under sequence parallelism")
        return dilated_attention(query, key, value, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, is_causal=is_causal, scale=scale,
                                 key_padding_mask=key_padding_mask, enable_gqa=enable_gqa,
                                 group=state.group, backend=backend,
                                 check_chunks=state.check_chunks)

    return parallel


def position_offset(local_length: int) -> int:
    """Global position of this rank's first token (0 outside :func:`sequence_parallel`)."""
    state = _active.get()
    return 0 if state is None else state.rank * int(local_length)
