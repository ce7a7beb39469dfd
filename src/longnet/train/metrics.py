"""Training metrics: a JSONL file, optional TensorBoard, and a PNG of the loss curves.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "loss", "lr",
"grad_norm", "tokens", "tokens_per_s", "time"}`` after each optimizer step and ``{"kind": "eval",
"step", "val_loss", "val_perplexity", "tokens"}`` after each evaluation. TensorBoard event files
go to ``RUN/tensorboard`` when the ``tensorboard`` package is installed; otherwise nothing is
written there. ``loss.png`` needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from longnet.utils.atomic import atomic_write_text, save_figure

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl`` (and TensorBoard when installed).

    ``resume_step``: records of steps after it (written after the checkpoint a run resumes from)
    are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step) if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a flat dict with ``kind`` and ``step``)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(folder: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSONL file holds the same figures
        return None
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (crash while writing) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(run_dir: Path, title: str = "") -> Path | None:
    """Draw training (raw and smoothed) and validation loss against steps into ``RUN/loss.png``.

    Returns the PNG path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else []
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _ema(losses, 0.9), color="tab:blue", linewidth=1.6, label="train (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or run_dir.name)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    return save_figure(fig, run_dir / PLOT_FILE)


def _ema(values: tuple[float, ...], beta: float) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
