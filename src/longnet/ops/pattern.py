"""The dilated attention pattern: which positions each head keeps, per branch.

A pattern is a list of branches ``(w, r)``: segment length ``w`` and dilation rate ``r``.
For a sequence of length ``N``, branch ``(w, r)`` uses ``w_eff = min(w, N)``; segment ``j``
covers ``[j * w_eff, min((j + 1) * w_eff, N))`` (the last may be short). Inside a segment,
head ``h`` keeps the positions ``p`` with ``(p - segment_start) % r == h % r`` (the paper's
per-head offset). Kept queries attend to kept keys of the same segment.

:class:`DilatedPattern` validates the pattern once and is then reused everywhere: the operator
(gather indices), the models (FLOP counts), the sequence-parallel code (who shares a segment)
and the generation cache (how many positions a head must keep).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["DilatedPattern", "BranchLayout", "kept", "same_segment", "slot_in_segment"]


def kept(positions, heads, segment, dilation):
    """The selection rule, for explicit segment lengths and rates (ints or tensors, broadcasting):
    head ``h`` keeps position ``p`` when ``(p mod w) mod r == h mod r`` (and ``p >= 0``).
    :meth:`DilatedPattern.keeps` is this rule for one branch of a pattern."""
    ok = (positions % segment) % dilation == heads % dilation
    return ok & (positions >= 0) if isinstance(ok, torch.Tensor) else ok and positions >= 0


def slot_in_segment(positions, segment, dilation):
    """Index of a kept position among its head's kept positions of its segment: ``(p mod w) // r``."""
    rel = positions % segment
    return torch.div(rel, dilation, rounding_mode="floor") if isinstance(rel, torch.Tensor) else rel // dilation


