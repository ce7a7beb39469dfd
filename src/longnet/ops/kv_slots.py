"""Which positions a bounded cache keeps per key/value head, and in which slot.

With grouped-query attention (``G = H / Hkv`` query heads per key/value head, query head ``h``
reads key/value head ``h // G``), a key/value head is read by the ``G`` query heads of its group,
and in branch ``(w, r)`` query head ``h`` reads only the positions of its segment whose offset
``o = p mod w`` has ``o mod r == h mod r`` (``DilatedPattern.residue``). So key/value head ``j``
keeps, per branch, the positions at the union of its group's residues
``R_j = {h mod r : h // G == j}``, each position once.

The slot of a kept offset ``o`` is ``(o // r) * m + rank_j(o mod r)``, with ``m = |R_j|`` and
``rank_j`` the index of a residue in sorted ``R_j``. ``G`` consecutive heads have
``m = min(G, r)`` distinct residues, whatever the group; the slot grows with the offset, and the
kept offsets of a segment fill slots ``0 .. count_j - 1`` exactly. A branch is given the most
slots any key/value head needs, at most ``min(w, m * ceil(w / r))``; with ``G = 1`` that is the
per-query-head bound ``ceil(w / r)``.

:func:`kv_slot_layout` computes this once per (pattern, heads); the slot cache
(:class:`longnet.models.cache.SlotLayerCache`, also behind ``longnet.hf.DilatedCache``) stores
by it, and the byte bounds (``DilatedKVCache.max_nbytes``, ``longnet.hf.bound_bytes``) count by
it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from longnet.ops.pattern import DilatedPattern

__all__ = ["KVSlotLayout", "kv_slot_layout", "group_residues", "kept_offset_count", "slot_of_offset"]

POSITION_BYTES = 8
"""Bytes per slot for its position (int64), per key/value head and row."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def group_residues(pattern: DilatedPattern, branch: int, num_heads: int,
                   num_kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Sorted residues that each key/value head keeps in ``branch``: the union of its query
    heads' ``DilatedPattern.residue``, one tuple per key/value head."""
    group = num_heads // num_kv_heads
    return tuple(tuple(sorted({int(pattern.residue(h, branch))
                               for h in range(j * group, (j + 1) * group)}))
                 for j in range(num_kv_heads))


def kept_offset_count(segment: int, dilation: int, residues) -> int:
    """Offsets ``o`` in ``[0, segment)`` with ``o mod dilation`` in ``residues``."""
    return sum(-(-(segment - res) // dilation) for res in residues if res < segment)


def slot_of_offset(offsets, dilation, group_residue_count, rank):
    """Slot of a kept segment offset inside its branch: ``(o // r) * m + rank`` (ints or
    broadcasting tensors), ``rank`` the index of ``o mod r`` among the key/value head's sorted
    residues and ``m`` their number."""
    if isinstance(offsets, torch.Tensor):
        return torch.div(offsets, dilation, rounding_mode="floor") * group_residue_count + rank
    return (offsets // dilation) * group_residue_count + rank


@dataclass(frozen=True)
class KVSlotLayout:
    """Slots of each branch per key/value head (see the module docstring).

    Attributes:
        pattern: the dilated pattern.
        num_heads, num_kv_heads: query and key/value heads.
        residues: ``residues[b][j]``, sorted residues key/value head ``j`` keeps in branch ``b``.
        sizes: slots of each branch: the most any key/value head keeps.
    """

    pattern: DilatedPattern
    num_heads: int
    num_kv_heads: int
    residues: tuple[tuple[tuple[int, ...], ...], ...]
    sizes: tuple[int, ...]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``G``."""
        return self.num_heads // self.num_kv_heads

    @property
    def firsts(self) -> tuple[int, ...]:
        """First slot of each branch."""
        return tuple(sum(self.sizes[:b]) for b in range(len(self.sizes)))

    @property
    def total(self) -> int:
        """Slots per key/value head, all branches."""
        return sum(self.sizes)

    def residue_counts(self) -> tuple[int, ...]:
        """``m`` of each branch: residues per key/value head, ``min(G, r)`` for every head."""
        return tuple(len(res[0]) for res in self.residues)

    def rank_table(self, device=None) -> torch.Tensor:
        """(branches, Hkv, max r) long: index of residue ``rho`` among head ``j``'s sorted residues
        in branch ``b``, ``-1`` where ``j`` does not keep ``rho``."""
        r_max = max(self.pattern.dilation_rates)
        table = torch.full((len(self.sizes), self.num_kv_heads, r_max), -1, dtype=torch.long)
        for b, per_head in enumerate(self.residues):
            for j, res in enumerate(per_head):
                table[b, j, list(res)] = torch.arange(len(res))
        return table.to(device)

    def slot_offsets(self, device=None) -> torch.Tensor:
        """(Hkv, total) long: the segment offset each slot of each key/value head holds (the
        inverse of :func:`slot_of_offset`), ``-1`` for slots a head never uses."""
        table = torch.full((self.num_kv_heads, self.total), -1, dtype=torch.long)
        ranks, counts = self.rank_table(), self.residue_counts()
        for b, (first, w, r) in enumerate(zip(self.firsts, self.pattern.segment_lengths,
                                              self.pattern.dilation_rates)):
            offsets = torch.arange(w)
            for j in range(self.num_kv_heads):
                rank = ranks[b, j, offsets % r]
                held = offsets[rank >= 0]
                table[j, first + slot_of_offset(held, r, counts[b], rank[rank >= 0])] = held
        return table.to(device)

    def nbytes(self, batch_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of a cache with this layout: keys and values (``dtype``) and int64 positions of
        :attr:`total` slots per key/value head and row."""
        per_slot = 2 * head_dim * torch.empty((), dtype=dtype).element_size() + POSITION_BYTES
        return batch_size * self.num_kv_heads * self.total * per_slot


def kv_slot_layout(pattern: DilatedPattern, num_heads: int,
                   num_kv_heads: int | None = None) -> KVSlotLayout:
    """The :class:`KVSlotLayout` of ``pattern`` for ``num_heads`` query heads read through
    ``num_kv_heads`` key/value heads (default ``num_heads``: no GQA).

    Raises:
        ValueError: a non-positive head count, or ``num_heads`` not a multiple of ``num_kv_heads``.
    """
    num_heads = _positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    residues = tuple(group_residues(pattern, b, num_heads, num_kv_heads) for b in range(len(pattern)))
    sizes = tuple(max(kept_offset_count(w, r, res) for res in per_head)
                  for w, r, per_head in zip(pattern.segment_lengths, pattern.dilation_rates, residues))
    return KVSlotLayout(pattern, num_heads, num_kv_heads, residues, sizes)
