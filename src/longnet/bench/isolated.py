"""Each benchmark case in a process of its own, cases alternating, rounds until the medians settle.

Timing several operators in one process lets each one inherit the state the previous one left:
the allocator's free lists, page faults of fresh memory, thread-pool wake-ups, caches. The same
dilated call was measured at 2.5-3.0 s alone and at 4.2-4.6 s right after a dense backward in one
process. This harness removes that effect:

* a *case* (one operator, backend, length, causality and mode) runs in a fresh Python process
  (``python -m longnet.bench.isolated``), which builds its inputs, makes ``warmup`` untimed calls
  and ``repeats`` timed ones, and reports the median wall time, the median process CPU time
  (``time.process_time``, all threads), the peak extra memory of one call and the load average;
* the cases that are compared (for example dilated and dense attention at one length) run in
  *rounds*: one process per case per round, in alternating order (A B, then B A, ...), so a drift
  of the machine's speed hits all of them alike;
* rounds continue until every case's median over the rounds has settled (adding the last round
  moved it by at most ``tolerance``), between ``min_rounds`` and ``max_rounds``.

The figure to quote is the median over rounds of each process's median (``median_ms``); every
process's figures are kept (``process_medians_ms``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

__all__ = ["run_case", "run_isolated", "settled", "groups", "attention_specs", "spec_config", "add_case_arguments",
           "paper_spec", "run_attention_bench_isolated"]


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one case in this process (what the child process runs); JSON-ready figures.

    ``spec``: ``impl`` (``"dilated"``, ``"dense"``, ``"flex"``: the same function as ``"dilated"``
    through FlexAttention (:mod:`longnet.bench.flex`; its result also records ``max_abs_err``
    against :func:`longnet.dilated_attention`), or ``"sgemm"``: the two matmuls of dense
    attention's forward, ``(H, N, D) @ (H, D, N)`` and ``(H, N, N) @ (H, N, D)``, the per-thread
    peak an attention kernel can hope to reach), ``backend``, ``n``, ``causal``, ``mode``
    (``"fwd"``/``"fwdbwd"``), ``heads``, ``head_dim``, ``batch_size``, ``segment_lengths``,
    ``dilation_rates``, ``device``, ``dtype``, ``warmup``, ``repeats``, ``seed`` and optionally
    ``threads`` and ``keep_freed_memory``.
    """
    import torch

    from longnet.bench.attention import _make_call
    from longnet.bench.measure import measure

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("keep_freed_memory"):
        _keep_freed_memory()
    cfg = spec_config(spec)
    device, dtype = cfg.device, cfg.dtype
    gen = torch.Generator(device="cpu").manual_seed(int(spec.get("seed", 0)))
    shape = (spec["batch_size"], spec["heads"], spec["n"], spec["head_dim"])  # (B, H, N, D)
    q, k, v, grad_out = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4))
    case = {"impl": spec["impl"], "n": spec["n"], "causal": spec["causal"], "mode": spec["mode"]}
    if spec["impl"] == "sgemm":
        h, n, d = spec["heads"] * spec["batch_size"], spec["n"], spec["head_dim"]
        a, b = q.reshape(h, n, d), k.reshape(h, n, d).transpose(1, 2).contiguous()  # (h, n, d), (h, d, n)
        c = torch.randn(h, n, n, generator=gen)  # (h, n, n): the probabilities' shape
        scores, out = torch.empty(h, n, n), torch.empty(h, n, d)  # written in place: no page faults timed

        def call() -> None:
            torch.bmm(a, b, out=scores)
            torch.bmm(c, a, out=out)

        flops = 4.0 * h * n * n * d
    elif spec["impl"] == "flex":
        call, flops = _flex_call(cfg, case, q, k, v, grad_out), cfg.flops(**dict(case, impl="dilated"))
    else:
        call, flops = _make_call(cfg, case, q, k, v, grad_out), cfg.flops(**case)
    before = _contention()
    m = measure(call, device=device, repeats=spec["repeats"], warmup=spec["warmup"])
    after = _contention()
    extra = {"max_abs_err": call.max_abs_err} if hasattr(call, "max_abs_err") else {}
    for key in before.keys() & after.keys():  # how long this process's threads waited for a CPU
        extra[key] = round(after[key] - before[key], 1)
    return {**extra, "median_ms": m.median_s * 1e3, "times_ms": [t * 1e3 for t in m.times_s],
            "cpu_median_ms": None if m.cpu_median_s is None else m.cpu_median_s * 1e3,
            "peak_mb": None if m.peak_bytes is None else m.peak_bytes / 2**20,
            "threads": torch.get_num_threads(), "loadavg_1m": _loadavg(), "flops": flops}


def spec_config(spec: dict[str, Any]) -> Any:
    """The :class:`~longnet.bench.attention.AttentionBenchConfig` of one case ``spec``."""
    import torch

    from longnet.bench.attention import AttentionBenchConfig

    return AttentionBenchConfig(seq_lens=(spec["n"],), dense_max_seq_len=spec["n"], causal=(spec["causal"],),
                                modes=(spec["mode"],), device=torch.device(spec["device"]),
                                dtype=getattr(torch, spec["dtype"]), heads=spec["heads"], head_dim=spec["head_dim"],
                                batch_size=spec["batch_size"], segment_lengths=tuple(spec["segment_lengths"]),
                                dilation_rates=tuple(spec["dilation_rates"]), backend=spec["backend"])


