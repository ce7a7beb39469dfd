"""Training throughput of LongNetLM presets: eager against ``torch.compile``, in one run.

One training step is forward + backward + ``AdamW.step`` on a random batch of ``--batch-size``
sequences of ``--seq-len`` tokens (bf16 autocast on CUDA by default, float32 on CPU). For each
preset two copies of the same model (same initial weights, each with its own AdamW) are built:
one run eagerly and one wrapped in ``torch.compile(model)`` (inductor unless
``--compile-backend`` says otherwise).

The compiled copy's first step compiles the forward and the backward graphs; its wall time is
reported as ``first_step_s``, and ``compile_s`` = first step minus the steady compiled step.
Then both copies get ``--warmup`` untimed steps, and the ``--steps`` timed steps alternate
(eager, compiled, eager, compiled, ...; :func:`longnet.bench.measure.measure_interleaved`), so a
drift in the machine's speed hits both alike and the ratio compiled / eager stays fair. Figures
are medians of the timed steps: CUDA events on GPU; wall time and process CPU time on CPU (with
one thread on a shared machine the CPU time is the steadier figure).

MFU = ``model.flops_per_token(seq_len)`` x tokens/s / peak. The peak is ``--peak-tflops``; on
CUDA with bf16 it defaults to the dense bf16 peak of the device when its name is known (H100 /
H200), otherwise the flag is required there. On CPU MFU is printed only with ``--peak-tflops``.

Prints a table, writes ``train_speed_<device>.json`` (rewritten after each preset, so a run
that crashes keeps what it measured) and a PNG bar chart under ``--out``, and ends with one
JSON line. Run: ``PYTHONPATH=src python benchmarks/train_speed.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from longnet.bench.results import add_overwrite_option, claim_results
from longnet.cli.options import non_negative_int, positive_float, positive_int

RESULTS = Path(__file__).resolve().parent / "results"

# dense (not sparse) bf16 tensor-core peaks in TFLOP/s, most specific name first
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
)

MODES = ("eager", "compiled")


def _presets(text: str) -> tuple[str, ...]:
    from longnet.models import PRESETS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated preset names")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    return names


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(f"--tag must be letters, digits, '.', '_' or '-', got {text!r}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--presets", type=_presets, default=("tiny", "small"),
                   help="comma-separated LongNetConfig presets (default: tiny,small)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step (default: 1)")
    p.add_argument("--steps", type=positive_int, default=5,
                   help="timed steps per mode (median reported; default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=2,
                   help="untimed steps per mode after the compiled copy's first step (default: 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16 = bf16 autocast with float32 weights (default: bfloat16 on CUDA, "
                        "float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure torch.compile(model) (default: yes)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; aot_eager for a fast smoke run)")
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="peak TFLOP/s for MFU (default on CUDA bf16: the device's dense bf16 peak "
                        "when known, H100/H200; required on other CUDA devices)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: benchmarks/results)")
    p.add_argument("--tag", type=_tag, default=None,
                   help="appended to the file names: train_speed_<device>_<tag>.json (e.g. 8k)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_overwrite_option(p)
    return p.parse_args(argv)


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None) -> tuple[float | None, str]:
    """The peak for MFU and where it came from; ``ValueError`` when CUDA needs ``--peak-tflops``."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "not given (pass --peak-tflops for MFU on CPU)"
    from longnet.bench.report import device_name

    name = device_name(device)
    if dtype == torch.bfloat16:
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name.upper():
                return tflops, f"dense bf16 peak of {key}"
    raise ValueError(f"no known {str(dtype).removeprefix('torch.')} peak for {name!r}: pass "
                     f"--peak-tflops (the device's dense peak in TFLOP/s)")


