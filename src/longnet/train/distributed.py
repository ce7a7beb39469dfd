"""Training under torchrun: a data parallel x sequence parallel mesh for ``longnet train``.

``torchrun --nproc-per-node K -m longnet train --sequence-parallel P ...`` runs ``K`` processes laid
out as a ``(dp = K / P, sp = P)`` grid (:func:`longnet.parallel.mesh.build_mesh`: the ``P`` ranks of
one sequence are contiguous). Rank ``r`` reads rows ``dp_rank`` of ``dp`` of each step's batch and
columns ``[sp_rank * n, (sp_rank + 1) * n)`` of those sequences (``n = seq_len / P``), runs the
single-device model, wrapped in ``DistributedDataParallel`` over the data axis
(:meth:`Parallel.data_parallel`, which first applies :func:`longnet.parallel.parallelize_sequence`:
its dilated attention becomes the exact distributed operator); DDP's buckets are summed over both axes as
backward produces them (:func:`longnet.parallel.mesh.data_parallel`, :mod:`longnet.train.step`).
Every replica takes the same optimizer step; rank 0 alone logs, writes metrics, plots and
checkpoints.

Validation runs distributed the same way: windows are split over the data-parallel ranks and
columns over the sequence-parallel ranks (up to ``dp - 1`` trailing windows are left out so that
every rank runs the same number of batches), and the token-weighted mean is summed over all ranks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longnet.data import EvalBatches
from longnet.models import LongNetConfig
from longnet.train.runtime import autocast

__all__ = ["ParallelSettingsError", "Parallel", "setup_parallel", "check_sequence_parallel", "check_pattern_split",
           "check_in_sync", "parallel_mean_loss", "local_micro_batch", "torchrun_world_size"]


class ParallelSettingsError(ValueError):
    """Bad parallel settings; every rank raises the same one (ranks > 0 need not print it)."""


def torchrun_world_size() -> int | None:
    """``WORLD_SIZE`` from the environment (set by torchrun), or None outside torchrun."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        world = int(value)
    except ValueError as err:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} is not an integer") from err
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
    return world


def check_sequence_parallel(sequence_parallel: int, world: int | None) -> None:
    """``ValueError`` unless ``--sequence-parallel`` fits the launch (before any process group)."""
    sp = sequence_parallel
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ParallelSettingsError(f"--sequence-parallel must be a positive integer, got {sp!r}")
    if world is None:
        if sp > 1:
            raise ParallelSettingsError(
                f"--sequence-parallel {sp} needs {sp} (or a multiple of {sp}) processes: launch with torchrun"
                f", e.g. torchrun --nproc-per-node {sp} -m longnet train --sequence-parallel {sp} ...")
        return
    if world % sp:
        raise ParallelSettingsError(f"--sequence-parallel {sp} does not divide the {world} processes torchrun "
                                    f"started; use --nproc-per-node (times nodes) = a multiple of {sp}")


def check_pattern_split(config: LongNetConfig, seq_len: int, sp: int, *, compile: bool = False) -> None:
    """:class:`ParallelSettingsError` when ``seq_len`` cannot be split over ``sp`` ranks for this model."""
    if sp == 1:
        return
    from longnet.parallel.layout import place_branches

    if compile:
        raise ParallelSettingsError("--compile is not supported with --sequence-parallel > 1; drop --compile")
    if seq_len % sp:
        raise ParallelSettingsError(f"--seq-len {seq_len} is not divisible by --sequence-parallel {sp}; every "
                                    f"rank holds an equal chunk (use a multiple of {sp})")
    if config.shift_segments:
        raise ParallelSettingsError(f"--sequence-parallel {sp} does not support shifted segments "
                                    "(LongNetConfig.shift_segments); train without them or on one process")
    pattern = config.pattern()
    if pattern is None:
        raise ParallelSettingsError(f"--sequence-parallel {sp} needs dilated attention (the model's attention "
                                    f"is {config.attention!r}); a single branch (N, 1) is dense attention")
    try:
        place_branches(pattern, seq_len, sp)
    except ValueError as err:
        raise ParallelSettingsError(f"--seq-len {seq_len} cannot be split over --sequence-parallel {sp} for the "
                                    f"pattern segment_lengths={list(pattern.segment_lengths)}: {err}") from err


