"""Time and peak memory of one callable, on CPU or CUDA.

Time: ``warmup`` untimed calls, then ``repeats`` timed calls; the median is the figure to quote.
On CUDA each call is timed with CUDA events after a synchronize; on CPU with ``perf_counter``.
On CPU the process CPU time of each call (``time.process_time``, all threads) is kept too: on a
machine shared with other jobs, wall time mostly measures how long the scheduler kept the process
waiting, while the CPU time of a single-threaded run stays close to its wall time on an idle
machine (with several threads it also counts the time threads spin at barriers).

Peak memory is the *extra* memory one call needs over what was allocated before it (inputs,
earlier results): outputs, saved activations, workspaces and, for a backward, the gradients.

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call
  (exact for the caching allocator; excludes cuBLAS/cuDNN workspaces outside it).
- CPU: torch has no CPU allocator statistics, and ``tracemalloc`` does not see torch's
  allocations, so the figure is the growth of the process's resident set size (RSS) over its
  value just before the call, sampled every millisecond from ``/proc/self/statm`` by a
  background thread, after ``malloc_trim(0)`` has handed freed heap back to the OS. It is an
  estimate: allocations that live for less than a sampling period can be missed, and pages that
  the allocator keeps mapped from earlier calls are not counted again. Where ``/proc`` is
  missing (not Linux) it is reported as ``None``.

The memory is sampled on the first call of a case (a warmup call when there is one), so the
timed calls run without the sampler.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Measurement", "measure", "measure_interleaved", "RssSampler", "StepTimes"]

_STATM = "/proc/self/statm"


@dataclass
class Measurement:
    """Times (seconds) of the timed calls, and the peak extra memory (bytes) of one call."""

    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)  # CPU only: process CPU time
    peak_bytes: int | None = None
    warmup: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def cpu_median_s(self) -> float | None:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else None

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def _libc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return lambda: None
    return lambda: trim(0) and None


class RssSampler:
    """Peak growth of the process RSS while the ``with`` block runs (bytes; ``None`` off Linux)."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s
        self.available = os.path.exists(_STATM)
        self._page = os.sysconf("SC_PAGE_SIZE") if self.available else 0
        self._trim = _libc_trim()
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssSampler":
        if self.available:
            self._trim()
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int | None:
        return self.peak - self.base if self.available else None


def _call_cpu(fn: Callable[[], object], sample_memory: bool) -> tuple[float, float, int | None]:
    if sample_memory:
        with RssSampler() as s:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        return dt, dc, s.growth
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0, None


def _call_cuda(fn: Callable[[], object], sample_memory: bool,
               device: torch.device) -> tuple[float, None, int | None]:
    torch.cuda.synchronize(device)
    before = 0
    if sample_memory:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    dt = start.elapsed_time(end) / 1e3
    peak = torch.cuda.max_memory_allocated(device) - before if sample_memory else None
    return dt, None, peak


def _caller(fn: Callable[[], object], device: torch.device):
    if device.type == "cuda":
        return lambda sample: _call_cuda(fn, sample, device)
    if device.type == "cpu":
        return lambda sample: _call_cpu(fn, sample)
    raise ValueError(f"device must be a cpu or cuda device, got {device}")


def _check_counts(repeats, warmups) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    for warmup in warmups:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")


def measure(fn: Callable[[], object], *, device: torch.device | str, repeats: int,
            warmup: int) -> Measurement:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Peak memory is taken on the first call (see the module docstring).
    """
    return measure_interleaved([fn], device=device, repeats=repeats, warmups=[warmup])[0]


def measure_interleaved(fns: list[Callable[[], object]], *, device: torch.device | str, repeats: int,
                        warmups: list[int]) -> list[Measurement]:
    """:func:`measure` for several callables whose timed calls alternate: fn0, fn1, ..., fn0, fn1, ...

    Each callable first gets its ``warmups[i]`` untimed calls (memory is sampled on its first call),
    then round ``j`` times call ``j`` of every callable in turn. A drift in the machine's speed
    (other jobs, clock changes) then hits all of them alike, so ratios between them are fair even
    on a shared machine; timing one callable's calls after the other's does not have that property.
    """
    if len(fns) != len(warmups):
        raise ValueError(f"one warmup count per callable: {len(fns)} callables, {len(warmups)} warmups")
    _check_counts(repeats, warmups)
    device = torch.device(device)
    calls = [_caller(fn, device) for fn in fns]
    out = [Measurement(warmup=w) for w in warmups]
    for call, m in zip(calls, out):
        for i in range(m.warmup):
            _, _, peak = call(i == 0)
            if i == 0:
                m.peak_bytes = peak
    for j in range(repeats):
        for call, m in zip(calls, out):
            dt, cpu, peak = call(j == 0 and m.warmup == 0)
            if j == 0 and m.warmup == 0:
                m.peak_bytes = peak
            m.times_s.append(dt)
            if cpu is not None:
                m.cpu_times_s.append(cpu)
    return out


class StepTimes:
    """Wall-clock and process-CPU seconds of steps timed one by one (decoding benchmarks).

    Each :meth:`run` synchronises CUDA before and after the step, so a step's time is its own.
    :meth:`summary` gives the figures the decoding benchmarks report, in ms per step: the median
    (the figure to quote), the minimum and mean of the wall time, and the median CPU time.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.wall: list[float] = []
        self.cpu: list[float] = []  # CPU seconds of this process (robust to load from others)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, step: Callable[[], object], record: bool = True):
        """``step()``, timed unless ``record`` is False (warmup); returns what it returned."""
        self._sync()
        t, c = time.perf_counter(), time.process_time()
        out = step()
        self._sync()
        if record:
            self.wall.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
        return out

    def summary(self) -> dict:
        if not self.wall:
            raise RuntimeError("no timed steps")
        w = self.wall
        return {"ms_per_token": 1e3 * statistics.median(w), "ms_min": 1e3 * min(w),
                "ms_mean": 1e3 * statistics.fmean(w), "timed_steps": len(w),
                "cpu_ms_per_token": 1e3 * statistics.median(self.cpu)}