def _resolve(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return device, dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_fn(model, opt, ids, labels, device: torch.device, dtype: torch.dtype):
    """One training step: forward, backward, AdamW step."""
    autocast = dtype != torch.float32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
    return step


def _error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"error: {type(err).__name__}: {first[:300]}"


def _rate(tokens: int, seconds: float | None) -> float | None:
    return None if not seconds else tokens / seconds


def bench_preset(name: str, args, device, dtype, peak: float | None, progress) -> dict:
    """Measure one preset; a failing mode is recorded (``status``) and the other still runs."""
    from longnet import LongNetConfig, LongNetLM
    from longnet.bench.measure import measure_interleaved

    torch.manual_seed(args.seed)
    config = LongNetConfig.from_preset(name)
    eager = LongNetLM(config).to(device).train()
    flops_per_token = eager.flops_per_token(args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    n_tokens = args.batch_size * args.seq_len
    rec = {"preset": name, "parameters": eager.num_parameters(), "flops_per_token": flops_per_token,
           "tokens_per_step": n_tokens, "modes": {}}

    copies = {"eager": eager}
    if args.compile:
        copies["compiled"] = copy.deepcopy(eager)
    steps, status = {}, {}
    for mode, model in copies.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        status[mode] = "ok"
        try:
            runner = model if mode == "eager" else torch.compile(model, backend=args.compile_backend)
        except Exception as err:  # noqa: BLE001 - e.g. an unknown backend: keep the eager figures
            status[mode] = _error(err)
            print(f"{name}: torch.compile failed: {status[mode]}", file=sys.stderr)
            runner = model
        steps[mode] = _step_fn(runner, opt, ids, labels, device, dtype)

    if status.get("compiled") == "ok":  # first step: compile forward and backward
        progress(f"{name}: compiling ({args.compile_backend})")
        try:
            _sync(device)
            t0 = time.perf_counter()
            steps["compiled"]()
            _sync(device)
            rec["first_step_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - a failed compile must not lose the eager figures
            status["compiled"] = _error(err)
            rec["compiled_traceback"] = traceback.format_exc()[-4000:]
            print(f"{name}: compiled step failed: {status['compiled']}", file=sys.stderr)
            _free(device)

    fns = []
    running = [m for m in steps if status[m] == "ok"]
    for mode in running:
        def guarded(fn=steps[mode], mode=mode):
            if status[mode] != "ok":
                return
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - e.g. out of memory in one mode
                status[mode] = _error(err)
                print(f"{name}: {mode} step failed: {status[mode]}", file=sys.stderr)
                _free(device)
        fns.append(progress.counting(guarded))
    progress(f"{name}: {args.warmup} warmup + {args.steps} timed steps x {len(running)} modes",
             total=len(running) * (args.warmup + args.steps))
    ms = measure_interleaved(fns, device=device, repeats=args.steps, warmups=[args.warmup] * len(fns))
    for mode, m in zip(running, ms):
        if status[mode] != "ok":
            continue
        cpu = m.cpu_median_s
        tps = _rate(n_tokens, m.median_s)
        rec["modes"][mode] = {
            "status": "ok", "median_s": m.median_s, "min_s": m.min_s,
            "times_s": [round(t, 5) for t in m.times_s],
            "cpu_median_s": cpu, "cpu_times_s": [round(t, 5) for t in m.cpu_times_s] or None,
            "tokens_per_s": tps, "cpu_tokens_per_s": _rate(n_tokens, cpu),
            "achieved_tflops": flops_per_token * tps / 1e12,
            "mfu": None if peak is None else flops_per_token * tps / (peak * 1e12),
            "peak_mb": None if m.peak_bytes is None else round(m.peak_bytes / 2**20, 1),
        }
    for mode in steps:
        if status[mode] != "ok":
            rec["modes"][mode] = {"status": status[mode]}
    e, c = rec["modes"].get("eager", {}), rec["modes"].get("compiled", {})
    if e.get("status") == "ok" and c.get("status") == "ok":
        rec["compiled_over_eager"] = c["tokens_per_s"] / e["tokens_per_s"]
        if e["cpu_tokens_per_s"] and c["cpu_tokens_per_s"]:
            rec["compiled_over_eager_cpu_time"] = c["cpu_tokens_per_s"] / e["cpu_tokens_per_s"]
        if "first_step_s" in rec:
            rec["compile_s"] = max(rec["first_step_s"] - c["median_s"], 0.0)
    del copies, steps, fns
    _free(device)
    return rec


class _Progress:
    """A line per phase and a tqdm bar over the steps of a phase (stderr)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, text: str, total: int | None = None) -> None:
        self.close()
        if not self.enabled:
            return
        if total is None:
            print(text, file=sys.stderr, flush=True)
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=text, unit="step", file=sys.stderr)

    def counting(self, fn):
        def run():
            fn()
            if self.bar is not None:
                self.bar.update(1)
        return run

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(records: list[dict], on_cpu: bool) -> str:
    head = ["preset", "params", "mode", "step s", "tokens/s"]
    if on_cpu:
        head += ["cpu step s", "cpu tokens/s"]
    head += ["TFLOP/s", "MFU", "compiled/eager", "compile s", "status"]
    cells = [head]
    for r in records:
        for mode in MODES:
            m = r["modes"].get(mode)
            if m is None:
                continue
            ok = m.get("status") == "ok"
            line = [r["preset"], f"{r['parameters'] / 1e6:.1f}M", mode,
                    _fmt(m.get("median_s"), ".3f"), _fmt(m.get("tokens_per_s"), ",.0f")]
            if on_cpu:
                line += [_fmt(m.get("cpu_median_s"), ".3f"), _fmt(m.get("cpu_tokens_per_s"), ",.0f")]
            ratio = r.get("compiled_over_eager") if mode == "compiled" else None
            line += [_fmt(m.get("achieved_tflops"), ".3f"),
                     "-" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%",
                     _fmt(ratio, ".2f"), _fmt(r.get("compile_s") if mode == "compiled" else None, ".1f"),
                     "ok" if ok else m["status"][:60]]
            cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def plot(doc: dict, path: Path) -> None:
    """Bar chart: tokens/s per preset, eager vs compiled (and CPU-time tokens/s on CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["results"]
    keys = [("tokens_per_s", "wall time")]
    if doc["device"]["type"] == "cpu":
        keys.append(("cpu_tokens_per_s", "process CPU time"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    width = 0.38
    for ax, (key, what) in zip(axes[0], keys):
        for i, mode in enumerate(MODES):
            xs, ys = [], []
            for j, r in enumerate(records):
                v = r["modes"].get(mode, {}).get(key)
                if v:
                    xs.append(j + (i - 0.5) * width)
                    ys.append(v)
            bars = ax.bar(xs, ys, width, label=mode, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(records)), [r["preset"] for r in records])
        ax.set_ylabel("training tokens / s")
        ax.set_title(f"tokens/s from {what}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    cfg = doc["config"]
    threads = doc["device"].get("torch_threads")
    fig.suptitle(f"LongNetLM training step (fwd+bwd+AdamW), {doc['device']['name']}"
                 f"{f', {threads} thread(s)' if threads else ''}\nseq {cfg['seq_len']} x batch "
                 f"{cfg['batch_size']}, {cfg['dtype']}, compile backend {cfg['compile_backend']}, "
                 f"torch {doc['torch_version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _summary(doc: dict) -> dict:
    out = {"benchmark": "train_speed", "device": doc["device"]["name"], "complete": doc["complete"],
           "seq_len": doc["config"]["seq_len"], "batch_size": doc["config"]["batch_size"],
           "dtype": doc["config"]["dtype"], "presets": {}}
    for r in doc["results"]:
        out["presets"][r["preset"]] = {
            **{f"{mode}_tokens_per_s": r["modes"].get(mode, {}).get("tokens_per_s") for mode in MODES},
            **{f"{mode}_mfu": r["modes"].get(mode, {}).get("mfu") for mode in MODES},
            "compiled_over_eager": r.get("compiled_over_eager"),
            "compiled_over_eager_cpu_time": r.get("compiled_over_eager_cpu_time"),
            "compile_s": r.get("compile_s"),
            "status": {mode: m.get("status") for mode, m in r["modes"].items()},
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from longnet import __version__
    from longnet.bench.report import device_name, device_slug
    from longnet.cli.bench import _git_commit

    try:
        device, dtype = _resolve(args)
        peak, peak_source = peak_tflops(device, dtype, args.peak_tflops)
    except ValueError as err:
        print(f"train_speed: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stem = f"train_speed_{device_slug(device)}" + (f"_{args.tag}" if args.tag else "")
    try:
        claim_results(args.out, stem, overwrite=args.overwrite)
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        print(f"train_speed: error: {err}", file=sys.stderr)
        return 2
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    doc = {
        "benchmark": "train_speed", "complete": False, "note": None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device),
                   "torch_threads": torch.get_num_threads() if device.type == "cpu" else None},
        "torch_version": torch.__version__, "longnet_version": __version__, "git_commit": _git_commit(),
        "config": {"presets": list(args.presets), "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "steps": args.steps, "warmup": args.warmup, "dtype": str(dtype).removeprefix("torch."),
                   "autocast": dtype != torch.float32, "compile": args.compile,
                   "compile_backend": args.compile_backend if args.compile else None, "seed": args.seed,
                   "optimizer": "AdamW(lr=1e-4)"},
        "peak_tflops": peak, "peak_source": peak_source,
        "timing_method": "median of the timed steps after the warmup steps, eager and compiled steps "
                         "alternating; CUDA events after a synchronize on GPU, time.perf_counter and "
                         "time.process_time on CPU",
        "flops_method": "LongNetLM.flops_per_token(seq_len): 6 x matmul weights + the attention "
                        "matmuls of the pattern (fwd+bwd = 3.5 x fwd) per token",
        "compile_method": "first_step_s: wall time of the compiled copy's first step (compiles forward "
                          "and backward); compile_s = first_step_s - median compiled step",
        "results": [],
    }
    print(f"train_speed: presets {list(args.presets)}, seq {args.seq_len} x batch {args.batch_size}, "
          f"{doc['config']['dtype']}, {device} ({doc['device']['name']}), {torch.get_num_threads()} "
          f"thread(s), {args.warmup} warmup + {args.steps} timed steps", file=sys.stderr)
    progress = _Progress(not args.no_progress)
    try:
        for name in args.presets:
            doc["results"].append(bench_preset(name, args, device, dtype, peak, progress))
            progress.close()
            _write(json_path, doc)
        doc["complete"] = True
    except KeyboardInterrupt:
        progress.close()
        doc["note"] = f"interrupted after {len(doc['results'])} of {len(args.presets)} presets"
        print(f"\n{doc['note']}", file=sys.stderr)
    doc["files"] = {"json": str(json_path), "png": None}
    if not args.no_plot and doc["results"]:
        try:
            plot(doc, png_path)
            doc["files"]["png"] = str(png_path)
        except ImportError as err:
            doc["plot_note"] = f"skipped: matplotlib is not installed ({err})"
    _write(json_path, doc)
    print(format_table(doc["results"], device.type == "cpu"))
    if peak is None:
        print(f"MFU: {peak_source}")
    print(f"wrote {json_path}" + (f" and {png_path}" if doc["files"]["png"] else ""))
    print(json.dumps(_summary(doc), separators=(",", ":")))
    if not doc["complete"]:
        return 130
    failed = any(m.get("status") != "ok" for r in doc["results"] for m in r["modes"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
