"""One function makes a single-device model ready to train on a mesh: :func:`parallelize`.

Model code is single-device. :func:`parallelize` applies, from outside and always in this order:

1. **sequence parallelism** when the mesh's sequence axis has more than one rank
   (:func:`~longnet.parallel.parallelize_sequence`: every dilated attention call runs the exact
   distributed operator over the ranks of one sequence, positions offset by the rank's chunk);
2. **activation checkpointing** (``grad_checkpointing``: each block is recomputed in backward);
3. **data parallelism** when the mesh has more than one rank: FSDP2 (``fsdp``: parameters,
   gradients and AdamW states sharded, :func:`~longnet.parallel.fsdp.fully_shard_model`) or DDP
   replicas (:func:`~longnet.parallel.mesh.data_parallel`), gradients summed over the whole mesh;
4. **torch.compile** (``compile``) of what the training step calls.

It returns a :class:`Parallelized`: what the training step calls, and the few operations whose
form depends on the layout (skipping gradient reduction for all micro-batches but the last, the
full weights for a checkpoint, sharded checkpoint files, the replica check). This module is the
only place that knows about DDP, FSDP2, sequence parallelism and compile; the trainer holds a
:class:`~longnet.parallel.runtime.TrainMesh` (of one process, or of many) and a ``Parallelized``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from longnet.parallel.runtime import TrainMesh

__all__ = ["parallelize", "Parallelized"]


@dataclass
class Parallelized:
    """A model made ready for a mesh by :func:`parallelize`.

    Attributes:
        model: the model itself (sharded in place under FSDP2): evaluate and describe it.
        forward: what the training step calls (the model, its DDP wrapper, compiled or not).
        mesh: the mesh it runs on.
        sharded: parameters are FSDP2 shards (each rank holds a part).
    """

    model: nn.Module
    forward: Callable
    mesh: TrainMesh
    sharded: bool = False
    _ddp: Any = None

    def describe(self, fsdp_shard: str = "mesh") -> str:
        """One line: the processes, the grid and how the model is replicated or sharded."""
        mesh = self.mesh
        if mesh.world == 1:
            return "one process"
        if not self.sharded:
            how = "DDP: every rank holds the whole model"
        elif fsdp_shard == "mesh":
            how = f"FSDP2: parameters, gradients and AdamW states sharded over the {mesh.world} ranks"
        else:
            how = (f"FSDP2: parameters, gradients and AdamW states sharded over the {mesh.dp} data-parallel ranks, "
                   f"replicated over the {mesh.sp} sequence-parallel ones")
        return f"torchrun: {mesh.describe()}; {how}"

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context: backward accumulates gradients locally, without reducing them over the mesh."""
        if self.sharded:
            from longnet.parallel.fsdp import gradient_sync

            return gradient_sync(self.model, False)
        if self._ddp is not None:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The full weights (``state_dict``): gathered on rank 0 under FSDP2 (every rank must call
        it; the others get ``{}``), the model's own tensors otherwise."""
        if self.sharded:
            from longnet.parallel.fsdp import full_model_state

            return full_model_state(self.model)
        return self.model.state_dict()

    def write_shards(self, folder: Path, optimizer: torch.optim.Optimizer) -> bool:
        """Under FSDP2 every rank writes its model and optimizer shards into ``folder``
        (``torch.distributed.checkpoint``) and this returns True; otherwise nothing is written
        and the optimizer state is saved whole."""
        if not self.sharded:
            return False
        from longnet.parallel.fsdp import save_sharded

        save_sharded(folder, self.model, optimizer)
        return True

    def load_state(self, optimizer: torch.optim.Optimizer, *, shards: Path | None,
                   optimizer_state: dict[str, Any] | None) -> None:
        """Read a checkpoint's optimizer state (and, from ``shards``, the model) into this layout,
        whatever layout wrote it: DCP shards reshard, a whole optimizer state is split."""
        from longnet.parallel.fsdp import load_full_optimizer, load_sharded

        if shards is not None:
            load_sharded(shards, self.model, optimizer)
        elif self.sharded:
            load_full_optimizer(self.model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)

    def check_in_sync(self) -> None:
        """``RuntimeError`` unless every replica holds bit-identical parameters.

        Compares per-parameter float64 checksums (sum and a position-weighted sum) with a MAX and
        a MIN all-reduce: two tiny collectives. One process, or FSDP2 shards (no replicas to
        compare): nothing to check.
        """
        if self.sharded or self.mesh.world == 1:
            return
        check_replicas(list(self.model.parameters()), self.mesh)


def check_replicas(params: list[torch.nn.Parameter], mesh: TrainMesh) -> None:
    """``RuntimeError`` unless ``params`` are bit-identical on every rank of ``mesh``."""
    sums = []
    for p in params:
        x = p.detach().double().reshape(-1)
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / x.numel()
        sums.append(torch.stack([x.sum(), (x * w).sum()]))
    local = torch.cat(sums)  # (2 * len(params),)
    hi, lo = local.clone(), local.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=mesh.world_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=mesh.world_group)
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"parameters diverged across ranks (parameter #{bad[0] // 2} differs first): "
                           "the replicas no longer take the same optimizer step")


def parallelize(model: nn.Module, mesh: TrainMesh, config: Any, *,
                param_dtype: torch.dtype | None = None) -> Parallelized:
    """Make ``model`` (single-device, on ``mesh.device``) ready to train on ``mesh``.

    Args:
        model: a LongNet model, or a Hugging Face model behind
            :class:`~longnet.integrations.hf_train.HFCausalLM`; changed in place.
        mesh: this process's :class:`~longnet.parallel.runtime.TrainMesh`.
        config: the parallel settings (``grad_checkpointing``, ``compile``, ``fsdp``,
            ``fsdp_shard``; :class:`longnet.train.config.ParallelSection`).
        param_dtype: FSDP2's compute dtype of the gathered parameters (bfloat16 on GPU), None to
            keep the parameters' dtype.

    Build the optimizer *after* this call (under FSDP2 the parameters become shards).
    """
    if mesh.sp > 1:
        from longnet.parallel.sequence import parallelize_sequence

        parallelize_sequence(model, mesh.sp_group)
    model.config.grad_checkpointing = bool(config.grad_checkpointing)
    out = Parallelized(model=model, forward=model, mesh=mesh)
    if mesh.world > 1 and config.fsdp:
        from longnet.parallel.fsdp import fully_shard_model

        out.forward = fully_shard_model(model, mesh.mesh, param_dtype=param_dtype, shard=config.fsdp_shard)
        out.sharded = True
    elif mesh.world > 1:
        from longnet.parallel.mesh import data_parallel

        out.forward = out._ddp = data_parallel(model, mesh.mesh)
    if config.compile:
        out.forward = torch.compile(out.forward)
    return out
