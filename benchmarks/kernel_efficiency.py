"""How close longnet's CPU kernel comes to sgemm, per thread, on one causal 2K segment.

One thread. Three cases run in processes of their own, alternating in rounds until their medians
settle (:mod:`longnet.bench.isolated`):

* ``cpu_kernel``: longnet's kernel, forward (and forward+backward) of one causal segment
  (N = 2048, the length most branches of the paper's pattern run at), H heads of D = 64;
* ``cpu_flash``: PyTorch's CPU flash kernel on the same call;
* ``sgemm``: the two matmuls of the same attention's forward (``QK^T`` and ``PV``, all N x N
  scores), through torch's BLAS: what an attention kernel built on GEMMs can hope to reach.

Rates count the FLOPs a causal kernel must do (half the scores; fwd+bwd = 3.5 x fwd, the
FlashAttention convention), so ``kernel / sgemm`` is the kernel's efficiency. The issue's bar is
70%; where the kernel stays below it and PyTorch's kernel is faster, ``auto`` must not choose it.

Prints the table, writes ``kernel_efficiency_<device>.json`` under ``--out``, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longnet.bench.isolated import run_isolated  # noqa: E402
from longnet.bench.results import add_overwrite_option, claim_results  # noqa: E402
from longnet.utils.atomic import atomic_write_json  # noqa: E402
from longnet.utils.strict_json import print_json_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from longnet.bench.report import device_slug

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="segment length (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="heads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (default: %(default)s)")
    p.add_argument("--min-rounds", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    add_overwrite_option(p)
    args = p.parse_args(argv)
    stem = f"kernel_efficiency_{device_slug(torch.device('cpu'))}"
    out = claim_results(args.out, stem, overwrite=args.overwrite, suffixes=(".json",))
    base = {"heads": args.heads, "head_dim": 64, "batch_size": 1, "segment_lengths": [args.n],
            "dilation_rates": [1], "device": "cpu", "dtype": "float32", "warmup": 1, "repeats": args.repeats,
            "seed": 0, "threads": 1, "keep_freed_memory": True, "n": args.n, "causal": True}
    rows = []
    for mode in ("fwd", "fwdbwd"):
        specs = [dict(base, impl="dilated", backend="cpu_kernel", mode=mode),
                 dict(base, impl="dilated", backend="cpu_flash", mode=mode),
                 dict(base, impl="sgemm", backend="-", mode="fwd")]
        records = run_isolated(specs, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
        failed = [f"{r['impl']}[{r['backend']}]: {r['status']}" for r in records if r["status"] != "ok"]
        if failed:
            raise SystemExit("a case failed, no ratio to report: " + "; ".join(failed))
        gflops = {(r["impl"] if r["impl"] == "sgemm" else r["backend"]): r["flops"] / r["median_ms"] / 1e6
                  for r in records if r["status"] == "ok"}
        rows.append({"mode": mode, "gflops_per_thread": gflops,
                     "kernel_over_sgemm": gflops["cpu_kernel"] / gflops["sgemm"],
                     "flash_over_sgemm": gflops["cpu_flash"] / gflops["sgemm"],
                     "kernel_over_flash": gflops["cpu_kernel"] / gflops["cpu_flash"],
                     "median_ms": {(r["impl"] if r["impl"] == "sgemm" else r["backend"]): r["median_ms"]
                                   for r in records if r["status"] == "ok"},
                     "rounds": records[0]["rounds"]})
    print(f"\n{'mode':>7} {'kernel GF/s':>12} {'flash GF/s':>11} {'sgemm GF/s':>11} {'kernel/sgemm':>13} "
          f"{'flash/sgemm':>12} {'kernel/flash':>13}")
    for r in rows:
        g = r["gflops_per_thread"]
        print(f"{r['mode']:>7} {g['cpu_kernel']:>12.1f} {g['cpu_flash']:>11.1f} {g['sgemm']:>11.1f} "
              f"{r['kernel_over_sgemm']:>13.2f} {r['flash_over_sgemm']:>12.2f} {r['kernel_over_flash']:>13.2f}")
    doc = {"what": f"one causal segment N={args.n}, H={args.heads}, D=64, float32, one thread; each case in its "
                   "own processes, alternating rounds", "rows": rows,
           "flops": "causal-effective matmul FLOPs (DilatedPattern.flops); sgemm: 4 N^2 D H per forward"}
    atomic_write_json(out / f"{stem}.json", doc, indent=1)
    print_json_line({"results": str(out / f"{stem}.json"),
                     "kernel_over_sgemm": {r["mode"]: round(r["kernel_over_sgemm"], 3) for r in rows}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
