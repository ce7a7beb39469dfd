"""Autograd-free forward and backward of dilated attention (``docs/design.md``, "The operator").

Forward: for each branch, the kernel calls of :func:`longnet.ops.calls.plan_branch` run the
backend's dense attention on strided views of the inputs, and their results merge into running
accumulators in place by the log-sum-exp rule (:func:`longnet.ops.merge.merge_partials`). Memory
is O(B * H * N * D) whatever the number of branches.

Backward: given the *merged* output ``O`` and log-sum-exp ``L``, each branch's gradient is the
ordinary attention backward evaluated with ``O`` and ``L`` in place of the branch's own, which is
exact, mixing weights included. Only inputs, output and log-sum-exp are needed.

The registered op (:mod:`longnet.ops.library`) and the sequence-parallel operator both call these.
"""

from __future__ import annotations

import torch

from longnet.ops.backends import AttentionBackend, get_backend
from longnet.ops.calls import alloc_like, plan_branch
from longnet.ops.merge import NEG_INF, acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["dilated_attention_forward", "dilated_attention_backward", "resolve_backend"]


def resolve_backend(backend, query, key_padding_mask) -> AttentionBackend:
    """A backend object from a name (``"auto"`` or a backend's name) or a backend object."""
    if not isinstance(backend, str):
        return backend
    return get_backend(backend, query, has_mask=key_padding_mask is not None)


