"""Prov-GigaPath slide encoder on CPU: longnet vs GigaPath's own code, 10K and 50K tiles.

Both run the released architecture (12 layers, 768 wide, float32) with the same random weights
(GigaPath's initialisation, saved in its slide_encoder.pth format; the released weights are not
downloadable here). GigaPath's code runs from the prov-gigapath snapshot in
/work/shared/reference with flash_attn_func replaced by PyTorch's fused exact CPU attention (the
kernel longnet's cpu_flash backend also calls), so the comparison is of everything around it.

Each measurement runs in its own process: one forward pass, wall time and peak RSS (VmHWM) of the
process, and the forward's share above the loaded model. With ``--rounds R`` each tile count runs R
rounds of both codes, alternating which goes first, and a row gives the median seconds over its
rounds (every round's figure is kept in ``seconds_per_round``). GigaPath's model is built with only the
rows of its position table the coordinates use (the released code allocates all 1,000,001 x 768
rows, 3.07 GB in float32, plus numpy temporaries at start-up; that figure is computed, not
measured, to keep the run inside this machine's memory).

Also measured at the smallest N: longnet under CPU autocast (bfloat16) and the paper's attention
(compat=None) on the same weights, both as the deviation from longnet float32 torchscale.

Run:  PYTHONPATH=src python benchmarks/gigapath_slide.py  (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longnet.bench.results import add_overwrite_option, claim_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gigapath"))
TABLE_BYTES = 1_000_001 * 768 * 4
X_CELLS = 50  # tiles on a 50 x 1000 cell grid: x < 12,800 px, y up to 255,999 px


def fused_exact_attention(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """flash_attn_func's contract on PyTorch's fused exact CPU kernel: (b, l, h, d) in and out."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal,
                  scale=softmax_scale)
    return out.transpose(1, 2), lse


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, n, 1536, generator=g)
    cell = torch.randperm(X_CELLS * 1000, generator=g)[:n] if n <= X_CELLS * 1000 else \
        torch.randint(0, X_CELLS * 1000, (n,), generator=g)
    xy = torch.stack([cell // 1000, cell % 1000], -1).float() * 256 + torch.rand(n, 2, generator=g) * 255
    return feats, xy[None]


def _gigapath(root: Path):
    import ref_snapshots

    gp = ref_snapshots.load_gigapath(root)
    gp.attention.flash_attn_func = fused_exact_attention
    return gp


def _build_reference(gp, rows: int, seed: int = 0):
    from functools import partial

    from gigapath_helpers import reference_table

    torch.manual_seed(seed)
    model = gp.LongNetViT(in_chans=1536, embed_dim=768, depth=12, mlp_ratio=4,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), slide_ngrids=1)
    model.slide_ngrids = 1000
    model.pos_embed = reference_table(gp, rows)
    return model.eval()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():  # VmRSS, VmHWM (peak)
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(impl: str, n: int, mode: str, tmp: Path) -> dict:
    """One forward in this process; prints a JSON result."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    feats, coords = inputs(n)
    if impl == "gigapath":
        gp = _gigapath(tmp / "ref" / "prov-gigapath-09d8e87")
        model = _build_reference(gp, X_CELLS * 1000 + 1)
        model.load_state_dict(torch.load(tmp / "slide_encoder.pth", weights_only=True)["model"])
        run = lambda: model(feats, coords)[0]  # noqa: E731
    else:
        from longnet.gigapath import load_slide_encoder

        model = load_slide_encoder(tmp / "slide_encoder.pth", compat=None if mode == "paper" else "torchscale")
        run = lambda: model(feats, coords)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the forward alone
    before = _rss("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run()
        else:
            out = run()
    seconds = time.perf_counter() - start
    torch.save(out.float(), tmp / f"out-{impl}-{n}-{mode}.pt")
    return {"impl": impl, "tiles": n, "mode": mode, "seconds": seconds, "peak_rss": _rss("VmHWM"),
            "forward_peak": _rss("VmHWM") - before, "finite": bool(torch.isfinite(out).all())}


def _spawn(impl, n, mode, tmp) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(n), mode, str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if res.returncode != 0:
        return {"impl": impl, "tiles": n, "mode": mode, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median_run(rounds: list[dict]) -> dict:
    """One row from the rounds of one code at one tile count: the median round's figures (by seconds),
    with every round's seconds; the first error if any round failed."""
    errors = [r for r in rounds if "error" in r]
    if errors:
        return errors[0]
    ranked = sorted(rounds, key=lambda r: r["seconds"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    if len(rounds) > 1:
        row["seconds"] = statistics.median(r["seconds"] for r in rounds)
        row["seconds_per_round"] = [r["seconds"] for r in rounds]
    return row


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of both codes per tile count, alternating which goes first (default: 1)")
    parser.add_argument("--tag", default="", help="appended to the results' file name (default: none)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    add_overwrite_option(parser)
    args = parser.parse_args()
    if args.worker:
        impl, n, mode, tmp = args.worker
        print(json.dumps(worker(impl, int(n), mode, Path(tmp))))
        return
    device = "cpu-" + "-".join(_cpu_name().lower().split()[:2])
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    out = ROOT / "benchmarks" / "results" / f"gigapath-{device}{'_' + args.tag if args.tag else ''}.json"
    try:
        claim_results(out.parent, out.stem, overwrite=args.overwrite)
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        raise SystemExit(f"gigapath_slide: error: {err}") from None
    os.environ["BENCH_THREADS"] = str(args.threads)
    import ref_snapshots

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ref_snapshots.unpack(tmp / "ref")
        gp = _gigapath(tmp / "ref" / "prov-gigapath-09d8e87")
        torch.save({"model": _build_reference(gp, 2).state_dict()}, tmp / "slide_encoder.pth")
        runs = []
        for n in args.tiles:
            per_impl = {"longnet": [], "gigapath": []}
            for rnd in range(args.rounds):
                for impl in (("longnet", "gigapath") if rnd % 2 == 0 else ("gigapath", "longnet")):
                    per_impl[impl].append(_spawn(impl, n, "float32", tmp))
                    print(json.dumps(per_impl[impl][-1]), file=sys.stderr, flush=True)
            runs += [_median_run(per_impl[impl]) for impl in ("longnet", "gigapath")]
        n0 = min(args.tiles)
        for mode in ("bf16", "paper"):
            runs.append(_spawn("longnet", n0, mode, tmp))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        base = {n: tmp / f"out-longnet-{n}-float32.pt" for n in args.tiles}
        for r in runs:
            f = tmp / f"out-{r['impl']}-{r['tiles']}-{r['mode']}.pt"
            if "error" not in r and f.is_file() and base[r["tiles"]].is_file() and f != base[r["tiles"]]:
                a, b = torch.load(f), torch.load(base[r["tiles"]])
                r["max_abs_diff_vs_longnet_fp32"] = float((a - b).abs().max())
                r["cosine_vs_longnet_fp32"] = float(torch.nn.functional.cosine_similarity(a, b).min())
    print(f"Prov-GigaPath slide encoder (12 layers, 768 wide), one forward, {_cpu_name()}, {args.threads} threads"
          + (f", median of {args.rounds} alternated rounds" if args.rounds > 1 else ""))
    print(f"{'tiles':>7}  {'code':>9}  {'mode':>8}  {'seconds':>8}  {'peak RSS GB':>11}  {'forward GB':>10}  "
          f"{'vs longnet fp32':>22}")
    for r in runs:
        if "error" in r:
            print(f"{r['tiles']:>7}  {r['impl']:>9}  {r['mode']:>8}  error: {r['error']}")
            continue
        diff = (f"max|d| {r['max_abs_diff_vs_longnet_fp32']:.1e} cos {r['cosine_vs_longnet_fp32']:.6f}"
                if "max_abs_diff_vs_longnet_fp32" in r else "")
        print(f"{r['tiles']:>7}  {r['impl']:>9}  {r['mode']:>8}  {r['seconds']:>8.1f}  {r['peak_rss'] / 1e9:>11.2f}  "
              f"{r['forward_peak'] / 1e9:>10.2f}  {diff:>22}")
    print(f"GigaPath also allocates its position table at start-up: {TABLE_BYTES / 1e9:.2f} GB (not included above)")
    result = {"benchmark": "gigapath_slide", "device": device, "cpu": _cpu_name(), "threads": args.threads,
              "rounds": args.rounds,
              "torch": torch.__version__, "runs": runs, "gigapath_position_table_bytes": TABLE_BYTES}
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs, out.with_suffix(".png"))
    print(json.dumps(result))


def _plot(runs, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in runs if r["mode"] == "float32" and "error" not in r]
    tiles = sorted({r["tiles"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "seconds", "forward time (s)"), (axes[1], "peak_rss", "peak RSS (GB)")):
        for k, impl in enumerate(("longnet", "gigapath")):
            vals = [next((r[key] for r in rows if r["impl"] == impl and r["tiles"] == t), 0) for t in tiles]
            vals = [v / 1e9 for v in vals] if key == "peak_rss" else vals
            ax.bar([i + 0.4 * k for i in range(len(tiles))], vals, width=0.4, label=impl)
        ax.set_xticks([i + 0.2 for i in range(len(tiles))], [f"{t:,} tiles" for t in tiles])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("Prov-GigaPath slide encoder on CPU, float32 (GigaPath's table not included)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
