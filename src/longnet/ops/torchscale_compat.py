"""Dilated attention as Microsoft's torchscale computes it (``DilatedAttention``, LongNet code).

Checkpoints trained with torchscale (Prov-GigaPath's slide encoder among them) only give their
outputs under torchscale's rule, which differs from the paper's (:func:`longnet.dilated_attention`):

- Head ``h`` of a branch with rate ``r`` keeps the segment-local offset ``h // ceil(H / r)``
  (contiguous blocks of heads share an offset), not ``h % r``.
- The sequence is zero-padded to a multiple of ``w = min(w_i, N)`` and every segment to a
  multiple of ``r``. Padding happens after the projections, so a padded key is the zero vector:
  its score is 0 and its value 0. It is not masked, so in bidirectional attention each padded
  slot a query's (segment, offset) group holds adds ``exp(0)`` to that query's softmax
  denominator. (Causal attention never reaches them: they come after every real slot.)
- Branches mix by a softmax over their log-sum-exp, computed under ``no_grad``: the mixing
  weights are constants for autograd.
- When ``w % r != 0`` and ``N > w`` torchscale's later segments are shifted by the per-segment
  padding (their outputs land on other positions). That is refused here with a ``ValueError``
  naming ``N``; for Prov-GigaPath's pattern it starts beyond 185,363 tokens.

How it is computed: per branch and head, the kept rows of each segment are strided views of
q/k/v, and one of longnet's attention backends runs on them (no copies, no masks). The ``c``
zero keys of a group are added analytically: ``lse' = logaddexp(lse, log c)`` and
``out' = out * exp(lse - lse')``. Branches then merge by log-sum-exp, which equals torchscale's
weighted sum. Backward is exact for torchscale's function (weights held constant): branch ``i``
takes the ordinary attention backward with its own (padded) output ``out'_i`` and the merged
log-sum-exp; its rows are recomputed, nothing but the inputs, the output and the log-sum-exp is
saved.

With a ``key_padding_mask`` (True = real, real tokens first in every row) each row is computed
as torchscale computes that sequence alone (its own ``N``, its own padding), so a padded batch
gives each sequence its batch-1 output. torchscale itself ignores the mask.
"""

from __future__ import annotations

import math

import torch

from longnet.ops.backends import AttentionBackend, get_backend
from longnet.ops.calls import alloc_like, plan_branch
from longnet.ops.dilated import check_attention_inputs
from longnet.ops.merge import acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["torchscale_dilated_attention", "torchscale_head_offset", "check_torchscale_length"]

_NEG_INF = float("-inf")


def torchscale_head_offset(head: int, num_heads: int, dilation: int) -> int:
    """The segment-local offset torchscale's head ``head`` (of ``num_heads``) keeps at rate ``r``."""
    return head // -(-num_heads // dilation)


def check_torchscale_length(pattern: DilatedPattern, length: int) -> None:
    """Raise ``ValueError`` where torchscale's outputs at ``length`` tokens are shifted (see module)."""
    for w, r in pattern.branches:
        if length > w and w % r:
            first = min(x for x, y in pattern.branches if x % y)
            raise ValueError(
                f"N = {length} tokens: torchscale's rule shifts the segments of branch "
                f"(w={w}, r={r}) beyond N = {w} (w is not a multiple of r), which "
                f"longnet does not replicate; with this pattern torchscale semantics hold up to "
                f"N = {first}. Use fewer tokens, or the paper's rule (compat=None / "
                f"semantics='paper')")


def _count(n: int, r: int, offset: int) -> int:
    """Positions ``p < n`` with ``p % r == offset``."""
    return 0 if offset >= n else (n - offset - 1) // r + 1


