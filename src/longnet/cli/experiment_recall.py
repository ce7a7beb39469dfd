"""``longnet experiment recall``: multi-query associative recall at distance (does LongNet use long context?)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

DESCRIPTION = """\
Does a LongNet model use long context? Five models of one shape (2 layers x 192, 12 heads) learn
multi-query associative recall: key-value pairs hidden in random filler, and queries of their keys
at distances from 64 tokens to the training length (4,096). The loss is taken on the answers only.
Everything but the attention is shared (data, seed, initial weights, optimizer, schedule, steps,
tokens per step): dense attention over the whole sequence (the quadratic reference), dense
attention in 2,048-token blocks (the paper's Transformer-2K), a Sparse Transformer (local 256 +
stride 12), LongNet (segments 256 ... 4,096, rates 1, 2, 4, 6, 12: the paper's pattern scaled to
4,096) and LongNet with shifted segments. Every row follows the same curriculum: short sequences
(256 tokens) first, then the training length.

Printed: accuracy per distance bucket with 95% Wilson intervals, evaluated at the training length
and at twice it, with parameters, attention FLOPs per token, training FLOPs and time; a last JSON
line. Written to --out: one folder per model (checkpointed: run the same command again after an
interruption to continue), recall.json, recall.png (accuracy against distance) and recall.md."""

EPILOG = """\
examples:
  longnet experiment recall --out runs/recall
  longnet experiment recall --quick
  longnet experiment recall --rows dense --lr 0.01 --long-steps 0 --out runs/recall-sweep-0.01"""


def add_parser(sub) -> None:
    """Add ``recall`` to the ``longnet experiment`` subcommands."""
    from longnet.bench.results import add_overwrite_option

    p = sub.add_parser("recall", help="associative recall at distance: does a model use long context?",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="experiment folder (default: runs/recall, runs/recall-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a micro model at 512 tokens: a smoke run of seconds")
    p.add_argument("--rows", nargs="+", metavar="ROW", default=None,
                   help="models to run (default: all): dense dense-block sparse longnet longnet-shifted")
    p.add_argument("--short-steps", type=int, default=None, help="steps of the short first phase (default: 400)")
    p.add_argument("--long-steps", type=int, default=None, help="steps at the training length (default: 200)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="tokens per optimizer step (default: 8,192)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, the same for every row (default: 0.01, from a sweep on the dense row)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights and the data (default: 0)")
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="sequences scored at each evaluation length (default: 64)")
    p.add_argument("--results-dir", metavar="DIR", default=None,
                   help="also write recall-<device>.json/.png here (for example benchmarks/results)")
    add_overwrite_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")


def plan_from_args(args: argparse.Namespace):
    """The :class:`~longnet.experiments.recall.RecallPlan` the options ask for."""
    from longnet.experiments.recall import RecallPlan

    return RecallPlan.preset("quick" if args.quick else "default", rows=tuple(args.rows) if args.rows else None,
                             short_steps=args.short_steps, long_steps=args.long_steps,
                             tokens_per_step=args.tokens_per_step, lr=args.lr, seed=args.seed,
                             eval_sequences=args.eval_sequences)


def run_recall_command(args: argparse.Namespace) -> int:
    """Run the experiment, write its files and print the tables and the JSON line."""
    from longnet.bench.report import write_results
    from longnet.cli.experiment_results import claim_results_dir
    from longnet.experiments.recall import run_recall
    from longnet.experiments.recall_report import format_table, markdown_table, plot_recall, summary_line
    from longnet.utils.atomic import atomic_write_text
    from longnet.utils.strict_json import print_json_line

    plan = plan_from_args(args)
    results = claim_results_dir(args, "recall")
    out = Path(args.out or ("runs/recall-quick" if args.quick else "runs/recall")).expanduser()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    doc = run_recall(plan, out, device=args.device, progress=args.progress, log=log)
    plot = plot_recall if importlib.util.find_spec("matplotlib") else None
    if plot is None:
        log("note: matplotlib is not installed, so no plot; pip install matplotlib")
    md = markdown_table(doc) + "\n"
    write_results(out, "recall", doc, plot)
    atomic_write_text(out / "recall.md", md)
    if results:
        write_results(results[0], results[1], doc, plot)
    print(format_table(doc))
    print_json_line(summary_line(doc))
    return 0
