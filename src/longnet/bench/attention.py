"""The attention benchmark: dilated attention against dense SDPA, forward and forward+backward.

Cases run in one process, the ones the targets need first (causal fwd+bwd), each from the shortest
sequence up, so a run that is stopped early has measured what matters most. The dilated and the
dense case of one (N, causal, mode) run together: after their warmup calls their timed calls
alternate (dilated, dense, dilated, dense, ...), so a change in the machine's speed during the
run (other jobs, clocks) hits both alike and their ratio stays fair. For each case the figures
are the median time of ``repeats`` calls (after ``warmup`` calls), the peak extra memory of one call (see
:mod:`longnet.bench.measure`), the effective TFLOP/s (the operator's own matmul FLOPs, from
:meth:`DilatedPattern.flops` / :meth:`DilatedPattern.dense_flops`, divided by the time), and for
each dilated/dense pair the FLOP ratio (dense / dilated) and the measured speedup.

A series (one operator, causal or not, one mode) stops at its first out-of-memory error; the
longer lengths of that series are recorded as skipped.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from longnet.bench.measure import measure_interleaved
from longnet.ops.dilated import dilated_attention
from longnet.ops.pattern import DilatedPattern
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS

__all__ = ["AttentionBenchConfig", "run_attention_bench", "comparison_rows", "target_checks",
           "paper_seq_lens", "MODES"]

MODES = ("fwd", "fwdbwd")
IMPLS = ("dilated", "dense")

_OOM = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
              torch.cuda.OutOfMemoryError})


@dataclass
class AttentionBenchConfig:
    """What to run.

    Attributes:
        seq_lens: sequence lengths N for dilated attention, ascending.
        dense_max_seq_len: dense SDPA runs only for N up to this (it is quadratic).
        causal: the causal settings to run, e.g. ``(True, False)``.
        modes: ``"fwd"`` (under ``no_grad``) and/or ``"fwdbwd"`` (forward then ``backward``).
        device, dtype: where and in what precision.
        repeats: timed calls per case (the median is reported).
        warmup: untimed calls before them.
        warmup_skip_s: skip the warmup of a case when the previous length of the same series
            already took longer than this per call (the process is warm by then).
        heads, head_dim, batch_size: the shape (B, H, N, D).
        segment_lengths, dilation_rates: the dilated pattern.
        backend: the dilated attention backend (``"auto"`` or a name, see ``dilated_attention``).
        seed: for the random inputs.
    """

    seq_lens: tuple[int, ...]
    dense_max_seq_len: int
    causal: tuple[bool, ...] = (True, False)
    modes: tuple[str, ...] = MODES
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    repeats: int = 3
    warmup: int = 1
    warmup_skip_s: float = 10.0
    heads: int = 12
    head_dim: int = 64
    batch_size: int = 1
    segment_lengths: tuple[int, ...] = PAPER_SEGMENT_LENGTHS
    dilation_rates: tuple[int, ...] = PAPER_DILATION_RATES
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        self.pattern = DilatedPattern(self.segment_lengths, self.dilation_rates)
        if not self.seq_lens or any(n < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens must be positive ints, got {self.seq_lens}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.causal:
            raise ValueError("causal must hold at least one setting")
        for name in ("repeats", "heads", "head_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        self.seq_lens = tuple(sorted(set(self.seq_lens)))

    def describe(self) -> dict:
        """The configuration as JSON-ready values."""
        return {
            "seq_lens": list(self.seq_lens), "dense_max_seq_len": self.dense_max_seq_len,
            "causal": list(self.causal), "modes": list(self.modes), "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "repeats": self.repeats,
            "warmup": self.warmup, "warmup_skip_s": self.warmup_skip_s, "heads": self.heads,
            "head_dim": self.head_dim, "batch_size": self.batch_size,
            "segment_lengths": list(self.segment_lengths),
            "dilation_rates": list(self.dilation_rates), "backend": self.backend,
            "seed": self.seed,
        }

    def cases(self) -> list[dict]:
        """Every (impl, N, causal, mode) to run, in run order."""
        out = []
        for mode in sorted(self.modes, key=lambda m: m != "fwdbwd"):
            for causal in sorted(self.causal, key=lambda c: not c):
                for n in self.seq_lens:
                    for impl in IMPLS:
                        if impl == "dense" and n > self.dense_max_seq_len:
                            continue
                        out.append({"impl": impl, "n": n, "causal": causal, "mode": mode})
        return out

    def flops(self, impl: str, n: int, causal: bool, mode: str) -> float:
        kw = dict(num_heads=self.heads, is_causal=causal, batch_size=self.batch_size,
                  backward=mode == "fwdbwd")
        if impl == "dense":
            return DilatedPattern.dense_flops(n, self.head_dim, **kw)
        return self.pattern.flops(n, self.head_dim, **kw)


def _series(case: dict) -> tuple:
    return case["impl"], case["causal"], case["mode"]


def _make_call(cfg: AttentionBenchConfig, case: dict, q, k, v, grad_out) -> Callable[[], None]:
    causal = case["causal"]
    if case["impl"] == "dense":
        def attn(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)
    else:
        def attn(a, b, c):
            return dilated_attention(a, b, c, segment_lengths=cfg.pattern, is_causal=causal,
                                     backend=cfg.backend)
    if case["mode"] == "fwd":
        def call():
            with torch.no_grad():
                attn(q, k, v)
        return call
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def call():
        attn(*leaves).backward(grad_out)
        for t in leaves:
            t.grad = None
    return call


def _loadavg() -> float | None:
    """The 1-minute load average after a case: how busy the machine was (None off Unix)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _groups(cases: list[dict]) -> list[list[dict]]:
    """Consecutive cases of one (N, causal, mode): the ones whose timed calls interleave."""
    groups: list[list[dict]] = []
    for case in cases:
        key = (case["n"], case["causal"], case["mode"])
        if groups and (groups[-1][0]["n"], groups[-1][0]["causal"], groups[-1][0]["mode"]) == key:
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


