"""FSDP2 on the data x sequence mesh, and sharded checkpoints with ``torch.distributed.checkpoint``.

:func:`fully_shard_model` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) to every block of a
single-device model and to the model itself (embedding, final norm and the tied head form the
root group), over the ranks of a :class:`~longnet.parallel.mesh.ParallelMesh`. Parameters,
gradients and AdamW states are sharded over **all** ``dp * sp`` ranks by default
(``shard="mesh"``), the data axis and the sequence axis flattened into one, as torchtitan shards
over ``dp_shard x cp``: the ``sp`` ranks of one sequence hold different shards too.
``shard="data"`` shards over the data axis only and replicates over the sequence axis (HSDP on the
``(sp, dp)`` grid: reduce-scatter over the data axis, then all-reduce over the sequence axis):
``sp`` times the memory of ``"mesh"``, and nothing is sharded in a job that is all sequence
parallel (``dp = 1``), but the weight all-gathers stay inside a data-parallel group.

Before a block runs, its parameters are all-gathered; after its backward, its gradients are
reduce-scattered with a *sum* (gradient divide factor 1): with every rank's loss
``sum of its tokens' losses / global token count`` (:mod:`longnet.parallel.mesh`, steps 1-2),
each shard then holds the gradient of the global mean loss, exactly as
:func:`~longnet.parallel.mesh.data_parallel` gives it to every replica.

Mixed precision (GPU): ``param_dtype=torch.bfloat16`` all-gathers bf16 parameters and computes
in bf16, ``reduce_dtype`` (float32) reduces the gradients; the sharded parameters and AdamW
states stay float32.

Checkpoints: :func:`save_sharded` writes the model and optimizer state dicts of the current
layout with ``torch.distributed.checkpoint`` (each rank its shards, plus one metadata file);
:func:`load_sharded` reads them into *any* layout (another world size, FSDP or not, one process
without a process group): DCP keeps every tensor's global shape and reshards on load.
:func:`full_model_state` gathers the full weights on rank 0 (for ``save_pretrained``).

Memory: :func:`sharded_state_bytes` predicts, from the parameters' shapes alone, the parameter,
gradient and AdamW bytes each rank keeps (``longnet plan --fsdp``; a test checks it against the
bytes measured on sharded models).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["fully_shard_model", "gradient_sync", "is_sharded", "unsharded_class", "full_model_state",
           "save_sharded", "load_sharded", "load_full_optimizer", "shard_rows", "sharded_state_bytes",
           "SHARD_CHOICES", "shard_world"]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`fully_shard_model` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a parameter's dim 0 (``dim0``) that FSDP2 keeps on ``rank`` of ``world``.

    FSDP2 splits dim 0 as ``torch.chunk`` does: chunks of ``ceil(dim0 / world)`` rows, the last one
    shorter, and trailing ranks get none when ``dim0 < world``.
    """
    for name, v in (("dim0", dim0), ("world", world), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if world < 1 or rank >= world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    size = -(-dim0 // world)
    return max(0, min(size, dim0 - rank * size))


def sharded_state_bytes(shapes, world: int, rank: int = 0) -> dict[str, int]:
    """Bytes of float32 parameters, gradients and AdamW state that FSDP2 keeps on ``rank``.

    ``shapes``: every parameter's shape (tied parameters once). AdamW keeps ``exp_avg`` and
    ``exp_avg_sq`` (sharded like the parameter) and a float32 ``step`` per parameter tensor.
    ``world = 1`` gives the unsharded figures (one process, or each DDP replica).
    """
    elems, count = 0, 0
    for shape in shapes:
        shape = tuple(int(d) for d in shape)
        rest = 1
        for d in shape[1:]:
            rest *= d
        elems += (shard_rows(shape[0], world, rank) * rest) if shape else (1 if rank == 0 or world == 1 else 0)
        count += 1
    return {"params": 4 * elems, "grads": 4 * elems, "optimizer": 8 * elems + 4 * count}


def unsharded_class(model: nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps it for an ``FSDP<Name>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


SHARD_CHOICES = ("mesh", "data")
"""What :func:`fully_shard_model` shards over: every rank of the mesh, or the data axis only."""


def shard_world(dp: int, sp: int, shard: str = "mesh") -> int:
    """How many ranks hold distinct shards of each parameter."""
    if shard not in SHARD_CHOICES:
        raise ValueError(f"shard must be one of {SHARD_CHOICES}, got {shard!r}")
    return dp * sp if shard == "mesh" else dp


def fully_shard_model(model: nn.Module, pm, *, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = torch.float32,
                      reshard_after_forward: bool = True, shard: str = "mesh") -> nn.Module:
    """Shard ``model`` (in place) with FSDP2 over every rank of ``pm``; returns ``model``.

    Args:
        model: a single-device model with a ``blocks`` ``ModuleList`` (every LongNet model);
            sequence parallelism (:func:`~longnet.parallel.parallelize_sequence`) may be applied
            before or after.
        pm: the :class:`~longnet.parallel.mesh.ParallelMesh` of this process.
        param_dtype: compute dtype of the all-gathered parameters (``torch.bfloat16`` on GPU);
            None keeps the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (float32 by default).
        reshard_after_forward: free each block's gathered parameters after its forward (and
            gather them again in backward): ZeRO-3; False keeps them until backward (ZeRO-2).
        shard: ``"mesh"`` (every rank holds a distinct shard) or ``"data"`` (shards over the data
            axis, replicas over the sequence axis); see the module docstring.

    Build the optimizer *after* this call: the parameters become ``DTensor`` shards.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from longnet.parallel.mesh import ParallelMesh

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(pm, ParallelMesh):
        raise TypeError(f"pm must be a ParallelMesh (longnet.parallel.mesh.build_mesh), got {type(pm).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model ({type(model).__name__}) has no `blocks` ModuleList to shard block by block")
    if is_sharded(model):
        raise ValueError("model is already sharded (fully_shard_model was called on it)")
    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise TypeError(f"{name} must be a torch.dtype or None, got {value!r}")
    shard_world(pm.dp, pm.sp, shard)  # checks shard
    device_type = pm.mesh.device_type
    if shard == "mesh":  # the data and sequence axes flattened: rank r holds shard r of every parameter
        shard_mesh = init_device_mesh(device_type, (pm.dp * pm.sp,), mesh_dim_names=("dp_sp",))
    else:  # HSDP: dim 0 replicates (the sp ranks of a sequence), dim 1 shards (a data-parallel group)
        grid = torch.arange(pm.dp * pm.sp).view(pm.dp, pm.sp).t().contiguous()
        shard_mesh = DeviceMesh(device_type, grid, mesh_dim_names=("sp_replicate", "dp_shard"))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if is_sharded(module):
            module.set_gradient_divide_factor(1.0)  # a sum over the mesh (see the module docstring)
            module.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM: gloo has no PREMUL_SUM
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, backward reduces gradients only when ``enabled`` (micro-batches but the
    last accumulate unreduced gradients locally: FSDP2's ``set_requires_gradient_sync``)."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``state_dict`` of ``model`` on CPU on rank 0, ``{}`` on the other ranks.

    Every rank must call it (it all-gathers). A model that is not sharded gives its own
    ``state_dict`` on CPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write ``model`` and ``optimizer`` into ``folder`` with ``torch.distributed.checkpoint``.

    Every rank calls it (each writes its own shards and fsyncs them; rank 0 writes the metadata).
    Keys are parameter names, so any layout can read the folder (:func:`load_sharded`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a :func:`save_sharded` folder into ``model`` and ``optimizer``, whatever the layout.

    Every rank calls it; works without a process group too (one process). The tensors are
    resharded to this layout: saved on 4 ranks (FSDP over 4), read on 2 or on 1.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # DCP warns that one process without a group loads alone: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a whole ``optimizer.state_dict()`` of the unsharded model (states keyed by parameter
    index, as a DDP or one-process run saves it) into the optimizer of a sharded ``model``.

    Every rank passes the same full state; each keeps its shards. The indices are matched to
    parameter names through ``optimizer.param_groups`` (the same order as when it was saved).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    groups, state = [], {}
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(optimizer.param_groups)}")
    for saved, group in zip(saved_groups, optimizer.param_groups):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("the saved optimizer's parameter groups do not match this model's")
        fqns = [names[id(p)] for p in group["params"]]
        for index, fqn in zip(saved["params"], fqns):
            if index in state_dict["state"]:
                state[fqn] = state_dict["state"][index]
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": fqns})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
