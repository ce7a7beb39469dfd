"""Is ``backend="auto"`` as fast as the best backend it could have named? One table per device.

For each case of the grid (N, causal or not, forward or forward+backward) dilated attention runs
with ``auto`` and with every named backend that can run it (on CPU ``cpu_kernel``, longnet's own
kernel, and ``cpu_flash``, PyTorch's), each call in a process of its own, the backends of one case
alternating in rounds until their medians settle (:mod:`longnet.bench.isolated`). A row passes when
``auto`` is at most ``--slack`` (5%) slower than the fastest named backend.

Process-to-process noise on a shared machine can exceed the slack, so every row also gives the
paired ratio: ``auto`` over the best named backend within each round (processes run next to each
other in time), its median, and a 90% bootstrap interval of that median (``paired_ci90``). The row
names the backend ``auto`` resolved to (``auto_runs``); where it is the best named backend, the two
run identical code and their difference is noise.

That noise can push a row past the slack when ``auto`` and the best backend are the same code, so
each row also scores ``auto``'s *choice* (``choice_over_best``): the processes of ``auto`` and of the
backend it resolved to are pooled (both run that backend's kernel), their median, plus what resolving
``"auto"`` costs per call (``auto_resolve_us``, measured here, once in the forward and once in the
backward), is divided by the fastest of it and the other named backends. It is 1.0 when ``auto``'s
choice is the fastest backend and fails (``choice_ok``) when another backend is more than the slack
faster. ``--rescore FILE`` recomputes these figures for a saved result without measuring again.

Prints the table, writes ``auto_backend_<device>.json`` under ``--out`` and ends with one JSON line.
Run: ``PYTHONPATH=src python benchmarks/auto_backend.py --help``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longnet.bench.isolated import add_case_arguments, paper_spec, run_isolated, spec_config  # noqa: E402
from longnet.bench.report import device_slug  # noqa: E402
from longnet.bench.results import add_overwrite_option, claim_results  # noqa: E402
from longnet.utils.atomic import atomic_write_json  # noqa: E402
from longnet.utils.strict_json import print_json_line  # noqa: E402

NAMED = {"cpu": ("cpu_kernel", "cpu_flash"), "cuda": ("cuda", "cuda_flash", "cuda_efficient")}


def paired_ratios(auto_ms: list[float], best_ms: list[float]) -> list[float]:
    """Round-by-round ``auto / best`` (both lists in round order; the shorter one bounds the rounds)."""
    return [a / b for a, b in zip(auto_ms, best_ms) if b > 0]


def bootstrap_median_ci(values: list[float], *, level: float = 0.9, draws: int = 2000,
                        seed: int = 0) -> tuple[float, float] | None:
    """A ``level`` percentile-bootstrap interval of the median of ``values`` (None for fewer than 2)."""
    import random

    if len(values) < 2:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    lo = meds[int((1 - level) / 2 * (draws - 1))]
    hi = meds[int((1 + level) / 2 * (draws - 1))]
    return lo, hi


def choice_over_best(process_ms: dict[str, list[float]], auto_runs: str, *, extra_ms: float = 0.0,
                     ) -> tuple[float, str] | None:
    """``(ratio, fastest)``: the pooled median of ``auto``'s and ``auto_runs``' process times plus
    ``extra_ms``, over the fastest of that and every other named backend's median (``fastest`` is
    ``"auto"`` when the choice is fastest, the ratio then 1.0). None without samples of both."""
    if not process_ms.get("auto") or not process_ms.get(auto_runs):
        return None
    choice = statistics.median(process_ms["auto"] + process_ms[auto_runs]) + extra_ms
    others = {b: statistics.median(t) for b, t in process_ms.items() if b not in ("auto", auto_runs) and t}
    fastest = min(others, key=others.get) if others else None
    if fastest is None or others[fastest] >= choice:
        return 1.0, "auto"
    return choice / others[fastest], fastest


def auto_resolve_us(device: str, dtype: str = "float32", head_dim: int = 64, calls: int = 2000) -> float:
    """Median microseconds of one ``get_backend("auto", ...)`` for a query like the benchmark's,
    in batches of 100 calls (what ``auto`` adds over a named backend is at most this, per resolve)."""
    import time

    import torch

    from longnet.ops.backends import get_backend

    q = torch.empty(1, 1, 1, head_dim, dtype=getattr(torch, dtype), device=device)
    get_backend("auto", q, has_mask=False)
    per = []
    for _ in range(max(1, calls // 100)):
        t = time.perf_counter()
        for _ in range(100):
            get_backend("auto", q, has_mask=False)
        per.append((time.perf_counter() - t) / 100 * 1e6)
    return statistics.median(per)


def score_row(row: dict, *, slack: float, resolve_us: float) -> dict:
    """``row`` with ``choice_over_best``, ``choice_fastest`` and ``choice_ok`` (see the module
    docstring) from its ``process_medians_ms`` and ``auto_runs``."""
    resolves = 2 if row["mode"] == "fwdbwd" else 1
    got = choice_over_best(row["process_medians_ms"], row["auto_runs"], extra_ms=resolves * resolve_us / 1e3)
    ratio, fastest = got if got else (None, None)
    return dict(row, choice_over_best=None if ratio is None else round(ratio, 4), choice_fastest=fastest,
                choice_ok=ratio is not None and ratio <= 1 + slack)


def _print_table(rows: list[dict], names: tuple[str, ...], slack: float) -> None:
    print(f"\n{'N':>6} {'causal':>6} {'mode':>6} " + " ".join(f"{b:>12}" for b in names)
          + f" {'best named':>12} {'auto runs':>10} {'auto/best':>9}  within {slack:.0%}"
          + f" {'paired':>7} {'90% interval':>15} {'choice/best':>11}  within {slack:.0%}")
    for r in rows:
        cells = " ".join(f"{r['ms'].get(b, float('nan')):>12.1f}" for b in names)
        ci = "{:.3f}-{:.3f}".format(*r["paired_ci90"]) if r["paired_ci90"] else "-"
        print(f"{r['n']:>6} {'yes' if r['causal'] else 'no':>6} {r['mode']:>6} {cells} {str(r['best_named']):>12} "
              f"{r['auto_runs']:>10} {(r['auto_over_best'] or float('nan')):>9.3f}  {'yes' if r['ok'] else 'NO':>9}"
              f" {(r['paired_auto_over_best'] or float('nan')):>7.3f} {ci:>15}"
              f" {(r['choice_over_best'] or float('nan')):>11.3f}  {'yes' if r['choice_ok'] else 'NO':>9}")


def _summary(doc: dict) -> dict:
    rows = doc["rows"]
    doc["all_within_slack"] = all(r["ok"] for r in rows)
    doc["choice_all_within_slack"] = all(r["choice_ok"] for r in rows)
    return doc


def rescore(path: Path) -> dict:
    """The saved result at ``path`` with the choice figures recomputed (``auto_resolve_us`` measured
    now, in this process, unless the file has it), written back in place."""
    import json

    doc = json.loads(path.read_text())
    if doc.get("auto_resolve_us") is None:
        doc["auto_resolve_us"] = round(auto_resolve_us(doc["device"], head_dim=doc["head_dim"]), 3)
    doc["rows"] = [score_row(r, slack=doc["slack"], resolve_us=doc["auto_resolve_us"]) for r in doc["rows"]]
    _summary(doc)
    atomic_write_json(path, doc, indent=1)
    return doc


def _auto_runs(spec: dict) -> str:
    """The backend ``auto`` resolves to for ``spec``'s inputs (no padding mask)."""
    import torch

    from longnet.ops.backends import get_backend

    q = torch.empty(1, 1, 1, spec["head_dim"], dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    return get_backend("auto", q, has_mask=False).name


def _in_process(specs: list[dict], rounds: int) -> list[dict]:
    """The cases of ``specs`` (one N, causal, mode; several backends) in this process: one warm-up
    call each, then ``rounds`` rounds of ``repeats`` calls per backend in alternating order."""
    import time

    import torch

    from longnet.bench.attention import _make_call

    s0 = specs[0]
    if s0.get("threads"):
        torch.set_num_threads(int(s0["threads"]))
    gen = torch.Generator().manual_seed(s0["seed"])
    shape = (s0["batch_size"], s0["heads"], s0["n"], s0["head_dim"])
    q, k, v, g = (torch.randn(shape, generator=gen).to(s0["device"], getattr(torch, s0["dtype"])) for _ in range(4))
    calls, times, cpu = [], [[] for _ in specs], [[] for _ in specs]
    for spec in specs:
        calls.append(_make_call(spec_config(spec), {"impl": "dilated", "n": spec["n"], "causal": spec["causal"],
                                      "mode": spec["mode"]}, q, k, v, g))
        calls[-1]()  # warm-up
    for r in range(rounds):
        for i in (range(len(specs)) if r % 2 == 0 else reversed(range(len(specs)))):
            for _ in range(specs[i]["repeats"]):
                w, c = time.perf_counter(), time.process_time()
                calls[i]()
                times[i].append((time.perf_counter() - w) * 1e3)
                cpu[i].append((time.process_time() - c) * 1e3)
    return [dict(spec, status="ok", median_ms=round(statistics.median(times[i]), 3),
                 cpu_median_ms=round(statistics.median(cpu[i]), 3), process_medians_ms=[round(t, 3) for t in times[i]],
                 rounds=rounds) for i, spec in enumerate(specs)]


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p, seq_lens="4096,8192,16384", repeats=3, min_rounds=3, max_rounds=5)
    p.add_argument("--in-process", action="store_true",
                   help="run the backends of a case alternating in this process (same inputs, same process "
                        "state; --repeats calls each per round, --max-rounds rounds) instead of one process each")
    p.add_argument("--slack", type=float, default=0.05, help="allowed excess of auto (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    p.add_argument("--rescore", metavar="FILE", type=Path,
                   help="recompute the choice figures of a saved auto_backend JSON in place, measuring nothing else")
    add_overwrite_option(p)
    args = p.parse_args(argv)
    if args.rescore is not None:
        if not args.rescore.is_file():
            p.error(f"--rescore: no such file: {args.rescore}")
        doc = rescore(args.rescore)
        _print_table(doc["rows"], ("auto", *NAMED[torch.device(doc["device"]).type]), doc["slack"])
        print_json_line({"results": str(args.rescore), "all_within_slack": doc["all_within_slack"],
                         "choice_all_within_slack": doc["choice_all_within_slack"]})
        return 0
    device = torch.device(args.device)
    threads = f"_threads{args.threads}" if args.threads else ""
    stem = f"auto_backend_{device_slug(device)}{threads}{'_in-process' if args.in_process else ''}"
    out = claim_results(args.out, stem, overwrite=args.overwrite, suffixes=(".json",))
    base = paper_spec(args, impl="dilated")
    resolve_us = auto_resolve_us(str(device), head_dim=args.head_dim)
    rows = []
    for mode in ("fwdbwd", "fwd"):
        for causal in (True, False):
            for n in (int(x) for x in args.seq_lens.split(",")):
                specs = [dict(base, n=n, causal=causal, mode=mode, backend=b) for b in ("auto", *NAMED[device.type])]
                if args.in_process:
                    records = _in_process(specs, rounds=args.max_rounds)
                else:
                    records = run_isolated(specs, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                                           progress=lambda line: print(line, file=sys.stderr, flush=True))
                times = {r["backend"]: r["median_ms"] for r in records if r["status"] == "ok"}
                named = {b: t for b, t in times.items() if b != "auto"}
                best = min(named, key=named.get) if named else None
                ratio = times["auto"] / named[best] if best and "auto" in times else None
                per_round = {r["backend"]: r["process_medians_ms"] for r in records if r["status"] == "ok"}
                pairs = paired_ratios(per_round["auto"], per_round[best]) if ratio is not None else []
                ci = bootstrap_median_ci(pairs)
                paired = round(statistics.median(pairs), 4) if pairs else None
                rows.append(score_row({"n": n, "causal": causal, "mode": mode, "ms": times, "best_named": best,
                             "auto_runs": _auto_runs(specs[0]),
                             "auto_over_best": ratio, "ok": ratio is not None and ratio <= 1 + args.slack,
                             "paired_auto_over_best": paired,
                             "paired_ci90": [round(x, 4) for x in ci] if ci else None,
                             "rounds": records[0].get("rounds"), "errors": {r["backend"]: r["status"] for r in records
                                                                           if r["status"] != "ok"},
                             "cpu_ms": {r["backend"]: r["cpu_median_ms"] for r in records if r["status"] == "ok"},
                             "process_medians_ms": {r["backend"]: r["process_medians_ms"] for r in records
                                                    if r["status"] == "ok"}}, slack=args.slack, resolve_us=resolve_us))
                print(f"N={n} {'causal' if causal else 'full'} {mode}: "
                      + ", ".join(f"{b} {t:.0f} ms" for b, t in times.items())
                      + (f"; auto / {best} = {ratio:.3f}" if ratio else ""), flush=True)
    _print_table(rows, ("auto", *NAMED[device.type]), args.slack)
    how = ("backends alternating in one process, same inputs" if args.in_process else
           "each call in its own process, backends alternating in rounds (longnet.bench.isolated)")
    doc = {"what": f"dilated attention, paper pattern, auto against every named backend; {how}",
           "in_process": args.in_process,
           "device": str(device), "heads": args.heads, "head_dim": args.head_dim, "threads": args.threads,
           "torch_threads_default": torch.get_num_threads(), "slack": args.slack,
           "auto_resolve_us": round(resolve_us, 3), "rows": rows}
    _summary(doc)
    atomic_write_json(out / f"{stem}.json", doc, indent=1)
    print_json_line({"results": str(out / f"{stem}.json"), "all_within_slack": doc["all_within_slack"],
                     "worst_auto_over_best": max((r["auto_over_best"] or 0) for r in rows),
                     "choice_all_within_slack": doc["choice_all_within_slack"],
                     "worst_choice_over_best": max((r["choice_over_best"] or 0) for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
