"""Sequence-parallel dilated attention under torchrun: outputs and gradients vs one device.

    torchrun --nproc-per-node 4 benchmarks/parallel_torchrun_check.py --chunk 512

Every rank builds the same full inputs (fixed seed), runs the single-device operator and the
sequence-parallel one on its chunk, and prints its largest differences, the bytes it moved per
branch, the bytes ``plan_bytes`` predicted and the wall time of a forward + backward. NCCL on GPUs,
gloo on CPU. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import longnet
from longnet.ops.pattern import DilatedPattern
from longnet.parallel import CommCounter, dilated_attention, init_distributed, plan_bytes, shard_sequence


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=256, help="tokens per rank")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--segment-lengths", default="64,256,1024,4096")
    ap.add_argument("--dilation-rates", default="1,2,4,8")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float64")
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    rank, world = init_distributed(timeout_s=120)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    pattern = DilatedPattern([int(x) for x in args.segment_lengths.split(",")],
                             [int(x) for x in args.dilation_rates.split(",")])
    N, H, D = args.chunk * world, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, H, N, D, generator=g).to(device, dtype) for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = longnet.dilated_attention(*full, segment_lengths=pattern, is_causal=args.causal)
    (ref * dout).sum().backward()
    part = [shard_sequence(t, 2).clone().requires_grad_() for t in (q, k, v)]
    dist.barrier()
    t0 = time.perf_counter()
    with CommCounter() as c:
        out = dilated_attention(*part, segment_lengths=pattern, is_causal=args.causal,
                                check_chunks=False)
        (out * shard_sequence(dout, 2)).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    errs = {"out": (out - shard_sequence(ref, 2)).abs().max().item()}
    for name, a, b in zip("qkv", part, full):
        errs["d" + name] = (a.grad - shard_sequence(b.grad, 2)).abs().max().item()
    plan = plan_bytes(pattern, N, world, H, D, torch.finfo(dtype).bits // 8, rank=rank)
    predicted = {b.branch: {"forward": b.forward_sent, "backward": b.backward_sent}
                 for b in plan.branches if not b.local}
    line = {"rank": rank, "world": world, "N": N, "errors": errs, "bytes": c.by_branch(),
            "predicted": predicted, "seconds": seconds}
    print(json.dumps(line), flush=True)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    ok = max(errs.values()) < tol and c.by_branch() == predicted
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
