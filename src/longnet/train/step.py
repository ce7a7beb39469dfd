"""One optimizer step of the trainer, on one process or on a data x sequence parallel mesh.

Single process: the step's ``batch_size`` sequences run as micro-batches; each micro-batch loss
(a mean over its tokens) is divided by the number of micro-batches, so the gradient is that of
the mean loss of the step.

On a mesh (``parallel`` given, see :mod:`longnet.train.distributed`): each rank holds
``batch_size / dp`` rows and the ``seq_len / sp`` columns of its sequence chunk, and ``forward``
is the model wrapped by :meth:`~longnet.train.distributed.Parallel.data_parallel`
(``DistributedDataParallel`` over the data axis). Every rank backpropagates ``sum of its tokens'
losses / global token count`` (attention communicates inside, over the sequence-parallel group);
micro-batches but the last run under ``no_sync`` and the last backward sums the accumulated
gradients over every rank, bucket by bucket, which gives every rank the gradient of the global
token mean, the same on every rank. Clipping and AdamW therefore take identical steps everywhere and the replicas stay
in sync (``check_in_sync`` verifies it).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from longnet.models.lm import IGNORE_INDEX
from longnet.train.runtime import autocast

if TYPE_CHECKING:
    from longnet.train.distributed import Parallel

__all__ = ["compute_gradients", "train_step"]


def compute_gradients(forward: Callable, input_ids: torch.Tensor, labels: torch.Tensor, *, micro: int,
                      device: torch.device, dtype: torch.dtype, parallel: "Parallel | None" = None) -> float:
    """Forward and backward of this process's part of one step; the step's mean loss.

    Args:
        forward: the model (or its compiled form), ``forward(x, labels=y) -> LMOutput``; with
            ``parallel``, the module :meth:`Parallel.data_parallel` returned (or its compiled form).
        input_ids, labels: (rows, n) this process's rows and columns of the step's batch.
        micro: rows per forward/backward (divides ``rows``).
        parallel: the mesh this process belongs to, or None for one process.

    Returns:
        The mean loss over every token of the step (all ranks: the same global value). On
        return ``.grad`` holds the gradient of that mean, summed over the mesh.
    """
    rows = input_ids.shape[0]
    if rows % micro:
        raise ValueError(f"micro-batch {micro} does not divide the {rows} rows of this process")
    n_micro = rows // micro
    if parallel is None:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(n_micro):
            x = input_ids[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, N)
            y = labels[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, N)
            with autocast(device, dtype):
                out = forward(x, labels=y)
            (out.loss / n_micro).backward()
            loss_sum += out.loss.detach().double()
        return float(loss_sum) / n_micro

    if parallel.ddp is None and parallel.fsdp is None:
        raise RuntimeError("compute_gradients with parallel needs the model wrapped by parallel.data_parallel(model) "
                           "(and that wrapped module, or its compiled form, as forward)")
    # global token count of the step (labels are known before any forward): one tiny all-reduce
    total = (labels != IGNORE_INDEX).sum().to(device=device, dtype=torch.int64)
    dist.all_reduce(total, group=parallel.world_group)
    total_f = float(total.clamp(min=1))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(n_micro):
        x = input_ids[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, n)
        y = labels[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, n)
        # gradients of all micro-batches but the last accumulate locally; the last backward sums
        # them over the mesh (DDP buckets, see longnet.parallel.mesh.data_parallel; FSDP: one
        # reduce-scatter per block, longnet.parallel.fsdp)
        sync = contextlib.nullcontext() if i == n_micro - 1 else parallel.no_sync()
        with sync:
            with autocast(device, dtype):
                out = forward(x, labels=y)
            local_sum = out.loss * out.num_tokens  # float32: sum of this chunk's token losses
            (local_sum / total_f).backward()
        loss_sum += local_sum.detach().double()
    dist.all_reduce(loss_sum, group=parallel.world_group)
    return float(loss_sum) / total_f


def train_step(forward: Callable, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               input_ids: torch.Tensor, labels: torch.Tensor, *, lr: float, grad_clip: float, micro: int,
               device: torch.device, dtype: torch.dtype, parallel: "Parallel | None" = None
               ) -> tuple[float, float]:
    """One optimizer step: set ``lr``, :func:`compute_gradients`, clip at ``grad_clip``, AdamW.

    Returns ``(mean loss of the step, gradient norm before clipping)``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = compute_gradients(forward, input_ids, labels, micro=micro, device=device, dtype=dtype,
                             parallel=parallel)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(grad_norm)
