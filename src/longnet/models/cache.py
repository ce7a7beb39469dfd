"""The generation cache of a :class:`~longnet.LongNetLM`: one layer cache per block.

With causal dilated attention a query only reads keys of its own segment, and per head only the
positions at its residue, so each layer keeps at most ``ceil(w_i / r_i)`` keys per query head and
branch: the cache stops growing once the largest segment is full, whatever the context length.
:class:`SlotLayerCache` does this (fixed slots written in place, one softmax over all branches),
per key/value head: with grouped-query attention a key/value head keeps the union of its group's
residues once (:mod:`longnet.ops.kv_slots`), not one copy per query head. An independent second
cache, :class:`longnet.testing.reference_cache.DilatedLayerCache` (per query head, grows to the bound,
recompacted at each call, one softmax per branch), is kept as a test reference: the slot cache
decodes about 2-3x faster and prefills about 10x faster on CPU (``benchmarks/decode.py``).

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

from longnet.ops.cache_tokens import new_tokens
from longnet.ops.dilated import dilated_attention
from longnet.ops.kv_slots import kv_slot_layout, slot_of_offset
from longnet.ops.pattern import DilatedPattern, kept, same_segment

__all__ = ["DilatedKVCache", "DenseLayerCache", "SlotLayerCache", "make_cache"]

_NEG_INF = float("-inf")


class SlotLayerCache:
    """The keys/values one dilated attention layer still needs, in fixed slots (no copying).

    Storage is per key/value head. Query head ``h`` of branch ``(w, r)`` reads the positions ``p``
    of the current segment with ``(p % w) % r == h % r``, through key/value head ``h // G``
    (``G = H / Hkv``); so key/value head ``j`` keeps the positions at the union of its group's
    residues, each once, in the slots of :mod:`longnet.ops.kv_slots` (``(p % w) // r * m +
    rank``, ``m = min(G, r)`` residues per head). A new token is written in place (overwriting a
    slot of a finished segment) and nothing is ever compacted. The slots of all branches are one
    array of ``S`` slots per key/value head (``S = sum_i ceil(w_i / r_i)`` without GQA; with GQA
    at most ``sum_i min(w_i, G * ceil(w_i / r_i))``, against ``G * sum_i ceil(w_i / r_i)`` for
    copies per query head: the ``r = 1`` branch is held once, not ``G`` times). Attention is a
    single softmax over the slots: a key held by several branches sits in several slots, which
    is exactly the branch mixture (the one-softmax identity of docs/design.md). A query reads a
    slot when the slot holds a real position of the query's segment (in the slot's branch) at or
    before the query, both kept by the query's head in that branch. The query heads of a group
    attend as one (B, Hkv, G * n) block over their key/value head's slots, so keys are never
    copied per query head.

    A prefill chunk that starts a segment of every branch (a multiple of all segment lengths)
    reads nothing cached and runs the dilated attention operator on itself; other chunks attend in
    sub-chunks of ``max_chunk`` rows over the slots plus their own keys (each counted once per
    branch holding it, a ``log(count)`` score bias).

    Same interface and results as :class:`~longnet.testing.reference_cache.DilatedLayerCache`;
    preallocated, so ``nbytes`` is the bound (:attr:`max_nbytes`) from the first token on.

    Args:
        pattern: the layer's dilated pattern (unshifted).
        batch_size, num_heads, head_dim: query-side sizes.
        num_kv_heads: key/value heads (default ``num_heads``); ``num_heads`` must be a multiple.
        dtype, device: storage.
    """

    def __init__(self, pattern: DilatedPattern, batch_size: int, num_heads: int, head_dim: int,
                 *, num_kv_heads: int | None = None, dtype=torch.float32, device=None):
        self.pattern = pattern
        self.layout = kv_slot_layout(pattern, num_heads, num_kv_heads)
        self.B, self.H, self.Hkv, self.D = batch_size, num_heads, self.layout.num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        sizes = self.layout.sizes
        self.offsets = list(self.layout.firsts)  # first slot of each branch
        S = self.layout.total
        self.keys = torch.zeros(batch_size, self.Hkv, S, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch_size, self.Hkv, S), -1, dtype=torch.long,
                                    device=device)  # -1 = empty
        # per slot: its branch's segment length and dilation rate, (S,)
        self.slot_w = torch.tensor([w for w, n in zip(pattern.segment_lengths, sizes)
                                    for _ in range(n)], dtype=torch.long, device=device)
        self.slot_r = torch.tensor([r for r, n in zip(pattern.dilation_rates, sizes)
                                    for _ in range(n)], dtype=torch.long, device=device)
        # per branch: segment length, dilation rate, first slot, residues per kv head, (nb,)
        self.branch_w = torch.tensor(pattern.segment_lengths, dtype=torch.long, device=device)
        self.branch_r = torch.tensor(pattern.dilation_rates, dtype=torch.long, device=device)
        self.branch_first = torch.tensor(self.offsets, dtype=torch.long, device=device)
        self.branch_m = torch.tensor(self.layout.residue_counts(), dtype=torch.long, device=device)
        self.rank = self.layout.rank_table(device)  # (nb, Hkv, max r), -1: residue not kept
        self.slot_branch = torch.tensor([b for b, n in enumerate(sizes) for _ in range(n)],
                                        dtype=torch.long, device=device)  # (S,)
        # (H, S) bool: query head h reads slot s of its key/value head when it keeps the offset
        offsets = self.layout.slot_offsets(device)[torch.arange(num_heads, device=device)
                                                   // self.layout.group_size]  # (H, S), -1: none
        self.head_reads = kept(offsets, torch.arange(num_heads, device=device).view(-1, 1),
                               self.slot_w, self.slot_r)
        self.period = math.lcm(*pattern.segment_lengths)  # every segment starts at its multiples
        self.max_chunk = 256  # query rows per unaligned sub-chunk: (B, H, 256, S + 256) scores

    @property
    def nbytes(self) -> int:
        """Bytes held (keys, values and their positions): constant, the pattern's bound."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    @property
    def max_nbytes(self) -> int:
        """Most bytes this layer can hold: :meth:`KVSlotLayout.nbytes` (equal to :attr:`nbytes`)."""
        return self.layout.nbytes(self.B, self.D, self.dtype)

    def _query_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B, H, n, S) bool: query (B, n) positions may read slot positions (B, Hkv, S).

        Three factors: the query head keeps the slot's offset (static, :attr:`head_reads`), the
        query is kept by its head in the slot's branch, and the slot holds a position of the
        query's segment at or before it (per key/value head, shared by its group)."""
        B, n = q_pos.shape
        H, Hkv, G = self.H, self.Hkv, self.layout.group_size
        heads = torch.arange(H, device=q_pos.device).view(1, H, 1, 1)
        q = q_pos[:, None, :, None]  # (B, 1, n, 1)
        q_kept = kept(q, heads, self.branch_w, self.branch_r)[..., self.slot_branch]  # (B, H, n, S)
        k = k_pos[:, :, None, :]  # (B, Hkv, 1, S)
        held = (k >= 0) & (k <= q) & same_segment(k, q, self.slot_w)  # (B, Hkv, n, S)
        S = k_pos.shape[-1]
        mask = (self.head_reads.view(1, Hkv, G, 1, S) & q_kept.view(B, Hkv, G, n, S)
                & held.view(B, Hkv, 1, n, S))
        return mask.view(B, H, n, S)

    def _attention(self, query, keys, values, mask, scale):
        """SDPA of query heads (B, H, n, D) over their key/value head's keys (B, Hkv, L, D), mask
        (B, H, n, L) bool or float: the G heads of a group run as G * n rows of one head."""
        B, H, n, D = query.shape
        Hkv, L = keys.shape[1], keys.shape[2]
        out = F.scaled_dot_product_attention(
            query.reshape(B, Hkv, -1, D), keys, values, attn_mask=mask.reshape(B, Hkv, -1, L),
            scale=scale)
        return out.view(B, H, n, D)

    def _write(self, k_new, v_new, positions, valid) -> None:
        """Store the new tokens that later queries can read: those of each row's last segment,
        in every key/value head whose group keeps them (k_new, v_new: (B, Hkv, n, D))."""
        B, Hkv, n, _ = k_new.shape
        last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(1)  # (B,)
        w, r, first, m = self.branch_w, self.branch_r, self.branch_first, self.branch_m  # (nb,)
        p = positions[:, None, :, None]  # (B, 1, n, 1)
        offset = p % w  # (B, 1, n, nb)
        branch = torch.arange(len(w), device=positions.device)
        kv = torch.arange(Hkv, device=positions.device).view(1, Hkv, 1, 1)
        rank = self.rank[branch, kv, offset % r]  # (B, Hkv, n, nb), -1: not kept by the group
        write = (valid[:, None, :, None] & (p >= 0) & (rank >= 0)
                 & same_segment(p, last.view(B, 1, 1, 1), w))  # (B, Hkv, n, nb)
        bi, ji, ti, br = write.nonzero(as_tuple=True)
        if bi.numel() == 0:
            return
        slot = first[br] + slot_of_offset(offset[bi, 0, ti, br], r[br], m[br], rank[bi, ji, ti, br])
        self.keys[bi, ji, slot] = k_new[bi, ji, ti]
        self.values[bi, ji, slot] = v_new[bi, ji, ti]
        self.positions[bi, ji, slot] = positions[bi, ti]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, valid: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Causal dilated attention of ``n`` new tokens over the cache plus themselves.

        Args and result as :meth:`longnet.testing.reference_cache.DilatedLayerCache.attend`: query
        (B, H, n, D), key/value (B, Hkv, n, D), positions (B, n) long (increasing by one across
        real tokens and calls), valid (B, n) bool -> (B, H, n, D). Padding queries output values
        that nothing reads (finite).
        """
        B, H, n, D = query.shape
        valid, k_new, v_new = new_tokens(self, query, key, value, positions, valid)  # (B, Hkv, n, D)
        if n == 1:  # decoding: write, then one softmax over the slots
            self._write(k_new, v_new, positions, valid)
            allowed = self._query_mask(positions, self.positions)  # (B, H, 1, S)
            none = ~allowed.any(-1, keepdim=True)  # (B, H, 1, 1): a query no branch keeps
            out = self._attention(query, self.keys.to(query.dtype), self.values.to(query.dtype),
                                  allowed | none, scale)
            return out.masked_fill(none, 0.0)  # as the operator: 0 where no key is read
        # a chunk: where it starts a segment of every branch (a multiple of all w), nothing
        # cached is read and the operator runs on it; before that, sub-chunks over the slots
        cut = n
        if bool(valid.all()) and bool((positions == positions[:1]).all()):
            cut = min(n, -int(positions[0, 0]) % self.period)
        if cut == 0:
            return self._aligned(query, key, value, k_new, v_new, positions, valid, scale)
        outs = [self._chunk(query[:, :, i:j], k_new[:, :, i:j], v_new[:, :, i:j],
                            positions[:, i:j], valid[:, i:j], scale)
                for i in range(0, cut, self.max_chunk)
                for j in [min(i + self.max_chunk, cut)]]
        if cut < n:
            rest = slice(cut, n)
            outs.append(self._aligned(query[:, :, rest], key[:, :, rest], value[:, :, rest],
                                      k_new[:, :, rest], v_new[:, :, rest], positions[:, rest],
                                      valid[:, rest], scale))
        return torch.cat(outs, 2)

    def _aligned(self, query, key, value, k_new, v_new, positions, valid, scale):
        """A chunk starting at a multiple of every segment length: the operator on it alone."""
        out = dilated_attention(query, key, value, segment_lengths=self.pattern, is_causal=True,
                                scale=scale, enable_gqa=key.shape[1] != query.shape[1])
        self._write(k_new, v_new, positions, valid)
        return out

    def _chunk(self, query, k_new, v_new, positions, valid, scale):
        """Slots as they were plus the new keys, each counted once per branch holding it."""
        B, H, n, _ = query.shape
        heads = torch.arange(H, device=query.device).view(1, H, 1, 1)
        q, k = positions[:, None, :, None], positions[:, None, None, :]  # (B,1,n,1), (B,1,1,n)
        pair = valid[:, None, :, None] & valid[:, None, None, :] & (k <= q)  # (B, 1, n, n)
        count = torch.zeros(B, H, n, n, dtype=torch.int32, device=query.device)
        for b in range(len(self.pattern)):
            count += pair & self.pattern.reads(b, q, k, heads)
        bias = torch.where(count > 0, count.to(query.dtype).log(), _NEG_INF)  # (B, H, n, n)
        old = torch.where(self._query_mask(positions, self.positions)
                          & valid[:, None, :, None], 0.0, _NEG_INF).to(query.dtype)
        mask = torch.cat([old, bias], -1)  # (B, H, n, S + n)
        none = torch.isinf(mask).all(-1, keepdim=True)  # (B, H, n, 1)
        keys = torch.cat([self.keys, k_new], 2).to(query.dtype)  # (B, Hkv, S + n, D)
        vals = torch.cat([self.values, v_new], 2).to(query.dtype)
        out = self._attention(query, keys, vals, mask.masked_fill(none, 0.0), scale)
        self._write(k_new, v_new, positions, valid)
        return out.masked_fill(none, 0.0)


class DenseLayerCache:
    """Every key/value of one layer (dense causal attention), with per-sequence positions.

    Same interface as :class:`~longnet.testing.reference_cache.DilatedLayerCache`. Keys are stored per
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

        Args and result as :meth:`longnet.testing.reference_cache.DilatedLayerCache.attend`: query
        (B, H, n, D), key/value (B, Hkv, n, D), positions (B, n) long, valid (B, n) bool ->
        (B, H, n, D). A padding query (no real key at or before it) reads only itself.
        """
        B, H, n, D = query.shape
        if (B, H, D) != (self.B, self.H, self.D) or key.shape[1] != self.Hkv:
            raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} does not fit a "
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

    Made by :meth:`LongNetLM.make_cache`. Each layer holds a :class:`SlotLayerCache` (dilated and
    sparse attention: per key/value head the union of its query heads' ``ceil(w_i / r_i)`` keys per
    branch, whatever the context length; or the layer cache class given to :func:`make_cache`) or
    a :class:`DenseLayerCache` (dense attention: every key, growing with the context).

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
        """Most bytes the cache can ever hold (each layer's ``max_nbytes``), or ``None`` when a
        dense layer makes it unbounded."""
        if not self.bounded:
            return None
        return sum(layer.max_nbytes for layer in self.layers)

    @property
    def default_prefill_chunk(self) -> int:
        """Prefill chunk length used when none is given: the period of the patterns (the least
        common multiple of all segment lengths, so that every chunk starts a segment of every
        branch and runs the dilated operator, reading nothing cached) when every layer is a
        :class:`SlotLayerCache` and that period is at most 65,536; else 1,024."""
        if all(isinstance(layer, SlotLayerCache) for layer in self.layers):
            period = math.lcm(*(layer.period for layer in self.layers))
            if period <= 65536:
                return period
        return 1024

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


LAYER_CACHES = {"slots": SlotLayerCache}
"""Layer caches of dilated layers by name: ``"slots"`` (:class:`SlotLayerCache`, preallocated,
written in place, one softmax)."""


def make_cache(model, batch_size: int, *, dtype: torch.dtype | None = None, device=None,
               layer_cache: str | type = "slots") -> DilatedKVCache:
    """An empty :class:`DilatedKVCache` for ``model`` (a :class:`~longnet.LongNetLM`).

    Args:
        batch_size: sequences generated together.
        dtype, device: storage; default the model's parameter dtype and device.
        layer_cache: the cache of dilated layers: a name of :data:`LAYER_CACHES` or a layer cache
            class with :class:`SlotLayerCache`'s constructor (tests pass the reference
            :class:`~longnet.testing.reference_cache.DilatedLayerCache`); dense layers always use
            :class:`DenseLayerCache`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(layer_cache, str):
        if layer_cache not in LAYER_CACHES:
            raise ValueError(f"layer_cache must be one of {sorted(LAYER_CACHES)} or a layer cache "
                             f"class, got {layer_cache!r}")
        layer_cache = LAYER_CACHES[layer_cache]
    elif not isinstance(layer_cache, type):
        raise TypeError(f"layer_cache must be a name or a class, got {type(layer_cache).__name__}")
    param = next(model.parameters())
    dtype = param.dtype if dtype is None else dtype
    device = param.device if device is None else device
    layers, patterns = [], []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if attn.pattern is not None and attn.pattern.shift:
            raise ValueError(f"the generation cache does not support shifted segments (layer {i}: "
                             f"{attn.pattern!r}, LongNetConfig.shift_segments); generate with a model "
                             "trained without shift_segments, or recompute model(ids) at each step")
        if attn.pattern is None:
            layers.append(DenseLayerCache(batch_size, attn.num_heads, attn.head_dim,
                                          num_kv_heads=attn.num_kv_heads, dtype=dtype,
                                          device=device))
        else:
            layers.append(layer_cache(attn.pattern, batch_size, attn.num_heads, attn.head_dim,
                                      num_kv_heads=attn.num_kv_heads, dtype=dtype, device=device))
        patterns.append(attn.pattern)
    return DilatedKVCache(layers, patterns, batch_size, device=device)
