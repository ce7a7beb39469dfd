"""Checks shared by the layer caches: new tokens against the cache they continue."""

from __future__ import annotations

import torch

__all__ = ["new_tokens"]


def new_tokens(cache, query, key, value, positions, valid):
    """Check new tokens against a layer cache (``.B``, ``.H``, ``.D``, ``.dtype``).

    Returns ``(valid (B, n) bool, key, value)`` with key/value expanded to the query heads
    (B, H, n, D) in the cache's dtype (heads of one GQA group keep different residues).
    """
    B, H, n, D = query.shape
    if (B, H, D) != (cache.B, cache.H, cache.D):
        raise ValueError(f"query of shape {tuple(query.shape)} does not fit a cache made for "
                         f"batch {cache.B}, {cache.H} heads, head dim {cache.D}")
    if positions.shape != (B, n):
        raise ValueError(f"positions must have shape {(B, n)}, got {tuple(positions.shape)}")
    Hkv = key.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    valid = torch.ones(B, n, dtype=torch.bool, device=query.device) if valid is None else valid
    kv_heads = torch.arange(H, device=query.device) // (H // Hkv)
    return valid, key[:, kv_heads].to(cache.dtype), value[:, kv_heads].to(cache.dtype)
