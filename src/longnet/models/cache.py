"""The generation cache of a :class:`~longnet.LongNetLM`: one layer cache per block.

With causal dilated attention a query only reads keys of its own segment, and per head only the
positions at its residue, so each layer keeps at most ``ceil(w_i / r_i)`` keys per head and branch
(:class:`longnet.ops.cache.DilatedLayerCache`): the cache stops growing once the largest segment
is full, whatever the context length.

Dense attention (``attention="dense"``) reads every earlier key, so its cache
(:class:`DenseLayerCache`) keeps them all and grows with the context: it is the baseline, exact
for the dense model at any length. To generate beyond the training length with a bounded cache,
use the paper's blockwise evaluation, ``LongNetConfig.for_eval_length`` (a single branch
``(max_train_length, 1)``): its cache is a dilated one, bounded by ``max_train_length``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longnet.ops.cache import DilatedLayerCache
from longnet.ops.pattern import DilatedPattern

__all__ = ["DilatedKVCache", "DenseLayerCache", "make_cache"]


class DenseLayerCache:
    """Every key/value of one layer (dense causal attention), with per-sequence positions.

    Same interface as :class:`~longnet.ops.cache.DilatedLayerCache`. Keys are stored per
    key/value head (GQA groups share them) in a buffer that doubles when full, and attention is
    ``F.scaled_dot_product_attention`` over the whole cache.

    Args:
        batch_size, num_heads, head_dim: query-side sizes.
        num_kv_heads: key/value heads (default ``num_heads``).
        dtype, device: storage.
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *,
                 num_kv_heads: int | None = None, dtype=torch.float32, device=None):
        self.B, self.H, self.D = batch_size, num_heads, head_dim
        self.Hkv = num_heads if num_kv_heads is None else num_kv_heads
        self.dtype, self.device = dtype, device
        self.length = 0  # slots used (padding slots included, marked by position -1)
        self.keys = torch.zeros(batch_size, self.Hkv, 0, head_dim, dtype=dtype, device=device)
        self.values = self.keys.clone()
        self.positions = torch.full((batch_size, 0), -1, dtype=torch.long, device=device)
        self.has_holes = False  # some slot holds no real token (padding)

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (keys, values, positions); the buffer may be larger."""
        per_slot = 2 * self.B * self.Hkv * self.D * self.keys.element_size() + self.B * 8
        return self.length * per_slot

    def _reserve(self, extra: int) -> None:
        need = self.length + extra
        cap = self.keys.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        grow = new_cap - cap
        pad = (0, 0, 0, grow)
        self.keys = F.pad(self.keys, pad)
        self.values = F.pad(self.values, pad)
        self.positions = F.pad(self.positions, (0, grow), value=-1)

    def fill_(self, length: int, *, capacity: int = 0,
              generator: torch.Generator | None = None) -> None:
        """Fill the cache with ``length`` random keys/values at positions ``0..length-1``, in a
        buffer of at least ``capacity`` slots.

        For benchmarks only: the cost of a dense decoding step does not depend on the values, and
        reaching position ``P`` by a real dense prefill costs ``O(P^2)``.
        """
        self._reserve(max(length, capacity) - self.length)
        shape = (self.B, self.Hkv, length, self.D)
        self.keys[:, :, :length] = torch.randn(shape, generator=generator).to(self.keys)
        self.values[:, :, :length] = torch.randn(shape, generator=generator).to(self.values)
        self.positions[:, :length] = torch.arange(length, device=self.positions.device)
        self.length = length

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, valid: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Causal attention of ``n`` new tokens over every cached token plus themselves.

        Args and result as :meth:`longnet.ops.cache.DilatedLayerCache.attend`: query
        (B, H, n, D), key/value (B, Hkv, n, D), positions (B, n) long, valid (B, n) bool ->
        (B, H, n, D). A padding query (no real key at or before it) reads only itself.
        """
        B, H, n, D = query.shape
        if (B, H, D) != (self.B, self.H, self.D) or key.shape[1] != self.Hkv:
            raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} do not fit a "
                             f"cache made for batch {self.B}, {self.H} heads ({self.Hkv} key/value"
                             f" heads), head dim {self.D}")
        if positions.shape != (B, n):
            raise ValueError(f"positions must have shape {(B, n)}, got {tuple(positions.shape)}")
        self._reserve(n)
        L0, L = self.length, self.length + n
        self.keys[:, :, L0:L] = key.to(self.dtype)
        self.values[:, :, L0:L] = value.to(self.dtype)
        if valid is None:
            self.positions[:, L0:L] = positions
        else:
            self.positions[:, L0:L] = torch.where(valid, positions, torch.full_like(positions, -1))
            self.has_holes = self.has_holes or not bool(valid.all())
        self.length = L
        k, v = self.keys[:, :, :L].to(query.dtype), self.values[:, :, :L].to(query.dtype)
        gqa = self.Hkv != H
        if n == 1 and not self.has_holes:  # decoding: every cached key is at or before the query
            return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=gqa)
        k_pos = self.positions[:, :L]  # (B, L)
        allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= positions[:, :, None])
        lonely = ~allowed.any(-1, keepdim=True)  # (B, n, 1): padding queries read themselves
        own = torch.zeros_like(allowed)
        own[:, :, L0:L] = torch.eye(n, dtype=torch.bool, device=own.device)
        allowed = allowed | (own & lonely)  # (B, n, L)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=allowed[:, None],
                                              scale=scale, enable_gqa=gqa)


