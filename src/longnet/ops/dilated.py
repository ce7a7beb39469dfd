"""Dilated attention: view each branch's rows, run a dense kernel on them, merge by log-sum-exp.

Forward, per branch ``(w, r)`` and head ``h``: the positions the head keeps form a strided view
(B, segments, slots, D) of the input (``x[:, h, seg_start + h % r :: r]`` per segment; the short
tail segment is a second view), so nothing is copied. The backend's attention runs on it (a mask
only for key padding) and the result merges into the running output in place with the
log-sum-exp rule ``L = logaddexp(L, L_i)``, ``O = exp(L_old - L) O + exp(L_i - L) O_i``.
Memory is O(B * H * N * D) whatever the number of branches: branches run one after the other.

Backward: with the merged ``O`` and ``L``, each branch's gradient is the ordinary attention
backward evaluated with ``O`` and ``L`` in place of its own (see ../shared/DESIGN.md), so the
gradients are exact, mixing weights included. Only the inputs, the output and the log-sum-exp are
saved; the views are rebuilt in backward.

:func:`dilated_attention_forward` and :func:`dilated_attention_backward` are autograd-free building
blocks (sequence parallelism reuses them); :func:`dilated_attention` is the public, differentiable
operator.
"""

from __future__ import annotations

import math

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
# A branch runs as kernel calls on rows (B, G, m, D): G independent groups of m slots (one head's
# kept positions of one segment). The operator uses strided views, one call per head for the full
# segments and one for the short tail segment, so nothing is gathered, copied or masked (but for
# padding). _GatherCall (rows gathered by index, short segments padded and masked) serves the
# plain-autograd dropout path.


class _ViewCall:
    """Head ``h``, residue ``c``: positions start + s*w + c + j*r of the segments s < S."""

    def __init__(self, h, hk, c, B, start, S, w, r, is_causal, key_padding_mask, dtype):
        self.h, self.hk, self.c, self.B, self.start, self.S, self.w, self.r = (
            h, hk, c, B, start, S, w, r)
        self.mask = self.empty = None
        if key_padding_mask is not None:
            ok = self._view(key_padding_mask.unsqueeze(1), 0)  # (B, S, m)
            self.mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
            self.mask.masked_fill_(~ok, _NEG_INF)
            self.mask = self.mask.unsqueeze(2)  # (B, S, 1, m)
            self.empty = (ok.cumsum(-1) == 0) if is_causal else ~ok.any(-1, keepdim=True).expand_as(ok)

    def _view(self, x, head):  # x (B, Hx, >= N, ...) -> (B, S, m, ...)
        span = x[:, head, self.start:self.start + self.S * self.w]
        return span.unflatten(1, (self.S, self.w))[:, :, self.c::self.r]

    def q_rows(self, x):
        return self._view(x, self.h)

    def kv_rows(self, x):
        return self._view(x, self.hk)

    def merge_(self, o_acc, l_acc, ob, lb, first):
        ov, lv = self.q_rows(o_acc), self.q_rows(l_acc)
        if first:
            ov.copy_(ob)
            lv.copy_(lb)
        else:
            ov.copy_(_merge(ov, lv, ob, lb)[0])
            lv.copy_(torch.logaddexp(lv, lb))

    def add_q_(self, buf, g):
        self.q_rows(buf).add_(g)

    def add_kv_(self, buf, g):
        self.kv_rows(buf).add_(g)


class _GatherCall:
    """All heads of a branch, rows gathered by index; short segments padded with masked slots."""

    def __init__(self, lay: BranchLayout, q_heads, kv_heads, B, is_causal, key_padding_mask,
                 dtype):
        self.lay, self.q_heads, self.kv_heads = lay, q_heads, kv_heads
        H = q_heads.shape[0]
        S, m = lay.num_segments, lay.slots
        self.shape = (B, H * S, m)
        keyok = None
        if key_padding_mask is not None:
            keyok = key_padding_mask[:, lay.index]  # (B, H, T)
            if lay.valid is not None:
                keyok = keyok & lay.valid
        elif lay.valid is not None and not is_causal:
            # causal needs no mask: padded slots sit after every real slot of their segment
            keyok = lay.valid.unsqueeze(0)
        self.mask = None
        if keyok is not None:
            ok = keyok.reshape(keyok.shape[0], H * S, 1, m)
            self.mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
            self.mask.masked_fill_(~ok, _NEG_INF)

    def _rows(self, x, heads):
        B, G, m = self.shape
        return x[:, heads.unsqueeze(1), self.lay.index].reshape(B, G, m, *x.shape[3:])

    def q_rows(self, x):
        return self._rows(x, self.q_heads)

    def kv_rows(self, x):
        return self._rows(x, self.kv_heads)


