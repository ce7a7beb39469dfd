"""``longnet bench attention``: time dilated attention against dense SDPA.

Prints tables (stdout), progress (stderr), and, last on stdout, one short JSON line (the speedups
and where the details are); writes every figure to ``OUT/attention_<device>.json`` (rewritten after
each case, so a long run that is stopped keeps what it measured) and a plot beside it. Where results
may go is :func:`longnet.bench.results.claim_results`'s rule: a full run does not replace existing
files without ``--overwrite``; ``--quick`` writes to ``runs/bench-quick``, never ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from longnet.bench.results import QUICK_DIR, add_overwrite_option, claim_results
from longnet.cli.options import int_list, positive_int
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.utils.atomic import atomic_write_json
from longnet.utils.strict_json import print_json_line

__all__ = ["add_arguments", "run"]

WHAT = ("attention",)  # later: "decode"

RESULTS_DIR = Path("benchmarks") / "results"

# --quick: a smoke run of a few seconds (used by the tests); its calls take well under a millisecond,
# so 5 repeats after a warm-up call cost nothing and keep one slow call from deciding the median
_QUICK = dict(seq_lens=(128, 256), segment_lengths=(64, 128), dilation_rates=(1, 2), heads=2,
              head_dim=16, repeats=5, warmup=1)
_UNSTABLE = 0.2  # spread (median absolute deviation / median) of a case's timed calls that is warned about


EPILOG = """\
examples:
  longnet bench attention --quick                 # smoke run, seconds
  longnet bench attention --threads 1             # CPU: float32, N 2K-128K, dense up to 32K
  longnet bench attention --seq-lens 16384,32768 --causal --mode fwdbwd --out runs/bench
  longnet bench attention --replot benchmarks/results/attention_cpu-amd-epyc.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet bench``."""
    parser.epilog = EPILOG
    parser.add_argument("what", choices=WHAT, help="what to benchmark")
    g = parser.add_argument_group("lengths")
    g.add_argument("--seq-lens", type=int_list, default=None,
                   help="comma-separated N to run (default: powers of two from 2048 to "
                        "--max-seq-len)")
    g.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="longest N (default 131072 on CPU, 1048576 on CUDA)")
    g.add_argument("--dense-max-seq-len", type=positive_int, default=None,
                   help="dense SDPA is quadratic: run it only up to this N "
                        "(default 32768 on CPU, 262144 on CUDA)")
    c = parser.add_mutually_exclusive_group()
    c.add_argument("--causal", dest="causal", action="store_const", const="causal",
                   help="causal only")
    c.add_argument("--no-causal", dest="causal", action="store_const", const="noncausal",
                   help="non-causal only")
    c.add_argument("--both", dest="causal", action="store_const", const="both",
                   help="causal and non-causal")
    parser.set_defaults(causal="both")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both",
                        help="forward only (no_grad), forward+backward, or both")
    s = parser.add_argument_group("shape and pattern")
    s.add_argument("--heads", type=positive_int, default=12, help="attention heads H")
    s.add_argument("--head-dim", type=positive_int, default=64, help="dimension D of each head")
    s.add_argument("--batch-size", type=positive_int, default=1, help="sequences B per call")
    s.add_argument("--segment-lengths", type=int_list, default=None,
                   help="default: the paper's " + ",".join(map(str, PAPER_SEGMENT_LENGTHS)))
    s.add_argument("--dilation-rates", type=int_list, default=None,
                   help="default: the paper's " + ",".join(map(str, PAPER_DILATION_RATES)))
    s.add_argument("--backend", default="auto", help="dilated attention backend")
    r = parser.add_argument_group("running")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    r.add_argument("--repeats", type=positive_int, default=3,
                   help="timed calls per case; the median is reported, and the spread of the calls printed "
                        "(--quick: 5)")
    r.add_argument("--warmup", type=positive_int, default=1,
                   help="untimed calls before them, at least 1: the first call pays one-time costs such as "
                        "loading the CPU kernel")
    r.add_argument("--warmup-skip-s", type=float, default=10.0,
                   help="skip the warmup of a case when the previous N of its series took "
                        "longer than this per call")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives steadier CPU "
                        "times on a machine shared with other jobs")
    r.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: let glibc keep freed memory for reuse (mmap and trim thresholds 1 GiB) so "
                        "timed calls measure attention, not the first touch of fresh pages (0.2-1.4 GB/s "
                        "on a VM); the CUDA caching allocator does the same on GPU")
    r.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default: {RESULTS_DIR}; with --quick {QUICK_DIR}). A full run stops "
                        "if attention_<device>.json or .png is already there, unless --overwrite")
    r.add_argument("--quick", action="store_true",
                   help=f"tiny shapes and pattern for a smoke run (seconds), written to {QUICK_DIR} and "
                        f"never to {RESULTS_DIR}")
    add_overwrite_option(r)
    r.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    r.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="redraw the PNG of an earlier results JSON (beside it) and exit")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    h = parser.add_argument_group("harness: each case in its own process (longnet.bench.isolated)")
    h.add_argument("--min-rounds", type=positive_int, default=3,
                   help="rounds of fresh processes per (N, causal, mode), dilated and dense alternating "
                        "(--quick runs in-process: a smoke run)")
    h.add_argument("--max-rounds", type=positive_int, default=7,
                   help="at most this many rounds: after --min-rounds, rounds stop once every case's median "
                        "over the rounds moves by at most --tolerance")
    h.add_argument("--tolerance", type=float, default=0.02, help="relative change that counts as settled")
    h.add_argument("--in-process", action="store_true",
                   help="the older harness instead: every case in this process, timed calls interleaved "
                        "(faster, but each case inherits the state the previous one left)")


def _config(args: argparse.Namespace):
    from longnet.bench.attention import AttentionBenchConfig, paper_seq_lens

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    quick = _QUICK if args.quick else {}
    max_n = args.max_seq_len or (1 << 20 if on_gpu else 1 << 17)
    seq_lens = args.seq_lens or quick.get("seq_lens") or paper_seq_lens(max_n)
    seq_lens = tuple(n for n in seq_lens if n <= max_n)
    if not seq_lens:
        raise ValueError(f"no sequence length <= --max-seq-len {max_n}")
    dense_max = args.dense_max_seq_len or (1 << 18 if on_gpu else 1 << 15)
    causal = {"causal": (True,), "noncausal": (False,), "both": (True, False)}[args.causal]
    modes = ("fwd", "fwdbwd") if args.mode == "both" else (args.mode,)
    seg = args.segment_lengths or quick.get("segment_lengths") or PAPER_SEGMENT_LENGTHS
    rates = args.dilation_rates or quick.get("dilation_rates") or PAPER_DILATION_RATES
    explicit = lambda name, default: getattr(args, name) if getattr(args, name) != default \
        else quick.get(name, default)  # noqa: E731
    return AttentionBenchConfig(
        seq_lens=seq_lens, dense_max_seq_len=dense_max, causal=causal, modes=modes,
        device=device, dtype=dtype, repeats=explicit("repeats", 3),
        warmup=explicit("warmup", 1), warmup_skip_s=args.warmup_skip_s,
        heads=explicit("heads", 12), head_dim=explicit("head_dim", 64),
        batch_size=args.batch_size, segment_lengths=tuple(seg), dilation_rates=tuple(rates),
        backend=args.backend,
    )


_TIMING = ("median of the timed calls after the warmup calls; CUDA events after a synchronize "
           "on GPU, time.perf_counter on CPU. On CPU also the process CPU time "
           "(time.process_time, all threads) of each call: comparisons_cpu_time and "
           "targets_cpu_time use it; with one thread on a busy machine it is the steadier "
           "figure, as wall time then includes time spent waiting for a core")
_MEMORY = {
    "cpu": "peak growth of the process RSS over its value before one call, sampled every 1 ms "
           "from /proc/self/statm after malloc_trim(0); an estimate of the extra memory the "
           "call needs (outputs, saved tensors, workspaces, gradients for fwdbwd), inputs "
           "excluded",
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before one call: the "
            "extra memory the call needs, inputs excluded",
}


def _document(cfg, records, started: str, complete: bool, note: str | None = None,
              commit: str | None = None) -> dict:
    from longnet import __version__
    from longnet.bench.attention import comparison_rows, target_checks
    from longnet.bench.report import device_name

    on_cpu = cfg.device.type == "cpu"
    return {
        "benchmark": "attention",
        "complete": complete,
        "note": note,
        "date": started,
        "device": {"type": cfg.device.type, "name": device_name(cfg.device),
                   "torch_threads": torch.get_num_threads() if cfg.device.type == "cpu" else None},
        "torch_version": torch.__version__,
        "longnet_version": __version__,
        "git_commit": commit,
        "config": cfg.describe(),
        "timing_method": _TIMING,
        "memory_method": _MEMORY[cfg.device.type],
        "flops_method": "matmul FLOPs, FlashAttention convention (fwd+bwd = 3.5 x fwd): "
                        "DilatedPattern.flops / DilatedPattern.dense_flops",
        "comparisons": comparison_rows(records),
        "targets": target_checks(records, cfg),
        "comparisons_cpu_time": comparison_rows(records, "cpu_median_ms") if on_cpu else None,
        "targets_cpu_time": target_checks(records, cfg, "cpu_median_ms") if on_cpu else None,
        "loadavg_1m_range": _load_range(records),
        "cases": records,
    }


def _git_commit() -> str | None:
    """The commit of the longnet checkout being measured, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parent)], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _load_range(records) -> list[float] | None:
    loads = [r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None]
    return [min(loads), max(loads)] if loads else None