def add_case_arguments(parser: Any, *, seq_lens: str, repeats: int, min_rounds: int, max_rounds: int) -> None:
    """The options every script built on this harness takes: ``--seq-lens``, ``--heads``,
    ``--head-dim``, ``--device``, ``--threads``, ``--repeats``, ``--min-rounds``, ``--max-rounds``."""
    parser.add_argument("--seq-lens", default=seq_lens, help="comma-separated N (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per process (default: %(default)s)")
    parser.add_argument("--min-rounds", type=int, default=min_rounds, help="rounds of processes (default: %(default)s)")
    parser.add_argument("--max-rounds", type=int, default=max_rounds, help="at most (default: %(default)s)")


def paper_spec(args: Any, **fields: Any) -> dict[str, Any]:
    """A case spec for the paper's pattern from :func:`add_case_arguments`' options (float32 on CPU,
    bfloat16 on CUDA, batch 1, one warm-up call), with ``fields`` on top."""
    from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS

    on_cpu = args.device.startswith("cpu")
    return {"heads": args.heads, "head_dim": args.head_dim, "batch_size": 1,
            "segment_lengths": list(PAPER_SEGMENT_LENGTHS), "dilation_rates": list(PAPER_DILATION_RATES),
            "device": args.device, "dtype": "float32" if on_cpu else "bfloat16", "warmup": 1,
            "repeats": args.repeats, "seed": 0, "threads": args.threads, "keep_freed_memory": on_cpu, **fields}


def _flex_call(cfg: Any, case: dict[str, Any], q, k, v, grad_out):
    """The FlexAttention anchor's timed call, carrying ``max_abs_err``: how far its output lies from
    longnet's operator on the same inputs (measured once, untimed)."""
    import torch

    from longnet.bench.flex import flex_available, make_flex_call
    from longnet.ops.dilated import dilated_attention

    reason = flex_available()
    if reason is not None:
        raise RuntimeError(reason)
    call = make_flex_call(cfg.pattern, q, k, v, is_causal=case["causal"], mode=case["mode"], grad_out=grad_out)
    with torch.no_grad():
        ours = dilated_attention(q, k, v, segment_lengths=cfg.pattern, is_causal=case["causal"])
        theirs = call.output()
    call.max_abs_err = float((theirs.float() - ours.float()).abs().max())
    return call


