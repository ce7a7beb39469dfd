"""Dilated attention, the public operator: checks, dispatch to the registered op, dropout path.

:func:`dilated_attention` checks its inputs (errors name the argument) and calls
``torch.ops.longnet.dilated_attention`` (:mod:`longnet.ops.library`), whose forward and backward
live in :mod:`longnet.ops.engine`: every branch runs as a few dense-kernel calls on strided views
(:mod:`longnet.ops.calls`) that merge by log-sum-exp. With ``dropout_p > 0`` a plain-autograd path
gathers each branch's rows (dropout acts on the mixed weights, which no fused kernel exposes).
``docs/design.md`` explains the math and the data flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longnet.ops.backends import BACKENDS
from longnet.ops.engine import dilated_attention_backward, dilated_attention_forward
from longnet.ops.library import dilated_attention_op
from longnet.ops.merge import NEG_INF as _NEG_INF
from longnet.ops.merge import acc_dtype as _acc_dtype
from longnet.ops.pattern import BranchLayout, DilatedPattern

__all__ = [
    "dilated_attention",
    "dilated_attention_forward",
    "dilated_attention_backward",
    "check_attention_inputs",
]


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


# ------------------------------------------------------------------------------- dropout path
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
        elif lay.valid is not None:
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
    segment_shift: int = 0,
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
        segment_shift: move every branch's segment boundaries this many positions earlier (see
            :class:`DilatedPattern`, ``shift``); a pattern passed as ``segment_lengths`` carries
            its own.
        backend: ``"auto"`` (fastest exact kernel for the device), or one of
            ``"cpu_flash"``, ``"cuda"``, ``"cuda_flash"``, ``"cuda_efficient"``, ``"math"``.
            A named backend that cannot run raises ``ValueError``.

    Returns:
        ``out`` (B, H, N, D) in the input dtype, or ``(out, lse)`` with ``return_lse``.

    A query kept by no branch outputs 0. NaN or inf in query/key/value propagate to the outputs
    that read them (as with SDPA); they are not checked for.
    """
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates, segment_shift)
    check_attention_inputs(query, key, value, key_padding_mask, enable_gqa=enable_gqa)
    _check_scalar_args(scale, dropout_p, is_causal)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0:
        out, lse = _dropout_dilated_attention(query, key, value, pattern, is_causal, scale,
                                              key_padding_mask, float(dropout_p))
    else:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        out, lse = dilated_attention_op(query, key, value, key_padding_mask,
                                        list(pattern.segment_lengths), list(pattern.dilation_rates),
                                        pattern.shift, is_causal, scale, backend)
    return (out, lse) if return_lse else out
