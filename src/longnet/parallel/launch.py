"""Starting process groups, and a small local launcher that never leaves a rank hanging.

Under ``torchrun``, call :func:`init_distributed` in every process: it reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` and picks NCCL on GPUs, gloo on
CPU, with a collective timeout (default 300 s): a rank blocked in a collective whose peers died or
diverged raises after at most that long instead of hanging (on NCCL through
``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent torch). ``torchrun`` itself stops
all workers when one fails.

For tests and single-machine runs, :func:`run_workers` spawns ``world_size`` processes on
127.0.0.1 with a free port, watches them, and as soon as one fails (exception or killed) stops
the others and raises :class:`WorkerError` with the failing rank's traceback; an overall
``timeout`` bounds the whole run.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longnet.utils.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["init_distributed", "run_workers", "WorkerError", "free_port"]


class WorkerError(RuntimeError):
    """A rank failed (or the run timed out); ``rank`` is the first that failed (None: timeout)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def init_distributed(backend: str | None = None, *, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; ``(rank, world_size)``.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective may wait for its peers before raising.
    """
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"environment variable {var} is not set: launch with torchrun "
                               f"(or longnet.parallel.run_workers)")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple,
           pg_timeout_s: float, backend: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        init_distributed(backend, timeout_s=pg_timeout_s)
        result = fn(rank, world_size, *args)
        atomic_write_bytes(os.path.join(outdir, f"{rank}.ok"), pickle.dumps(result))
    except BaseException:  # report any failure to the parent, then exit non-zero
        atomic_write_text(os.path.join(outdir, f"{rank}.err"), traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        from longnet.parallel.comm import clear_subgroups
        if dist.is_initialized():
            dist.destroy_process_group()
        clear_subgroups()


def run_workers(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 120.0,
                pg_timeout_s: float = 60.0, backend: str | None = "gloo",
                start_method: str = "spawn") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes; their results.

    ``fn`` must be picklable (a module-level function). Each process has the default process
    group initialised (gloo on 127.0.0.1 unless ``backend`` says otherwise). If a process raises
    or dies, the others are stopped and :class:`WorkerError` carries its traceback; if the run
    takes longer than ``timeout_s`` all are stopped and :class:`WorkerError` says so.
    ``start_method="fork"`` starts much faster on CPU (no re-import); never use it once CUDA is
    initialised in the parent.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method must be 'spawn', 'fork' or 'forkserver', "
                         f"got {start_method!r}")
    ctx = mp.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="longnet-workers-") as outdir:
        procs = [ctx.Process(target=_child, args=(r, world_size, port, outdir, fn, args,
                                                  pg_timeout_s, backend), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            while (any(p.is_alive() for p in procs) and time.monotonic() < deadline
                   and not _failed(outdir, procs)):
                time.sleep(0.05)
            time.sleep(0.1)  # let a rank that failed first finish writing its report
            failed = _first_failure(outdir, procs)
        finally:
            _stop(procs)
        if failed is not None:
            err = os.path.join(outdir, f"{failed}.err")
            detail = open(err).read() if os.path.exists(err) else (
                f"process exited with code {procs[failed].exitcode} without a traceback "
                f"(killed?)")
            others = [r for r in range(world_size) if r != failed
                      and os.path.exists(os.path.join(outdir, f"{r}.err"))]
            also = f" (ranks {others} failed after it)" if others else ""
            raise WorkerError(f"rank {failed} of {world_size} failed{also}; the other ranks were "
                              f"stopped.\n{detail}", rank=failed)
        missing = [r for r in range(world_size)
                   if not os.path.exists(os.path.join(outdir, f"{r}.ok"))]
        if missing:
            raise WorkerError(f"ranks {missing} did not finish within {timeout_s} s; all ranks "
                              f"were stopped")
        results = []
        for r in range(world_size):
            with open(os.path.join(outdir, f"{r}.ok"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _failed(outdir: str, procs) -> list[int]:
    return [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
            or os.path.exists(os.path.join(outdir, f"{r}.err"))]


def _first_failure(outdir: str, procs) -> int | None:
    """The likely root cause: a rank that died without a report (killed, crashed), else the
    rank that reported an error first (peers of a failed rank usually fail as a consequence)."""
    silent = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
              and not os.path.exists(os.path.join(outdir, f"{r}.err"))]
    if silent:
        return silent[0]
    reported = [(os.stat(os.path.join(outdir, f"{r}.err")).st_mtime_ns, r)
                for r in range(len(procs)) if os.path.exists(os.path.join(outdir, f"{r}.err"))]
    return min(reported)[1] if reported else None


def _stop(procs, grace_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
