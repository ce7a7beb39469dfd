"""Where the time of dilated attention goes on CPU: the kernel calls against everything around them.

Usage::

    PYTHONPATH=src python benchmarks/profile_attention.py --seq-len 16384 --mode fwd --threads 2
    PYTHONPATH=src python benchmarks/profile_attention.py --seq-len 16384 --backend cpu_flash --threads 1

Three measurements (wall time and process CPU time, the median of ``--repeats`` calls):

1. the whole operator (``dilated_attention``, forward under ``no_grad`` or forward + backward);
2. the backend's kernel alone at each branch's shape (B, H * segments, slots, D), on contiguous
   inputs, and dense attention (PyTorch's CPU flash kernel, what SDPA runs) at the full length: the
   kernel-only time is the bound any change of layout, merge or call plan can reach, and
   dense / kernel-only the speedup such a change could give;
3. ``torch.profiler`` self time per op in one call (the calling thread's), grouped into the GEMMs
   longnet's kernel calls, the longnet op's own time (the kernel's softmax loops, its merge epilogue,
   its block GEMMs where it calls the BLAS's sgemm_ directly, and the Python between ops),
   PyTorch's flash kernel, merge arithmetic, fills and copies; only shares.

Writes ``benchmarks/results/profile_attention_<device>_N<N>_<causal|full>_<mode>_<backend>_t<threads>.json``
and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from longnet import DilatedPattern, dilated_attention
from longnet.bench.report import device_slug
from longnet.bench.results import add_overwrite_option, claim_results
from longnet.ops.backends import BACKENDS, get_backend
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.utils.atomic import atomic_write_json

_OWN = ("longnet op's own time: the kernel (softmax loops, merge epilogue, and its GEMMs where it calls "
        "sgemm_ directly) and Python")
GROUPS = {  # op -> group
    "longnet::dilated_attention": _OWN,
    "longnet::dilated_attention_backward": _OWN,
    "aten::_scaled_dot_product_flash_attention_for_cpu": "PyTorch flash kernel",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "PyTorch flash kernel",
    "aten::mm": "GEMMs inside longnet's kernel through ATen (mm, addmm_)",
    "aten::addmm_": "GEMMs inside longnet's kernel through ATen (mm, addmm_)",
    "aten::mul": "merge arithmetic (mul, add, sub, exp, logaddexp)",
    "aten::add": "merge arithmetic (mul, add, sub, exp, logaddexp)",
    "aten::sub": "merge arithmetic (mul, add, sub, exp, logaddexp)",
    "aten::exp": "merge arithmetic (mul, add, sub, exp, logaddexp)",
    "aten::logaddexp": "merge arithmetic (mul, add, sub, exp, logaddexp)",
    "aten::fill_": "zeros / full (fill_)",
    "aten::zero_": "zeros / full (fill_)",
    "aten::copy_": "copies (copy_)",
    "aten::empty": "allocations (empty)",
    "aten::empty_strided": "allocations (empty)",
}


def seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall and median process CPU time of ``repeats`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=16384, help="N (default: %(default)s)")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="(default: causal)")
    ap.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd", help="(default: %(default)s)")
    ap.add_argument("--backend", default="auto", help="dilated attention backend (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="(default: torch's, %(default)s)")
    ap.add_argument("--heads", type=int, default=8, help="(default: %(default)s)")
    ap.add_argument("--head-dim", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each (default: %(default)s)")
    ap.add_argument("--skip-dense", action="store_true", help="do not time dense attention")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    add_overwrite_option(ap)
    args = ap.parse_args()
    stem = (f"profile_attention_{device_slug(torch.device('cpu'))}_N{args.seq_len}_"
            f"{'causal' if args.causal else 'full'}_{args.mode}_{args.backend}_t{args.threads}")
    try:
        claim_results(args.out, stem, overwrite=args.overwrite, suffixes=(".json",))
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        raise SystemExit(f"profile_attention: error: {err}") from None
    torch.set_num_threads(args.threads)
    pattern = DilatedPattern(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)
    B, H, N, D, causal, fwd_only = 1, args.heads, args.seq_len, args.head_dim, args.causal, args.mode == "fwd"
    scale = D ** -0.5
    q, k, v, g = (torch.randn(B, H, N, D) for _ in range(4))  # (B, H, N, D)
    leaves = [t.clone().requires_grad_(not fwd_only) for t in (q, k, v)]
    backend = get_backend(args.backend, q, has_mask=False)

    def op():
        if fwd_only:
            with torch.no_grad():
                dilated_attention(*leaves, segment_lengths=pattern, is_causal=causal, backend=args.backend)
            return
        dilated_attention(*leaves, segment_lengths=pattern, is_causal=causal, backend=args.backend).backward(g)
        for t in leaves:
            t.grad = None

    op()  # warm up
    total, total_cpu = seconds(op, args.repeats)

    def kernel(be, G: int, L: int) -> dict:
        x = [torch.randn(B, G, L, D) for _ in range(4)]
        o, lse, aux = be.forward(*x[:3], None, causal, scale)
        tf = seconds(lambda: be.forward(*x[:3], None, causal, scale), args.repeats)[0]
        tb = 0.0 if fwd_only else seconds(lambda: be.backward(x[3], *x[:3], o, lse, aux, None, causal, scale),
                                          args.repeats)[0]
        flops = 4.0 * B * G * L * L * D * (0.5 if causal else 1.0)
        return {"groups": G, "length": L, "fwd_s": round(tf, 4), "bwd_s": round(tb, 4),
                "fwd_gflops": round(flops / tf / 1e9, 1),
                "bwd_gflops": None if fwd_only else round(2.5 * flops / tb / 1e9, 1)}

    branches = []
    for b in range(len(pattern)):
        lay = pattern.layout(b, N, H)
        branches.append(dict(kernel(backend, H * lay.num_segments, lay.slots), segment=lay.segment,
                             dilation=lay.dilation))
    kernel_only = sum(x["fwd_s"] + x["bwd_s"] for x in branches)
    dense = None if args.skip_dense else kernel(BACKENDS["cpu_flash"], H, N)
    dense_s = None if dense is None else dense["fwd_s"] + dense["bwd_s"]

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op()
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        group = GROUPS.get(e.key, "other ops")
        shares[group] = shares.get(group, 0.0) + e.self_cpu_time_total / self_total
    flop_ratio = (DilatedPattern.dense_flops(N, D, H, is_causal=causal, backward=not fwd_only)
                  / pattern.flops(N, D, H, is_causal=causal, backward=not fwd_only))
    doc = {
        "seq_len": N, "causal": causal, "mode": args.mode, "backend": args.backend, "resolved_backend": backend.name,
        "threads": args.threads, "heads": H, "head_dim": D, "repeats": args.repeats,
        "torch_version": torch.__version__, "device": device_slug(torch.device("cpu")),
        "operator_s": round(total, 3), "operator_cpu_s": round(total_cpu, 3),
        "kernel_only_s": round(kernel_only, 3),
        "overhead_s": round(total - kernel_only, 3),
        "overhead_share": round(1 - kernel_only / total, 3),
        "dense_s": dense_s and round(dense_s, 3),
        "flop_ratio": round(flop_ratio, 3),
        "speedup": dense_s and round(dense_s / total, 3),
        "speedup_over_flop_ratio": dense_s and round(dense_s / total / flop_ratio, 3),
        "kernel_only_speedup": dense_s and round(dense_s / kernel_only, 3),
        "kernel_only_speedup_over_flop_ratio": dense_s and round(dense_s / kernel_only / flop_ratio, 3),
        "branches": branches, "dense_kernel": dense,
        "profiler_self_time_shares": {k: round(v, 4) for k, v in
                                      sorted(shares.items(), key=lambda kv: -kv[1])},
    }
    atomic_write_json(args.out / f"{stem}.json", doc, sort_keys=False)
    print(json.dumps(doc, indent=1))
    print(json.dumps({"results": str(args.out / f"{stem}.json"), "overhead_share": doc["overhead_share"],
                      "speedup_over_flop_ratio": doc["speedup_over_flop_ratio"],
                      "kernel_only_speedup_over_flop_ratio": doc["kernel_only_speedup_over_flop_ratio"]}))


if __name__ == "__main__":
    main()
