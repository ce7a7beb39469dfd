"""Teardown check: sequence-parallel backward, then ``destroy_process_group``, repeated under torchrun.

    PYTHONPATH=src python benchmarks/teardown_repeat.py --repeats 20          # 0 of 20 must fail
    PYTHONPATH=src python benchmarks/teardown_repeat.py --repeats 20 --hold-group   # the old bug

Each repeat launches ``torchrun --standalone --nproc-per-node 4`` on this file in worker mode:
init gloo, one forward + backward of :func:`longnet.parallel.dilated_attention` on
(1, 2, 64, 8) float64 chunks with segments [16, 32] (its branch of 32 spans 2 ranks: sub-groups),
then the issue's repro: segments [16, 64], rates [1, 2], causal (the branch of 64 spans all 4
ranks), then ``dist.destroy_process_group()`` and a normal exit. A repeat fails when torchrun exits non-zero
(before the fix: SIGABRT, "terminate called without an active exception", in about 1 run in 3 to
10 on a 2-core machine).

``--hold-group`` keeps a strong reference to the process groups past ``destroy_process_group``,
as ``longnet.parallel``'s caches did before the fix (see :mod:`longnet.parallel.comm`): the gloo
worker threads then live until interpreter shutdown and the abort comes back.

Writes ``benchmarks/results/teardown_repeat.json`` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_HELD: list = []
_SCRIPT: dict = {}  # the repro is a script: its tensors are globals that live until interpreter shutdown


def worker(hold_group: bool) -> None:
    import torch
    import torch.distributed as dist

    import longnet.parallel as lp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    for segments in ([16, 32], [16, 64]):  # the repro last, right before the teardown
        q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64, generator=g, requires_grad=True)
                   for _ in range(3))
        out = lp.dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=[1, 2], is_causal=True)
        out.sum().backward()
        _SCRIPT.update(q=q, k=k, v=v, out=out)
    if hold_group:  # what the caches of longnet.parallel did before the fix
        from torch.distributed.distributed_c10d import _world

        _HELD.extend(_world.pg_map)
    dist.destroy_process_group()


def main(argv=None) -> int:
    from longnet.bench.results import add_overwrite_option, claim_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--hold-group", action="store_true", help="reproduce the bug the fix removed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    add_overwrite_option(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.hold_group)
        return 0
    stem = "teardown_repeat" + ("_hold_group" if args.hold_group else "")
    if not args.no_write:
        try:
            claim_results(RESULTS, stem, overwrite=args.overwrite)
        except OSError as err:  # ResultsExistError: an earlier result would be replaced
            print(f"teardown_repeat: error: {err}", file=sys.stderr)
            return 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else src
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "--worker"] + (["--hold-group"] if args.hold_group else [])
    failures, aborts, seconds = [], 0, []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        seconds.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            failures.append(i)
            aborts += "terminate called without an active exception" in proc.stderr
            print(f"repeat {i}: exit {proc.returncode}\n{proc.stderr[-1500:]}", file=sys.stderr)
    result = {"repeats": args.repeats, "nproc": args.nproc, "hold_group": args.hold_group,
              "failed": len(failures), "failed_repeats": failures, "sigabrt_messages": aborts,
              "seconds_per_repeat": round(sum(seconds) / len(seconds), 2)}
    if not args.no_write:
        from longnet.bench.report import write_results

        write_results(RESULTS, stem, result)
    print(json.dumps(result))
    return 1 if failures and not args.hold_group else 0


if __name__ == "__main__":
    sys.exit(main())
