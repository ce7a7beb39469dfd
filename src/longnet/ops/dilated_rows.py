"""Exact dilated attention for a few query rows of a longer sequence (cached decoding).

With a KV cache the queries of a forward pass are the last ``q`` positions of the ``n`` keys.
:func:`dilated_attention_rows` computes, for those rows only, exactly what
:func:`longnet.dilated_attention` would compute over the whole length-``n`` sequence: per branch
``(w, r)`` with ``w_eff = min(w, n)``, a query at relative position ``p`` keeps its row when
``(p - s) % r == h % r`` (``s = (p // w_eff) * w_eff`` its segment start) and then reads the keys
``s + h % r + j * r`` of its segment (``<= p`` when causal). All branches' keys go into one
softmax, a key counted once per branch that holds it, which is the branch mixture of the paper
(see docs/design.md, "One softmax over the union"). A query read by no branch outputs 0.

Cost per query: ``sum_i ceil(w_i / r_i)`` keys, so decoding a token reads a bounded number of keys
whatever the context length. Plain autograd; used where the fast operator (which needs
``q == n``) does not apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longnet.ops.merge import acc_dtype
from longnet.ops.pattern import DilatedPattern

__all__ = ["dilated_attention_rows"]

# elements of one gathered key block (B * H * chunk * keys * D) before queries are chunked
_CHUNK_ELEMENTS = 1 << 24


def _row_keys(pattern: DilatedPattern, rel: torch.Tensor, num_heads: int, length: int,
              offsets: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Key indices and validity of every branch for queries at relative positions ``rel``.

    Args:
        rel: (B, q) query positions counted from each row's start (negative: a padding query).
        offsets: (B,) index of each row's position 0 in the key tensor.
    Returns:
        ``index`` (B, H, q, M) long indices into the key tensor (0 where invalid) and ``valid``
        (B, H, q, M) bool, ``M = sum_i ceil(min(w_i, n) / r_i)``.
    """
    device = rel.device
    heads = torch.arange(num_heads, device=device).view(1, num_heads, 1, 1)
    rel4 = rel[:, None, :, None]  # (B, 1, q, 1)
    off4 = offsets.view(-1, 1, 1, 1)
    index, valid = [], []
    for b, r in enumerate(pattern.dilation_rates):
        w = pattern.effective_segment(b, length)
        m = -(-w // r)
        start = pattern.segment_index(b, rel4, length) * w  # (B, 1, q, 1)
        res = pattern.residue(heads, b)  # (1, H, 1, 1)
        kept = pattern.keeps(b, rel4, heads, length)  # (B, H, q, 1): the query's row exists
        pos = start + res + torch.arange(m, device=device).view(1, 1, 1, m) * r  # (B, H, q, m)
        ok = kept & (pos < torch.clamp(start + w, max=length))
        if is_causal:
            ok = ok & (pos <= rel4)
        idx = pos + off4  # back to indices of the key tensor
        ok = ok & (idx < length)  # past the row's end: wrapped padding, never a real key
        index.append(torch.where(ok, idx, torch.zeros_like(idx)))
        valid.append(ok)
    return torch.cat(index, -1), torch.cat(valid, -1)


def dilated_attention_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pattern: DilatedPattern, *,
    query_start: int, is_causal: bool, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, row_offsets: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dilated attention of the query rows ``query_start .. query_start + q - 1`` over all keys.

    Args:
        query: (B, H, q, D), the queries at key indices ``query_start + i``.
        key, value: (B, Hkv, n, D); ``H % Hkv == 0`` (query head ``h`` reads ``h // (H // Hkv)``).
        pattern: the dilated pattern; segments use ``w_eff = min(w, n)``.
        query_start: key index of the first query row.
        is_causal: keys only at positions <= the query's.
        scale: score scale, default ``1 / sqrt(D)``.
        key_padding_mask: (B, n) bool, True = real key.
        row_offsets: (B,) long; row ``b``'s position 0 is key index ``row_offsets[b]`` (left
            padding): positions, segments and residues count from there, and the row is read as
            if its first ``row_offsets[b]`` keys were moved to its end (where they must be
            padding). ``None``: all zero.
        dropout_p: dropout on the attention weights.

    Returns:
        (B, H, q, D) in the query dtype; the same rows :func:`longnet.dilated_attention` gives for
        the whole (shifted) sequence.
    """
    B, H, q, D = query.shape
    Hkv, n = key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if not 0 <= query_start <= n - q:
        raise ValueError(f"query_start={query_start} puts {q} query rows outside {n} keys")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = acc_dtype(query.dtype)
    device = query.device
    offsets = (torch.zeros(B, dtype=torch.long, device=device) if row_offsets is None
               else row_offsets.to(device=device, dtype=torch.long))
    kv_heads = (torch.arange(H, device=device) // (H // Hkv)).view(1, H, 1, 1)
    b_idx = torch.arange(B, device=device).view(B, 1, 1, 1)
    key_rows, value_rows = key.reshape(-1, D), value.reshape(-1, D)  # (B * Hkv * n, D)
    num_keys = sum(-(-pattern.effective_segment(b, n) // r)
                   for b, r in enumerate(pattern.dilation_rates))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * num_keys * D))
    outs = []
    for c0 in range(0, q, chunk):
        c1 = min(q, c0 + chunk)
        pos = query_start + torch.arange(c0, c1, device=device)  # (c,) key indices
        rel = pos.unsqueeze(0) - offsets.unsqueeze(1)  # (B, c)
        index, valid = _row_keys(pattern, rel, H, n, offsets, is_causal)  # (B, H, c, M)
        M = index.shape[-1]
        if key_padding_mask is not None:
            pad_ok = key_padding_mask.reshape(-1).index_select(0, (b_idx * n + index).reshape(-1))
            valid = valid & pad_ok.view(B, H, -1, M)
        rows = ((b_idx * Hkv + kv_heads) * n + index).reshape(-1)  # into (B * Hkv * n) rows
        k = key_rows.index_select(0, rows).view(B, H, -1, M, D).to(acc)  # (B, H, c, M, D)
        v = value_rows.index_select(0, rows).view(B, H, -1, M, D).to(acc)
        qc = query[:, :, c0:c1].to(acc)  # (B, H, c, D)
        s = torch.einsum("bhqd,bhqmd->bhqm", qc, k) * scale
        s = s.masked_fill(~valid, float("-inf"))
        empty = ~valid.any(-1, keepdim=True)  # rows with no key: output 0, NaN-free gradients
        lse = torch.logsumexp(s.masked_fill(empty, 0.0), -1, keepdim=True)
        p = torch.exp(s - lse)  # (B, H, c, M), 0 at invalid keys
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p, training=True)
        outs.append(torch.einsum("bhqm,bhqmd->bhqd", p, v))
    return torch.cat(outs, 2).to(query.dtype)
