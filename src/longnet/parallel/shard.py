"""Splitting full-length tensors into the contiguous chunk each rank holds."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["shard_sequence"]


def shard_sequence(x: torch.Tensor, dim: int, rank: int | None = None,
                   world: int | None = None, group=None) -> torch.Tensor:
    """Chunk ``rank`` (of ``world`` equal chunks) of ``x`` along ``dim``, as a view.

    ``rank``/``world`` default to this process's rank and size in ``group`` (default: world).
    Raises ``ValueError`` when the length along ``dim`` is not a multiple of ``world``.
    """
    if rank is None or world is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("pass rank and world, or initialise torch.distributed")
        rank = dist.get_rank(group) if rank is None else rank
        world = dist.get_world_size(group) if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, "
                         f"world={world}")
    N = x.shape[dim]
    if N % world:
        raise ValueError(f"sequence length {N} (dim {dim}) is not divisible by the number of "
                         f"ranks {world}; pad it to a multiple of {world}")
    n = N // world
    return x.narrow(dim, rank * n, n)
