"""Dilated attention as registered PyTorch ops, so compiled and exported graphs hold it whole.

``torch.ops.longnet.dilated_attention(query, key, value, key_padding_mask, segment_lengths,
dilation_rates, shift, is_causal, scale, backend) -> (out, lse)`` and its backward
``torch.ops.longnet.dilated_attention_backward(...) -> (dq, dk, dv)`` are ``torch.library``
custom ops with fake (meta) implementations and a registered autograd formula. ``torch.compile``
traces them as one node each (no graph break, whatever the pattern), ``torch.export`` keeps them,
and :func:`torch.library.opcheck` checks them (``tests/ops/test_library.py``).

The ops run :mod:`longnet.ops.engine` eagerly: the kernel calls of every branch are decided per
call from shapes, strides and the backend, which is why they sit behind an op boundary instead of
being traced.
"""

from __future__ import annotations

import torch

from longnet.ops.engine import dilated_attention_backward, dilated_attention_forward
from longnet.ops.merge import acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["dilated_attention_op", "dilated_attention_backward_op", "strided_like"]


def strided_like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty_like(ref)`` has (the fake implementation's)."""
    out = torch.empty_like(ref, dtype=t.dtype)
    return t if out.stride() == t.stride() else out.copy_(t)


@torch.library.custom_op("longnet::dilated_attention", mutates_args=())
def dilated_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    key_padding_mask: torch.Tensor | None, segment_lengths: list[int], dilation_rates: list[int],
    shift: int, is_causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention ``(out (B, H, N, D), lse (B, H, N))``; inputs already checked."""
    pattern = DilatedPattern(segment_lengths, dilation_rates, shift)
    out, lse, _ = dilated_attention_forward(query, key, value, pattern, is_causal=is_causal,
                                            scale=scale, key_padding_mask=key_padding_mask,
                                            backend=backend)
    return strided_like(query, out), lse.contiguous()


@dilated_attention_op.register_fake
def _(query, key, value, key_padding_mask, segment_lengths, dilation_rates, shift, is_causal, scale,
      backend):
    B, H, N, _ = query.shape
    return torch.empty_like(query), query.new_empty((B, H, N), dtype=acc_dtype(query.dtype))


@torch.library.custom_op("longnet::dilated_attention_backward", mutates_args=())
def dilated_attention_backward_op(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, segment_lengths: list[int], dilation_rates: list[int],
    shift: int, is_causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(dq, dk, dv)`` given the merged ``out`` and ``lse`` (see :mod:`longnet.ops.engine`)."""
    pattern = DilatedPattern(segment_lengths, dilation_rates, shift)
    d_q, d_k, d_v = dilated_attention_backward(
        grad_out, query, key, value, out, lse, pattern, is_causal=is_causal, scale=scale,
        key_padding_mask=key_padding_mask, backend=backend, grad_lse=grad_lse)
    return strided_like(query, d_q), strided_like(key, d_k), strided_like(value, d_v)


@dilated_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, grad_lse, key_padding_mask, segment_lengths,
      dilation_rates, shift, is_causal, scale, backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, segment_lengths, dilation_rates, shift, is_causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, key_padding_mask, out, lse)
    ctx.args = (list(segment_lengths), list(dilation_rates), shift, is_causal, scale, backend)
    ctx.set_materialize_grads(False)  # an unused lse gets None, so its extra terms are skipped


def _backward(ctx, grad_out, grad_lse):
    query, key, value, key_padding_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    d_q, d_k, d_v = dilated_attention_backward_op(grad_out, query, key, value, out, lse, grad_lse,
                                                  key_padding_mask, *ctx.args)
    return d_q, d_k, d_v, None, None, None, None, None, None, None


dilated_attention_op.register_autograd(_backward, setup_context=_setup_context)
