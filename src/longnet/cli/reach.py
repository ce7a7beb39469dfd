"""``longnet reach``: how many layers a dilated pattern needs to carry one token to another.

Exact (see :mod:`longnet.analysis.reach` for the definitions and the method): max hops over all pairs,
the fraction of pairs no number of layers connects, examples of such pairs, and hops against
distance in log-spaced buckets; a last JSON line with the same numbers. ``--shifted`` analyses the
layers of ``LongNetConfig(shift_segments=True)`` (even layers unshifted, odd layers shifted by half
the shortest segment), ``--layers`` bounds the depth.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from longnet.analysis.reach import alternating_shift, reach, work
from longnet.cli.options import int_list
from longnet.models.config import PRESETS
from longnet.ops.pattern import DilatedPattern
from longnet.paper import PAPER_DILATION_RATES as PAPER_DILATIONS
from longnet.paper import PAPER_SEGMENT_LENGTHS as PAPER_SEGMENTS
from longnet.utils.strict_json import print_json_line

_SLOW = 7 * 10**7  # block * classes above which the causal analysis takes over a minute (2 cores)
_DILATED_PRESETS = sorted(k for k, v in PRESETS.items() if "segment_lengths" in v)

EPILOG = """\
examples:
  longnet reach --preset tiny
  longnet reach --seq-len 1048576                  # the paper's pattern, 12 heads
  longnet reach --segment-lengths 8,16,32 --dilation-rates 1,2,4 --heads 4 --seq-len 64
  longnet reach --seq-len 32768 --shifted          # no blind spots"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Exact reach of a dilated attention pattern. In one layer position j reads i when some "
        "head keeps both in the same segment of some branch (causal: i <= j); consecutive layers "
        "may use different heads. Prints the most layers any pair needs (inf: some pair is never "
        "connected), the unreachable fraction, examples, and hops against distance |j - i|. "
        "Pairs include the diagonal (0 hops); causal counts i <= j, non-causal all ordered pairs. "
        "With --shifted the layers alternate the pattern and the pattern shifted by half its "
        "shortest segment (LongNetConfig(shift_segments=True)); --layers L counts only paths "
        "through the first L layers (default: any number). "
        "The last line is JSON (max_hops null when infinite).")
    parser.epilog = EPILOG
    parser.add_argument("--preset", choices=_DILATED_PRESETS, default=argparse.SUPPRESS,
                        help="take pattern, heads and (default) length from a model preset")
    parser.add_argument("--segment-lengths", type=int_list, default=argparse.SUPPRESS,
                        help="w_i, comma-separated (default: the preset's, else the paper's "
                             f"{','.join(map(str, PAPER_SEGMENTS))})")
    parser.add_argument("--dilation-rates", type=int_list, default=argparse.SUPPRESS,
                        help="r_i, comma-separated (default: the preset's, else the paper's "
                             f"{','.join(map(str, PAPER_DILATIONS))})")
    parser.add_argument("--heads", type=int, default=argparse.SUPPRESS,
                        help="attention heads (default: the preset's, else 12)")
    parser.add_argument("--seq-len", type=int, default=argparse.SUPPRESS,
                        help="sequence length N (default: the preset's max_train_length, else 32768)")
    parser.add_argument("--non-causal", action="store_true",
                        help="encoder attention: every pair, paths in both directions")
    parser.add_argument("--shifted", action="store_true",
                        help="alternate unshifted (even) and shifted (odd) layers, as "
                             "LongNetConfig(shift_segments=True): shift = min(w) // 2")
    parser.add_argument("--layers", type=int, default=None,
                        help="count only paths through the first L layers (default: any number)")
    parser.add_argument("--examples", type=int, default=5, help="unreachable pairs to list")


def _settings(args: argparse.Namespace) -> tuple[list[DilatedPattern], int, int]:
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    w = getattr(args, "segment_lengths", None) or list(preset.get("segment_lengths", PAPER_SEGMENTS))
    r = getattr(args, "dilation_rates", None) or list(preset.get("dilation_rates", PAPER_DILATIONS))
    heads = getattr(args, "heads", preset.get("num_heads", 12))
    n = getattr(args, "seq_len", preset.get("max_train_length", 32768))
    for name, v in (("--heads", heads), ("--seq-len", n)):
        if v < 1:
            raise ValueError(f"{name} must be a positive int, got {v}")
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be a positive int, got {args.layers}")
    pattern = DilatedPattern(w, r)
    return (alternating_shift(pattern, 2) if args.shifted else [pattern]), n, heads


def _progress():
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="reach", unit="source", file=sys.stderr, disable=None,
                       leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _bucket_name(lo: int, hi: int) -> str:
    return f"{lo:,}" if hi - lo == 1 else f"{lo:,}-{hi - 1:,}"


