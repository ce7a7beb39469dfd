"""Dilated attention: gather each branch's rows, run a dense kernel on them, merge by log-sum-exp.

Forward, per branch ``(w, r)``: gather the positions every head keeps into rows
(B, H * segments, slots, D), run the backend's attention on them (a mask only where padding or
uneven segments need one), and merge the result into the running output with the log-sum-exp
rule ``L = logaddexp(L, L_i)``, ``O = exp(L_old - L) O + exp(L_i - L) O_i``. Memory is
O(B * H * N * D) whatever the number of branches: branches run one after the other.

Backward: with the merged ``O`` and ``L``, each branch's gradient is the ordinary attention
backward evaluated with ``O`` and ``L`` in place of its own (see ../shared/DESIGN.md), so the
gradients are exact, mixing weights included. Only the inputs, the output and the log-sum-exp are
saved; gathers are redone in backward.

:func:`dilated_attention_forward` and :func:`dilated_attention_backward` are autograd-free building
blocks (sequence parallelism reuses them); :func:`dilated_attention` is the public, differentiable
operator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longnet.ops.backends import AttentionBackend, get_backend
from longnet.ops.pattern import BranchLayout, DilatedPattern

__all__ = [
    "dilated_attention",
    "dilated_attention_forward",
    "dilated_attention_backward",
    "check_attention_inputs",
]

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------- checks
def check_attention_inputs(query, key, value, key_padding_mask=None, *, enable_gqa=False,
                           kv_length=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when inputs do not fit together.

    ``kv_length`` lets key/value be longer than query (decoding); by default lengths must match.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    B, H, N, D = query.shape
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if t.shape[0] != B:
            raise ValueError(f"{name} batch size {t.shape[0]} differs from query's {B}")
        expect_n = N if kv_length is None else kv_length
        if t.shape[2] != expect_n:
            raise ValueError(f"{name} length {t.shape[2]} differs from query length {expect_n}")
        if t.shape[3] != D:
            raise ValueError(f"{name} head dim {t.shape[3]} differs from query head dim {D}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads but value has {value.shape[1]}")
    Hkv = key.shape[1]
    if Hkv != H:
        if not enable_gqa:
            raise ValueError(f"query has {H} heads but key/value have {Hkv}; "
                             f"pass enable_gqa=True for grouped-query attention")
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("key_padding_mask must be a bool torch.Tensor (batch, length), got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = real token), "
                            f"got {key_padding_mask.dtype}")
        n_k = key.shape[2]
        if tuple(key_padding_mask.shape) != (B, n_k):
            raise ValueError(f"key_padding_mask must have shape (batch, length) = {(B, n_k)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} "
                             f"but query is on {query.device}")


def _check_scalar_args(scale, dropout_p, is_causal) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite float, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")


# ------------------------------------------------------------------------------ branch plumbing
@dataclass
class _Branch:
    """One branch at one length: its layout and the masks its kernel needs."""

    layout: BranchLayout
    mask: torch.Tensor | None  # additive (B or 1, H*S, 1, m) in query dtype
    empty: torch.Tensor | None  # (B or 1, H, T) bool: rows with no key at all
    rows: tuple[int, int]  # (H * S, m)


def _branch(pattern: DilatedPattern, b: int, query: torch.Tensor, is_causal: bool,
            key_padding_mask: torch.Tensor | None) -> _Branch:
    B, H, N, _ = query.shape
    lay = pattern.layout(b, N, H, device=query.device)
    S, m = lay.num_segments, lay.slots
    keyok = None
    if key_padding_mask is not None:
        keyok = key_padding_mask[:, lay.index]  # (B, H, T)
        if lay.valid is not None:
            keyok = keyok & lay.valid
    elif lay.valid is not None and not is_causal:
        # causal needs no mask here: invalid slots sit after every valid one of their segment
        keyok = lay.valid.unsqueeze(0)
    mask = empty = None
    if keyok is not None:
        ok = keyok.reshape(keyok.shape[0], H * S, 1, m)
        mask = torch.zeros(ok.shape, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~ok, _NEG_INF)
        if key_padding_mask is not None:
            if is_causal:
                none = ok.reshape(-1, H, S, m).cumsum(-1) == 0
            else:
                none = ~ok.reshape(-1, H, S, 1, m).any(-1).expand(-1, H, S, m)
            empty = none.reshape(-1, H, S * m)
    return _Branch(lay, mask, empty, (H * S, m))


def _gather_rows(x: torch.Tensor, heads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hx, N, D) -> (B, H, T, D): row t of head h is x[:, heads[h], index[h, t]]."""
    return x[:, heads.unsqueeze(1), index]