def _contention() -> dict[str, float]:
    """Counters (ms) of waiting for a CPU, where Linux exposes them: ``runqueue_wait_ms``, the time
    this process's threads were runnable but not running (``/proc/self/task/*/schedstat``), and
    ``steal_ms``, the time the hypervisor ran something else on this machine's CPUs
    (``/proc/stat``). Their growth over the timed calls says whether a slow process was slowed
    from outside."""
    out: dict[str, float] = {}
    try:
        wait = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/schedstat") as f:
                wait += int(f.read().split()[1])
        out["runqueue_wait_ms"] = wait / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        out["steal_ms"] = int(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return out


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _keep_freed_memory() -> bool:
    """glibc: keep up to 1 GiB of freed memory for reuse (see ``longnet bench --help``)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(-3, 1 << 30)) and bool(mallopt(-1, 1 << 30))


def _spawn(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`run_case` in a fresh interpreter; its result, or ``{"error": ...}``."""
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "longnet.bench.isolated"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    out = json.loads(lines[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def settled(values: list[float], tolerance: float) -> bool:
    """True when the median of ``values`` moved by at most ``tolerance`` (relative) with the last one."""
    if len(values) < 2:
        return False
    before, after = statistics.median(values[:-1]), statistics.median(values)
    return abs(after - before) <= tolerance * after


def run_isolated(specs: list[dict[str, Any]], *, min_rounds: int = 3, max_rounds: int = 7,
                 tolerance: float = 0.02, timeout_s: float = 1800.0,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure cases that are compared with each other: each in its own process, in rounds.

    Round ``r`` runs one process per case, in the order of ``specs`` on even rounds and reversed
    on odd ones. After ``min_rounds`` rounds it stops as soon as every case's median over the
    rounds has :func:`settled`; at ``max_rounds`` at the latest. A case whose process fails is
    recorded with ``status`` ``"error: ..."`` and left out of later rounds.

    Returns one record per spec: the spec, ``status``, ``median_ms`` (median over rounds of each
    process's median), ``cpu_median_ms`` (likewise), ``process_medians_ms``, ``rounds``,
    ``peak_mb`` (largest), ``loadavg_1m`` (per process), ``flops``, and where Linux gives them
    ``runqueue_wait_ms_per_process`` and ``steal_ms_per_process`` (see :func:`_contention`).
    """
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    errors: dict[int, str] = {}
    for r in range(max_rounds):
        order = list(range(len(specs))) if r % 2 == 0 else list(reversed(range(len(specs))))
        for i in order:
            if i in errors:
                continue
            result = _spawn(specs[i], timeout_s)
            if "error" in result:
                errors[i] = result["error"]
                continue
            runs[i].append(result)
            if progress is not None:
                progress(f"round {r + 1}: {_label(specs[i])} {result['median_ms']:.1f} ms")
        live = [i for i in range(len(specs)) if i not in errors]
        if r + 1 >= min_rounds and all(settled([x["median_ms"] for x in runs[i]], tolerance) for i in live):
            break
    records = []
    for i, spec in enumerate(specs):
        done = runs[i]
        rec: dict[str, Any] = dict(spec, rounds=len(done))
        if not done:
            records.append(dict(rec, status=f"error: {errors.get(i, 'not run')}"))
            continue
        cpu = [x["cpu_median_ms"] for x in done if x["cpu_median_ms"] is not None]
        peaks = [x["peak_mb"] for x in done if x["peak_mb"] is not None]
        loads = [x["loadavg_1m"] for x in done if x["loadavg_1m"] is not None]
        rec.update(status="ok" if i not in errors else f"error after {len(done)} rounds: {errors[i]}",
                   median_ms=round(statistics.median(x["median_ms"] for x in done), 3),
                   cpu_median_ms=round(statistics.median(cpu), 3) if cpu else None,
                   process_medians_ms=[round(x["median_ms"], 3) for x in done],
                   times_ms=[round(t, 3) for x in done for t in x["times_ms"]],
                   peak_mb=round(max(peaks), 1) if peaks else None,
                   loadavg_1m=max(loads) if loads else None, loadavg_1m_per_process=loads,
                   flops=done[0]["flops"], threads=done[0]["threads"])
        for key in ("runqueue_wait_ms", "steal_ms"):
            if all(key in x for x in done):
                rec[f"{key}_per_process"] = [x[key] for x in done]
        errs = [x["max_abs_err"] for x in done if "max_abs_err" in x]
        if errs:
            rec["max_abs_err"] = max(errs)
        rec["tflops"] = round(rec["flops"] / (rec["median_ms"] / 1e3) / 1e12, 4)
        records.append(rec)
    return records


def _label(spec: dict[str, Any]) -> str:
    backend = f"[{spec['backend']}]" if spec["impl"] == "dilated" else ""
    return f"{spec['impl']}{backend} N={spec['n']} {'causal' if spec['causal'] else 'full'} {spec['mode']}"


def groups(specs: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Specs of one (N, causal, mode), in order: the cases :func:`run_isolated` compares."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for spec in specs:
        out.setdefault((spec["n"], spec["causal"], spec["mode"]), []).append(spec)
    return list(out.values())


def attention_specs(cfg: Any, *, threads: int | None = None, keep_freed_memory: bool = True) -> list[dict[str, Any]]:
    """One spec per case of an :class:`~longnet.bench.attention.AttentionBenchConfig`."""
    base = {"backend": cfg.backend, "heads": cfg.heads, "head_dim": cfg.head_dim, "batch_size": cfg.batch_size,
            "segment_lengths": list(cfg.segment_lengths), "dilation_rates": list(cfg.dilation_rates),
            "device": str(cfg.device), "dtype": str(cfg.dtype).removeprefix("torch."), "warmup": cfg.warmup,
            "repeats": cfg.repeats, "seed": cfg.seed, "threads": threads,
            "keep_freed_memory": keep_freed_memory and cfg.device.type == "cpu"}
    return [dict(base, **case) for case in cfg.cases()]


def run_attention_bench_isolated(cfg: Any, *, min_rounds: int = 3, max_rounds: int = 7, tolerance: float = 0.02,
                                 threads: int | None = None, keep_freed_memory: bool = True,
                                 progress: Callable[[Iterable], Iterable] = lambda it: it,
                                 on_case: Callable[[list[dict]], None] | None = None,
                                 records: list[dict] | None = None) -> list[dict]:
    """``longnet bench attention``'s cases with this harness: the dilated and dense case of each
    (N, causal, mode) compared in rounds of fresh processes. Records as
    :func:`longnet.bench.attention.run_attention_bench` gives them, plus the per-process figures."""
    records = [] if records is None else records
    for group in progress(groups(attention_specs(cfg, threads=threads, keep_freed_memory=keep_freed_memory))):
        for rec in run_isolated(group, min_rounds=min_rounds, max_rounds=max_rounds, tolerance=tolerance):
            for key in ("backend", "heads", "head_dim", "batch_size", "segment_lengths", "dilation_rates",
                        "device", "dtype", "repeats", "seed", "keep_freed_memory"):
                rec.pop(key, None)
            records.append(rec)
        if on_case is not None:
            on_case(records)
    return records


def main() -> int:
    """Child process: a spec as JSON on stdin, the result as one JSON line on stdout."""
    from longnet.utils.strict_json import print_json_line

    print_json_line(run_case(json.loads(sys.stdin.read())), compact=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