def _pct(x: int, n: int) -> str:
    if n == 0:
        return "-"
    if x == 0:
        return "0"
    p = 100 * x / n
    return f"{p:.0f}%" if p >= 1 else "<1%"


def _pieces_line(rep) -> str | None:
    pieces = sorted(rep.pieces)
    if len(pieces) < 2:
        return None
    if not any(rep.shifts):
        tail = f" and one of {rep.length % rep.block:,}" if rep.length % rep.block else ""
        return (f"  blocks: {rep.length // rep.block:,} of {rep.block:,} tokens{tail}; every branch "
                f"starts a segment at each multiple of lcm(w) = {rep.block:,}, so tokens in "
                "different blocks never interact")
    kinds = ", ".join(f"{'one' if c == 1 else f'{c:,}'} of {n:,} tokens" for _, n, c in pieces)
    return (f"  pieces: {kinds}; every branch of every layer starts a segment at each cut "
            "between them, so tokens in different pieces never interact")


def _layers_line(rep, patterns) -> str:
    depth = "any number of layers" if rep.layers is None else f"the first {rep.layers} layers"
    if len(patterns) == 1:
        return f"  layers: all alike; paths through {depth}"
    cycle = ", ".join(f"shift {p.shift}" for p in patterns)
    return f"  layers cycle through [{cycle}] (layer 0 first); paths through {depth}"


def print_report(rep, patterns, seconds: float) -> None:
    kind = "causal" if rep.causal else "non-causal"
    base = DilatedPattern(patterns[0].segment_lengths, patterns[0].dilation_rates)
    print(f"reach of {base} at N = {rep.length:,}, {rep.num_heads} heads, {kind}")
    print(_layers_line(rep, patterns))
    line = _pieces_line(rep)
    if line:
        print(line)
    mh = "inf" if math.isinf(rep.max_hops) else str(rep.max_hops)
    print(f"  max hops: {mh} ({rep.max_reachable_hops} among the pairs that have a path)")
    print(f"  unreachable: {rep.unreachable:,} of {rep.pairs:,} pairs "
          f"({100 * rep.unreachable_fraction:.4g}%)")
    if rep.examples:
        ex = ", ".join(f"{i:,} -> {j:,}" for i, j in rep.examples)
        within = "in any number of layers" if rep.layers is None else f"in {rep.layers} layers"
        print(f"  nearest unreachable pairs (token i never reaches position j {within}): {ex}")
    depth = rep.max_reachable_hops
    head = (f"{'distance':>17} {'pairs':>18} {'unreachable':>11} {'max hops':>8} {'mean hops':>9}"
            + "".join(f"{f'{k} hop' + ('' if k == 1 else 's'):>8}" for k in range(depth + 1)))
    print(head)
    for (lo, hi), hops, bad in zip(rep.distance_buckets(), rep.distance_hops,
                                   rep.distance_unreachable):
        n = sum(hops) + bad
        if n == 0:
            continue
        ok = sum(hops)
        top = max((k for k, c in enumerate(hops) if c), default=None)
        mean = f"{sum(k * c for k, c in enumerate(hops)) / ok:.2f}" if ok else "-"
        print(f"{_bucket_name(lo, hi):>17} {n:>18,} {_pct(bad, n):>11} "
              f"{'-' if top is None else top:>8} {mean:>9}"
              + "".join(f"{_pct(c, n):>8}" for c in hops))
    print(f"  ({seconds:.2f} s)")


def run(args: argparse.Namespace) -> int:
    try:
        patterns, n, heads = _settings(args)
        block, classes = work(patterns, n, heads)
        if block * classes > _SLOW:
            print(f"note: lcm of the segment lengths is {block:,} tokens with {classes:,} residue "
                  "classes; the exact analysis grows like their product (see longnet.analysis.reach) "
                  "and may take a long time; a shorter --seq-len is quicker", file=sys.stderr)
        t0 = time.perf_counter()
        rep = reach(patterns, n, heads, causal=not args.non_causal, layers=args.layers, distance_edges="log2",
                    examples=args.examples, progress=_progress())
        seconds = time.perf_counter() - t0
    except (ValueError, TypeError) as err:
        print(f"longnet reach: error: {err}", file=sys.stderr)
        return 2
    print_report(rep, patterns, seconds)
    out = {"segment_lengths": list(patterns[0].segment_lengths),
           "dilation_rates": list(patterns[0].dilation_rates), "shifted": bool(args.shifted),
           **rep.to_dict(), "seconds": seconds}
    print_json_line(out)
    return 0