def run_attention_bench(cfg: AttentionBenchConfig, *,
                        progress: Callable[[Iterable], Iterable] = lambda it: it,
                        on_case: Callable[[list[dict]], None] | None = None,
                        records: list[dict] | None = None) -> list[dict]:
    """Run every case of ``cfg``; return one record per case (see module docstring).

    ``progress`` wraps the iterable of case groups (one per N, causal and mode; e.g. ``tqdm``);
    ``on_case`` is called with the records so far after each group (e.g. to save partial
    results). Records are appended to ``records`` when given, so a caller that catches
    ``KeyboardInterrupt`` keeps them.
    """
    records = [] if records is None else records
    stopped: dict[tuple, str] = {}  # series -> why it stopped
    last_time: dict[tuple, float] = {}
    inputs_n, inputs = None, None
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    bar = progress(_groups(cfg.cases()))
    for group in bar:
        first = group[0]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"N={first['n']} {'causal' if first['causal'] else 'full'} {first['mode']}")
        if inputs_n != first["n"]:
            inputs = None
            _free(cfg.device)
            shape = (cfg.batch_size, cfg.heads, first["n"], cfg.head_dim)  # (B, H, N, D)
            inputs = [torch.randn(shape, generator=gen).to(cfg.device, cfg.dtype)
                      for _ in range(4)]
            inputs_n = first["n"]
        q, k, v, grad_out = inputs
        running, fns, warmups, failed = [], [], [], {}
        for case in group:
            rec = dict(case, flops=cfg.flops(**case))
            series = _series(case)
            if series in stopped:
                records.append(dict(rec, status=f"skipped: {stopped[series]}"))
                continue
            running.append((case, rec, series))
            fns.append(_guarded(_make_call(cfg, case, q, k, v, grad_out), series, failed, cfg.device))
            warmups.append(cfg.warmup if last_time.get(series, 0.0) <= cfg.warmup_skip_s else 0)
        if not running:
            continue
        ms = measure_interleaved(fns, device=cfg.device, repeats=cfg.repeats, warmups=warmups)
        for (case, rec, series), m in zip(running, ms):
            if series in failed:
                stopped[series] = f"out of memory at N={case['n']}"
                records.append(dict(rec, status="oom", error=str(failed[series]).splitlines()[0][:200]))
                continue
            last_time[series] = m.median_s
            records.append(dict(
                rec, status="ok", loadavg_1m=_loadavg(), warmup=m.warmup,
                times_ms=[round(t * 1e3, 3) for t in m.times_s],
                median_ms=round(m.median_s * 1e3, 3), min_ms=round(m.min_s * 1e3, 3),
                cpu_times_ms=[round(t * 1e3, 3) for t in m.cpu_times_s] or None,
                cpu_median_ms=None if m.cpu_median_s is None else round(m.cpu_median_s * 1e3, 3),
                peak_mb=None if m.peak_bytes is None else round(m.peak_bytes / 2**20, 1),
                tflops=round(rec["flops"] / m.median_s / 1e12, 4),
            ))
        if on_case is not None:
            on_case(records)
    inputs = None
    _free(cfg.device)
    return records


