"""One optimizer step of the trainer, the same on one process and on a data x sequence mesh.

Each rank holds ``batch_size / dp`` rows of the step and the ``seq_len / sp`` columns of its chunk
of them (one process: the whole batch). Every rank backpropagates ``sum of its tokens' losses /
the step's token count over the whole mesh``; micro-batches but the last run under
:meth:`~longnet.parallel.Parallelized.no_sync`, and the last backward sums the accumulated
gradients over every rank (DDP buckets or FSDP2 reduce-scatters, applied by
:func:`longnet.parallel.parallelize`; attention communicates inside the forward when the sequence
is split). Every rank then holds the gradient of the step's mean token loss, clipping and AdamW
take identical steps everywhere, and the replicas stay in sync (``Parallelized.check_in_sync``
verifies it). On one process the sums over the mesh are the local values.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from longnet.models.lm import IGNORE_INDEX
from longnet.train.runtime import autocast

__all__ = ["compute_gradients", "train_step", "as_parallelized"]


def as_parallelized(model: Any, device: torch.device) -> Any:
    """``model`` as :func:`longnet.parallel.parallelize` returns it: a ``Parallelized`` is kept,
    a plain module becomes the one-process form."""
    from longnet.parallel import Parallelized, TrainMesh

    if isinstance(model, Parallelized):
        return model
    return Parallelized(model=model, forward=model, mesh=TrainMesh(0, 1, 1, 1, 0, 0, device))


def compute_gradients(trained: Any, input_ids: torch.Tensor, labels: torch.Tensor, *, micro: int,
                      dtype: torch.dtype, device: torch.device | None = None) -> float:
    """Forward and backward of this process's part of one step; the step's mean loss.

    Args:
        trained: what :func:`longnet.parallel.parallelize` returned (or a plain model, for one
            process on ``device``).
        input_ids, labels: (rows, n) this process's rows and columns of the step's batch.
        micro: rows per forward/backward (divides ``rows``).
        dtype: compute precision (autocast below float32).

    Returns:
        The mean loss over every token of the step (every rank: the same global value). On
        return ``.grad`` holds the gradient of that mean, summed over the mesh.
    """
    trained = as_parallelized(trained, device or torch.device("cpu"))
    mesh = trained.mesh
    device = mesh.device
    rows = input_ids.shape[0]
    if rows % micro:
        raise ValueError(f"micro-batch {micro} does not divide the {rows} rows of this process")
    n_micro = rows // micro
    # the step's token count over the mesh (labels are known before any forward): one tiny all-reduce
    total = mesh.sum((labels != IGNORE_INDEX).sum().to(device=device, dtype=torch.int64))
    total_f = float(total.clamp(min=1))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(n_micro):
        x = input_ids[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, n)
        y = labels[i * micro:(i + 1) * micro].to(device, non_blocking=True)  # (micro, n)
        with trained.no_sync() if i < n_micro - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                out = trained.forward(x, labels=y)
            local_sum = out.loss * out.num_tokens  # float32: sum of this chunk's token losses
            (local_sum / total_f).backward()
        loss_sum += local_sum.detach().double()
    return float(mesh.sum(loss_sum)) / total_f


def train_step(trained: Any, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, labels: torch.Tensor,
               *, lr: float, grad_clip: float, micro: int, dtype: torch.dtype,
               device: torch.device | None = None) -> tuple[float, float]:
    """One optimizer step: set ``lr``, :func:`compute_gradients`, clip at ``grad_clip``, AdamW.

    Returns ``(mean loss of the step, gradient norm before clipping)``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = compute_gradients(trained, input_ids, labels, micro=micro, dtype=dtype, device=device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(grad_norm)
