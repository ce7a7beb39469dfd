"""Explicit attention in plain torch ops: runs on every device and dtype, O(L^2) per call.

The tested fallback for the fused kernels, and the backend for dtypes they lack (float16 on CPU).
"""

from __future__ import annotations

import torch

from longnet.ops.merge import acc_dtype

__all__ = ["MathBackend"]


def _scores(query, key, mask, is_causal, scale):
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, G, L, L)
    if mask is not None:
        scores = scores + mask
    if is_causal:
        L, S = scores.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


class MathBackend:
    name = "math"
    needs_forward_state = False

    def unsupported_reason(self, query, *, has_mask):
        return None

    def forward(self, query, key, value, mask, is_causal, scale):
        acc = acc_dtype(query.dtype)
        scores = _scores(query.to(acc), key.to(acc), None if mask is None else mask.to(acc),
                         is_causal, scale)
        lse = torch.logsumexp(scores, dim=-1)  # (B, G, L)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))
        out = torch.matmul(probs, value.to(acc)).to(query.dtype)
        return out, lse, None

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        acc = acc_dtype(query.dtype)
        q, k, v = query.to(acc), key.to(acc), value.to(acc)
        do, o = grad_out.to(acc), out.to(acc)
        scores = _scores(q, k, None if mask is None else mask.to(acc), is_causal, scale)
        probs = torch.exp(scores - lse.to(acc).unsqueeze(-1))  # P with the merged lse
        d_v = torch.matmul(probs.transpose(-1, -2), do)
        d_p = torch.matmul(do, v.transpose(-1, -2))
        delta = (do * o).sum(-1, keepdim=True)
        d_s = probs * (d_p - delta)
        d_q = torch.matmul(d_s, k) * scale
        d_k = torch.matmul(d_s.transpose(-1, -2), q) * scale
        return d_q.to(query.dtype), d_k.to(key.dtype), d_v.to(value.dtype)
