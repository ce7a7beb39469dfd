"""The paper's Figure 5 in miniature: the forward time of one attention call against sequence length.

Setup (the paper's runtime comparison, at the size of one machine):

- Tokens per call are held constant: ``batch = tokens // N``, so a linear-cost attention shows a
  flat curve and a quadratic one a curve that doubles with every doubling of ``N``.
- Dilated attention runs the paper's runtime pattern: segment lengths ``w = base, 2 base, 4 base,
  ... N`` with dilation rates ``r = 1, 2, 4, ...`` growing with them, so every branch reads
  ``base`` keys per kept query and the pattern reaches the whole sequence; it is timed up to
  ``max_length``.
- Dense attention is ``F.scaled_dot_product_attention`` over the whole sequence; it is timed from
  the shortest length until one call takes longer than ``dense_limit_s``.
- Both causal, float32 on CPU (bfloat16 on CUDA), ``heads`` heads of ``head_dim``.
- On CPU the figure is the process CPU time of the call (all threads), which a busy machine
  inflates far less than wall time; the wall time is recorded too. On CUDA, CUDA-event time.
  One untimed warm-up call at the shortest length precedes each method.

The growth exponent ``b`` of ``time ~ N^b`` is fitted by least squares on the log-log points of
each method: about 0 for linear cost at constant tokens, about 1 for quadratic cost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RuntimePlan:
    """The lengths, sizes and limits of one run."""

    tokens: int = 1 << 22
    """Tokens per call (``batch * N``), held constant."""
    min_length: int = 2048
    """Shortest ``N`` of both methods (at ``N = base`` dilated attention is one dense block)."""
    max_length: int = 1 << 22
    """Longest ``N`` of dilated attention (the lengths are powers of two from ``min_length``)."""
    base: int = 2048
    """Keys per kept query in each branch: segments ``base * 2^i``, rates ``2^i``."""
    heads: int = 1
    head_dim: int = 64
    dense_limit_s: float = 60.0
    """Dense attention stops after the first call that takes longer than this."""
    repeats: int = 1

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RuntimePlan":
        """``"default"`` (2^22 tokens, 2K ... 4M) or ``"quick"`` (2^15 tokens, 1K ... 32K, seconds)."""
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "quick": dict(tokens=1 << 15, min_length=1024, max_length=1 << 15, base=256, head_dim=32,
                          dense_limit_s=0.5),
        }
        from longnet.experiments.presets import from_preset

        return from_preset(cls, presets, name, overrides)

    def __post_init__(self) -> None:
        for name in ("tokens", "min_length", "max_length", "base", "heads", "head_dim", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("tokens", "min_length", "max_length", "base"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if not self.base <= self.min_length <= self.max_length <= self.tokens:
            raise ValueError(f"need base <= min_length <= max_length <= tokens, got {self.base}, "
                             f"{self.min_length}, {self.max_length}, {self.tokens}")
        if not self.dense_limit_s > 0:
            raise ValueError(f"dense_limit_s must be positive, got {self.dense_limit_s}")

    @property
    def lengths(self) -> list[int]:
        out, n = [], self.min_length
        while n <= self.max_length:
            out.append(n)
            n *= 2
        return out

    def pattern(self, length: int) -> tuple[list[int], list[int]]:
        """``(segment_lengths, dilation_rates)`` at ``length``: ``base * 2^i`` and ``2^i`` up to ``length``."""
        segments, rates, w, r = [], [], self.base, 1
        while w <= length:
            segments.append(w)
            rates.append(r)
            w, r = 2 * w, 2 * r
        return segments, rates


def fit_exponent(lengths: list[int], times: list[float]) -> float | None:
    """Least-squares slope of ``log(time)`` against ``log(length)``; None with fewer than 2 points."""
    if len(lengths) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(lengths, dtype=float)), np.log(np.asarray(times, dtype=float)), 1)
    return float(slope)


def _inputs(plan: RuntimePlan, length: int, device: torch.device, dtype: torch.dtype):
    shape = (plan.tokens // length, plan.heads, length, plan.head_dim)
    gen = torch.Generator(device="cpu").manual_seed(length)
    return [torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(3)]


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    from longnet.bench.measure import measure

    m = measure(fn, device=device, repeats=repeats, warmup=0)
    out = {"wall_s": m.median_s}
    if m.cpu_median_s is not None:
        out["cpu_s"] = m.cpu_median_s
    return out


def run_runtime(plan: RuntimePlan, device: torch.device, *, log: Callable[[str], None] = print,
                progress: bool | None = None) -> dict[str, Any]:
    """Time every point of ``plan``; return the results document (points and fitted exponents)."""
    from tqdm import tqdm

    from longnet import dilated_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    metric = "cpu_s" if device.type == "cpu" else "wall_s"

    def dilated(q, k, v, length):
        segments, rates = plan.pattern(length)
        return lambda: dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates, is_causal=True)

    def dense(q, k, v, length):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    points: list[dict[str, Any]] = []
    for method, make in (("dilated", dilated), ("dense", dense)):
        q, k, v = _inputs(plan, plan.min_length, device, dtype)
        make(q[:1], k[:1], v[:1], plan.min_length)()  # warm-up: kernels built, threads started
        del q, k, v
        bar = tqdm(plan.lengths, desc=method, unit="N", leave=False,
                   disable=None if progress is None else not progress)
        for length in bar:
            q, k, v = _inputs(plan, length, device, dtype)
            timing = _timed(make(q, k, v, length), device, plan.repeats)
            del q, k, v
            point = {"method": method, "length": length, "batch": plan.tokens // length, **timing}
            if method == "dilated":
                point["segment_lengths"], point["dilation_rates"] = plan.pattern(length)
            points.append(point)
            log(f"  {method:8s} N={length:>9,}  batch {plan.tokens // length:>5,}  {timing[metric]:8.2f} s "
                f"({'process CPU' if metric == 'cpu_s' else 'CUDA'} time)")
            if method == "dense" and timing[metric] > plan.dense_limit_s:
                log(f"  dense stops here: one call took more than {plan.dense_limit_s:g} s")
                break
        bar.close()
    fits = {}
    for method in ("dilated", "dense"):
        mine = [p for p in points if p["method"] == method]
        fits[method] = fit_exponent([p["length"] for p in mine], [p[metric] for p in mine])
    return {"experiment": "runtime", "plan": asdict(plan), "metric": metric, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "points": points, "exponents": fits}


def format_table(doc: dict[str, Any]) -> str:
    """One line per length: dilated and dense time (the metric of the run), and their ratio."""
    metric = doc["metric"]
    by = {(p["method"], p["length"]): p[metric] for p in doc["points"]}
    lengths = sorted({p["length"] for p in doc["points"]})
    lines = [f"forward time of one causal attention call, {doc['plan']['tokens']:,} tokens per call "
             f"({'process CPU time' if metric == 'cpu_s' else 'CUDA time'}, seconds)",
             f"{'N':>10}  {'batch':>6}  {'dilated':>9}  {'dense':>9}  {'dense / dilated':>15}"]
    for n in lengths:
        dil, den = by.get(("dilated", n)), by.get(("dense", n))
        ratio = f"{den / dil:.1f}x" if dil and den else "-"
        lines.append(f"{n:>10,}  {doc['plan']['tokens'] // n:>6,}  {dil if dil is not None else float('nan'):9.2f}  "
                     f"{'-' if den is None else f'{den:9.2f}':>9}  {ratio:>15}")
    fits = doc["exponents"]
    lines.append("growth exponent b of time ~ N^b: " + ", ".join(
        f"{m} {'-' if b is None else f'{b:.2f}'}" for m, b in fits.items()))
    return "\n".join(lines)


def summary_line(doc: dict[str, Any]) -> dict[str, Any]:
    """The last printed line: the fitted exponents and the time at each length."""
    metric = doc["metric"]
    return {"experiment": "runtime", "metric": metric, "tokens": doc["plan"]["tokens"],
            "exponents": {m: (None if b is None or math.isnan(b) else round(b, 3))
                          for m, b in doc["exponents"].items()},
            "seconds": {m: {str(p["length"]): round(p[metric], 3) for p in doc["points"] if p["method"] == m}
                        for m in ("dilated", "dense")}}


def plot_runtime(doc: dict[str, Any], path) -> None:
    """Log-log time against length, one line per method, with the fitted exponent in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longnet.utils.atomic import save_figure

    metric = doc["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, method in enumerate(("dilated", "dense")):
        mine = [p for p in doc["points"] if p["method"] == method]
        b = doc["exponents"][method]
        label = f"{method} attention" + ("" if b is None else f" (time ~ N^{b:.2f})")
        ax.plot([p["length"] for p in mine], [p[metric] for p in mine], marker="o", color=f"C{i}", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length N (tokens per call held constant)",
           ylabel=("process CPU time" if metric == "cpu_s" else "CUDA time") + " of one forward call (s)",
           title=f"runtime against length, {doc['plan']['tokens']:,} tokens per call; {doc.get('device', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    save_figure(fig, path, dpi=110)