def local_micro_batch(batch_size: int, dp: int, chunk_len: int, given: int | None, default_tokens: int) -> int:
    """Rows per forward/backward on one rank of a ``dp``-way data-parallel step.

    ``given`` (``--micro-batch``) must divide the ``batch_size / dp`` rows of a rank; by default the
    most rows whose ``chunk_len``-token chunks fit in ``default_tokens`` (at least one).
    """
    if batch_size % dp:
        raise ParallelSettingsError(f"the {batch_size} sequences of a step (--batch-tokens / --seq-len) cannot "
                                    f"be split over {dp} data-parallel ranks (processes / --sequence-parallel); "
                                    f"use a multiple of {dp} sequences")
    rows = batch_size // dp
    if given is not None:
        if rows % given:
            raise ParallelSettingsError(f"--micro-batch {given} does not divide the {rows} sequences each "
                                        f"data-parallel rank runs per step ({batch_size} / {dp})")
        return given
    fit = max(1, default_tokens // chunk_len)
    return max(d for d in range(1, min(fit, rows) + 1) if rows % d == 0)


@dataclass
class Parallel:
    """This process's place in the training mesh (see the module docstring)."""

    rank: int
    world: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    mesh: object  # longnet.parallel.mesh.ParallelMesh
    owns_group: bool
    """True when :func:`setup_parallel` started the process group (and :meth:`close` ends it)."""
    ddp: object = None
    """The model wrapped by :meth:`data_parallel` (``DistributedDataParallel``), once wrapped."""
    fsdp: object = None
    """The model sharded by :meth:`data_parallel` with ``fsdp=True`` (FSDP2), once sharded."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_group(self):
        return self.mesh.world_group

    @property
    def backend(self) -> str:
        """``"gloo"`` or ``"nccl"``."""
        return str(dist.get_backend(self.world_group))

    def columns(self, seq_len: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's chunk of a ``seq_len`` sequence."""
        n = seq_len // self.sp
        return self.sp_rank * n, (self.sp_rank + 1) * n

    def data_parallel(self, model: torch.nn.Module, *, fsdp: bool = False,
                      param_dtype: torch.dtype | None = None, fsdp_shard: str = "mesh") -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` over the data axis, gradients summed over the mesh.

        With ``fsdp``, ``model`` is instead sharded in place with FSDP2 over every rank
        (:func:`longnet.parallel.fsdp.fully_shard_model`; ``param_dtype`` bf16 on GPU; ``fsdp_shard``
        ``"data"``: over the data axis only) and returned;
        build the optimizer after this call. Keep training through the returned module (pass it to
        :func:`longnet.train.step.train_step`); save, evaluate and generate with ``model`` itself.
        """
        from longnet.parallel.mesh import data_parallel
        from longnet.parallel.sequence import parallelize_sequence

        if self.sp > 1:  # the model's attention runs over the sequence group from now on
            parallelize_sequence(model, self.mesh.sp_group)
        if fsdp:
            from longnet.parallel.fsdp import fully_shard_model

            self.fsdp = fully_shard_model(model, self.mesh, param_dtype=param_dtype, shard=fsdp_shard)
            return self.fsdp
        self.ddp = data_parallel(model, self.mesh)
        return self.ddp

    def no_sync(self):
        """Context: backward accumulates gradients locally, without reducing them over the mesh."""
        if self.fsdp is not None:
            from longnet.parallel.fsdp import gradient_sync

            return gradient_sync(self.fsdp, False)
        return self.ddp.no_sync()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a signal seen by one rank)."""
        t = torch.tensor(int(bool(flag)), dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world_group)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier(group=self.world_group)

    def close(self) -> None:
        """End the process group if :func:`setup_parallel` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            from longnet.parallel.comm import clear_subgroups

            clear_subgroups()


def setup_parallel(sequence_parallel: int, device: torch.device, *, timeout_s: float = 120.0,
                   fsdp: bool = False) -> Parallel | None:
    """The mesh of a torchrun launch, or None outside torchrun (``WORLD_SIZE`` unset).

    Starts the default process group unless one is running already (gloo on CPU, NCCL on CUDA,
    ``timeout_s`` for every collective, so a rank whose peers died raises instead of hanging),
    then builds the ``(world / sequence_parallel, sequence_parallel)`` mesh. ``fsdp`` outside
    torchrun is a :class:`ParallelSettingsError`.
    """
    world = torchrun_world_size()
    check_sequence_parallel(sequence_parallel, world)
    if world is None:
        if fsdp:
            raise ParallelSettingsError("--fsdp shards the model over torchrun's processes: launch with torchrun, "
                                        "e.g. torchrun --nproc-per-node 2 -m longnet train --fsdp ...; a run saved "
                                        "with --fsdp resumes on one process without it")
        return None
    from longnet.parallel import init_distributed
    from longnet.parallel.mesh import build_mesh

    owns = not dist.is_initialized()
    if owns:
        init_distributed("nccl" if device.type == "cuda" else "gloo", timeout_s=timeout_s)
    if dist.get_world_size() != world:
        raise ValueError(f"the running process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world}")
    pm = build_mesh(world // sequence_parallel, sequence_parallel,
                    device_type="cuda" if device.type == "cuda" else "cpu")
    return Parallel(dist.get_rank(), world, pm.dp, pm.sp, pm.dp_rank, pm.sp_rank, pm, owns)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.index is not None and device.index != local and torchrun_world_size() not in (None, 1):
        raise ValueError(f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK; pass --device cuda")
    if local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", local)


def check_in_sync(params: list[torch.nn.Parameter], parallel: Parallel) -> None:
    """``RuntimeError`` unless every rank holds bit-identical parameters.

    Compares per-parameter float64 checksums (sum and sum of |x| times a fixed position weight)
    with a MAX and a MIN all-reduce: two tiny collectives. Under FSDP (``parallel.fsdp``) every
    rank holds other shards and there is no replica to compare: nothing is checked.
    """
    if parallel.fsdp is not None:
        return
    sums = []
    for p in params:
        x = p.detach().double().reshape(-1)
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / x.numel()
        sums.append(torch.stack([x.sum(), (x * w).sum()]))
    local = torch.cat(sums)  # (2 * len(params),)
    hi, lo = local.clone(), local.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=parallel.world_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=parallel.world_group)
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"parameters diverged across ranks (parameter #{bad[0] // 2} differs first): "
                           "the replicas no longer take the same optimizer step")


@torch.no_grad()
def parallel_mean_loss(model: torch.nn.Module, batches: EvalBatches, device: torch.device, dtype: torch.dtype,
                       parallel: Parallel) -> tuple[float, int]:
    """``(mean next-token loss, tokens)`` of ``batches`` over the mesh (the same on every rank)."""
    was_training = model.training
    model.eval()
    start, stop = parallel.columns(batches.seq_len)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    try:
        for input_ids, labels in batches.batches(1, start, stop, rank=parallel.dp_rank, world=parallel.dp):
            with autocast(device, dtype):
                out = model(input_ids.to(device), labels=labels.to(device))
            total[0] += out.loss.double() * out.num_tokens
            total[1] += out.num_tokens
    finally:
        model.train(was_training)
    dist.all_reduce(total, group=parallel.world_group)
    count = int(total[1])
    return (float(total[0]) / count if count else math.nan), count
