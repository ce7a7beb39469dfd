"""``longnet experiment``: the paper's experiments in miniature (``table2``, ``recall``, ``runtime``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import signal
import sys
from pathlib import Path

DESCRIPTION = """\
The paper's Table 2 in miniature. Six models of one shape are trained with the same data,
tokenizer, seed (data order), optimizer, steps and tokens per step: a dense Transformer trained at
2K, a Sparse Transformer and LongNet trained at 8K and at 32K (the paper's five rows), and LongNet
with shifted segments at 8K (no blind spots, see longnet reach --shifted). Every model is then
evaluated at 2K, 8K and 32K on the same held-out tokens of the corpus (beyond 2K the dense model
runs blockwise causal attention, as in the paper). The paper's pattern is used: segments
2048 ... 32768, rates 1, 2, 4, 6, 12, on 12 heads so every residue of every branch has a head.

Printed: a table (parameters, training tokens and FLOPs, wall time, perplexity with a 95%
bootstrap interval over blocks of the scored tokens, copy-probe gains), which of the paper's
orderings hold here, and a last JSON line {"rows": [...]}. Written to --out: one run folder per
model (resumable: run the same command again after an interruption), table2.json with everything
(loss against position, copy probe, paired comparisons), table2.png, and table2.md (our table
beside the paper's, in Markdown).

Scales: default (2-core CPU, about an hour), --quick (lengths / 16, a few minutes, for smoke
tests) and --scale large (one GPU: 6 x 384, 2000 steps of 262,144 tokens)."""

EPILOG = """\
examples:
  longnet experiment table2 --out runs/table2
  longnet experiment table2 --quick --out runs/table2-quick
  longnet experiment table2 --scale large --device cuda --out runs/table2-gpu
  longnet experiment table2 --rows longnet-8192 longnet-shifted-8192 --steps 100"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet experiment`` and its three experiments."""
    from longnet.bench.results import add_overwrite_option
    from longnet.cli import experiment_recall, experiment_runtime

    parser.epilog = ("examples:\n  longnet experiment table2 --out runs/table2\n"
                     "  longnet experiment recall --quick\n  longnet experiment runtime --quick")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT",
                                help="table2 (perplexity, dense / sparse / LongNet), recall (long context), "
                                     "runtime (the paper's Figure 5)")
    p = sub.add_parser("table2", help="the paper's Table 2 in miniature (dense / sparse / LongNet)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="experiment folder (default: runs/table2, runs/table2-quick with --quick)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="lengths / 16 and a micro model: a smoke run of minutes")
    size.add_argument("--scale", choices=("default", "large"), default="default",
                      help="default: the 2-core CPU run; large: a GPU run")
    p.add_argument("--rows", nargs="+", metavar="ROW", default=None,
                   help="models to run (default: all): transformer-2048 sparse-8192 longnet-8192 sparse-32768 "
                        "longnet-32768 longnet-shifted-8192 (train lengths at full scale)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    p.add_argument("--tokens-per-step", type=int, default=None, help="tokens per optimizer step (every model)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--embed-dim", type=int, default=None, help="model width")
    p.add_argument("--num-layers", type=int, default=None, help="model depth")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights and the data order")
    p.add_argument("--data", metavar="SPEC", default=None, help="corpus (default: stdlib, the Python standard library)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out tokens scored per length, rounded down to whole 32K windows "
                        "(default: 262,144; 0 = the whole split)")
    p.add_argument("--split", choices=("validation", "test"), default=None,
                   help="held-out split to score (default: test, 0.93M tokens of the stdlib corpus)")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="token-file cache (default: ~/.cache/longnet)")
    p.add_argument("--results-dir", metavar="DIR", default=None,
                   help="also write table2-<device>.json/.png here (e.g. benchmarks/results)")
    add_overwrite_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    experiment_recall.add_parser(sub)
    experiment_runtime.add_parser(sub)


def run(args: argparse.Namespace) -> int:
    from longnet.cli.train import report_error
    from longnet.train import TrainingDiverged, TrainingInterrupted

    if args.experiment is None:
        print("error: name an experiment: table2, recall or runtime (longnet experiment --help)", file=sys.stderr)
        return 2
    try:
        if args.experiment == "recall":
            from longnet.cli.experiment_recall import run_recall_command

            return run_recall_command(args)
        if args.experiment == "runtime":
            from longnet.cli.experiment_runtime import run_runtime_command

            return run_runtime_command(args)
        return _table2(args)
    except KeyboardInterrupt:
        report_error("interrupted; what was trained is saved: run the same command again to continue")
        return 130
    except TrainingInterrupted as err:  # the row's checkpoint is saved; the same command resumes
        name = signal.Signals(err.signum).name
        report_error(f"interrupted by {name} at step {err.step} of {err.run_dir.name}; its checkpoint is saved: "
                     "run the same command again to continue")
        return 128 + err.signum
    except TrainingDiverged as err:
        report_error(err)
        return 1
    except (ValueError, OSError) as err:
        report_error(err)
        return 2


def plan_from_args(args: argparse.Namespace):
    """The :class:`~longnet.experiments.table2.Table2Plan` the options ask for (``--eval-tokens 0``:
    the whole split)."""
    from longnet.experiments.table2 import Table2Plan

    plan = Table2Plan.preset("quick" if args.quick else args.scale, rows=tuple(args.rows) if args.rows else None,
                             steps=args.steps, tokens_per_step=args.tokens_per_step, lr=args.lr,
                             embed_dim=args.embed_dim, num_layers=args.num_layers, seed=args.seed, data=args.data,
                             vocab_size=args.vocab_size, split=args.split, eval_tokens=args.eval_tokens or None)
    return dataclasses.replace(plan, eval_tokens=None) if args.eval_tokens == 0 else plan


def _table2(args: argparse.Namespace) -> int:
    from longnet.bench.report import write_results
    from longnet.cli.experiment_results import claim_results_dir
    from longnet.experiments.table2 import run_table2
    from longnet.experiments.table2_report import format_table, markdown_table, plot_table2, summary_line
    from longnet.utils.atomic import atomic_write_text
    from longnet.utils.strict_json import print_json_line

    plan = plan_from_args(args)
    results = claim_results_dir(args, "table2")
    out = Path(args.out or ("runs/table2-quick" if args.quick else "runs/table2")).expanduser()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    doc = run_table2(plan, out, cache_dir=args.cache_dir, device=args.device, progress=args.progress, log=log)
    plot = plot_table2 if importlib.util.find_spec("matplotlib") else None
    if plot is None:
        log("note: matplotlib is not installed, so no plot; pip install matplotlib")
    write_results(out, "table2", doc, plot)
    atomic_write_text(out / "table2.md", markdown_table(doc) + "\n")
    if results:
        write_results(results[0], results[1], doc, plot)
    print(format_table(doc))
    print_json_line(summary_line(doc))
    return 0
