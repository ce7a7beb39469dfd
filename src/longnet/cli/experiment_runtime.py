"""``longnet experiment runtime``: the paper's Figure 5 in miniature (time of one attention call against N)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

DESCRIPTION = """\
The paper's runtime figure in miniature: the forward time of one causal attention call, dilated
against dense (scaled_dot_product_attention), with the tokens per call held constant (batch = tokens
/ N), so linear cost gives a flat curve and quadratic cost one that doubles with N. Dilated
attention runs the paper's runtime pattern (segments 2048, 4096, ... N with rates 1, 2, 4, ...)
from 2K to 4M tokens; dense attention runs from 2K until one call takes more than --dense-limit
seconds (60: at 2^22 tokens per call that is reached at 8K on a 2-core CPU).
On CPU the time is the process CPU time of the call (all threads); on CUDA, CUDA time.

Printed: a table, the fitted growth exponent b of time ~ N^b for each method, and a last JSON line.
Written to --out: runtime.json and runtime.png (log-log)."""

EPILOG = """\
examples:
  longnet experiment runtime --out runs/runtime
  longnet experiment runtime --quick
  longnet experiment runtime --device cuda --max-length 16777216 --results-dir benchmarks/results"""


def add_parser(sub) -> None:
    """Add ``runtime`` to the ``longnet experiment`` subcommands."""
    from longnet.bench.results import add_overwrite_option

    p = sub.add_parser("runtime", help="the paper's Figure 5: attention time against length, dilated vs dense",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: runs/runtime, runs/runtime-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="2^15 tokens, 1K ... 32K: a smoke run of seconds")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call, a power of two (default: 4,194,304)")
    p.add_argument("--max-length", type=int, default=None, help="longest N of dilated attention (default: 4,194,304)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: 1)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default: 64)")
    p.add_argument("--dense-limit", type=float, default=None,
                   help="dense attention stops after a call longer than this many seconds (default: 60)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point; the median is kept (default: 1)")
    p.add_argument("--results-dir", metavar="DIR", default=None,
                   help="also write runtime-<device>.json/.png here (for example benchmarks/results)")
    add_overwrite_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")


def run_runtime_command(args: argparse.Namespace) -> int:
    """Run the measurement, write its files and print the table and the JSON line."""
    from longnet.bench.report import device_name, write_results
    from longnet.cli.experiment_results import claim_results_dir
    from longnet.experiments.runtime import RuntimePlan, format_table, plot_runtime, run_runtime, summary_line
    from longnet.train.runtime import resolve_device
    from longnet.utils.strict_json import print_json_line

    results = claim_results_dir(args, "runtime")
    plan = RuntimePlan.preset("quick" if args.quick else "default", tokens=args.tokens, max_length=args.max_length,
                              heads=args.heads, head_dim=args.head_dim, dense_limit_s=args.dense_limit,
                              repeats=args.repeats)
    device = resolve_device(args.device)
    out = Path(args.out or ("runs/runtime-quick" if args.quick else "runs/runtime")).expanduser()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"runtime: {plan.tokens:,} tokens per call, N = {plan.lengths[0]:,} ... {plan.lengths[-1]:,} on {device}")
    doc = {"device": device_name(device), **run_runtime(plan, device, log=log, progress=args.progress)}
    plot = plot_runtime if importlib.util.find_spec("matplotlib") else None
    if plot is None:
        log("note: matplotlib is not installed, so no plot; pip install matplotlib")
    write_results(out, "runtime", doc, plot)
    if results:
        write_results(results[0], results[1], doc, plot)
    print(format_table(doc))
    print_json_line(summary_line(doc))
    return 0
