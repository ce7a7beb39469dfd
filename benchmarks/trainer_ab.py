"""Training throughput of ``longnet train`` from two source trees, alternated (A B A B ...).

Each round runs ``python -m longnet train`` once from each tree (``PYTHONPATH=TREE/src``), in its
own process, on the same data cache, and reads the tokens/s of every logged step from the run's
``metrics.jsonl`` (the first ``--skip`` steps are warm-up and left out). Alternating the two trees
round by round makes a drift of the machine's speed hit both alike; the figure to quote is the
median over all rounds of each tree's per-run median, and the ratio B/A per round.

Prints a table, writes ``<--name>.json`` under ``--out`` and ends with one JSON line. Example (the
trainer before and after a change, the tiny preset on CPU)::

    git worktree add /tmp/before <commit>
    python benchmarks/trainer_ab.py --a /tmp/before --b . --name trainer_ab_tiny --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from longnet.bench.results import add_overwrite_option, claim_results  # noqa: E402
from longnet.utils.strict_json import print_json_line  # noqa: E402


def run_once(tree: Path, out: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "longnet", "train", "--preset", args.preset, "--max-steps", str(args.steps),
           "--eval-every", str(10 ** 6), "--save-every", str(10 ** 6), "--device", "cpu", "--no-progress",
           "--out", str(out), *args.extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: longnet train failed:\n{proc.stderr[-2000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in steps if r["kind"] == "train" and r["step"] > args.skip]
    return {"median_tokens_per_s": statistics.median(rates), "steps": len(rates), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, type=Path, help="the first source tree (holding src/longnet)")
    p.add_argument("--b", required=True, type=Path, help="the second source tree")
    p.add_argument("--preset", default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default: %(default)s)")
    p.add_argument("--name", default="trainer_ab", help="results file stem (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    p.add_argument("extra", nargs="*", help="more `longnet train` options, after --")
    add_overwrite_option(p)
    args = p.parse_args(argv)
    out = claim_results(args.out, args.name, overwrite=args.overwrite, suffixes=(".json",))
    rows: dict[str, list[dict]] = {"a": [], "b": []}
    load = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds + 1):  # round 0 warms the data cache and the file system, not counted
            for key in ("a", "b"):
                result = run_once(getattr(args, key).resolve(), Path(tmp) / f"{key}{i}", args)
                if i:
                    rows[key].append(result)
                    load.append(os.getloadavg()[0])
                    print(f"round {i} {key}: {result['median_tokens_per_s']:,.0f} tokens/s "
                          f"({result['steps']} steps, {result['wall_s']:.1f} s)", flush=True)
    med = {k: statistics.median(r["median_tokens_per_s"] for r in v) for k, v in rows.items()}
    ratios = [b["median_tokens_per_s"] / a["median_tokens_per_s"] for a, b in zip(rows["a"], rows["b"])]
    print(f"\n{'tree':<6} {'median tokens/s':>16}  runs\n{'A':<6} {med['a']:>16,.0f}  {len(rows['a'])}\n"
          f"{'B':<6} {med['b']:>16,.0f}  {len(rows['b'])}\nB/A per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    doc = {"preset": args.preset, "steps": args.steps, "skip": args.skip, "threads": args.threads,
           "a": str(args.a), "b": str(args.b), "runs": rows, "median_tokens_per_s": med,
           "ratio_b_over_a": ratios, "median_ratio": statistics.median(ratios), "load_average": load}
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print_json_line({"results": str(out / f"{args.name}.json"), "median_ratio_b_over_a": doc["median_ratio"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
