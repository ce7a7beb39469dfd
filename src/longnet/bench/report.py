"""Device names, the results table, the plots of the attention and decoding benchmarks."""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from longnet.utils.atomic import atomic_write_json, save_figure

__all__ = ["device_name", "device_slug", "format_rows", "format_table", "plot_attention", "plot_decode",
           "write_results"]


def device_name(device: torch.device) -> str:
    """A human name: the GPU's name, or the CPU model from ``/proc/cpuinfo``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fallback = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        return fallback
    return fallback


def device_slug(device: torch.device) -> str:
    """``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``: safe for file names."""
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "unknown"
    return f"{device.type}-{name}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


_COLUMNS = (  # header, key, format
    ("N", "n", "d"), ("causal", "causal", ""), ("mode", "mode", ""),
    ("dilated ms", "dilated_ms", ".1f"), ("dense ms", "dense_ms", ".1f"),
    ("speedup", "speedup", ".2f"), ("FLOP ratio", "flop_ratio", ".2f"),
    ("dil TFLOP/s", "dilated_tflops", ".3f"), ("dense TFLOP/s", "dense_tflops", ".3f"),
    ("dil MB", "dilated_mb", ".0f"), ("dense MB", "dense_mb", ".0f"),
)


def format_table(rows: list[dict]) -> str:
    """Right-aligned columns, one line per (N, causal, mode)."""
    cells = [[h for h, _, _ in _COLUMNS]]
    for row in rows:
        line = []
        for _, key, spec in _COLUMNS:
            v = row[key]
            line.append(("yes" if v else "no") if key == "causal" else _fmt(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, ".3g")
    return str(v)


def format_rows(rows: list[dict]) -> str:
    """Any list of flat dicts as a right-aligned table: one column per key (in order of first
    appearance), ``-`` for a missing or ``None`` value, ``yes``/``no`` for booleans."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [keys] + [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def plot_attention(doc: dict, path: Path) -> None:
    """Time and peak memory against N (log-log), dense vs dilated; fwd and fwd+bwd columns.

    Rows: wall time, process CPU time (CPU runs), peak extra memory. Raises ``ImportError``
    when matplotlib is missing (the caller reports it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc["cases"] if r.get("status") == "ok"]
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in records)] or ["fwd"]
    panels = [("median_ms", "wall time (median)", "ms")]
    if any(r.get("cpu_median_ms") is not None for r in records):
        panels.append(("cpu_median_ms", "process CPU time (median)", "ms"))
    panels.append(("peak_mb", "peak extra memory", "MiB"))
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(6.5 * len(modes), 3.6 * len(panels)),
                             squeeze=False)
    styles = {("dilated", True): ("C0", "-"), ("dilated", False): ("C0", "--"),
              ("dense", True): ("C3", "-"), ("dense", False): ("C3", "--")}
    for col, mode in enumerate(modes):
        title = {"fwd": "forward", "fwdbwd": "forward + backward"}[mode]
        for row, (key, what, unit) in enumerate(panels):
            ax = axes[row][col]
            for (impl, causal), (color, ls) in styles.items():
                pts = sorted((r["n"], r[key]) for r in records
                             if r["impl"] == impl and r["causal"] == causal and r["mode"] == mode
                             and r.get(key) is not None and r[key] > 0)
                if pts:
                    ax.plot(*zip(*pts), color=color, ls=ls, marker="o",
                            label=f"{impl} {'causal' if causal else 'non-causal'}")
            ax.set_title(f"{title}: {what}", fontsize=10)
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.grid(True, which="both", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    cfg = doc["config"]
    threads = doc["device"].get("torch_threads")
    fig.suptitle(f"dilated vs dense attention, {doc['device']['name']}"
                 f"{f', {threads} thread(s)' if threads else ''}\n{cfg['dtype']}, "
                 f"B={cfg['batch_size']} H={cfg['heads']} D={cfg['head_dim']}, "
                 f"torch {doc['torch_version']}", fontsize=10)
    save_figure(fig, path, dpi=100)


def plot_decode(results: dict, path: Path, series: list[tuple[str, str]], title: str) -> None:
    """Latency per token (wall, and process CPU time dashed where measured) and cache size against
    the context position, log-log, for the decoding benchmarks (``benchmarks/decode.py``,
    ``benchmarks/hf_decode.py``).

    ``results["rows"]`` holds one dict per position: ``position`` and, per series key, a dict with
    ``ms_per_token``, ``cache_bytes`` and optionally ``cpu_ms_per_token`` (or nothing when that
    series did not run there). ``series`` is ``[(key, label), ...]``; a vertical line marks
    ``results["largest_segment"]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in series:
        pts = [(r["position"], r[key]) for r in results["rows"] if r.get(key)]
        if not pts:
            continue
        x = [p for p, _ in pts]
        line, = a.plot(x, [m["ms_per_token"] for _, m in pts], "o-", label=f"{label}, wall")
        if all(m.get("cpu_ms_per_token") is not None for _, m in pts):
            a.plot(x, [m["cpu_ms_per_token"] for _, m in pts], "x--", color=line.get_color(),
                   label=f"{label}, CPU")
        b.plot(x, [m["cache_bytes"] / 2 ** 20 for _, m in pts], "o-", label=label)
    for ax, what, unit in ((a, "latency per token", "ms / token"), (b, "cache size", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context position (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(what)
        ax.axvline(results["largest_segment"], color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=120)


def write_results(out_dir: str | Path, stem: str, results: dict, plot: Callable[[dict, Path], None] | None = None
                  ) -> Path:
    """Write ``<out_dir>/<stem>.json`` (atomically) and, with ``plot``, ``<stem>.png``; say so on stderr."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    atomic_write_json(path, results, indent=2, sort_keys=False)
    if plot is not None:
        plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json" + (" and .png" if plot is not None else ""), file=sys.stderr)
    return path