def _head_maps(H: int, Hkv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    q_heads = torch.arange(H, device=device)
    return q_heads, q_heads // (H // Hkv)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _needs_mask(pattern: DilatedPattern, N: int, is_causal: bool, has_padding: bool) -> bool:
    if has_padding:
        return True
    if is_causal:
        return False
    return any(N % pattern.effective_segment(b, N) or pattern.effective_segment(b, N) % r
               for b, r in enumerate(pattern.dilation_rates))


def _resolve_backend(backend, query, pattern, is_causal, key_padding_mask) -> AttentionBackend:
    if not isinstance(backend, str):
        return backend
    has_mask = _needs_mask(pattern, query.shape[2], is_causal, key_padding_mask is not None)
    return get_backend(backend, query, has_mask=has_mask)


# ---------------------------------------------------------------------------- forward / backward
def dilated_attention_forward(
    query, key, value, pattern: DilatedPattern, *, is_causal: bool, scale: float,
    key_padding_mask=None, backend: AttentionBackend | str = "auto",
):
    """Autograd-free forward: ``(out (B, H, N, D), lse (B, H, N), aux)``.

    ``lse`` is float32 (float64 for float64 inputs), ``-inf`` for queries with no key.
    ``aux`` holds per-branch kernel state that :func:`dilated_attention_backward` takes.
    """
    backend = _resolve_backend(backend, query, pattern, is_causal, key_padding_mask)
    B, H, N, D = query.shape
    acc = _acc_dtype(query.dtype)
    q_heads, kv_heads = _head_maps(H, key.shape[1], query.device)
    o_acc = torch.zeros(B, H, N + 1, D, dtype=acc, device=query.device)  # row N: trash
    l_acc = torch.full((B, H, N + 1), _NEG_INF, dtype=acc, device=query.device)
    aux = []
    for b in range(len(pattern)):
        br = _branch(pattern, b, query, is_causal, key_padding_mask)
        lay, (G, m) = br.layout, br.rows
        T = lay.index.shape[1]
        qb = _gather_rows(query, q_heads, lay.index).view(B, G, m, D)
        kb = _gather_rows(key, kv_heads, lay.index).view(B, G, m, D)
        vb = _gather_rows(value, kv_heads, lay.index).view(B, G, m, D)
        ob, lb, a = backend.forward(qb, kb, vb, br.mask, is_causal, scale)
        aux.append(a)
        ob = ob.reshape(B, H, T, D).to(acc)
        lb = lb.reshape(B, H, T).to(acc)
        if br.empty is not None:
            lb = lb.masked_fill(br.empty, _NEG_INF)
            ob = ob.masked_fill(br.empty.unsqueeze(-1), 0.0)
        out_idx = lay.index if lay.valid is None else torch.where(lay.valid, lay.index, N)
        idx3 = out_idx.unsqueeze(0).expand(B, H, T)
        idx4 = idx3.unsqueeze(-1).expand(B, H, T, D)
        if b > 0:
            og, lg = o_acc.gather(2, idx4), l_acc.gather(2, idx3)
            new_l = torch.logaddexp(lg, lb)
            safe = torch.where(torch.isfinite(new_l), new_l, torch.zeros_like(new_l))
            ob = og * torch.exp(lg - safe).unsqueeze(-1) + ob * torch.exp(lb - safe).unsqueeze(-1)
            lb = new_l
        o_acc.scatter_(2, idx4, ob)
        l_acc.scatter_(2, idx3, lb)
    out = o_acc[:, :, :N].to(query.dtype, memory_format=torch.contiguous_format)
    return out, l_acc[:, :, :N].contiguous(), aux


def dilated_attention_backward(
    grad_out, query, key, value, out, lse, pattern: DilatedPattern, *, is_causal: bool,
    scale: float, key_padding_mask=None, backend: AttentionBackend | str = "auto", aux=None,
    grad_lse=None,
):
    """Exact gradients ``(dq, dk, dv)`` of dilated attention given the merged ``out`` and ``lse``.

    ``out``/``lse`` may come from a larger merge (other devices, a cache); each branch's kernel
    backward is evaluated with them. ``grad_lse`` (B, H, N), if given, adds the gradient flowing
    into the returned log-sum-exp.
    """
    backend = _resolve_backend(backend, query, pattern, is_causal, key_padding_mask)
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    acc = _acc_dtype(query.dtype)
    q_heads, kv_heads = _head_maps(H, Hkv, query.device)
    d_q = torch.zeros(B, H * N, D, dtype=acc, device=query.device)
    d_k = torch.zeros(B, Hkv * N, D, dtype=acc, device=query.device)
    d_v = torch.zeros(B, Hkv * N, D, dtype=acc, device=query.device)
    # rows with no key at all: lse = +inf makes every probability exp(s - lse) exactly 0
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    for b in range(len(pattern)):
        br = _branch(pattern, b, query, is_causal, key_padding_mask)
        lay, (G, m) = br.layout, br.rows
        T = lay.index.shape[1]
        qb = _gather_rows(query, q_heads, lay.index).view(B, G, m, D)
        kb = _gather_rows(key, kv_heads, lay.index).view(B, G, m, D)
        vb = _gather_rows(value, kv_heads, lay.index).view(B, G, m, D)
        idx3 = lay.index.unsqueeze(0).expand(B, H, T)
        idx4 = idx3.unsqueeze(-1).expand(B, H, T, D)
        ob = out.gather(2, idx4)
        dob = grad_out.gather(2, idx4)
        lb = lse.gather(2, idx3)
        if lay.valid is not None:  # slots past a segment's end carry no gradient
            dob = dob * lay.valid.unsqueeze(-1).to(dob.dtype)
            lb = lb.masked_fill(~lay.valid, float("inf"))
        ob, dob, lb = ob.view(B, G, m, D), dob.view(B, G, m, D), lb.view(B, G, m)
        a = None if aux is None else aux[b]
        if a is None and backend.name.startswith("cuda"):
            _, _, a = backend.forward(qb, kb, vb, br.mask, is_causal, scale)
        dqb, dkb, dvb = backend.backward(dob, qb, kb, vb, ob, lb, a, br.mask, is_causal, scale)
        dqb, dkb = dqb.to(acc), dkb.to(acc)
        if grad_lse is not None:
            dqx, dkx = _lse_grad_terms(grad_lse, lay, br, qb, kb, lb, backend, is_causal, scale)
            dqb, dkb = dqb + dqx, dkb + dkx
        q_flat = (q_heads.unsqueeze(1) * N + lay.index).reshape(-1)
        kv_flat = (kv_heads.unsqueeze(1) * N + lay.index).reshape(-1)
        d_q.index_add_(1, q_flat, dqb.reshape(B, H * T, D))
        d_k.index_add_(1, kv_flat, dkb.reshape(B, H * T, D))
        d_v.index_add_(1, kv_flat, dvb.reshape(B, H * T, D).to(acc))
    return (d_q.view(B, H, N, D).to(query.dtype), d_k.view(B, Hkv, N, D).to(key.dtype),
            d_v.view(B, Hkv, N, D).to(value.dtype))


def _lse_grad_terms(grad_lse, lay, br, qb, kb, lb, backend, is_causal, scale):
    """Extra (dq, dk) of one branch from a gradient on the merged log-sum-exp.

    dL/ds_qk = P_qk (the merged probability), so dq += scale * dL_q * sum_k P_qk k_k and
    dk += scale * sum_q P_qk dL_q q_q. The first is a forward with value = key (rescaled from the
    branch's own normaliser to the merged one), the second the value-gradient of a backward.
    """
    B, G, m, D = qb.shape
    acc = _acc_dtype(qb.dtype)
    g = grad_lse.gather(2, lay.index.unsqueeze(0).expand(B, -1, -1))
    if lay.valid is not None:
        g = g * lay.valid.to(g.dtype)
    g = g.reshape(B, G, m, 1).to(acc)
    a_k, l_i, aux = backend.forward(qb, kb, kb, br.mask, is_causal, scale)
    l_i = l_i.reshape(B, G, m).to(acc)
    if br.empty is not None:
        l_i = l_i.masked_fill(br.empty.reshape(-1, G, m), _NEG_INF)
    weight = torch.exp(l_i - lb.to(acc)).unsqueeze(-1)  # P_merged / P_branch, 0 where no key
    d_q = scale * g * weight * a_k.to(acc)
    zeros = torch.zeros_like(qb)
    _, _, d_k = backend.backward((g * qb.to(acc)).to(qb.dtype), qb, kb, kb, zeros, lb, aux,
                                 br.mask, is_causal, scale)
    return d_q, scale * d_k.to(acc)


# ------------------------------------------------------------------------------------- autograd
class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, key_padding_mask, pattern, is_causal, scale, backend):
        out, lse, aux = dilated_attention_forward(
            query, key, value, pattern, is_causal=is_causal, scale=scale,
            key_padding_mask=key_padding_mask, backend=backend)
        ctx.save_for_backward(query, key, value, key_padding_mask, out, lse)
        ctx.pattern, ctx.is_causal, ctx.scale, ctx.backend, ctx.aux = (
            pattern, is_causal, scale, backend, aux)
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, key_padding_mask, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        d_q, d_k, d_v = dilated_attention_backward(
            grad_out, query, key, value, out, lse, ctx.pattern, is_causal=ctx.is_causal,
            scale=ctx.scale, key_padding_mask=key_padding_mask, backend=ctx.backend,
            aux=ctx.aux, grad_lse=grad_lse)
        return d_q, d_k, d_v, None, None, None, None, None


