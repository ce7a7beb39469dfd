"""Decoding cost against context position: dilated KV cache vs a dense KV cache.

For each context position P (default 1K to 1M tokens), a small LongNet LM (the ``small`` preset:
6 layers, width 384, segments 128..2048) is brought to position ``P - steps`` and then decodes
``steps`` single tokens (positions ``P - steps .. P - 1``, the end of a full largest segment when
P is a multiple of it, i.e. where the dilated cache is largest). Reported: milliseconds per token
(median over the steps) and the cache's bytes after them.

- dilated: the real model prefill of a random prompt of ``P - steps`` tokens through
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
from longnet.models.generation import cached_forward

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--positions", default=",".join(str(2 ** k) for k in range(10, 21)),
                   help="comma-separated context positions (default: 1K..1M, powers of 2)")
    p.add_argument("--steps", type=int, default=20, help="timed single-token steps per position")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--dense-max", type=int, default=262144,
                   help="largest position for the dense cache (memory bound)")
    p.add_argument("--prefill-chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    return p.parse_args(argv)


def time_steps(model, cache, steps: int, warmup: int, device) -> list[float]:
    """Seconds of each of ``steps`` single-token cached steps (after ``warmup`` more)."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = cached_forward(model, token, cache)
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_dilated(model, P: int, args, device) -> dict:
    before = P - args.steps - args.warmup
    g = torch.Generator().manual_seed(P)
    prompt = torch.randint(0, model.config.vocab_size, (1, before), generator=g).to(device)
    cache = model.make_cache(1)
    t = time.perf_counter()
    model.generate(prompt, 1, cache=cache, prefill_chunk_size=args.prefill_chunk_size)
    prefill_s = time.perf_counter() - t
    fed = sum(int((pos >= 0).any(1).sum()) for pos in cache.layers[0].positions)
    times = time_steps(model, cache, args.steps, args.warmup, device)
    return {"ms_per_token": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "ms_mean": 1e3 * statistics.fmean(times), "cache_bytes": cache.nbytes,
            "cache_bytes_bound": cache.max_nbytes, "prefill_s": prefill_s,
            "position_after": int(cache.lengths[0]), "first_branch_slots": fed}


def bench_dense(model, P: int, args, device) -> dict:
    before = P - args.steps - args.warmup
    cache = model.make_cache(1)
    g = torch.Generator().manual_seed(P)
    for layer in cache.layers:
        layer.fill_(before, capacity=P, generator=g)
    cache.lengths[:] = before
    times = time_steps(model, cache, args.steps, args.warmup, device)
    return {"ms_per_token": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "ms_mean": 1e3 * statistics.fmean(times), "cache_bytes": cache.nbytes}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("dilated", "dilated KV cache"), ("dense", "dense KV cache")):
        pts = [(r["position"], r[key]) for r in rows if r.get(key)]
        if not pts:
            continue
        x = [p for p, _ in pts]
        a.plot(x, [m["ms_per_token"] for _, m in pts], "o-", label=label)
        b.plot(x, [m["cache_bytes"] / 2 ** 20 for _, m in pts], "o-", label=label)
    for ax, title, unit in ((a, "latency per token", "ms / token"),
                            (b, "cache size", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context position (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.axvline(results["largest_segment"], color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"decoding, {results['model']} on {results['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    positions = sorted(int(p) for p in args.positions.split(","))
    if min(positions) <= args.steps + args.warmup:
        raise SystemExit(f"positions must exceed steps + warmup ({args.steps + args.warmup})")
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
          f"{config.segment_lengths}, dilations {config.dilation_rates}; {args.steps} steps per "
          f"position, {torch.get_num_threads()} threads on {name}", flush=True)
    print(f"{'position':>9} | {'dilated ms/tok':>14} {'cache MiB':>9} {'prefill s':>9} | "
          f"{'dense ms/tok':>12} {'cache MiB':>9}", flush=True)
    for P in positions:
        row = {"position": P, "dilated": bench_dilated(dilated, P, args, device)}
        row["dense"] = bench_dense(dense, P, args, device) if P <= args.dense_max else None
        rows.append(row)
        d, e = row["dilated"], row["dense"]
        dense_txt = (f"{e['ms_per_token']:>12.2f} {e['cache_bytes'] / 2 ** 20:>9.1f}" if e
                     else f"{'-':>12} {'-':>9}")
        print(f"{P:>9} | {d['ms_per_token']:>14.2f} {d['cache_bytes'] / 2 ** 20:>9.2f} "
              f"{d['prefill_s']:>9.2f} | {dense_txt}", flush=True)
    flat = [r["dilated"] for r in rows if r["position"] >= W]
    summary = {
        "benchmark": "decode", "device": args.device, "model": args.preset,
        "largest_segment": W, "positions": [r["position"] for r in rows],
        "dilated_ms_per_token": [round(r["dilated"]["ms_per_token"], 3) for r in rows],
        "dense_ms_per_token": [round(r["dense"]["ms_per_token"], 3) if r["dense"] else None
                               for r in rows],
        "dilated_cache_bytes": [r["dilated"]["cache_bytes"] for r in rows],
        "dense_cache_bytes": [r["dense"]["cache_bytes"] if r["dense"] else None for r in rows],
    }
    if flat:
        ms = [f["ms_per_token"] for f in flat]
        summary["latency_spread_from_largest_segment"] = round(max(ms) / min(ms) - 1, 4)
        summary["cache_bytes_constant_from_largest_segment"] = len(
            {f["cache_bytes"] for f in flat}) == 1
    results = {**summary, "rows": rows, "device_name": name, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
               "prefill_chunk_size": args.prefill_chunk_size, "config": config.to_dict(),
               "dense_config_changes": {"attention": "dense", "position": "rope"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
