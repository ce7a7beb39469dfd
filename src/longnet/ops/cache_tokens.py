"""Checks shared by the layer caches: new tokens against the cache they continue."""

from __future__ import annotations

import torch

__all__ = ["new_tokens"]


def new_tokens(cache, query, key, value, positions, valid):
    """Check new tokens against a layer cache (``.B``, ``.H``, ``.Hkv``, ``.D``, ``.dtype``).

    Returns ``(valid (B, n) bool, key, value)`` with key/value (B, Hkv, n, D) in the cache's
    dtype, one per key/value head (a cache that stores per query head expands them itself).
    """
    B, H, n, D = query.shape
    if (B, H, D) != (cache.B, cache.H, cache.D):
        raise ValueError(f"query of shape {tuple(query.shape)} does not fit a cache made for "
                         f"batch {cache.B}, {cache.H} heads, head dim {cache.D}")
    if positions.shape != (B, n):
        raise ValueError(f"positions must have shape {(B, n)}, got {tuple(positions.shape)}")
    if key.shape != (B, cache.Hkv, n, D) or value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} does not fit a cache "
                         f"made for {cache.Hkv} key/value heads (num_kv_heads); expected "
                         f"{(B, cache.Hkv, n, D)}")
    valid = torch.ones(B, n, dtype=torch.bool, device=query.device) if valid is None else valid
    return valid, key.to(cache.dtype), value.to(cache.dtype)