def _rows_like(ref: torch.Tensor, t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    """``t`` with the shape of ``ref``'s leading dims, laid out like ``ref`` (copied if needed)."""
    if t is None:
        return None
    dtype = t.dtype if dtype is None else dtype
    out = alloc_like(ref, tuple(t.shape), dtype)
    if out.stride() == t.stride() and t.dtype == dtype:
        return t
    return out.copy_(t)


def dilated_attention_forward(
    query, key, value, pattern: DilatedPattern, *, is_causal: bool, scale: float,
    key_padding_mask=None, backend: AttentionBackend | str = "auto",
):
    """``(out (B, H, N, D), lse (B, H, N), aux)``, without autograd.

    ``out`` is in the input dtype and laid out like ``query``; ``lse`` is float32 (float64 for
    float64 inputs), ``-inf`` for queries with no key. ``aux`` holds per-call kernel state that
    :func:`dilated_attention_backward` may take.
    """
    backend = resolve_backend(backend, query, key_padding_mask)
    B, H, N, D = query.shape
    acc = acc_dtype(query.dtype)
    o_acc = alloc_like(query, (B, H, N, D), acc, fill=0.0)
    l_acc = alloc_like(query, (B, H, N), acc, fill=NEG_INF)
    aux = []
    # a kernel that merges into the accumulators in its own epilogue
    into = None if backend.needs_forward_state else getattr(backend, "forward_into", None)
    for b in range(len(pattern)):
        for call in plan_branch(pattern, b, query, key, is_causal=is_causal,
                                key_padding_mask=key_padding_mask, tensors=(value, o_acc, l_acc)):
            if (into is not None and call.mask is None
                    and into(call.q_rows(query), call.kv_rows(key), call.kv_rows(value), call.q_rows(o_acc),
                             call.q_rows(l_acc), merge=b != 0, is_causal=is_causal, scale=scale)):
                aux.append(None)  # calls of a branch are disjoint, as below
                continue
            ob, lb, a = backend.forward(call.q_rows(query), call.kv_rows(key), call.kv_rows(value),
                                        call.mask, is_causal, scale)
            aux.append(a)
            ob, lb = ob.to(acc), lb.to(acc)
            if call.empty is not None:
                lb = lb.masked_fill(call.empty, NEG_INF)
                ob = ob.masked_fill(call.empty.unsqueeze(-1), 0.0)
            call.merge_(o_acc, l_acc, ob, lb, first=b == 0)  # calls of a branch are disjoint
    return o_acc.to(query.dtype), l_acc, aux


def dilated_attention_backward(
    grad_out, query, key, value, out, lse, pattern: DilatedPattern, *, is_causal: bool,
    scale: float, key_padding_mask=None, backend: AttentionBackend | str = "auto", aux=None,
    grad_lse=None,
):
    """Exact gradients ``(dq, dk, dv)`` of dilated attention given the merged ``out`` and ``lse``.

    ``out``/``lse`` may come from a larger merge (other devices, a cache); each branch's kernel
    backward is evaluated with them. ``grad_lse`` (B, H, N), if given, adds the gradient flowing
    into the returned log-sum-exp. Gradients are laid out like their inputs' buffers.
    """
    backend = resolve_backend(backend, query, key_padding_mask)
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    acc = acc_dtype(query.dtype)
    d_q = alloc_like(query, (B, H, N, D), acc, fill=0.0)
    d_k = alloc_like(key, (B, Hkv, N, D), acc, fill=0.0)
    d_v = alloc_like(key, (B, Hkv, N, D), acc, fill=0.0)
    # rows with no key at all: lse = +inf makes every probability exp(s - lse) exactly 0
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    lse = _rows_like(query, lse)
    grad_out, out = _rows_like(query, grad_out), _rows_like(query, out)
    grad_lse = _rows_like(query, grad_lse)
    tensors = tuple(t for t in (value, out, grad_out, lse, grad_lse, d_q, d_k, d_v) if t is not None)
    n_call = 0
    for b in range(len(pattern)):
        for call in plan_branch(pattern, b, query, key, is_causal=is_causal,
                                key_padding_mask=key_padding_mask, tensors=tensors):
            qb, kb, vb = call.q_rows(query), call.kv_rows(key), call.kv_rows(value)
            ob, dob, lb = call.q_rows(out), call.q_rows(grad_out), call.q_rows(lse)
            a = None if aux is None else aux[n_call]
            n_call += 1
            if a is None and backend.needs_forward_state:
                _, _, a = backend.forward(qb, kb, vb, call.mask, is_causal, scale)
            dqb, dkb, dvb = backend.backward(dob, qb, kb, vb, ob, lb, a, call.mask, is_causal,
                                             scale)
            if grad_lse is not None:
                g = call.q_rows(grad_lse)
                dqx, dkx = _lse_grad_terms(g, call, qb, kb, lb, backend, is_causal, scale)
                dqb, dkb = dqb.to(acc) + dqx, dkb.to(acc) + dkx
            call.add_q_(d_q, dqb)
            call.add_kv_(d_k, dkb)
            call.add_kv_(d_v, dvb)
    return d_q.to(query.dtype), d_k.to(key.dtype), d_v.to(value.dtype)


def _lse_grad_terms(g, call, qb, kb, lb, backend, is_causal, scale):
    """Extra (dq, dk) rows of one kernel call from a gradient ``g`` on the merged log-sum-exp.

    dL/ds_qk = P_qk (the merged probability), so dq += scale * g_q * sum_k P_qk k_k and
    dk += scale * sum_q P_qk g_q q_q. The first is a forward with value = key (rescaled from the
    call's own normaliser to the merged one), the second the value-gradient of a backward.
    """
    acc = acc_dtype(qb.dtype)
    g = g.to(acc).unsqueeze(-1)  # (X, Y, m, 1)
    a_k, l_i, aux = backend.forward(qb, kb, kb, call.mask, is_causal, scale)
    l_i = l_i.to(acc)
    if call.empty is not None:
        l_i = l_i.masked_fill(call.empty, NEG_INF)
    weight = torch.exp(l_i - lb.to(acc)).unsqueeze(-1)  # P_merged / P_call, 0 where no key
    d_q = scale * g * weight * a_k.to(acc)
    zeros = torch.zeros_like(qb)
    _, _, d_k = backend.backward((g * qb.to(acc)).to(qb.dtype), qb, kb, kb, zeros, lb, aux,
                                 call.mask, is_causal, scale)
    return d_q, scale * d_k.to(acc)
