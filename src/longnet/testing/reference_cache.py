"""A second, independent bounded generation cache: a simple reference the tests compare the slot
cache against (like :mod:`longnet.testing.reference` for the operator), not the fast path.

Generation uses :class:`longnet.models.cache.SlotLayerCache`: measured on CPU
(``benchmarks/decode.py``) it decodes 2-3x and prefills about 10x faster than this cache, which
therefore has no user; tests compare the two, and ``make_cache(layer_cache=DilatedLayerCache)``
still builds a model cache from it.

Causal dilated attention over a bounded cache, for decoding and chunked prefill.

A causal query at position ``p`` only reads keys of its own segment (per branch), and per head
only the positions at that head's residue. So one head needs at most ``ceil(w_i / r_i)`` cached
keys per branch: :class:`DilatedLayerCache` keeps exactly those of each sequence's current
segment and drops the rest. Memory and time per token are bounded by the pattern, whatever the
context length.

Positions are per sequence: ``positions`` (B, n) gives each new token's position counted from
that sequence's first real token, so left-padded prompts of different lengths decode exactly as
if each ran alone. Padding tokens (``valid`` False) are never cached and read nothing.
"""

from __future__ import annotations

import math

import torch

from longnet.ops.cache_tokens import new_tokens
from longnet.ops.kv_slots import kv_slot_layout
from longnet.ops.merge import acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["DilatedLayerCache"]

_NEG_INF = float("-inf")


class DilatedLayerCache:
    """The keys/values one attention layer still needs, per branch (see module docstring).

    Args:
        pattern: the layer's dilated pattern.
        batch_size, num_heads, head_dim: query-side sizes (keys are stored per query head: this
            reference keeps the simple layout; the slot cache stores per key/value head).
        num_kv_heads: key/value heads of the keys it is given (default ``num_heads``).
        dtype, device: storage.
    """

    def __init__(self, pattern: DilatedPattern, batch_size: int, num_heads: int, head_dim: int,
                 *, num_kv_heads: int | None = None, dtype=torch.float32, device=None):
        self.pattern = pattern
        self.B, self.H, self.D = batch_size, num_heads, head_dim
        self.Hkv = kv_slot_layout(pattern, num_heads, num_kv_heads).num_kv_heads  # checks the counts
        self.layout = kv_slot_layout(pattern, num_heads)  # stored per query head (G = 1)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []  # per branch (B, H, M, D)
        self.values: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []  # per branch (B, H, M) long, -1 = empty slot
        for _ in range(len(pattern)):  # empty until tokens arrive; at most ceil(w/r) slots
            self.keys.append(torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype,
                                         device=device))
            self.values.append(self.keys[-1].clone())
            self.positions.append(torch.full((batch_size, num_heads, 0), -1, dtype=torch.long,
                                             device=device))

    @property
    def nbytes(self) -> int:
        """Bytes held now (keys, values and their positions)."""
        return sum(t.numel() * t.element_size()
                   for ts in (self.keys, self.values, self.positions) for t in ts)

    @property
    def max_nbytes(self) -> int:
        """Most bytes this layer can hold: ``ceil(w_i / r_i)`` slots per query head and branch."""
        return self.layout.nbytes(self.B, self.D, self.dtype)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, valid: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Causal dilated attention of ``n`` new tokens over the cache plus themselves.

        Args:
            query: (B, H, n, D); key, value: (B, Hkv, n, D) of the same new tokens.
            positions: (B, n) long, each token's position in its sequence (increasing by one
                across real tokens and calls).
            valid: (B, n) bool, False for padding tokens; default all True.
        Returns:
            (B, H, n, D); exactly what full causal dilated attention over the whole sequence
            gives at these positions. The cache is updated to keep what later tokens can read.
        """
        B, H, n, D = query.shape
        valid, k_new, v_new = new_tokens(self, query, key, value, positions, valid)
        group = torch.arange(H, device=query.device) // (H // self.Hkv)  # kv head of each query head
        k_new, v_new = k_new[:, group], v_new[:, group]  # (B, H, n, D)
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        acc = acc_dtype(query.dtype)
        heads = torch.arange(H, device=query.device).view(1, H, 1)
        q_pos = positions.unsqueeze(1)  # (B, 1, n)
        new_pos = torch.where(valid, positions, torch.full_like(positions, -1)).unsqueeze(1)
        new_pos = new_pos.expand(B, H, n)
        out = torch.zeros(B, H, n, D, dtype=acc, device=query.device)
        lse = torch.full((B, H, n), _NEG_INF, dtype=acc, device=query.device)
        q = query.to(acc)
        for b in range(len(self.pattern)):
            w = self.pattern.segment_lengths[b]
            keys = torch.cat([self.keys[b], k_new], dim=2)  # (B, H, M + n, D)
            vals = torch.cat([self.values[b], v_new], dim=2)
            k_pos = torch.cat([self.positions[b], new_pos], dim=2)  # (B, H, M + n)
            # which tokens each head keeps in this branch: residue h % r inside the segment
            q_kept = self.pattern.keeps(b, q_pos, heads) & valid.unsqueeze(1)  # (B, H, n)
            k_kept = self.pattern.keeps(b, k_pos, heads)  # (B, H, M + n)
            allowed = (q_kept.unsqueeze(-1) & k_kept.unsqueeze(-2)
                       & ((q_pos // w).unsqueeze(-1) == (k_pos // w).unsqueeze(-2))
                       & (k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)))  # (B, H, n, M + n)
            scores = torch.matmul(q, keys.to(acc).transpose(-1, -2)) * scale
            scores = scores.masked_fill(~allowed, _NEG_INF)
            none = ~allowed.any(-1, keepdim=True)
            l_b = torch.logsumexp(scores.masked_fill(none, 0.0), -1).masked_fill(
                none.squeeze(-1), _NEG_INF)
            p = torch.exp(scores - torch.where(torch.isfinite(l_b), l_b, 0.0).unsqueeze(-1))
            o_b = torch.matmul(p, vals.to(acc))
            l_new = torch.logaddexp(lse, l_b)
            safe = torch.where(torch.isfinite(l_new), l_new, 0.0)
            out = (out * torch.exp(lse - safe).unsqueeze(-1)
                   + o_b * torch.exp(l_b - safe).unsqueeze(-1))
            lse = l_new
            self._keep(b, keys, vals, k_pos, k_kept, positions, valid, w)
        return out.to(query.dtype)

    def _keep(self, b, keys, vals, k_pos, k_kept, positions, valid, w):
        """Keep, per sequence and head, the kept keys of the segment of the last real token."""
        last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(1)  # (B,)
        prev = self.positions[b].amax(dim=(1, 2)) if self.positions[b].shape[2] else None
        if prev is not None:
            last = torch.maximum(last, prev)
        seg = torch.div(last, w, rounding_mode="floor").view(-1, 1, 1)
        keep = k_kept & (torch.div(k_pos, w, rounding_mode="floor") == seg) & (last.view(-1, 1, 1) >= 0)
        count = int(keep.sum(-1).max().item()) if keep.numel() else 0
        M = self.pattern.max_cached_positions(b)
        if count > M:  # cannot happen for consecutive positions; guards against misuse
            raise ValueError("positions must increase by one per real token across calls")
        # stable compaction: kept slots first, in position order
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :count]
        self.keys[b] = keys.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
        self.values[b] = vals.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, vals.shape[-1]))
        pos = k_pos.gather(2, order)
        self.positions[b] = torch.where(keep.gather(2, order), pos, torch.full_like(pos, -1))
