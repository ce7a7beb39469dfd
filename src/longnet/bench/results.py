"""Where benchmark results are written, and the one rule that keeps earlier results.

Every benchmark (``longnet bench`` and the scripts under ``benchmarks/``) claims its output files
through :func:`claim_results` before it measures anything:

- a full run never silently replaces a results file: when ``<stem>.json`` or ``<stem>.png``
  already exists it stops with an error, unless ``--overwrite`` is given;
- a ``--quick`` smoke run writes to ``runs/bench-quick`` (or its ``--out``), where it may replace
  an earlier smoke run, and never into a ``benchmarks/results`` folder, which holds the committed
  results of full runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["QUICK_DIR", "OVERWRITE_HELP", "ResultsExistError", "add_overwrite_option", "claim_results",
           "is_committed_results"]

QUICK_DIR = Path("runs") / "bench-quick"
"""Where ``--quick`` smoke runs write when no ``--out`` is given (``runs/`` is not committed)."""

OVERWRITE_HELP = ("replace result files of the same name in the output folder; without it a run that would "
                  "overwrite one stops before measuring anything")


class ResultsExistError(FileExistsError):
    """A run would replace an earlier results file and ``--overwrite`` was not given."""


def is_committed_results(folder: str | Path) -> bool:
    """True for a ``benchmarks/results`` folder: the committed results of full runs."""
    path = Path(folder).expanduser().resolve()
    return path.name == "results" and path.parent.name == "benchmarks"


def add_overwrite_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--overwrite`` (see :func:`claim_results`) to a benchmark's options."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def claim_results(out_dir: str | Path, stem: str, *, overwrite: bool, quick: bool = False,
                  suffixes: tuple[str, ...] = (".json", ".png")) -> Path:
    """The folder ``out_dir`` (created), once it is clear the run may write ``<stem><suffix>`` there.

    Raises :class:`ResultsExistError` when one of those files exists and neither ``overwrite`` nor
    ``quick`` is set, and ``ValueError`` when a ``quick`` run is pointed at a ``benchmarks/results``
    folder. Call it before measuring, so a refused run costs nothing.
    """
    out = Path(out_dir).expanduser()
    if quick and is_committed_results(out):
        raise ValueError(f"--quick is a smoke run, and {out} holds the results of full runs: leave out --out "
                         f"(it then writes to {QUICK_DIR}) or give another folder")
    if not (overwrite or quick):
        for suffix in suffixes:
            path = out / f"{stem}{suffix}"
            if path.exists():
                raise ResultsExistError(f"{path} exists (an earlier run's results); pass --overwrite to replace "
                                        "it, or --out DIR to write somewhere else")
    out.mkdir(parents=True, exist_ok=True)
    return out
