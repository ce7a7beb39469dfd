"""longnet beside the anchors a user would compare it with: dense SDPA and FlexAttention.

For each N (default 8K, 16K, 32K) and mode, three implementations run the paper's pattern
(w = 2048 ... 32768, r = 1, 2, 4, 6, 12), causal (``--full``: bidirectional), H heads of D = 64,
float32 on CPU:

* ``dense``: ``F.scaled_dot_product_attention`` (full attention; what dilated attention replaces);
* ``longnet``: :func:`longnet.dilated_attention` with ``backend="auto"``;
* ``flex``: the same function as longnet written with PyTorch's FlexAttention (block mask and a
  ``log(count)`` score modification, :mod:`longnet.bench.flex`), compiled. Its output is checked
  against longnet's on the same inputs (``max_abs_err``). On CPU torch compiles Flex's forward only,
  so it has forward rows only there; on CUDA it has both.

torchscale's ``DilatedAttention`` calls ``flash_attn_func``, which exists only with CUDA and the
flash-attn package; it has no row here (the JSON says so).

Every case runs in its own processes, the cases of one (N, mode) alternating in rounds until their
medians settle (:mod:`longnet.bench.isolated`). FlexAttention's largest branch covers the whole
sequence, so its block mask is dense and its cost grows as N^2: ``--flex-max-seq-len`` (default
16K) bounds it.

Prints the table, writes ``anchors_<device>.json`` and ``.png`` under ``--out``, ends with one JSON line.
Run: ``PYTHONPATH=src python benchmarks/anchors.py --help`` (about 40 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longnet.bench.isolated import add_case_arguments, paper_spec, run_isolated  # noqa: E402
from longnet.bench.report import device_name, device_slug  # noqa: E402
from longnet.bench.results import add_overwrite_option, claim_results  # noqa: E402
from longnet.utils.atomic import atomic_write_json, save_figure  # noqa: E402
from longnet.utils.strict_json import print_json_line  # noqa: E402

IMPLS = ("dense", "longnet", "flex")
TORCHSCALE = "not run: torchscale's DilatedAttention calls flash_attn_func (CUDA and the flash-attn package only)"


def _specs(base: dict, n: int, mode: str, device_type: str, flex_max: int) -> list[dict]:
    specs = [dict(base, impl="dense", n=n, mode=mode), dict(base, impl="dilated", n=n, mode=mode)]
    if n <= flex_max and (mode == "fwd" or device_type == "cuda"):
        specs.append(dict(base, impl="flex", n=n, mode=mode, repeats=1))  # one call is many seconds
    return specs


def _name(impl: str) -> str:
    return "longnet" if impl == "dilated" else impl


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        rows = [r for r in doc["rows"] if r["mode"] == mode]
        if not rows:
            ax.set_visible(False)
            continue
        for impl, style in (("dense", "s--"), ("longnet", "o-"), ("flex", "^:")):
            pts = [(r["n"], r["ms"][impl] / 1e3) for r in rows if r["ms"].get(impl)]
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds per call")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, "
                     f"{'causal' if doc.get('causal', True) else 'bidirectional'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"dilated attention (paper pattern) and its anchors: {doc['device_name']}, "
                 f"{doc['heads']} heads x {doc['head_dim']}, float32")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p, seq_lens="8192,16384,32768", repeats=2, min_rounds=2, max_rounds=4)  # flex makes 1 call
    p.add_argument("--full", action="store_true", help="bidirectional attention instead of causal")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated, of fwd and fwdbwd (default: %(default)s)")
    p.add_argument("--tag", default="", help="appended to the results' file name (default: none)")
    p.add_argument("--flex-max-seq-len", type=int, default=16384,
                   help="longest N FlexAttention runs at; its cost grows as N^2 (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    add_overwrite_option(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"fwd", "fwdbwd"}:
        p.error(f"--modes takes fwd and/or fwdbwd, got {args.modes!r}")
    stem = f"anchors_{device_slug(device)}{'_full' if args.full else ''}{'_' + args.tag if args.tag else ''}"
    out = claim_results(args.out, stem, overwrite=args.overwrite, suffixes=(".json", ".png"))
    base = paper_spec(args, backend="auto", causal=not args.full)
    rows = []
    for mode in modes:
        for n in (int(x) for x in args.seq_lens.split(",")):
            records = run_isolated(_specs(base, n, mode, device.type, args.flex_max_seq_len),
                                   min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True))
            ok = {_name(r["impl"]): r for r in records if r["status"] == "ok"}
            ms = {k: r["median_ms"] for k, r in ok.items()}
            row = {"n": n, "mode": mode, "ms": ms, "cpu_ms": {k: r["cpu_median_ms"] for k, r in ok.items()},
                   "process_medians_ms": {k: r["process_medians_ms"] for k, r in ok.items()},
                   "rounds": max((r["rounds"] for r in records), default=0),
                   "flop_ratio": ok["dense"]["flops"] / ok["longnet"]["flops"] if {"dense", "longnet"} <= ok.keys()
                   else None,
                   "errors": {_name(r["impl"]): r["status"] for r in records if r["status"] != "ok"},
                   "flex_max_abs_err": ok["flex"].get("max_abs_err") if "flex" in ok else None,
                   "loadavg_1m_max": max((r["loadavg_1m"] or 0) for r in ok.values()) if ok else None}
            if {"dense", "longnet"} <= ms.keys():
                row["speedup_vs_dense"] = ms["dense"] / ms["longnet"]
                row["speedup_over_flop_ratio"] = row["speedup_vs_dense"] / row["flop_ratio"]
            if {"flex", "longnet"} <= ms.keys():
                row["speedup_vs_flex"] = ms["flex"] / ms["longnet"]
            rows.append(row)
            print(f"N={n} {mode}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items()), flush=True)
    header = (f"{'N':>6} {'mode':>6} {'dense ms':>10} {'longnet ms':>11} {'flex ms':>10} {'vs dense':>9} "
              f"{'FLOP ratio':>10} {'/ ratio':>8} {'vs flex':>8} {'flex err':>9}")
    print("\n" + header)

    def cell(v, spec):
        return format(v, spec) if v is not None else "-"

    for r in rows:
        print(f"{r['n']:>6} {r['mode']:>6} {cell(r['ms'].get('dense'), '10.0f')} "
              f"{cell(r['ms'].get('longnet'), '11.0f')} {cell(r['ms'].get('flex'), '10.0f')} "
              f"{cell(r.get('speedup_vs_dense'), '9.2f')} {cell(r['flop_ratio'], '10.2f')} "
              f"{cell(r.get('speedup_over_flop_ratio'), '8.2f')} {cell(r.get('speedup_vs_flex'), '8.1f')} "
              f"{cell(r['flex_max_abs_err'], '9.1e')}")
    print(f"torchscale: {TORCHSCALE}")
    doc = {"what": f"{'bidirectional' if args.full else 'causal'} dilated attention (paper pattern) beside dense "
                   "SDPA and FlexAttention computing the same function; each case in its own processes, alternating "
                   "rounds (longnet.bench.isolated)", "causal": not args.full,
           "device": str(device), "device_name": device_name(device), "heads": args.heads,
           "head_dim": args.head_dim, "threads": args.threads, "torch_threads_default": torch.get_num_threads(),
           "torch": torch.__version__, "torchscale": TORCHSCALE, "rows": rows}
    atomic_write_json(out / f"{stem}.json", doc, indent=1)
    plot(doc, out / f"{stem}.png")
    print_json_line({"results": str(out / f"{stem}.json"),
                     "speedup_over_flop_ratio": {f"{r['n']}_{r['mode']}": round(r["speedup_over_flop_ratio"], 3)
                                                 for r in rows if "speedup_over_flop_ratio" in r},
                     "speedup_vs_flex": {str(r["n"]): round(r["speedup_vs_flex"], 1) for r in rows
                                         if "speedup_vs_flex" in r}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