class DilatedKVCache:
    """Per-layer attention caches of a language model, with per-sequence positions.

    Made by :meth:`LongNetLM.make_cache`. Each layer holds a
    :class:`~longnet.ops.cache.DilatedLayerCache` (dilated and sparse attention: at most
    ``ceil(w_i / r_i)`` keys per head and branch, whatever the context length) or a
    :class:`DenseLayerCache` (dense attention: every key, growing with the context).

    Attributes:
        layers: one layer cache per block.
        lengths: (B,) long, real tokens held so far per sequence (the position of its next token).
        patterns: the dilated pattern of each layer (``None`` for dense layers).
    """

    def __init__(self, layers: list, patterns: list[DilatedPattern | None], batch_size: int,
                 device=None):
        if len(layers) != len(patterns):
            raise ValueError(f"got {len(layers)} layer caches for {len(patterns)} patterns")
        self.layers = layers
        self.patterns = patterns
        self.batch_size = batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held now, summed over layers (keys, values, positions)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def max_nbytes(self) -> int | None:
        """Most bytes the cache can ever hold, or ``None`` when a dense layer makes it unbounded."""
        total = 0
        for layer, pattern in zip(self.layers, self.patterns):
            if pattern is None:
                return None
            slot = 2 * layer.D * torch.empty((), dtype=layer.dtype).element_size() + 8
            slots = sum(pattern.max_cached_positions(b) for b in range(len(pattern)))
            total += layer.B * layer.H * slots * slot
        return total

    @property
    def bounded(self) -> bool:
        """True when no layer is dense (the size is bounded by the patterns)."""
        return all(p is not None for p in self.patterns)

    def unread_before(self, last_position: int) -> int:
        """First position that the cache (and so the next tokens) can still depend on.

        When every segment length of a layer divides its largest one ``W``, the hidden state of a
        position ``p`` at any layer depends only on the tokens of ``[W * (p // W), p]``: each branch
        reads inside its own segment, which lies inside ``p``'s ``W``-segment (positions, RoPE or
        XPos, are absolute and unchanged). Tokens before the ``W``-segment of ``last_position`` are
        thus never read again, and a prompt can skip them exactly: prefilling a prompt of any
        length costs at most ``W`` tokens. Returns 0 when that does not hold (dense layers,
        patterns that do not nest).
        """
        tops = set()
        for pattern in self.patterns:
            if pattern is None:
                return 0
            top = max(pattern.segment_lengths)
            if any(top % w for w in pattern.segment_lengths):
                return 0
            tops.add(top)
        top = math.lcm(*tops)  # layers with different tops: their common multiple
        return (last_position // top) * top

    def __repr__(self) -> str:
        kinds = {type(layer).__name__ for layer in self.layers}
        return (f"DilatedKVCache(layers={len(self.layers)} x {'/'.join(sorted(kinds))}, "
                f"batch_size={self.batch_size}, nbytes={self.nbytes})")


def make_cache(model, batch_size: int, *, dtype: torch.dtype | None = None,
               device=None) -> DilatedKVCache:
    """An empty :class:`DilatedKVCache` for ``model`` (a :class:`~longnet.LongNetLM`).

    Args:
        batch_size: sequences generated together.
        dtype, device: storage; default the model's parameter dtype and device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    param = next(model.parameters())
    dtype = param.dtype if dtype is None else dtype
    device = param.device if device is None else device
    layers, patterns = [], []
    for block in model.blocks:
        attn = block.attn
        if attn.pattern is None:
            layers.append(DenseLayerCache(batch_size, attn.num_heads, attn.head_dim,
                                          num_kv_heads=attn.num_kv_heads, dtype=dtype,
                                          device=device))
        else:
            layers.append(DilatedLayerCache(attn.pattern, batch_size, attn.num_heads,
                                            attn.head_dim, dtype=dtype, device=device))
        patterns.append(attn.pattern)
    return DilatedKVCache(layers, patterns, batch_size, device=device)