def _print_targets(targets: dict, label: str) -> None:
    """A table per target of :func:`~longnet.bench.attention.target_checks` that this run measured
    (entries with a ``note`` were not), and one line naming the others."""
    from longnet.bench.report import format_rows

    skipped = []
    for key, entries in targets.items():
        rows = entries if isinstance(entries, list) else [{"series": k, **v} for k, v in entries.items()]
        rows = [r for r in rows if r.get("note") is None]
        if not rows:
            skipped.append(key)
            continue
        print(f"target {key} ({label}):")
        print(format_rows(rows))
    if skipped:
        print(f"targets not measured by this run ({label}; see the JSON file for why): {', '.join(skipped)}")


def _spread(record: dict) -> float:
    """Median absolute deviation of a case's timed calls over their median (0: all equal)."""
    times, median = record["times_ms"], record["median_ms"]
    return statistics.median(abs(t - median) for t in times) / median if median > 0 else 0.0


def timing_note(cfg, records: list[dict], isolated: bool = False) -> str:
    """How each time was taken (warm-up and timed calls) and how stable the timed calls were."""
    ok = [r for r in records if r.get("status") == "ok"]
    if isolated:
        rounds = sorted({r.get("rounds", 1) for r in ok}) or [0]
        text = (f"timing: each case ran in its own processes, {rounds[0]}-{rounds[-1]} round(s) of dilated and "
                f"dense alternating; each time is the median over rounds of each process's median of "
                f"{cfg.repeats} timed call(s) after {cfg.warmup} warm-up call(s)")
    else:
        text = (f"timing: each time is the median of {cfg.repeats} timed call(s) after {cfg.warmup} warm-up "
                "call(s), the dilated and dense calls of one N alternating")
    cold = sorted({r["n"] for r in ok if r.get("warmup", cfg.warmup) == 0})
    if cold:
        text += (f"; no warm-up at N={cold} (a call at the previous N took over {cfg.warmup_skip_s:g} s, "
                 "see --warmup-skip-s)")
    if not ok:
        return text
    worst = max(ok, key=_spread)
    text += (f"; spread of the timed calls (median absolute deviation / median): at most {_spread(worst):.0%} "
             f"({worst['impl']}, N={worst['n']}, {worst['mode']})")
    if _spread(worst) > _UNSTABLE:
        text += (f". Over {_UNSTABLE:.0%}: the machine was busy; rerun with more --repeats, or --threads 1 "
                 "on a quieter machine, before quoting these times")
    return text


