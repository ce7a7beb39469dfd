"""Decoding cost against context position: dilated KV cache vs a dense KV cache.

For each context position P (default 1K to 1M tokens), a small LongNet LM (the ``small`` preset:
6 layers, width 384, segments 128..2048) is brought to position ``P - T`` and then decodes ``T``
single tokens (``T = warmup + rounds * steps``: positions ``P - T .. P - 1``, the end of a full
largest segment when P is a multiple of it, i.e. where the dilated cache is fullest). The timed
steps run in rounds over all positions, interleaved, so that load from other processes falls on
all positions alike. Reported: milliseconds per token (median and min over the timed steps) and
the cache's bytes after them, and the median CPU time of this process per token, which load
from other processes on a shared machine disturbs far less than wall-clock time. "dilated" in the
JSON is the default slot cache.

- dilated ("slots", the default :class:`~longnet.models.cache.SlotLayerCache`, and "compact",
  :class:`longnet.testing.reference_cache.DilatedLayerCache`): the real model prefill of a random prompt of
  ``P - steps`` tokens through
  ``LongNetLM.generate`` (prefill in chunks; tokens before the last largest segment are skipped
  exactly, since no later position reads them, so reaching 1M costs one segment of prefill), then
  real cached decoding steps.
- dense: the same model with ``attention="dense"`` (RoPE: XPos without blocks overflows float32
  near 36K positions) and a :class:`~longnet.models.cache.DenseLayerCache` holding every key and
  value, attended with ``F.scaled_dot_product_attention``. Its cache is filled with random keys
  and values (a step's cost does not depend on them; a real dense prefill to P costs O(P^2)), up to
  ``--dense-max`` positions (memory: about 18 KB per position for this model).

Writes ``benchmarks/results/decode-<device>.json`` and ``.png`` and prints a table, then one JSON
summary line. Run: ``PYTHONPATH=src python benchmarks/decode.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from longnet import LongNetConfig, LongNetLM
from longnet.bench.measure import StepTimes
from longnet.bench.report import plot_decode, write_results
from longnet.bench.results import add_overwrite_option, claim_results
from longnet.models.generation import cached_forward
from longnet.testing.reference_cache import DilatedLayerCache

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--positions", default=",".join(str(2 ** k) for k in range(10, 21)),
                   help="comma-separated context positions (default: 1K..1M, powers of 2)")
    p.add_argument("--steps", type=int, default=4,
                   help="timed single-token steps per position and round")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds over all positions (interleaved, so that load from other "
                        "processes spreads over all positions alike)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds")
    p.add_argument("--dense-max", type=int, default=262144,
                   help="largest position for the dense cache (memory bound)")
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="default: generate's (the largest segment for the slot cache, else 1024)")
    p.add_argument("--no-compact", action="store_true",
                   help="skip the 'compact' reference layer cache (longnet.testing.reference_cache.DilatedLayerCache)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    add_overwrite_option(p)
    return p.parse_args(argv)


class Run:
    """A cache brought to ``P - warmup - rounds * steps`` tokens, then stepped token by token."""

    def __init__(self, model, cache, device):
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.timer = StepTimes(device)

    def _step(self) -> None:
        logits = cached_forward(self.model, self.token, self.cache)
        self.token = logits.argmax(-1, keepdim=True)  # (1, 1)

    def steps(self, count: int, record: bool = True) -> None:
        for _ in range(count):
            self.timer.run(self._step, record)

    def result(self, P: int) -> dict:
        if int(self.cache.lengths[0]) != P:  # the timed steps ended at position P - 1
            raise RuntimeError(f"expected {P} tokens in the cache, got {int(self.cache.lengths[0])}")
        return {**self.timer.summary(), "cache_bytes": self.cache.nbytes,
                "cache_bytes_bound": self.cache.max_nbytes}


def start_dilated(model, P: int, args, device, layer_cache) -> tuple[Run, float]:
    """Prefill a random prompt (real model, generate's chunked prefill); seconds it took."""
    before = P - args.warmup - args.rounds * args.steps
    g = torch.Generator().manual_seed(P)
    prompt = torch.randint(0, model.config.vocab_size, (1, before), generator=g).to(device)
    cache = model.make_cache(1, layer_cache=layer_cache)
    t = time.perf_counter()
    model.generate(prompt, 1, cache=cache, prefill_chunk_size=args.prefill_chunk_size)
    return Run(model, cache, device), time.perf_counter() - t


def bench_dense(model, P: int, args, device) -> dict:
    """Dense KV cache filled with random keys/values to ``P - steps``, then timed steps."""
    total = args.rounds * args.steps
    cache = model.make_cache(1)
    g = torch.Generator().manual_seed(P)
    for layer in cache.layers:
        layer.fill_(P - args.warmup - total, capacity=P, generator=g)
    cache.lengths[:] = P - args.warmup - total
    run = Run(model, cache, device)
    run.steps(args.warmup, record=False)
    run.steps(total)
    return run.result(P)


def plot(results: dict, path: Path) -> None:
    plot_decode(results, path, [("dilated", "dilated KV cache (slots)"), ("compact", "dilated KV cache (compact)"),
                 ("dense", "dense KV cache")],
                f"decoding, {results['model']} on {results['device_name']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        claim_results(args.out, f"decode-{device.type}", overwrite=args.overwrite)
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        print(f"decode: error: {err}", file=sys.stderr)
        return 2
    positions = sorted(int(p) for p in args.positions.split(","))
    if min(positions) <= args.rounds * args.steps + args.warmup:
        raise SystemExit(f"positions must exceed rounds * steps + warmup "
                         f"({args.rounds * args.steps + args.warmup})")
    torch.manual_seed(0)
    config = LongNetConfig.from_preset(args.preset)
    dilated = LongNetLM(config).to(device).eval()
    dense_config = LongNetConfig.from_preset(args.preset, attention="dense", position="rope")
    dense = LongNetLM(dense_config).to(device).eval()
    W = max(config.segment_lengths)
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    rows = []
    print(f"{args.preset}: {dilated.num_parameters():,} parameters, segments "
          f"{config.segment_lengths}, dilations {config.dilation_rates}; {args.rounds} x "
          f"{args.steps} timed steps per position (median), {torch.get_num_threads()} threads on "
          f"{name}", flush=True)
    print("ms/tok: median wall-clock ms per token (cpu: median CPU ms of this process)")
    print(f"{'position':>9} | {'slots ms/tok (cpu)':>18} {'MiB':>6} {'prefill s':>9} | "
          f"{'compact ms/tok (cpu)':>20} {'MiB':>6} {'prefill s':>9} | "
          f"{'dense ms/tok (cpu)':>18} {'MiB':>7}", flush=True)
    kinds = ["dilated"] + ([] if args.no_compact else ["compact"])
    names = {"dilated": "slots", "compact": DilatedLayerCache}
    runs, prefill = {}, {}
    for P in positions:  # bring every dilated cache to its position (bounded memory each)
        for kind in kinds:
            runs[P, kind], prefill[P, kind] = start_dilated(dilated, P, args, device, names[kind])
            runs[P, kind].steps(args.warmup, record=False)
    for r in range(args.rounds):  # interleaved timing
        order = positions if r % 2 == 0 else positions[::-1]
        for P in order:
            for kind in kinds:
                runs[P, kind].steps(args.steps)
    for P in positions:
        row = {"position": P}
        for kind in ("dilated", "compact"):
            row[kind] = None
            if kind in kinds:
                row[kind] = {**runs[P, kind].result(P), "prefill_s": prefill[P, kind]}
                del runs[P, kind]  # free its memory
        row["dense"] = bench_dense(dense, P, args, device) if P <= args.dense_max else None
        rows.append(row)
        d, c, e = row["dilated"], row["compact"], row["dense"]
        def ms(m, width):
            return f"{m['ms_per_token']:.1f} ({m['cpu_ms_per_token']:.1f})".rjust(width)

        c_txt = (f"{ms(c, 20)} {c['cache_bytes'] / 2 ** 20:>6.2f} {c['prefill_s']:>9.2f}"
                 if c else f"{'-':>20} {'-':>6} {'-':>9}")
        e_txt = (f"{ms(e, 18)} {e['cache_bytes'] / 2 ** 20:>7.1f}" if e
                 else f"{'-':>18} {'-':>7}")
        print(f"{P:>9} | {ms(d, 18)} {d['cache_bytes'] / 2 ** 20:>6.2f} "
              f"{d['prefill_s']:>9.2f} | {c_txt} | {e_txt}", flush=True)
    summary = {
        "benchmark": "decode", "device": args.device, "model": args.preset,
        "largest_segment": W, "positions": [r["position"] for r in rows],
        "dilated_ms_per_token": [round(r["dilated"]["ms_per_token"], 3) for r in rows],
        "dilated_cpu_ms_per_token": [round(r["dilated"]["cpu_ms_per_token"], 3) for r in rows],
        "dense_ms_per_token": [round(r["dense"]["ms_per_token"], 3) if r["dense"] else None
                               for r in rows],
        "dense_cpu_ms_per_token": [round(r["dense"]["cpu_ms_per_token"], 3) if r["dense"]
                                   else None for r in rows],
        "dilated_cache_bytes": [r["dilated"]["cache_bytes"] for r in rows],
        "compact_ms_per_token": [round(r["compact"]["ms_per_token"], 3) if r["compact"] else None
                                 for r in rows],
        "compact_cpu_ms_per_token": [round(r["compact"]["cpu_ms_per_token"], 3) if r["compact"]
                                     else None for r in rows],
        "compact_cache_bytes": [r["compact"]["cache_bytes"] if r["compact"] else None
                                for r in rows],
        "dense_cache_bytes": [r["dense"]["cache_bytes"] if r["dense"] else None for r in rows],
    }
    for key in ("dilated", "compact"):
        flat = [r[key] for r in rows if r["position"] >= W and r[key]]
        if flat:
            ms = [f["ms_per_token"] for f in flat]
            summary[f"{key}_latency_spread_from_largest_segment"] = round(max(ms) / min(ms) - 1, 4)
            mid = statistics.median(ms)
            summary[f"{key}_latency_max_deviation_from_median"] = round(
                max(abs(m / mid - 1) for m in ms), 4)
            cpu = [f["cpu_ms_per_token"] for f in flat]
            summary[f"{key}_cpu_latency_spread_from_largest_segment"] = round(
                max(cpu) / min(cpu) - 1, 4)
            summary[f"{key}_cache_bytes_constant_from_largest_segment"] = len(
                {f["cache_bytes"] for f in flat}) == 1
    results = {**summary, "rows": rows, "device_name": name, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "steps": args.steps, "rounds": args.rounds,
               "warmup": args.warmup,
               "prefill_chunk_size": args.prefill_chunk_size, "config": config.to_dict(),
               "dense_config_changes": {"attention": "dense", "position": "rope"}}
    write_results(args.out, f"decode-{device.type}", results, plot)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
