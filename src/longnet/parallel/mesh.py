"""2-D parallelism: data parallel x sequence parallel, and the reductions a training step needs.

``build_mesh(dp, sp)`` lays the ``dp * sp`` ranks out as a (dp, sp) grid: ranks
``[i*sp, (i+1)*sp)`` share one sequence (sequence-parallel group ``i``, contiguous so that a
segment's ranks sit on the same node as far as possible); rank ``j`` of each sequence-parallel
group belongs to data-parallel group ``j``.

A step that matches one process exactly:

1. every rank computes the *sum* of its tokens' losses and the global number of tokens
   (:func:`global_token_count`, summed over both axes);
2. ``loss = local_sum / global_count``; ``loss.backward()`` (attention communicates inside);
3. :func:`all_reduce_gradients` sums the gradients over both axes: every parameter is replicated
   on every rank and each rank holds the gradient of its own tokens, so the sum is the gradient
   of the global mean loss;
4. :func:`reduce_loss` (sum over both axes, no grad) gives the global mean loss to log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelMesh", "build_mesh", "global_token_count", "reduce_loss",
           "all_reduce_gradients"]


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in a (data parallel, sequence parallel) grid.

    Attributes:
        mesh: the torch ``DeviceMesh`` with dimension names ``("dp", "sp")``.
        dp, sp: sizes of the two axes.
        dp_rank: which sequence (batch shard) this rank works on.
        sp_rank: which chunk of that sequence this rank holds.
        dp_group, sp_group: process groups of the two axes (``sp_group`` is the one to pass to
            :func:`longnet.parallel.dilated_attention` / :func:`~longnet.parallel.sequence_parallel`).
        world_group: all ``dp * sp`` ranks.
    """

    mesh: DeviceMesh
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    dp_group: object
    sp_group: object
    world_group: object


def build_mesh(dp: int, sp: int, *, device_type: str | None = None) -> ParallelMesh:
    """The (dp, sp) mesh over the default process group; ``dp * sp`` must equal its size.

    Must be called by every rank. ``device_type`` defaults to ``"cuda"`` when the process group
    uses NCCL, else ``"cpu"``.
    """
    for name, v in (("dp", dp), ("sp", sp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_mesh needs an initialised torch.distributed "
                           "(longnet.parallel.init_distributed)")
    world = dist.get_world_size()
    if dp * sp != world:
        raise ValueError(f"dp * sp must equal the world size: {dp} * {sp} != {world}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    rank = dist.get_rank()
    return ParallelMesh(mesh, dp, sp, rank // sp, rank % sp, mesh.get_group("dp"),
                        mesh.get_group("sp"), dist.group.WORLD)


def global_token_count(local_count: int | torch.Tensor, pm: ParallelMesh,
                       device=None) -> torch.Tensor:
    """Sum of ``local_count`` over every rank of the mesh (an int64 tensor)."""
    t = torch.as_tensor(local_count, dtype=torch.int64, device=device).clone()
    dist.all_reduce(t, group=pm.world_group)
    return t


def reduce_loss(local_loss: torch.Tensor, pm: ParallelMesh) -> torch.Tensor:
    """Sum of a (detached) scalar over every rank: the global loss when each rank passes its
    ``local_sum / global_count``."""
    t = local_loss.detach().clone()
    dist.all_reduce(t, group=pm.world_group)
    return t


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], pm: ParallelMesh) -> None:
    """Sum the gradients over both axes, in place, with one flattened all-reduce per dtype.

    Parameters without a gradient on this rank count as zero (every rank must pass the same
    parameters in the same order).
    """
    params = [p for p in params if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, group=pm.world_group)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