def _guarded(call: Callable[[], None], series: tuple, failed: dict, device: torch.device) -> Callable[[], None]:
    """``call``, which after an out-of-memory error records it in ``failed[series]`` and does nothing."""
    def run():
        if series in failed:
            return
        try:
            call()
        except _OOM as err:
            failed[series] = err
            _free(device)
    return run


# --------------------------------------------------------------------------------- derived views
def _index(records: list[dict], time_key: str = "median_ms") -> dict[tuple, dict]:
    """Records that ran (and have ``time_key``), by (impl, n, causal, mode)."""
    return {(r["impl"], r["n"], r["causal"], r["mode"]): r for r in records
            if r.get("status") == "ok" and r.get(time_key) is not None}


def comparison_rows(records: list[dict], time_key: str = "median_ms") -> list[dict]:
    """One row per (N, causal, mode) with dilated and dense side by side (dense may be missing).

    ``time_key``: ``"median_ms"`` (wall time) or ``"cpu_median_ms"`` (CPU time, CPU runs).
    """
    idx = _index(records, time_key)
    keys = sorted({(r["n"], r["mode"], not r["causal"]) for r in records})
    rows = []
    for n, mode, not_causal in keys:
        causal = not not_causal
        d, s = idx.get(("dilated", n, causal, mode)), idx.get(("dense", n, causal, mode))
        if d is None and s is None:
            continue
        flops_d = next(r["flops"] for r in records if r["impl"] == "dilated" and r["n"] == n
                       and r["causal"] == causal and r["mode"] == mode)
        dense_rec = next((r for r in records if r["impl"] == "dense" and r["n"] == n
                          and r["causal"] == causal and r["mode"] == mode), None)
        flops_s = dense_rec["flops"] if dense_rec is not None else None
        rows.append({
            "n": n, "causal": causal, "mode": mode,
            "dilated_ms": d and d[time_key], "dense_ms": s and s[time_key],
            "speedup": (s[time_key] / d[time_key]) if d and s else None,
            "flop_ratio": flops_s / flops_d if flops_s else None,
            "dilated_tflops": d and d["flops"] / d[time_key] / 1e9,
            "dense_tflops": s and s["flops"] / s[time_key] / 1e9,
            "dilated_mb": d and d["peak_mb"], "dense_mb": s and s["peak_mb"],
        })
    return rows


def _time(idx, impl, n, causal, mode, time_key) -> float | None:
    r = idx.get((impl, n, causal, mode))
    return None if r is None else r[time_key] / 1e3


