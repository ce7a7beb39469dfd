"""The ``longnet`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

from longnet.cli.options import HelpFormatter

# subcommand name -> module under longnet.cli (imported only when that subcommand runs)
SUBCOMMANDS = {
    "bench": ("longnet.cli.bench", "benchmark dilated attention against dense attention"),
    "train": ("longnet.cli.train", "train (or resume) a LongNet language model on a text corpus"),
    "eval": ("longnet.cli.eval", "perplexity of a trained model at several context lengths"),
    "generate": ("longnet.cli.generate", "continue a prompt with a trained model (streamed)"),
    "plan": ("longnet.cli.plan", "per-device memory, FLOPs and communication of sequence-parallel LongNet"),
    "reach": ("longnet.cli.reach", "how many layers carry one token to another: exact reach of a dilated pattern"),
    "slide-embed": ("longnet.cli.slide_embed", "Prov-GigaPath slide embeddings of tile-feature files"),
    "experiment": ("longnet.cli.experiment", "the paper's experiments in miniature: table2, recall, runtime"),
}

EPILOG = """\
examples:
  # a tiny model on CPU (minutes), then its perplexity at several context lengths
  longnet train --preset tiny --max-steps 150 --out runs/tiny
  longnet eval --checkpoint runs/tiny --seq-len 32 128 512 2048
  longnet bench attention --quick      # dilated vs dense attention, a smoke run of seconds"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longnet",
        description="LongNet (Ding et al., 2023): train, evaluate, generate and benchmark "
                    "models built on exact dilated attention.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="what to do; 'longnet COMMAND --help' shows its options and examples")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