def _merge(o_a, l_a, o_b, l_b):
    """Log-sum-exp merge of two partial attention results (rows with no key stay 0)."""
    l_new = torch.logaddexp(l_a, l_b)
    safe = torch.where(torch.isfinite(l_new), l_new, torch.zeros_like(l_new))
    o_new = o_a * torch.exp(l_a - safe).unsqueeze(-1) + o_b * torch.exp(l_b - safe).unsqueeze(-1)
    return o_new, l_new


# On CPU a call covers at most this many bytes of output rows: buffers below glibc's 32 MiB mmap
# threshold are reused from the heap from one call to the next, while larger ones are fresh pages
# every time, and first-touching them (~1.4 GB/s on the 2-core test machine) made N = 128K 17%
# slower per FLOP than N = 32K. Splitting the full segments over several calls is exact.
_CPU_CALL_BYTES = 8 << 20


def _calls(pattern, b, query, key, is_causal, key_padding_mask):
    """The kernel calls of branch ``b``: per head, the full segments (in chunks on CPU) and the
    short tail."""
    B, H, N, D = query.shape
    group = H // key.shape[1]
    r = pattern.dilation_rates[b]
    w = pattern.effective_segment(b, N)
    full, tail = divmod(N, w)
    per_segment = B * -(-w // r) * D * _acc_dtype(query.dtype).itemsize  # one segment's output rows
    chunk = max(1, _CPU_CALL_BYTES // per_segment) if query.device.type == "cpu" else max(full, 1)
    calls = []
    for h in range(H):
        c = h % r
        pieces = [(s0 * w, min(chunk, full - s0), w) for s0 in range(0, full, chunk)]
        for start, S, seg in (*pieces, (full * w, 1, tail)):
            if S and seg > c:  # the head keeps at least one position of these segments
                calls.append(_ViewCall(h, h // group, c, B, start, S, seg, r, is_causal,
                                       key_padding_mask, query.dtype))
    return calls


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_backend(backend, query, key_padding_mask, is_causal=False) -> AttentionBackend:
    if not isinstance(backend, str):
        return backend
    return get_backend(backend, query, has_mask=key_padding_mask is not None, is_causal=is_causal)


# ---------------------------------------------------------------------------- forward / backward
def dilated_attention_forward(
    query, key, value, pattern: DilatedPattern, *, is_causal: bool, scale: float,
    key_padding_mask=None, backend: AttentionBackend | str = "auto",
):
    """Autograd-free forward: ``(out (B, H, N, D), lse (B, H, N), aux)``.

    ``lse`` is float32 (float64 for float64 inputs), ``-inf`` for queries with no key.
    ``aux`` holds per-call kernel state that :func:`dilated_attention_backward` takes.
    """
    backend = _resolve_backend(backend, query, key_padding_mask, is_causal)
    B, H, N, D = query.shape
    acc = _acc_dtype(query.dtype)
    o_acc = torch.zeros(B, H, N, D, dtype=acc, device=query.device)
    l_acc = torch.full((B, H, N), _NEG_INF, dtype=acc, device=query.device)
    aux = []
    for b in range(len(pattern)):
        calls = _calls(pattern, b, query, key, is_causal, key_padding_mask)
        for call in calls:
            ob, lb, a = backend.forward(call.q_rows(query), call.kv_rows(key),
                                        call.kv_rows(value), call.mask, is_causal, scale)
            aux.append(a)
            ob, lb = ob.to(acc), lb.to(acc)
            if call.empty is not None:
                lb = lb.masked_fill(call.empty, _NEG_INF)
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
    into the returned log-sum-exp.
    """
    backend = _resolve_backend(backend, query, key_padding_mask, is_causal)
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    acc = _acc_dtype(query.dtype)
    d_q = torch.zeros(B, H, N, D, dtype=acc, device=query.device)
    d_k = torch.zeros(B, Hkv, N, D, dtype=acc, device=query.device)
    d_v = torch.zeros(B, Hkv, N, D, dtype=acc, device=query.device)
    # rows with no key at all: lse = +inf makes every probability exp(s - lse) exactly 0
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    n_call = 0
    for b in range(len(pattern)):
        for call in _calls(pattern, b, query, key, is_causal, key_padding_mask):
            qb, kb, vb = call.q_rows(query), call.kv_rows(key), call.kv_rows(value)
            ob, dob, lb = call.q_rows(out), call.q_rows(grad_out), call.q_rows(lse)
            a = None if aux is None else aux[n_call]
            n_call += 1
            if a is None and backend.name.startswith("cuda"):
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
    acc = _acc_dtype(qb.dtype)
    g = g.to(acc).unsqueeze(-1)  # (B, G, m, 1)
    a_k, l_i, aux = backend.forward(qb, kb, kb, call.mask, is_causal, scale)
    l_i = l_i.to(acc)
    if call.empty is not None:
        l_i = l_i.masked_fill(call.empty, _NEG_INF)
    weight = torch.exp(l_i - lb.to(acc)).unsqueeze(-1)  # P_merged / P_call, 0 where no key
    d_q = scale * g * weight * a_k.to(acc)
    zeros = torch.zeros_like(qb)
    _, _, d_k = backend.backward((g * qb.to(acc)).to(qb.dtype), qb, kb, kb, zeros, lb, aux,
                                 call.mask, is_causal, scale)
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
    q_heads = torch.arange(H, device=query.device)
    kv_heads = q_heads // (H // key.shape[1])
    parts = []
    for b in range(len(pattern)):
        lay = pattern.layout(b, N, H, device=query.device)
        call = _GatherCall(lay, q_heads, kv_heads, B, is_causal, key_padding_mask, acc)
        qb, kb, vb = (x.to(acc) for x in (call.q_rows(query), call.kv_rows(key),
                                           call.kv_rows(value)))
        s = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # (B, G, m, m)
        if call.mask is not None:
            s = s + call.mask
        m = s.shape[-1]
        if is_causal:
            s = s.masked_fill(~torch.ones(m, m, dtype=torch.bool, device=s.device).tril(),
                              _NEG_INF)
        none = ~torch.isfinite(s).any(-1, keepdim=True)  # rows with no key: NaN-free grads
        lb = torch.logsumexp(s.masked_fill(none, 0.0), -1).masked_fill(none.squeeze(-1), _NEG_INF)
        p = torch.exp(s - torch.where(torch.isfinite(lb), lb, 0.0).unsqueeze(-1))
        ob = torch.matmul(F.dropout(p, dropout_p, training=True), vb).reshape(B, H, -1, D)
        lb = lb.reshape(B, H, -1)
        if lay.valid is not None:
            lb = lb.masked_fill(~lay.valid, _NEG_INF)
        parts.append((lay.index.expand(B, -1, -1), ob, lb))
    with torch.no_grad():
        top = torch.full((B, H, N), _NEG_INF, dtype=acc, device=query.device)
        for idx, _, lb in parts:
            top.scatter_reduce_(2, idx, lb, "amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    denom = torch.zeros(B, H, N, dtype=acc, device=query.device)
    for idx, _, lb in parts:
        denom = denom.scatter_add(2, idx, torch.exp(lb - top.gather(2, idx)))
    lse = torch.where(denom > 0, top + torch.log(denom), torch.full_like(denom, _NEG_INF))
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.zeros(B, H, N, D, dtype=acc, device=query.device)
    for idx, ob, lb in parts:
        w = torch.exp(lb - safe.gather(2, idx)).unsqueeze(-1)
        out = out.scatter_add(2, idx.unsqueeze(-1).expand(-1, -1, -1, D), w * ob)
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
        be = _resolve_backend(backend, query, key_padding_mask, is_causal)
        out, lse = _DilatedAttentionFunction.apply(query, key, value, key_padding_mask, pattern,
                                                   is_causal, scale, be)
    return (out, lse) if return_lse else out