def _head_sets(H: int, Hkv: int, r: int) -> list[tuple[int, int, int, int, int]]:
    """torchscale's heads of one offset are a contiguous block; within it every ``g``-th head
    (``g = H / Hkv``) reads consecutive key/value heads: ``(h0, kh0, step, kstep, count)`` sets."""
    block, g = -(-H // r), H // Hkv
    sets = []
    for start in range(0, H, block):
        stop = min(start + block, H)
        for h0 in range(start, min(start + g, stop)):
            sets.append((h0, h0 // g, g, 1, len(range(h0, stop, g))))
    return sets


def _calls(pattern, b, q, k, is_causal, tensors):
    """The branch's kernel calls (head-batched strided views, :func:`longnet.ops.calls.plan_branch`)
    with torchscale's offsets, each with ``log_zeros``: log of the zero keys its groups add."""
    H, N = q.shape[1], q.shape[2]
    r = pattern.dilation_rates[b]
    slots = -(-pattern.effective_segment(b, N) // r)  # slots per offset of a padded segment
    calls = plan_branch(pattern, b, q, k, is_causal=is_causal, tensors=tensors,
                        heads=_head_sets(H, k.shape[1], r),
                        residue=lambda h: torchscale_head_offset(h, H, r))
    for call in calls:
        zeros = 0 if is_causal else slots - _count(call.spec.seg, r, call.spec.c)
        call.log_zeros = math.log(zeros) if zeros else None
    return calls


def _pad(call, out, lse):
    """Add the group's zero keys to a kernel result (acc dtype)."""
    if call.log_zeros is None:
        return out, lse
    padded = torch.logaddexp(lse, torch.full_like(lse, call.log_zeros))
    return out * torch.exp(lse - padded).unsqueeze(-1), padded


def _forward(q, k, v, pattern, is_causal, scale, backend):
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
    out = alloc_like(q, (B, H, N, D), acc, fill=0.0)
    lse = alloc_like(q, (B, H, N), acc, fill=_NEG_INF)
    for b in range(len(pattern)):
        for call in _calls(pattern, b, q, k, is_causal, (v, out, lse)):
            ob, lb, _ = backend.forward(call.q_rows(q), call.kv_rows(k), call.kv_rows(v), None,
                                        is_causal, scale)
            ob, lb = _pad(call, ob.to(acc), lb.to(acc))
            call.merge_(out, lse, ob, lb, first=False)
    return out.to(q.dtype), lse


def _backward(grad_out, q, k, v, lse, pattern, is_causal, scale, backend):
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
    d_q = alloc_like(q, (B, H, N, D), acc, fill=0.0)
    d_k = alloc_like(k, tuple(k.shape), acc, fill=0.0)
    d_v = alloc_like(k, tuple(v.shape), acc, fill=0.0)
    grad_out = alloc_like(q, tuple(grad_out.shape), grad_out.dtype).copy_(grad_out)
    lse = alloc_like(q, tuple(lse.shape), lse.dtype).copy_(lse)
    for b in range(len(pattern)):
        for call in _calls(pattern, b, q, k, is_causal, (v, grad_out, lse, d_q, d_k, d_v)):
            qb, kb, vb = call.q_rows(q), call.kv_rows(k), call.kv_rows(v)
            ob, lb, aux = backend.forward(qb, kb, vb, None, is_causal, scale)
            ob, _ = _pad(call, ob.to(acc), lb.to(acc))
            # this branch's own (padded) output with the merged lse: the mixing weight is a
            # constant and P_merged = weight * P_branch, as torchscale differentiates it
            dqb, dkb, dvb = backend.backward(call.q_rows(grad_out), qb, kb, vb, ob.to(q.dtype),
                                             call.q_rows(lse), aux, None, is_causal, scale)
            call.add_q_(d_q, dqb)
            call.add_kv_(d_k, dkb)
            call.add_kv_(d_v, dvb)
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)


class _TorchscaleAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, is_causal, scale, backend):
        out, lse = _forward(q, k, v, pattern, is_causal, scale, backend)
        ctx.save_for_backward(q, k, v, lse)
        ctx.pattern, ctx.is_causal, ctx.scale, ctx.backend = pattern, is_causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse = ctx.saved_tensors
        grads = _backward(grad_out.contiguous(), q, k, v, lse, ctx.pattern, ctx.is_causal,
                          ctx.scale, ctx.backend)
        return (*grads, None, None, None, None)


def _prefix_lengths(key_padding_mask: torch.Tensor) -> list[int]:
    """Real-token counts per row; raises unless each row is real tokens followed by padding."""
    m = key_padding_mask
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("key_padding_mask: torchscale semantics need each row's real tokens "
                         "first and its padding after them (True... then False...)")
    return m.sum(1).tolist()


def torchscale_dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, segment_lengths,
    dilation_rates=None, is_causal: bool = False, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
    enable_gqa: bool = False, backend: str | AttentionBackend = "auto",
) -> torch.Tensor:
    """Dilated attention with torchscale's semantics (see the module docstring).

    Args:
        query: (B, H, N, D); key, value: (B, Hkv, N, D) (``Hkv < H`` with ``enable_gqa``).
        segment_lengths, dilation_rates: the branches, or ``segment_lengths`` a
            :class:`~longnet.DilatedPattern`.
        is_causal: keys at positions <= the query's (torchscale's decoder).
        scale: score scale, default ``1 / sqrt(D)``.
        key_padding_mask: (B, N) bool, True = real token, real tokens first in each row; each
            row is computed as the unpadded sequence would be. Padded rows output 0.
        dropout_p: must be 0 (torchscale's attention dropout is not replicated).
        backend: a backend name of :func:`longnet.dilated_attention` (``"auto"``) or object.

    Returns:
        (B, H, N, D) in the input dtype. Raises ``ValueError`` for a length at which torchscale
        shifts segments (see :func:`check_torchscale_length`).
    """
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
    check_attention_inputs(query, key, value, key_padding_mask, enable_gqa=enable_gqa)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(f"dropout_p must be 0 with torchscale semantics, got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    if isinstance(backend, str):
        backend = get_backend(backend, query, has_mask=False, is_causal=is_causal)
    B, H, N, D = query.shape
    lengths = [N] * B if key_padding_mask is None else _prefix_lengths(key_padding_mask)
    for n in sorted(set(lengths)):
        check_torchscale_length(pattern, n)
    if all(n == N for n in lengths):
        return _TorchscaleAttention.apply(query, key, value, pattern, is_causal, float(scale),
                                          backend)
    # rows of equal length run together; every row sees only its own length
    parts, order = [], []
    for n in sorted(set(lengths)):
        rows = [i for i, x in enumerate(lengths) if x == n]
        idx = torch.tensor(rows, device=query.device)
        order += rows
        if n == 0:
            parts.append(query.new_zeros(len(rows), H, N, D))
            continue
        sub = [t.index_select(0, idx)[:, :, :n] for t in (query, key, value)]
        o = _TorchscaleAttention.apply(*sub, pattern, is_causal, float(scale), backend)
        parts.append(torch.nn.functional.pad(o, (0, 0, 0, N - n)))
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B)
    return torch.cat(parts).index_select(0, inverse.to(query.device))
