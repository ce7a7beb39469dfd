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

from longnet.ops.backends import BACKENDS, AttentionBackend, get_backend
from longnet.ops.calls import alloc_like, plan_branch
from longnet.ops.dilated import check_attention_inputs
from longnet.ops.library import strided_like
from longnet.ops.merge import acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["torchscale_dilated_attention", "torchscale_head_offset", "check_torchscale_length",
           "torchscale_attention_op", "torchscale_attention_backward_op"]

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


def _row_groups(lengths: list[int]) -> dict[int, list[int]]:
    """Rows of equal real length (they run together; each sees only its own length)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return groups


def _forward_rows(q, k, v, lengths, pattern, is_causal, scale, backend):
    """``(out, lse)`` of every row at its own length; rows past a row's length are 0 (lse -inf)."""
    N = q.shape[2]
    if all(n == N for n in lengths):
        return _forward(q, k, v, pattern, is_causal, scale, backend)
    out = torch.zeros_like(q)
    lse = q.new_full(q.shape[:3], _NEG_INF, dtype=acc_dtype(q.dtype))
    for n, rows in _row_groups(lengths).items():
        if n == 0:
            continue
        idx = torch.tensor(rows, device=q.device)
        sub = [t.index_select(0, idx)[:, :, :n] for t in (q, k, v)]
        o, l_ = _forward(*sub, pattern, is_causal, scale, backend)
        out[idx, :, :n] = o
        lse[idx, :, :n] = l_
    return out, lse


def _backward_rows(grad_out, q, k, v, lse, lengths, pattern, is_causal, scale, backend):
    N = q.shape[2]
    if all(n == N for n in lengths):
        return _backward(grad_out, q, k, v, lse, pattern, is_causal, scale, backend)
    d_q, d_k, d_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for n, rows in _row_groups(lengths).items():
        if n == 0:
            continue
        idx = torch.tensor(rows, device=q.device)
        sub = [t.index_select(0, idx)[:, :, :n] for t in (grad_out, q, k, v, lse)]
        dq, dk, dv = _backward(*sub, pattern, is_causal, scale, backend)
        d_q[idx, :, :n], d_k[idx, :, :n], d_v[idx, :, :n] = dq, dk, dv
    return d_q, d_k, d_v


def _prefix_lengths(key_padding_mask: torch.Tensor) -> list[int]:
    """Real-token counts per row; raises unless each row is real tokens followed by padding."""
    m = key_padding_mask
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("key_padding_mask: torchscale semantics need each row's real tokens "
                         "first and its padding after them (True... then False...)")
    return m.sum(1).tolist()


def _lengths(key_padding_mask: torch.Tensor | None, B: int, N: int) -> list[int]:
    return [N] * B if key_padding_mask is None else _prefix_lengths(key_padding_mask)


def _check_lengths(pattern: DilatedPattern, lengths: list[int]) -> None:
    for n in sorted(set(lengths)):
        check_torchscale_length(pattern, n)


# The registered ops: torch.compile and torch.export hold them as one node each, whatever the
# padding mask holds (the per-row lengths are read inside, so they cause no graph break).
@torch.library.custom_op("longnet::torchscale_attention", mutates_args=())
def torchscale_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    key_padding_mask: torch.Tensor | None, segment_lengths: list[int], dilation_rates: list[int],
    is_causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchscale's dilated attention ``(out (B, H, N, D), lse (B, H, N))``; inputs already checked
    except the mask's layout and the lengths (checked here, where the mask's values are known)."""
    pattern = DilatedPattern(segment_lengths, dilation_rates)
    B, _, N, _ = query.shape
    lengths = _lengths(key_padding_mask, B, N)
    _check_lengths(pattern, lengths)
    impl = get_backend(backend, query, has_mask=False)
    out, lse = _forward_rows(query, key, value, lengths, pattern, is_causal, scale, impl)
    return strided_like(query, out), lse.contiguous()


@torchscale_attention_op.register_fake
def _(query, key, value, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, backend):
    B, H, N, _ = query.shape
    return torch.empty_like(query), query.new_empty((B, H, N), dtype=acc_dtype(query.dtype))


@torch.library.custom_op("longnet::torchscale_attention_backward", mutates_args=())
def torchscale_attention_backward_op(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: torch.Tensor | None, segment_lengths: list[int],
    dilation_rates: list[int], is_causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchscale's gradients (branch weights held constant) of :func:`torchscale_attention_op`."""
    pattern = DilatedPattern(segment_lengths, dilation_rates)
    B, _, N, _ = query.shape
    impl = get_backend(backend, query, has_mask=False)
    d_q, d_k, d_v = _backward_rows(grad_out, query, key, value, lse, _lengths(key_padding_mask, B, N),
                                   pattern, is_causal, scale, impl)
    return strided_like(query, d_q), strided_like(key, d_k), strided_like(value, d_v)


@torchscale_attention_backward_op.register_fake
def _(grad_out, query, key, value, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal,
      scale, backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, backend = inputs
    ctx.save_for_backward(query, key, value, key_padding_mask, output[1])
    ctx.args = (list(segment_lengths), list(dilation_rates), is_causal, scale, backend)


def _backward_formula(ctx, grad_out, grad_lse):
    # the lse output is internal (torchscale_dilated_attention returns only out): grad_lse unused
    query, key, value, key_padding_mask, lse = ctx.saved_tensors
    d_q, d_k, d_v = torchscale_attention_backward_op(grad_out.contiguous(), query, key, value, lse,
                                                     key_padding_mask, *ctx.args)
    return d_q, d_k, d_v, None, None, None, None, None, None


torchscale_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


class _TorchscaleAttention(torch.autograd.Function):
    """The same computation for a backend given as an object (not a registered name): eager only."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, pattern, is_causal, scale, backend):
        out, lse = _forward_rows(q, k, v, lengths, pattern, is_causal, scale, backend)
        ctx.save_for_backward(q, k, v, lse)
        ctx.args = (lengths, pattern, is_causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse = ctx.saved_tensors
        grads = _backward_rows(grad_out.contiguous(), q, k, v, lse, *ctx.args)
        return (*grads, None, None, None, None, None)


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
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        if key_padding_mask is None:  # N is a shape: checked here (under compile, at trace time)
            check_torchscale_length(pattern, query.shape[2])
        out, _ = torchscale_attention_op(query, key, value, key_padding_mask,
                                         list(pattern.segment_lengths), list(pattern.dilation_rates),
                                         is_causal, float(scale), backend)
        return out
    B, _, N, _ = query.shape
    lengths = _lengths(key_padding_mask, B, N)
    _check_lengths(pattern, lengths)
    return _TorchscaleAttention.apply(query, key, value, lengths, pattern, is_causal, float(scale),
                                      backend)
