"""The training mesh: where this process sits in a data parallel x sequence parallel grid.

:func:`init_mesh` gives every training process a :class:`TrainMesh`. Outside torchrun it is the
mesh of one process (``world = dp = sp = 1``, no process group): its collectives return their
input, its barrier returns at once, and :meth:`TrainMesh.columns` is the whole sequence. Under
``torchrun --nproc-per-node K -m longnet train --sequence-parallel P ...`` the ``K`` processes are laid
out as a ``(dp = K / P, sp = P)`` grid (:func:`longnet.parallel.mesh.build_mesh`: the ``P`` ranks of
one sequence are contiguous). Rank ``r`` reads rows ``dp_rank`` of ``dp`` of each step's batch and
columns ``[sp_rank * n, (sp_rank + 1) * n)`` of those sequences (``n = seq_len / P``). The trainer
holds a mesh and never asks whether it is distributed; what the model needs to run on it
(sequence parallelism, DDP or FSDP2) is applied from outside by
:func:`longnet.parallel.parallelize`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ParallelSettingsError", "TrainMesh", "init_mesh", "check_sequence_parallel", "check_pattern_split",
           "local_micro_batch", "torchrun_world_size"]


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


def check_pattern_split(config, seq_len: int, sp: int, *, compile: bool = False) -> None:
    """:class:`ParallelSettingsError` when ``seq_len`` cannot be split over ``sp`` ranks for this model.

    ``config``: a :class:`~longnet.LongNetConfig`, or any config with ``pattern()``,
    ``shift_segments`` and ``attention``."""
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
class TrainMesh:
    """This process's place in the training mesh (see the module docstring).

    ``mesh`` is the :class:`~longnet.parallel.mesh.ParallelMesh` of a torchrun launch, None for one
    process; every method works on both."""

    rank: int
    world: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    device: torch.device
    """This process's device (``cuda`` under torchrun means ``cuda:LOCAL_RANK``)."""
    mesh: object = None
    owns_group: bool = False
    """True when :func:`init_mesh` started the process group (and :meth:`close` ends it)."""
    timeout_s: float = 120.0
    """How long a collective waits for its peers."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_group(self):
        return self.mesh.world_group if self.mesh is not None else None

    @property
    def sp_group(self):
        return self.mesh.sp_group if self.mesh is not None else None

    @property
    def backend(self) -> str:
        """``"gloo"`` or ``"nccl"``; ``"none"`` for one process."""
        return str(dist.get_backend(self.world_group)) if self.mesh is not None else "none"

    def describe(self) -> str:
        """One line: processes, grid and backend."""
        return (f"{self.world} process(es) = {self.dp} data parallel x {self.sp} sequence parallel"
                + (f"; {self.backend}, collective timeout {self.timeout_s:g} s (a rank whose peer died exits "
                   "non-zero within it)" if self.mesh is not None else ""))

    def columns(self, seq_len: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's chunk of a ``seq_len`` sequence."""
        n = seq_len // self.sp
        return self.sp_rank * n, (self.sp_rank + 1) * n

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place (returned)."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.world_group)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a signal seen by one rank)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor(int(bool(flag)), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world_group)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier(group=self.world_group)

    def close(self) -> None:
        """End the process group if :func:`init_mesh` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            from longnet.parallel.comm import clear_subgroups

            clear_subgroups()


def init_mesh(sequence_parallel: int, device: torch.device, *, timeout_s: float = 120.0,
              fsdp: bool = False) -> TrainMesh:
    """The mesh of this process: one process outside torchrun (``WORLD_SIZE`` unset), else the grid.

    Under torchrun it starts the default process group unless one is running already (gloo on
    CPU, NCCL on CUDA, ``timeout_s`` for every collective, so a rank whose peers died raises
    instead of hanging), then builds the ``(world / sequence_parallel, sequence_parallel)`` mesh.
    ``sequence_parallel`` that does not fit the launch, and ``fsdp`` outside torchrun, are a
    :class:`ParallelSettingsError` (raised before any process group starts).
    """
    world = torchrun_world_size()
    check_sequence_parallel(sequence_parallel, world)
    if world is None:
        if fsdp:
            raise ParallelSettingsError("--fsdp shards the model over torchrun's processes: launch with torchrun, "
                                        "e.g. torchrun --nproc-per-node 2 -m longnet train --fsdp ...; a run saved "
                                        "with --fsdp resumes on one process without it")
        return TrainMesh(0, 1, 1, 1, 0, 0, device)
    device = local_device(device)
    from longnet.parallel.launch import init_distributed
    from longnet.parallel.mesh import build_mesh

    owns = not dist.is_initialized()
    if owns:
        init_distributed("nccl" if device.type == "cuda" else "gloo", timeout_s=timeout_s)
    if dist.get_world_size() != world:
        raise ValueError(f"the running process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world}")
    pm = build_mesh(world // sequence_parallel, sequence_parallel,
                    device_type="cuda" if device.type == "cuda" else "cpu")
    return TrainMesh(dist.get_rank(), world, pm.dp, pm.sp, pm.dp_rank, pm.sp_rank, device, pm, owns, timeout_s)


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