def target_checks(records: list[dict], cfg: AttentionBenchConfig,
                  time_key: str = "median_ms") -> dict:
    """The issue's targets as computed figures (never asserted).

    1. CPU float32 causal fwd+bwd: speedup over dense >= 0.9 x the FLOP ratio, at N = 16K and 32K.
    2. Linear growth: dilated time(128K) / time(32K) within 10% of the FLOP growth (4.0).
    3. GPU bf16 fwd+bwd: dilated effective TFLOP/s at 32K >= 70% of dense's; and, on any device,
       the longest N that ran, per operator and mode.

    ``time_key`` picks wall time (``"median_ms"``) or CPU time (``"cpu_median_ms"``).
    """
    idx = _index(records, time_key)
    on_cpu_fp32 = cfg.device.type == "cpu" and cfg.dtype == torch.float32
    on_gpu_bf16 = cfg.device.type == "cuda" and cfg.dtype == torch.bfloat16

    speed = []
    for n in (16384, 32768):
        td = _time(idx, "dilated", n, True, "fwdbwd", time_key)
        ts = _time(idx, "dense", n, True, "fwdbwd", time_key)
        ratio = cfg.flops("dense", n, True, "fwdbwd") / cfg.flops("dilated", n, True, "fwdbwd")
        entry = {"n": n, "flop_ratio": round(ratio, 3), "required_speedup": round(0.9 * ratio, 3),
                 "speedup": None, "speedup_over_flop_ratio": None, "pass": None}
        if not on_cpu_fp32:
            entry["note"] = "not applicable: needs device cpu and dtype float32"
        elif td is None or ts is None:
            entry["note"] = "not measured"
        else:
            entry.update(speedup=round(ts / td, 3), speedup_over_flop_ratio=round(ts / td / ratio, 3),
                         **{"pass": ts / td >= 0.9 * ratio})
        speed.append(entry)

    growth = []
    for mode in cfg.modes:
        for causal in cfg.causal:
            t32 = _time(idx, "dilated", 32768, causal, mode, time_key)
            t128 = _time(idx, "dilated", 131072, causal, mode, time_key)
            fg = (cfg.flops("dilated", 131072, causal, mode)
                  / cfg.flops("dilated", 32768, causal, mode))
            entry = {"causal": causal, "mode": mode, "flop_growth": round(fg, 3),
                     "time_growth": None, "relative_error": None, "pass": None}
            if t32 is None or t128 is None:
                entry["note"] = "not measured (needs N = 32768 and 131072)"
            else:
                err = (t128 / t32) / fg - 1
                entry.update(time_growth=round(t128 / t32, 3), relative_error=round(err, 3),
                             **{"pass": abs(err) <= 0.10})
            growth.append(entry)

    tflops = []
    for causal in cfg.causal:
        d, s = idx.get(("dilated", 32768, causal, "fwdbwd")), idx.get(("dense", 32768, causal, "fwdbwd"))
        entry = {"n": 32768, "causal": causal, "dilated_tflops": None, "dense_tflops": None,
                 "fraction_of_dense": None, "pass": None}
        if not on_gpu_bf16:
            entry["note"] = "not applicable: needs device cuda and dtype bfloat16"
        elif d is None or s is None:
            entry["note"] = "not measured"
        else:
            td, ts = d["flops"] / d[time_key] / 1e9, s["flops"] / s[time_key] / 1e9
            frac = td / ts
            entry.update(dilated_tflops=round(td, 4), dense_tflops=round(ts, 4),
                         fraction_of_dense=round(frac, 3), **{"pass": frac >= 0.7})
        tflops.append(entry)

    longest = {}
    for impl in IMPLS:
        for mode in cfg.modes:
            ran = [r["n"] for r in records if r["impl"] == impl and r["mode"] == mode
                   and r.get("status") == "ok"]
            oom = [r["n"] for r in records if r["impl"] == impl and r["mode"] == mode
                   and r.get("status") == "oom"]
            longest[f"{impl}_{mode}"] = {
                "longest_n": max(ran) if ran else None,
                "first_oom_n": min(oom) if oom else None,
                "limited_by": "out of memory" if oom else "requested lengths",
            }
    return {
        "cpu_fp32_causal_fwdbwd_speedup_vs_flop_ratio": speed,
        "linear_growth_128k_over_32k": growth,
        "gpu_bf16_fwdbwd_tflops_fraction_of_dense": tflops,
        "longest_seq_len": longest,
    }


def paper_seq_lens(max_seq_len: int, min_seq_len: int = PAPER_SEGMENT_LENGTHS[0]) -> tuple[int, ...]:
    """Powers of two from ``min_seq_len`` up to ``max_seq_len``."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    lo = min(min_seq_len, max_seq_len)
    return tuple(2 ** e for e in range(int(math.log2(lo)), int(math.log2(max_seq_len)) + 1)
                 if 2 ** e >= lo)
