"""Collectives on sub-groups, with byte counting.

Every collective of :mod:`longnet.parallel` goes through :func:`all_gather` or
:func:`reduce_scatter` here, which record what they move in the active :class:`CommCounter`s
(bytes per the convention of :func:`longnet.parallel.layout.collective_bytes`, the same function
the planner uses).

Sub-groups are created with ``use_local_synchronization=True``: only the member ranks take part,
each creates the groups it belongs to in the same (deterministic) order, and groups are cached per
tuple of global ranks, so a sub-group is made once per process whatever calls need it.

Process groups are held **weakly** here and everywhere in :mod:`longnet.parallel` that keeps one
past a call (:class:`GroupRef`): ``torch.distributed`` owns them, and
``dist.destroy_process_group()`` must be able to end them. A strong reference kept in a cache
made a gloo group outlive ``destroy_process_group`` until interpreter shutdown; its worker thread
then released its last finished collective (whose tensors have Python objects, so the release
needs the GIL) while Python was finalizing, the thread was ended by ``pthread_exit`` inside a
``noexcept`` destructor, and the process died with SIGABRT ("terminate called without an active
exception") after all its work was done (``benchmarks/teardown_repeat.py`` repeats the case).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longnet.parallel.layout import collective_bytes

__all__ = ["CommRecord", "CommCounter", "GroupRef", "subgroup", "all_gather", "reduce_scatter"]

_local = threading.local()


def _all_gather_single(out, x, group):
    # newer torch names it all_gather_single; older versions only have all_gather_into_tensor
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_single(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)

_groups: dict[tuple[int, ...], "GroupRef"] = {}


class GroupRef:
    """A weak reference to a process group (``None`` stands for the default group, resolved at
    each call): holding one never keeps a group alive after ``destroy_process_group``."""

    __slots__ = ("_ref",)

    def __init__(self, group) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def get(self):
        """The group; ``RuntimeError`` when it was destroyed."""
        if self._ref is None:
            return dist.group.WORLD
        group = self._ref()
        if group is None:
            raise RuntimeError("the process group was destroyed (dist.destroy_process_group); "
                               "re-apply longnet.parallel after creating a new one")
        return group

    @property
    def alive(self) -> bool:
        return self._ref is None or self._ref() is not None


@dataclass(frozen=True)
class CommRecord:
    """One collective as one rank saw it."""

    tag: str  # e.g. "branch 3" or "check"
    collective: str  # "all_gather" | "reduce_scatter"
    phase: str  # "forward" | "backward"
    group_size: int
    sent: int
    received: int


class CommCounter:
    """Context manager recording the collectives this process runs (forward and backward).

    Example::

        with CommCounter() as c:
            out = longnet.parallel.dilated_attention(q, k, v, ...)
            out.sum().backward()
        c.by_branch()  # {0: {"forward": bytes, "backward": bytes}, ...}
    """

    def __init__(self):
        self.records: list[CommRecord] = []

    def __enter__(self) -> "CommCounter":
        stack = getattr(_local, "counters", None)
        if stack is None:
            stack = _local.counters = []
        stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _local.counters.remove(self)

    @property
    def sent(self) -> int:
        """Total bytes sent."""
        return sum(r.sent for r in self.records)

    @property
    def received(self) -> int:
        """Total bytes received."""
        return sum(r.received for r in self.records)

    def by_branch(self) -> dict[int, dict[str, int]]:
        """Bytes sent per branch index and phase (collectives tagged ``branch i`` only)."""
        out: dict[int, dict[str, int]] = {}
        for r in self.records:
            if r.tag.startswith("branch "):
                d = out.setdefault(int(r.tag.split()[1]), {"forward": 0, "backward": 0})
                d[r.phase] += r.sent
        return out


def _record(tag: str, collective: str, phase: str, shard_bytes: int, size: int) -> None:
    sent, received = collective_bytes(collective, shard_bytes, size)
    for c in getattr(_local, "counters", None) or ():
        c.records.append(CommRecord(tag, collective, phase, size, sent, received))


def subgroup(ranks: tuple[int, ...], parent=None):
    """The process group of the global ``ranks`` (``parent`` itself when it has exactly them).

    Must be called by every rank in ``ranks``, in the same order relative to other sub-groups.
    """
    ranks = tuple(ranks)
    if tuple(dist.get_process_group_ranks(parent or dist.group.WORLD)) == ranks:
        return parent or dist.group.WORLD
    ref = _groups.get(ranks)
    if ref is None or not ref.alive:  # torch.distributed holds the group, this cache only a weak reference
        pg = dist.new_group(list(ranks), use_local_synchronization=True)
        _groups[ranks] = GroupRef(pg)
        return pg
    return ref.get()


_group_bound: list[dict] = []


def group_bound_cache() -> dict:
    """A new dict for objects tied to sub-groups (holding them as :class:`GroupRef`);
    :func:`clear_subgroups` empties it too."""
    cache: dict = {}
    _group_bound.append(cache)
    return cache


def clear_subgroups() -> None:
    """Forget cached sub-groups and what holds them (call after ``destroy_process_group``)."""
    _groups.clear()
    for cache in _group_bound:
        cache.clear()


def all_gather(x: torch.Tensor, group, size: int, *, tag: str, phase: str) -> torch.Tensor:
    """(size, *x.shape): every member's ``x`` in group-rank order."""
    x = x.contiguous()
    # flat buffers: backends expect the gathered tensor concatenated along dim 0
    out = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
    _record(tag, "all_gather", phase, x.numel() * x.element_size(), size)
    if size == 1:
        out.copy_(x.reshape(-1))
    else:
        _all_gather_single(out, x.reshape(-1), group=group)
    return out.view((size,) + tuple(x.shape))


def reduce_scatter(x: torch.Tensor, group, size: int, *, tag: str, phase: str) -> torch.Tensor:
    """x (size, *S) -> (*S): the sum over members of their ``x[my group rank]``."""
    x = x.contiguous()
    out = torch.empty(x[0].numel(), dtype=x.dtype, device=x.device)
    _record(tag, "reduce_scatter", phase, out.numel() * out.element_size(), size)
    if size == 1:
        out.copy_(x[0].reshape(-1))
    else:
        _reduce_scatter_single(out, x.reshape(-1), group=group)
    return out.view(tuple(x.shape[1:]))
