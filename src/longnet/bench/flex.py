"""LongNet's exact function written with PyTorch's FlexAttention: the anchor a user would reach for.

FlexAttention computes ``softmax(score_mod(QK^T * scale)) V`` over the (query, key) pairs a block
mask allows. Dilated attention fits it exactly: the branch mixture equals one softmax over the
union of the branches' keys, a key counted once per branch that reads it (see
:mod:`longnet.testing.reference`). So

* ``mask_mod`` allows a pair when at least one branch reads it, and
* ``score_mod`` adds ``log(count)``, the number of branches that read it,

both asked of :meth:`longnet.ops.pattern.DilatedPattern.reads`, the one place the selection rule is
written. This is a benchmark anchor, not a backend: on CPU, torch 2.13 compiles FlexAttention's
forward only (no backward), and the block mask costs ``O(N^2)`` mask evaluations to build
(compiled, blockwise; eagerly it would hold all of them at once).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from longnet.ops.pattern import DilatedPattern

__all__ = ["flex_available", "flex_dilated_attention", "make_flex_call"]


def flex_available() -> str | None:
    """``None`` when this torch has FlexAttention, else why not."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:  # older torch
        return f"torch {torch.__version__} has no FlexAttention ({exc})"
    return None


def _count(pattern: DilatedPattern, length: int, q_idx, kv_idx, h, is_causal: bool):
    """How many branches let query ``q_idx`` of head ``h`` read key ``kv_idx`` (int tensor)."""
    total = None
    for b in range(len(pattern)):
        reads = pattern.reads(b, q_idx, kv_idx, h, length, is_causal=is_causal).to(torch.int32)
        total = reads if total is None else total + reads
    return total


def _mods(pattern: DilatedPattern, length: int, is_causal: bool):
    def mask_mod(b, h, q_idx, kv_idx):
        return _count(pattern, length, q_idx, kv_idx, h, is_causal) > 0

    def score_mod(score, b, h, q_idx, kv_idx):
        count = _count(pattern, length, q_idx, kv_idx, h, is_causal).to(score.dtype)
        return score + torch.log(count)  # -inf where no branch reads the pair (masked anyway)

    return mask_mod, score_mod


def _block_mask(mask_mod, H: int, N: int, device, compiled: bool):
    """Flex's block mask. Compiled it is built blockwise; eagerly it evaluates all (H, N, N) pairs at
    once (8 heads at 16K needed over 24 GB and the process was killed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, H, N, N, device=device, _compile=compiled)


def flex_dilated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths: Any,
                           dilation_rates: Any = None, *, is_causal: bool = False, compiled: bool = True
                           ) -> torch.Tensor:
    """Dilated attention (paper rule, as :func:`longnet.dilated_attention`) through FlexAttention.

    ``query``/``key``/``value``: (B, H, N, D), equal head counts. ``compiled=False`` runs Flex's
    eager path (any dtype, slow; what the tests use). Returns the (B, H, N, D) output.
    """
    from torch.nn.attention.flex_attention import flex_attention

    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, N, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"flex_dilated_attention needs as many key heads as query heads, got "
                         f"key {key.shape[1]} and query {query.shape[1]}")
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
    B, H, N, _ = query.shape
    mask_mod, score_mod = _mods(pattern, N, is_causal)
    block_mask = _block_mask(mask_mod, H, N, query.device, compiled)
    if compiled:
        return torch.compile(flex_attention, dynamic=False)(query, key, value, score_mod=score_mod,
                                                            block_mask=block_mask)
    with warnings.catch_warnings():  # the eager path is asked for on purpose (tests, float64)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask)


def make_flex_call(pattern: DilatedPattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   is_causal: bool, mode: str, grad_out: torch.Tensor | None = None):
    """A timed call for the benchmark: the block mask and the compiled kernel are built here, once.

    ``mode`` ``"fwd"`` (no grad) or ``"fwdbwd"`` (where the device compiles a backward: CUDA). The
    call's ``output()`` gives the forward's result (for checking it against the operator).
    """
    from torch.nn.attention.flex_attention import flex_attention

    H, N = q.shape[1], q.shape[2]
    mask_mod, score_mod = _mods(pattern, N, is_causal)
    block_mask = _block_mask(mask_mod, H, N, q.device, compiled=True)
    attend = torch.compile(flex_attention, dynamic=False)

    def output() -> torch.Tensor:
        with torch.no_grad():
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)

    if mode == "fwd":
        def call() -> None:
            output()
        call.output = output
        return call
    if q.device.type == "cpu":
        raise ValueError("FlexAttention has no compiled backward on CPU in this torch; use mode='fwd'")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def call() -> None:
        attend(*leaves, score_mod=score_mod, block_mask=block_mask).backward(grad_out)
        for t in leaves:
            t.grad = None
    call.output = output
    return call
