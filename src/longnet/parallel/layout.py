"""Who holds what under sequence parallelism, and how many bytes move: pure arithmetic.

``P`` ranks each hold ``n = N / P`` consecutive positions; rank ``i`` holds ``[i*n, (i+1)*n)``.
For a branch ``(w, r)`` with ``w_eff = min(w, N)``:

* **local** when ``n % w_eff == 0``: every segment lies inside one chunk, no communication;
* **remote** when ``w_eff % n == 0``: a segment spans ``s = w_eff / n`` whole chunks. The ranks of
  one segment form a sub-group (the last one may be shorter when ``N % w_eff != 0``); each of them
  keeps, per (key/value head, residue) pair its query heads need, the ``ceil(n / r)`` slots of its
  chunk at that residue, and all-gathers them within the sub-group;
* anything else (neither divides the other) raises ``ValueError``.

The same functions serve the run-time code (:mod:`longnet.parallel.attention` builds its
collectives from them and :class:`~longnet.parallel.comm.CommCounter` counts with
:func:`collective_bytes`) and the planner (:func:`plan_bytes`, ``longnet plan``), so a plan and a
measurement agree by construction and a test checks that they do.

Byte convention (per rank, one collective over ``s`` ranks, ``shard`` bytes per rank): a ring
all-gather or reduce-scatter sends and receives ``(s - 1) * shard`` bytes, the minimum any
algorithm must receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longnet.ops.pattern import DilatedPattern

__all__ = [
    "BranchPlacement",
    "place_branches",
    "kv_pairs",
    "collective_bytes",
    "BranchComm",
    "CommPlan",
    "plan_bytes",
]


@dataclass(frozen=True)
class BranchPlacement:
    """Where one branch runs for a given ``(N, P)``.

    Attributes:
        branch: index in the pattern.
        segment: effective segment length ``min(w, N)``.
        dilation: ``r``.
        local: True when the branch needs no communication.
        span: ranks per segment (1 for local branches).
    """

    branch: int
    segment: int
    dilation: int
    local: bool
    span: int

    def group_of(self, rank: int, world: int) -> tuple[int, ...]:
        """Group-local ranks sharing ``rank``'s segment (contiguous, the last may be short)."""
        start = (rank // self.span) * self.span
        return tuple(range(start, min(start + self.span, world)))


def place_branches(pattern: DilatedPattern, seq_len: int, world: int) -> list[BranchPlacement]:
    """Classify each branch as local or remote; ``ValueError`` for shapes that cannot be split.

    Args:
        pattern: the dilated pattern.
        seq_len: the full length ``N`` (all ranks together).
        world: number of ranks ``P``; ``N`` must be a multiple of it.
    """
    if pattern.shift:
        raise ValueError(f"shifted segments (shift={pattern.shift}) are not supported under sequence "
                         "parallelism; use an unshifted pattern")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if seq_len < 1 or seq_len % world:
        raise ValueError(f"sequence length {seq_len} must be a positive multiple of the number "
                         f"of ranks {world} (every rank holds an equal chunk)")
    n = seq_len // world
    out = []
    for b, r in enumerate(pattern.dilation_rates):
        w = pattern.effective_segment(b, seq_len)
        if n % w == 0:
            out.append(BranchPlacement(b, w, r, True, 1))
        elif w % n == 0:
            out.append(BranchPlacement(b, w, r, False, w // n))
        else:
            raise ValueError(
                f"branch {b}: segment length {w} (= min(w, N)) and chunk length {n} "
                f"(= N / ranks = {seq_len} / {world}): sequence parallelism needs one to divide "
                f"the other, so that segments either fit in a chunk or span whole chunks")
    return out


def kv_pairs(num_heads: int, kv_heads: int, dilation: int) -> tuple[list[tuple[int, int]],
                                                                    list[int]]:
    """The distinct (key/value head, residue) pairs the query heads read, and each head's pair.

    Query head ``h`` reads key/value head ``h // (H / Hkv)`` at residue ``h % r``; heads that
    share both share the gathered rows, so only distinct pairs are communicated.
    """
    rep = num_heads // kv_heads
    pairs = sorted({(h // rep, h % dilation) for h in range(num_heads)})
    where = {p: i for i, p in enumerate(pairs)}
    return pairs, [where[(h // rep, h % dilation)] for h in range(num_heads)]


def residue_slots(chunk: int, dilation: int) -> int:
    """Slots a rank sends per pair: ``ceil(n / r)`` (some are padding when ``r`` does not divide n)."""
    return -(-chunk // dilation)


def collective_bytes(kind: str, shard_bytes: int, group_size: int) -> tuple[int, int]:
    """``(sent, received)`` bytes of one rank (see the module docstring's convention)."""
    if kind not in ("all_gather", "reduce_scatter"):
        raise ValueError(f"kind must be 'all_gather' or 'reduce_scatter', got {kind!r}")
    moved = (group_size - 1) * shard_bytes
    return moved, moved


@dataclass(frozen=True)
class BranchComm:
    """Predicted communication of one branch on one rank (one attention call)."""

    branch: int
    local: bool
    group_size: int
    forward_sent: int
    forward_received: int
    backward_sent: int
    backward_received: int
    gathered_bytes: int  # keys/values this rank holds after the all-gather (saved for backward)


@dataclass(frozen=True)
class CommPlan:
    """Communication of one attention call on one rank, branch by branch."""

    branches: list[BranchComm] = field(default_factory=list)

    @property
    def forward_bytes(self) -> int:
        """Bytes sent in forward (received is the same under the ring convention)."""
        return sum(b.forward_sent for b in self.branches)

    @property
    def backward_bytes(self) -> int:
        """Bytes sent in backward."""
        return sum(b.backward_sent for b in self.branches)


def _elem_bytes_backward(dtype_bytes: int) -> int:
    # gradients are reduced in the accumulation dtype: float32, or float64 for float64 inputs
    return max(dtype_bytes, 4)


def branch_shard_elems(placement: BranchPlacement, chunk: int, num_heads: int, kv_heads: int,
                       head_dim: int, batch_size: int, padding_mask: bool) -> tuple[int, int]:
    """Elements one rank contributes to a remote branch: ``(forward all-gather, backward)``.

    Forward sends ``[k | v (| mask column)]`` rows, backward ``[dk | dv]`` rows, each
    ``batch * pairs * ceil(n / r)`` rows.
    """
    pairs, _ = kv_pairs(num_heads, kv_heads, placement.dilation)
    rows = batch_size * len(pairs) * residue_slots(chunk, placement.dilation)
    return rows * (2 * head_dim + int(padding_mask)), rows * 2 * head_dim


def plan_bytes(pattern: DilatedPattern, seq_len: int, world: int, heads: int, head_dim: int,
               dtype_bytes: int, *, kv_heads: int | None = None, batch_size: int = 1,
               padding_mask: bool = False, rank: int | None = None) -> CommPlan:
    """Bytes one rank sends and receives in one attention call (forward and backward).

    Args:
        pattern: the dilated pattern (a :class:`DilatedPattern` or ``(segments, rates)``).
        seq_len: full sequence length ``N``.
        world: ranks sharing the sequence ``P``.
        heads, head_dim: query heads ``H`` and head dim ``D``.
        dtype_bytes: bytes per element of q/k/v (2 for bf16).
        kv_heads: key/value heads (GQA), default ``heads``.
        batch_size: sequences per call.
        padding_mask: a key padding mask is passed (adds one column to the gathered rows).
        rank: the rank to plan for; ``None`` gives, per branch, the busiest rank.
    """
    pattern = DilatedPattern.coerce(*pattern) if isinstance(pattern, tuple) else pattern
    kv_heads = heads if kv_heads is None else kv_heads
    n = seq_len // world if world > 0 else 0
    out = []
    for pl in place_branches(pattern, seq_len, world):
        if pl.local:
            out.append(BranchComm(pl.branch, True, 1, 0, 0, 0, 0, 0))
            continue
        f_el, b_el = branch_shard_elems(pl, n, heads, kv_heads, head_dim, batch_size,
                                        padding_mask)
        ranks = range(world) if rank is None else (rank,)
        size = max(len(pl.group_of(i, world)) for i in ranks)
        fs, fr = collective_bytes("all_gather", f_el * dtype_bytes, size)
        bs, br = collective_bytes("reduce_scatter", b_el * _elem_bytes_backward(dtype_bytes),
                                  size)
        out.append(BranchComm(pl.branch, False, size, fs, fr, bs, br,
                              size * f_el * dtype_bytes))
    return CommPlan(out)
