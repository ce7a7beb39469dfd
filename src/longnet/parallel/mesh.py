"""2-D parallelism: data parallel x sequence parallel, and the reductions a training step needs.

``build_mesh(dp, sp)`` lays the ``dp * sp`` ranks out as a (dp, sp) grid: ranks
``[i*sp, (i+1)*sp)`` share one sequence (sequence-parallel group ``i``, contiguous so that a
segment's ranks sit on the same node as far as possible); rank ``j`` of each sequence-parallel
group belongs to data-parallel group ``j``.

A step that matches one process exactly:

1. every rank computes the *sum* of its tokens' losses and the global number of tokens
   (:func:`global_token_count`, summed over both axes);
2. ``loss = local_sum / global_count``; ``loss.backward()`` (attention communicates inside);
3. the gradients are summed over both axes: every parameter is replicated on every rank and each
   rank holds the gradient of its own tokens, so the sum is the gradient of the global mean loss.
   :func:`data_parallel` wraps the model in ``DistributedDataParallel`` over the data axis with a
   communication hook that sums each gradient bucket over *both* axes as backward produces it
   (one all-reduce per bucket, overlapping the rest of backward; Megatron-LM reduces over its
   data x context parallel group the same way). :func:`all_reduce_gradients` does the same sum
   after backward, in one flat all-reduce, for code that does not wrap the model;
4. :func:`reduce_loss` (sum over both axes, no grad) gives the global mean loss to log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ParallelMesh", "build_mesh", "global_token_count", "reduce_loss",
           "all_reduce_gradients", "data_parallel"]


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


def _sum_bucket_over_mesh(group, bucket):  # no return annotation: DDP checks it, postponed ones fail
    """DDP communication hook: the bucket's gradients summed (not averaged) over ``group``."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: torch.nn.Module, pm: ParallelMesh, *, bucket_cap_mb: float = 25.0,
                  device: torch.device | None = None) -> DistributedDataParallel:
    """``model`` wrapped in ``DistributedDataParallel`` over the data axis of ``pm``.

    When wrapping, DDP broadcasts the parameters from the first rank of each data-parallel group,
    then the first rank of each sequence-parallel group broadcasts them (and the buffers) to its
    group: every replica starts from rank 0's values. In backward, a communication hook *sums*
    each gradient bucket over both mesh axes, so with the loss of step 2 in the module docstring
    every rank ends up with the gradient of the global mean loss (DDP's default hook would average
    over the data axis only). Use ``wrapped.no_sync()`` around every micro-batch but the last.

    Checkpoints should save ``wrapped.module`` (the plain model, unprefixed state-dict keys).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(pm, ParallelMesh):
        raise TypeError(f"pm must be a ParallelMesh (longnet.parallel.mesh.build_mesh), got {type(pm).__name__}")
    if device is None:
        device = next(model.parameters()).device
    # buffers are not synced in forward (they are constants: rotary tables, masks); torch >= 2.13
    # names that forward_sync_buffers and deprecates broadcast_buffers
    import inspect

    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, process_group=pm.dp_group,
        bucket_cap_mb=bucket_cap_mb, **{no_sync: False})
    if pm.sp > 1:  # the ranks of one sequence sit in different data-parallel groups
        src = dist.get_global_rank(pm.sp_group, 0)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=src, group=pm.sp_group)
    ddp.register_comm_hook(pm.world_group, _sum_bucket_over_mesh)
    return ddp
