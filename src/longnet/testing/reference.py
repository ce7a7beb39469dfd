"""Dense float64 reference of dilated attention: a simple reference the tests compare the
operator against, not a fast path (``O(N^2)`` memory and time; use
:func:`longnet.dilated_attention` for real work).

The branch mixture ``sum_i alpha_i O_i`` with ``alpha_i = s_i / sum_j s_j`` equals one softmax over
the union of the branches' keys, a key counted once per branch that holds it. So the reference
builds the count matrix ``C`` (H, N, N), adds ``log C`` to the scores (``-inf`` where ``C = 0``),
takes one softmax and multiplies by ``V``. Run it in float64.
"""

from __future__ import annotations

import math

import torch

from longnet.ops.pattern import DilatedPattern

__all__ = ["count_matrix", "reference_dilated_attention"]


def count_matrix(pattern: DilatedPattern, length: int, num_heads: int, *, is_causal: bool = False,
                 device=None) -> torch.Tensor:
    """(H, N, N) float64: how many branches let query ``i`` of head ``h`` read key ``j``."""
    pos = torch.arange(length, device=device)
    heads = torch.arange(num_heads, device=device).view(-1, 1, 1)
    counts = torch.zeros(num_heads, length, length, dtype=torch.float64, device=device)
    for b in range(len(pattern)):
        counts += pattern.reads(b, pos.view(1, -1, 1), pos.view(1, 1, -1), heads, length,
                                is_causal=is_causal).to(torch.float64)
    return counts


def reference_dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths, dilation_rates,
    *, is_causal: bool = False, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(out, lse)`` of dilated attention; autograd flows through both.

    Shapes as :func:`longnet.dilated_attention`. Rows with no key give output 0 and lse ``-inf``.
    """
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    if Hkv != H:
        rep = H // Hkv
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    counts = count_matrix(pattern, N, H, is_causal=is_causal, device=query.device)  # (H, N, N)
    bias = counts.log().to(query.dtype).unsqueeze(0)  # -inf where no branch holds the pair
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale + bias  # (B, H, N, N)
    empty = ~torch.isfinite(scores).any(-1, keepdim=True)  # rows with no key at all
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1)  # (B, H, N); NaN-free grads
    lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(probs, value)
    return out, lse