def same_segment(a, b, segment):
    """Whether positions ``a`` and ``b`` fall in the same segment of length ``segment``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.div(a, segment, rounding_mode="floor") == torch.div(b, segment, rounding_mode="floor")
    return a // segment == b // segment


def _as_int_tuple(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not isinstance(
        values, torch.Tensor
    ):
        if isinstance(values, numbers.Integral) and not isinstance(values, bool):
            values = (values,)
        else:
            raise TypeError(f"{name} must be a sequence of positive ints, got {type(values).__name__}")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must contain ints, got {v!r} ({type(v).__name__})")
        if v < 1:
            raise ValueError(f"{name} must contain positive ints, got {int(v)}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


@dataclass(frozen=True)
class BranchLayout:
    """Where the kept positions of one branch sit, for a given sequence length and head count.

    Rows of the gathered layout are ``(head, segment, slot)``; slot ``j`` of segment ``s`` of
    head ``h`` holds position ``s * w + h % r + j * r`` when that is inside the segment.

    Attributes:
        segment: effective segment length ``min(w, N)``.
        dilation: dilation rate ``r``.
        num_segments: ``ceil(N / segment)``.
        slots: slots per segment and head, ``ceil(segment / r)``.
        index: (H, num_segments * slots) long, the position of every slot (0 where invalid).
        valid: (H, num_segments * slots) bool, slots that hold a real position; ``None`` when all do.
    """

    segment: int
    dilation: int
    num_segments: int
    slots: int
    index: torch.Tensor
    valid: torch.Tensor | None


@dataclass(frozen=True)
class DilatedPattern:
    """A validated dilated attention pattern.

    Args:
        segment_lengths: segment length ``w_i`` of each branch, positive ints.
        dilation_rates: dilation rate ``r_i`` of each branch, positive ints, same count.
        shift: move every branch's segment boundaries ``shift`` positions earlier: segment ``k``
            of a branch covers ``[k * w - s, (k + 1) * w - s)`` clipped to the sequence, with
            ``s = shift mod min(w, N)`` (``0`` for a branch whose segment covers the whole
            sequence). Causal models alternate shifted and unshifted layers so that no pair of
            positions is cut apart by every layer (``docs/design.md``, "Shifted segments").

    Example::

        >>> p = DilatedPattern((4, 8), (1, 2))
        >>> p.kept_positions(length=8, head=1, branch=1)
        [1, 3, 5, 7]
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    shift: int = 0

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], shift: int = 0):
        w = _as_int_tuple("segment_lengths", segment_lengths)
        r = _as_int_tuple("dilation_rates", dilation_rates)
        if len(w) != len(r):
            raise ValueError(
                f"segment_lengths and dilation_rates must have the same length, "
                f"got {len(w)} and {len(r)}"
            )
        if isinstance(shift, bool) or not isinstance(shift, numbers.Integral) or shift < 0:
            raise ValueError(f"shift must be a non-negative int, got {shift!r}")
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        object.__setattr__(self, "shift", int(shift))

    @classmethod
    def coerce(cls, segment_lengths, dilation_rates, shift: int = 0) -> "DilatedPattern":
        """Build from arguments that may already be a pattern (``segment_lengths`` a pattern)."""
        if isinstance(segment_lengths, DilatedPattern):
            if shift and shift != segment_lengths.shift:
                raise ValueError(f"segment_shift={shift} conflicts with the pattern's shift "
                                 f"{segment_lengths.shift}")
            return segment_lengths
        return cls(segment_lengths, dilation_rates, shift)

    # ------------------------------------------------------------------ basics
    @property
    def branches(self) -> tuple[tuple[int, int], ...]:
        """``((w_0, r_0), (w_1, r_1), ...)``."""
        return tuple(zip(self.segment_lengths, self.dilation_rates))

    def __len__(self) -> int:
        return len(self.segment_lengths)

    def effective_segment(self, branch: int, length: int) -> int:
        """``min(w_i, N)``: the segment length branch ``i`` really uses at length ``N``."""
        return max(1, min(self.segment_lengths[branch], length))

    # ------------------------------------------------------------ the selection rule
    # Every path (operator, reference, caches, Hugging Face, sequence parallel) asks these
    # methods which keys a query reads; the rule is written here and nowhere else.
    def residue(self, head, branch: int):
        """The offset inside each segment that ``head`` keeps in ``branch``: ``h mod r``
        (ints or a tensor of heads)."""
        return head % self.dilation_rates[branch]

    def _segment(self, branch: int, length: int | None) -> int:
        """``min(w, N)``, or ``w`` for an open-ended stream (``length=None``, a cache)."""
        w = self.segment_lengths[branch]
        return w if length is None else self.effective_segment(branch, length)

    def branch_shift(self, branch: int, length: int | None = None) -> int:
        """How many positions earlier the segment boundaries of ``branch`` lie at length ``N``:
        ``shift mod min(w, N)``, 0 when one segment covers the sequence."""
        if not self.shift:
            return 0
        w = self._segment(branch, length)
        return 0 if length is not None and w >= length else self.shift % w

    def segment_pieces(self, branch: int, length: int) -> list[tuple[int, int, int, int]]:
        """The segments of ``branch`` as runs ``(start, count, seg_len, first_offset)``: ``count``
        consecutive segments of ``seg_len`` positions from ``start``, whose first position sits at
        offset ``first_offset`` of its (unclipped) segment. A shifted pattern starts with a short
        segment; the last one may be short."""
        w, s = self._segment(branch, length), self.branch_shift(branch, length)
        pieces = []
        head = min(w - s, length) if s else 0
        if head:
            pieces.append((0, 1, head, s))
        full, tail = divmod(length - head, w)
        if full:
            pieces.append((head, full, w, 0))
        if tail:
            pieces.append((head + full * w, 1, tail, 0))
        return pieces

    def segment_index(self, branch: int, positions, length: int | None = None):
        """Which segment of ``branch`` each position falls in."""
        return (positions + self.branch_shift(branch, length)) // self._segment(branch, length)

    def slot(self, branch: int, positions, length: int | None = None):
        """Index of each position among the kept positions of its head in its segment:
        ``(p mod w) // r`` (meaningful where :meth:`keeps` holds)."""
        return slot_in_segment(positions + self.branch_shift(branch, length), self._segment(branch, length),
                               self.dilation_rates[branch])

    def keeps(self, branch: int, positions, heads, length: int | None = None):
        """Whether ``heads`` keep ``positions`` in ``branch`` (broadcasting):
        ``((p + s) mod w) mod r == h mod r`` (``s`` the branch's shift, 0 unless shifted).
        Negative positions are never kept."""
        s = self.branch_shift(branch, length)
        ok = kept(positions + s, heads, self._segment(branch, length), self.dilation_rates[branch])
        if not s:
            return ok
        return ok & (positions >= 0) if isinstance(ok, torch.Tensor) else ok and positions >= 0

    def reads(self, branch: int, query_positions, key_positions, heads, length: int | None = None,
              *, is_causal: bool = False):
        """Whether a query of ``heads`` at ``query_positions`` reads the key at ``key_positions`` in
        ``branch`` (broadcasting): same segment, both kept by the head, and with ``is_causal`` the key
        not after the query."""
        s = self.branch_shift(branch, length)
        ok = same_segment(query_positions + s, key_positions + s, self._segment(branch, length))
        ok = ok & self.keeps(branch, query_positions, heads, length) & self.keeps(
            branch, key_positions, heads, length)
        if is_causal:
            ok = ok & (key_positions <= query_positions)
        return ok

    def for_layer(self, layer: int) -> "DilatedPattern":
        """The pattern layer ``layer`` of a model with alternating shifted segments runs: even
        layers unshifted, odd layers shifted by half the shortest segment
        (``LongNetConfig.shift_segments``)."""
        shift = min(self.segment_lengths) // 2 if layer % 2 else 0
        return DilatedPattern(self.segment_lengths, self.dilation_rates, shift=shift)

    def next_kept_offset(self, branch: int, segment_offset, residue):
        """From offset ``segment_offset`` inside a segment of ``branch``, how far the first position
        at or after it that heads of ``residue`` keep lies: ``(residue - offset) mod r``."""
        r = self.dilation_rates[branch]
        diff = residue - segment_offset
        return torch.remainder(diff, r) if isinstance(diff, torch.Tensor) else diff % r

    def kept_positions(self, length: int, head: int, branch: int) -> list[int]:
        """Positions (sorted) that ``head`` keeps in ``branch`` for a sequence of ``length``."""
        return torch.nonzero(self.keeps(branch, torch.arange(length), head, length)).flatten().tolist()

    def max_cached_positions(self, branch: int) -> int:
        """Most keys a causal query of one head can read in ``branch``: ``ceil(w_i / r_i)``."""
        return -(-self.segment_lengths[branch] // self.dilation_rates[branch])

    # ------------------------------------------------------------------ layout
    def layout(self, branch: int, length: int, num_heads: int, device=None) -> BranchLayout:
        """Gather indices of ``branch`` for ``num_heads`` heads over ``length`` positions."""
        w = self.effective_segment(branch, length)
        r = self.dilation_rates[branch]
        s = self.branch_shift(branch, length)
        nseg = -(-(length + s) // w)
        slots = -(-w // r)
        seg = torch.arange(nseg, device=device).view(1, nseg, 1) * w - s
        off = self.residue(torch.arange(num_heads, device=device), branch).view(num_heads, 1, 1)
        slot = torch.arange(slots, device=device).view(1, 1, slots) * r
        rel = off + slot  # (H, 1, slots) offset inside the segment
        pos = seg + rel  # (H, nseg, slots)
        seg_end = torch.clamp(seg + w, max=length)
        valid = (pos < seg_end) & (pos >= 0)
        aligned = length % w == 0 and w % r == 0 and s == 0
        index = torch.where(valid, pos, torch.zeros_like(pos)).reshape(num_heads, nseg * slots)
        return BranchLayout(
            segment=w,
            dilation=r,
            num_segments=nseg,
            slots=slots,
            index=index,
            valid=None if aligned else valid.reshape(num_heads, nseg * slots),
        )

    # ------------------------------------------------------------------ cost
    def flops(
        self, length: int, head_dim: int, num_heads: int = 1, *, is_causal: bool = False,
        batch_size: int = 1, backward: bool = False,
    ) -> float:
        """Matmul FLOPs of the pattern (FlashAttention convention).

        Per head and branch: ``4 * segments * (w/r)^2 * D``, half with ``is_causal``; with
        ``backward`` the forward plus backward count (x 3.5, as FlashAttention counts).
        Tail segments and uneven residues are counted exactly.
        """
        total = 0.0
        for b in range(len(self)):
            r = self.dilation_rates[b]
            for h in range(min(num_heads, r)):
                reps = len(range(h, num_heads, r))
                pairs = sum(count * _pairs(_count(seg, r, self.next_kept_offset(b, first, h % r)), is_causal)
                            for _, count, seg, first in self.segment_pieces(b, length))
                total += reps * 4.0 * pairs * head_dim
        total *= batch_size
        return total * 3.5 if backward else total

    @staticmethod
    def dense_flops(
        length: int, head_dim: int, num_heads: int = 1, *, is_causal: bool = False,
        batch_size: int = 1, backward: bool = False,
    ) -> float:
        """Matmul FLOPs of dense attention, same convention as :meth:`flops`."""
        total = batch_size * num_heads * 4.0 * _pairs(length, is_causal) * head_dim
        return total * 3.5 if backward else total

    def __repr__(self) -> str:
        inner = ", ".join(f"({w}, {r})" for w, r in self.branches)
        return f"DilatedPattern([{inner}]" + (f", shift={self.shift})" if self.shift else ")")


def _count(seg_len: int, r: int, offset: int) -> int:
    """Positions ``p < seg_len`` with ``p % r == offset``."""
    return 0 if offset >= seg_len else (seg_len - offset - 1) // r + 1


def _pairs(n: int, causal: bool) -> float:
    return n * (n + 1) / 2 if causal else float(n * n)