def summary_line(doc: dict) -> dict:
    """The last line on stdout: what ran, how it was timed, the speedups and where the rest is.
    A few hundred bytes plus about 50 per (N, causal, mode); every figure is in the JSON file."""
    cfg = doc["config"]
    return {
        "benchmark": doc["benchmark"], "complete": doc["complete"], "note": doc["note"],
        "device": doc["device"]["name"], "dtype": cfg["dtype"], "quick": doc.get("quick", False),
        "repeats": cfg["repeats"], "warmup": cfg["warmup"],
        "speedups": [[r["n"], r["causal"], r["mode"], None if r["speedup"] is None else round(r["speedup"], 3)]
                     for r in doc["comparisons"]],
        "speedups_columns": ["n", "causal", "mode", "dense_ms / dilated_ms"],
        "files": doc["files"],
    }


def _write(path: Path, doc: dict) -> None:
    atomic_write_json(path, doc, sort_keys=False)


def _replot(path: Path) -> int:
    from longnet.bench.report import plot_attention

    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"longnet bench: error: cannot read --replot {path}: {err}", file=sys.stderr)
        return 2
    plot_attention(doc, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return 0


def _keep_freed_memory() -> bool:
    """glibc: serve allocations up to 1 GiB from the heap and keep up to 1 GiB of freed memory
    (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), for this benchmark process only."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _run_attention(args: argparse.Namespace) -> int:
    from longnet.bench.attention import comparison_rows, run_attention_bench
    from longnet.bench.report import device_slug, format_table, plot_attention

    if args.replot is not None:
        return _replot(args.replot)

    try:
        cfg = _config(args)
    except ValueError as err:
        print(f"longnet bench: error: {err}", file=sys.stderr)
        return 2
    commit = _git_commit()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = "default"
    if cfg.device.type == "cpu" and args.keep_freed_memory:
        allocator = "glibc keeps freed memory" if _keep_freed_memory() else "default (mallopt unavailable)"
    stem = f"attention_{device_slug(cfg.device)}"
    try:
        out = claim_results(args.out or (QUICK_DIR if args.quick else RESULTS_DIR), stem,
                            overwrite=args.overwrite, quick=args.quick)
    except (ValueError, OSError) as err:
        print(f"longnet bench: error: {err}", file=sys.stderr)
        return 2
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"dilated {cfg.pattern} vs dense SDPA: {cfg.device} {cfg.describe()['dtype']}, "
          f"B={cfg.batch_size} H={cfg.heads} D={cfg.head_dim}, N={list(cfg.seq_lens)}, "
          f"dense up to {cfg.dense_max_seq_len}, {cfg.repeats} timed calls after {cfg.warmup} warm-up call(s)",
          file=sys.stderr)

    def progress(cases):
        if args.no_progress:
            return cases
        from tqdm import tqdm
        return tqdm(cases, desc="bench attention", unit="N", file=sys.stderr)

    in_process = args.in_process or args.quick  # a smoke run: seconds, not a fresh process per case
    records: list[dict] = []
    note = None
    save = lambda recs: _write(json_path, _document(cfg, recs, started, False, commit=commit))  # noqa: E731
    try:
        if in_process:
            run_attention_bench(cfg, progress=progress, records=records, on_case=save)
        else:
            from longnet.bench.isolated import run_attention_bench_isolated

            rounds = (args.min_rounds, max(args.min_rounds, args.max_rounds))
            run_attention_bench_isolated(cfg, min_rounds=rounds[0], max_rounds=rounds[1], tolerance=args.tolerance,
                                         threads=args.threads,
                                         keep_freed_memory=args.keep_freed_memory, progress=progress,
                                         on_case=save, records=records)
    except KeyboardInterrupt:  # keep what was measured, say so, and report it
        note = f"interrupted after {len(records)} of {len(cfg.cases())} cases"
        print(f"\n{note}", file=sys.stderr)
    doc = _document(cfg, records, started, note is None, note, commit)
    doc["allocator"] = allocator
    doc["harness"] = ("in-process, timed calls interleaved" if in_process else
                      "each case in its own process; rounds alternate the cases of one (N, causal, mode) "
                      f"until medians settle within {args.tolerance:g} (longnet.bench.isolated)")
    doc["quick"] = args.quick
    doc["files"] = {"json": str(json_path), "png": None}
    if args.no_plot:
        doc["plot_note"] = "skipped (--no-plot)"
    else:
        try:
            plot_attention(doc, png_path)
            doc["files"]["png"] = str(png_path)
        except ImportError as err:
            doc["plot_note"] = f"skipped: matplotlib is not installed ({err})"
            print(f"note: plot {doc['plot_note']}", file=sys.stderr)
    _write(json_path, doc)
    print("wall time (median ms):")
    print(format_table(comparison_rows(records)))
    _print_targets(doc["targets"], "wall time")
    if doc["comparisons_cpu_time"] is not None:
        print("process CPU time (median ms):")
        print(format_table(doc["comparisons_cpu_time"]))
        _print_targets(doc["targets_cpu_time"], "CPU time")
    print(timing_note(cfg, records, isolated=not in_process))
    print(f"wrote {json_path}" + (f" and {png_path}" if doc["files"]["png"] else "") + " (every figure)")
    print_json_line(summary_line(doc), compact=True)
    return 0 if note is None else 130


def run(args: argparse.Namespace) -> int:
    if args.what == "attention":
        return _run_attention(args)
    raise ValueError(f"unknown benchmark {args.what!r}")  # argparse choices prevent this
