"""``--results-dir`` of the ``longnet experiment`` commands (``table2``, ``recall``, ``runtime``).

One module below the three commands, so that each imports it rather than each other.
"""

from __future__ import annotations

import argparse


def claim_results_dir(args: argparse.Namespace, name: str) -> tuple[str, str] | None:
    """``(folder, stem)`` for ``--results-dir``, claimed before anything runs (see
    :func:`longnet.bench.results.claim_results`: never overwrite without ``--overwrite``, and no
    ``--quick`` run into ``benchmarks/results``); None without ``--results-dir``."""
    from longnet.bench.report import device_slug
    from longnet.bench.results import claim_results
    from longnet.train.runtime import resolve_device

    if not args.results_dir:
        return None
    stem = f"{name}-{device_slug(resolve_device(args.device))}" + ("-quick" if args.quick else "")
    claim_results(args.results_dir, stem, overwrite=args.overwrite, quick=args.quick)
    return args.results_dir, stem
