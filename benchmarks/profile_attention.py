"""Where the time of dilated attention goes on CPU: kernels vs gathers, merges and fills.

Usage::

    PYTHONPATH=src python benchmarks/profile_attention.py --seq-len 16384 --causal --threads 1

Three measurements, all in process CPU time (``time.process_time``), which stays meaningful on
a machine shared with other jobs when run with one thread:

1. the whole operator, forward + backward (``dilated_attention(...).backward(grad)``);
2. the attention kernel alone (the CPU flash aten ops) at each branch's gathered shape
   (B, H * segments, slots, D), forward and backward, and dense attention at the full length:
   the kernel-only time is the bound any gather/merge optimisation can reach;
3. ``torch.profiler`` self time per aten op in one forward + backward, grouped into kernel,
   gathers (``index``/``gather``), merge arithmetic, fills/copies and scatters; the profiler's
   times are wall times, so only their shares are reported.

Writes ``benchmarks/results/profile_attention_<device>_N<N>_<causal|full>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from longnet import DilatedPattern, dilated_attention
from longnet.bench.report import device_slug
from longnet.bench.results import add_overwrite_option, claim_results
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.utils.atomic import atomic_write_json

GROUPS = {  # aten op -> group
    "aten::_scaled_dot_product_flash_attention_for_cpu": "kernel forward",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "kernel backward",
    "aten::index": "gather q/k/v rows (index)",
    "aten::gather": "gather for merge and backward (gather)",
    "aten::scatter_": "scatter merged rows (scatter_)",
    "aten::index_add_": "accumulate gradients (index_add_)",
    "aten::fill_": "zeros / full (fill_)",
    "aten::copy_": "copies (copy_)",
}


def cpu_seconds(fn, repeats: int) -> float:
    """Smallest process CPU time of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-dense", action="store_true", help="do not time dense attention")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    add_overwrite_option(ap)
    args = ap.parse_args()
    stem = f"profile_attention_{device_slug(torch.device('cpu'))}_N{args.seq_len}_{'causal' if args.causal else 'full'}"
    try:
        claim_results(args.out, stem, overwrite=args.overwrite, suffixes=(".json",))
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        raise SystemExit(f"profile_attention: error: {err}") from None
    torch.set_num_threads(args.threads)
    pattern = DilatedPattern(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)
    B, H, N, D, causal = 1, args.heads, args.seq_len, args.head_dim, args.causal
    scale = D ** -0.5
    q, k, v, g = (torch.randn(B, H, N, D) for _ in range(4))  # (B, H, N, D)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def op():
        # the CPU flash path, the one whose aten kernels part 2 times alone
        dilated_attention(*leaves, segment_lengths=pattern, is_causal=causal, backend="cpu_flash").backward(g)
        for t in leaves:
            t.grad = None

    op()  # warm up
    total = cpu_seconds(op, args.repeats)

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def kernel(G: int, L: int) -> dict:
        x = [torch.randn(B, G, L, D) for _ in range(4)]
        o, lse = fwd(*x[:3], 0.0, causal, scale=scale)
        tf = cpu_seconds(lambda: fwd(*x[:3], 0.0, causal, scale=scale), args.repeats)
        tb = cpu_seconds(lambda: bwd(x[3], *x[:3], o, lse, 0.0, causal, scale=scale),
                         args.repeats)
        flops = 4.0 * B * G * L * L * D * (0.5 if causal else 1.0)
        return {"groups": G, "length": L, "fwd_s": round(tf, 4), "bwd_s": round(tb, 4),
                "fwd_gflops": round(flops / tf / 1e9, 1),
                "bwd_gflops": round(2.5 * flops / tb / 1e9, 1)}

    branches = []
    for b in range(len(pattern)):
        lay = pattern.layout(b, N, H)
        branches.append(dict(kernel(H * lay.num_segments, lay.slots), segment=lay.segment,
                             dilation=lay.dilation))
    kernel_only = sum(x["fwd_s"] + x["bwd_s"] for x in branches)
    dense = None if args.skip_dense else kernel(H, N)
    dense_s = None if dense is None else dense["fwd_s"] + dense["bwd_s"]

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op()
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        group = GROUPS.get(e.key, "other ops (exp, mul, add, where, logaddexp, ...)")
        shares[group] = shares.get(group, 0.0) + e.self_cpu_time_total / self_total
    flop_ratio = (DilatedPattern.dense_flops(N, D, H, is_causal=causal, backward=True)
                  / pattern.flops(N, D, H, is_causal=causal, backward=True))
    doc = {
        "seq_len": N, "causal": causal, "threads": args.threads, "heads": H, "head_dim": D,
        "torch_version": torch.__version__, "device": device_slug(torch.device("cpu")),
        "operator_fwdbwd_cpu_s": round(total, 3),
        "kernel_only_fwdbwd_cpu_s": round(kernel_only, 3),
        "overhead_cpu_s": round(total - kernel_only, 3),
        "overhead_share": round(1 - kernel_only / total, 3),
        "dense_fwdbwd_cpu_s": dense_s and round(dense_s, 3),
        "flop_ratio": round(flop_ratio, 3),
        "speedup": dense_s and round(dense_s / total, 3),
        "kernel_only_speedup": dense_s and round(dense_s / kernel_only, 3),
        "branches": branches, "dense_kernel": dense,
        "profiler_self_time_shares": {k: round(v, 4) for k, v in
                                      sorted(shares.items(), key=lambda kv: -kv[1])},
    }
    atomic_write_json(args.out / f"{stem}.json", doc, sort_keys=False)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
