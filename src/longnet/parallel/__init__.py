"""longnet.parallel: everything that communicates.

* :func:`dilated_attention`: sequence-parallel dilated attention (paper section 3), exact, with
  communication per rank that does not grow with the sequence length;
* :class:`CommCounter`: bytes each collective moved, per branch and phase;
* :func:`plan_bytes`: the same bytes predicted from shapes alone (used by ``longnet plan``);
* :func:`parallelize_sequence` (and the ``with`` form :func:`sequence_parallel`): makes a
  single-device model's attention sequence parallel from outside;
* :func:`init_distributed` (under torchrun), :func:`run_workers` (local spawning launcher that
  stops every rank when one fails), :func:`shard_sequence`;
* :mod:`longnet.parallel.mesh`: data x sequence parallel grid (``build_mesh``) and the loss and
  gradient reductions of an exact 2-D training step;
* :func:`init_mesh` / :class:`TrainMesh`: a training process's place in that grid (one process
  outside torchrun), and :func:`parallelize`: the one function that applies sequence
  parallelism, activation checkpointing, FSDP2 or DDP, and compile to a single-device model.
"""

from longnet.parallel.attention import dilated_attention
from longnet.parallel.comm import CommCounter, CommRecord
from longnet.parallel.launch import WorkerError, init_distributed, run_workers
from longnet.parallel.layout import BranchComm, CommPlan, place_branches, plan_bytes
from longnet.parallel.parallelize import Parallelized, parallelize
from longnet.parallel.runtime import ParallelSettingsError, TrainMesh, init_mesh
from longnet.parallel.sequence import parallelize_sequence, sequence_parallel, unparallelize_sequence
from longnet.parallel.shard import shard_sequence

__all__ = [
    "dilated_attention", "CommCounter", "CommRecord", "plan_bytes", "CommPlan", "BranchComm",
    "place_branches", "parallelize_sequence", "unparallelize_sequence", "sequence_parallel",
    "init_distributed", "run_workers", "WorkerError", "shard_sequence", "parallelize", "Parallelized",
    "TrainMesh", "init_mesh", "ParallelSettingsError",
]