def _dropout_dilated_attention(query, key, value, pattern, is_causal, scale, key_padding_mask,
                               dropout_p):
    """Plain-autograd dilated attention with dropout on the mixed attention weights."""
    B, H, N, D = query.shape
    acc = _acc_dtype(query.dtype)
    q_heads, kv_heads = _head_maps(H, key.shape[1], query.device)
    parts = []
    for b in range(len(pattern)):
        br = _branch(pattern, b, query, is_causal, key_padding_mask)
        lay, (G, m) = br.layout, br.rows
        T = lay.index.shape[1]
        qb = _gather_rows(query, q_heads, lay.index).view(B, G, m, D).to(acc)
        kb = _gather_rows(key, kv_heads, lay.index).view(B, G, m, D).to(acc)
        vb = _gather_rows(value, kv_heads, lay.index).view(B, G, m, D).to(acc)
        s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
        if br.mask is not None:
            s = s + br.mask.to(acc)
        if is_causal:
            s = s.masked_fill(~torch.ones(m, m, dtype=torch.bool, device=s.device).tril(),
                              _NEG_INF)
        lb = torch.logsumexp(s.masked_fill(~torch.isfinite(s).any(-1, keepdim=True), 0.0), -1)
        lb = lb.reshape(B, H, T)
        if br.empty is not None:
            lb = lb.masked_fill(br.empty, _NEG_INF)
        p = torch.exp(s - torch.where(torch.isfinite(lb), lb, 0.0).reshape(B, G, m, 1))
        ob = torch.matmul(F.dropout(p, dropout_p, training=True), vb).reshape(B, H, T, D)
        if lay.valid is not None:
            lb = lb.masked_fill(~lay.valid, _NEG_INF)
        parts.append((lay.index, ob, lb))
    with torch.no_grad():
        top = torch.full((B, H, N), _NEG_INF, dtype=acc, device=query.device)
        for idx, _, lb in parts:
            top.scatter_reduce_(2, idx.expand(B, -1, -1), lb, "amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    denom = torch.zeros(B, H, N, dtype=acc, device=query.device)
    for idx, _, lb in parts:
        denom = denom.scatter_add(2, idx.expand(B, -1, -1), torch.exp(lb - top.gather(2, idx.expand(B, -1, -1))))
    lse = torch.where(denom > 0, top + torch.log(denom), torch.full_like(denom, _NEG_INF))
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.zeros(B, H, N, D, dtype=acc, device=query.device)
    for idx, ob, lb in parts:
        w = torch.exp(lb - safe.gather(2, idx.expand(B, -1, -1))).unsqueeze(-1)
        out = out.scatter_add(2, idx.expand(B, -1, -1).unsqueeze(-1).expand(-1, -1, -1, D), w * ob)
    return out.to(query.dtype), lse


# --------------------------------------------------------------------------------------- public
def dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, segment_lengths,
    dilation_rates=None, is_causal: bool = False, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
    enable_gqa: bool = False, return_lse: bool = False, backend: str = "auto",
):
    """Dilated attention (LongNet), a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        query: (B, H, N, D).
        key, value: (B, Hkv, N, D); ``Hkv == H`` unless ``enable_gqa`` (then query head ``h``
            reads key/value head ``h // (H // Hkv)``).
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``; ``segment_lengths`` may
            also be a :class:`DilatedPattern` (then leave ``dilation_rates`` out).
        is_causal: keys only at positions <= the query's.
        scale: score scale, default ``1 / sqrt(D)``.
        key_padding_mask: (B, N) bool, True = real token. Masked keys take part in nothing;
            outputs at padded query positions are unspecified but finite.
        dropout_p: dropout on the (mixed) attention weights; only applied when > 0.
        enable_gqa: allow fewer key/value heads than query heads.
        return_lse: also return the log-sum-exp (B, H, N), natural log, float32 (float64 for
            float64 inputs), ``-inf`` where a query has no key. It is differentiable.
        backend: ``"auto"`` (fastest exact kernel for the device), or one of
            ``"cpu_flash"``, ``"cuda"``, ``"cuda_flash"``, ``"cuda_efficient"``, ``"math"``.
            A named backend that cannot run raises ``ValueError``.

    Returns:
        ``out`` (B, H, N, D) in the input dtype, or ``(out, lse)`` with ``return_lse``.

    A query kept by no branch outputs 0. NaN or inf in query/key/value propagate to the outputs
    that read them (as with SDPA); they are not checked for.
    """
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
    check_attention_inputs(query, key, value, key_padding_mask, enable_gqa=enable_gqa)
    _check_scalar_args(scale, dropout_p, is_causal)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0:
        out, lse = _dropout_dilated_attention(query, key, value, pattern, is_causal, scale,
                                              key_padding_mask, float(dropout_p))
    else:
        be = _resolve_backend(backend, query, pattern, is_causal, key_padding_mask)
        out, lse = _DilatedAttentionFunction.apply(query, key, value, key_padding_mask, pattern,
                                                   is_causal, scale, be)
    return (out, lse) if return_lse else out
