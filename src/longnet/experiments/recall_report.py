"""Tables, Markdown and the plot of ``longnet experiment recall`` (from its results document)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longnet.utils.atomic import save_figure


def _bucket_name(bucket: dict[str, Any]) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(bucket['lo'])}-{short(bucket['hi'])}"


def _cell(bucket: dict[str, Any]) -> str:
    if bucket["accuracy"] is None:
        return "-"
    lo, hi = bucket["interval"]
    return f"{bucket['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"


def _rows_for(doc: dict[str, Any], length: int) -> tuple[list[str], list[list[str]]]:
    buckets = doc["rows"][0]["accuracy"][str(length)]
    header = [_bucket_name(b) for b in buckets]
    body = []
    for row in doc["rows"]:
        cells = [_cell(b) for b in row["accuracy"][str(length)]]
        body.append([row["label"], f"{row['parameters'] / 1e6:.2f}M", f"{row['attention_flops_per_token'] / 1e6:.2f}M",
                     f"{row['train_flops']:.2e}",
                     f"{row['train_wall_s'] / 60:.1f} min ({row['train_cpu_s'] / 60:.1f} CPU-min)"] + cells)
    return header, body


def format_table(doc: dict[str, Any]) -> str:
    """Plain-text tables: accuracy [95% Wilson interval] per distance bucket, at each eval length."""
    out = []
    for length in doc["eval_lengths"]:
        header, body = _rows_for(doc, length)
        cols = ["model", "params", "attn FLOP/tok", "train FLOPs", "train time"] + header
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
        out.append(f"accuracy by query distance, evaluated at {length:,} tokens (chance {doc['chance']:.3f}):")
        out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body)
        out.append("")
    return "\n".join(out).rstrip()


def markdown_table(doc: dict[str, Any]) -> str:
    """The same tables in Markdown, with the plan in one line above them."""
    plan = doc["plan"]
    lines = [f"Multi-query associative recall: {plan['num_layers']} layers x {plan['embed_dim']}, "
             f"{plan['num_heads']} heads; {plan['short_steps']} steps at {plan['short_length']:,} + "
             f"{plan['long_steps']} at {plan['train_length']:,} tokens, {plan['tokens_per_step']:,} tokens per step, "
             f"lr {plan['lr']}; {plan['num_values']} values (chance {doc['chance']:.3f}); {doc['device']}.", ""]
    for length in doc["eval_lengths"]:
        header, body = _rows_for(doc, length)
        lines.append(f"Accuracy [95% Wilson interval] by query distance, evaluated at {length:,} tokens:")
        lines.append("")
        lines.append("| model | params | attention FLOPs / token | training FLOPs | training time (process CPU) | "
                     + " | ".join(header) + " |")
        lines.append("|---" * (5 + len(header)) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in body)
        lines.append("")
    return "\n".join(lines).rstrip()


def summary_line(doc: dict[str, Any]) -> dict[str, Any]:
    """The last printed line: per row, accuracy per bucket at the longest evaluation length."""
    longest = str(doc["eval_lengths"][-1])
    return {"experiment": "recall", "chance": doc["chance"], "eval_length": int(longest),
            "rows": [{"key": r["key"], "train_wall_s": r["train_wall_s"],
                      "attention_flops_per_token": r["attention_flops_per_token"],
                      "accuracy": {_bucket_name(b): b["accuracy"] for b in r["accuracy"][longest]}}
                     for r in doc["rows"]]}


def plot_recall(doc: dict[str, Any], path: Path) -> None:
    """Accuracy against query distance (one line per row, Wilson intervals as bands) at each
    evaluation length, and the training curves. Raises ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = doc["eval_lengths"]
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(6 * (len(lengths) + 1), 4.6))
    for ax, length in zip(axes, lengths):
        for i, row in enumerate(doc["rows"]):
            buckets = [b for b in row["accuracy"][str(length)] if b["accuracy"] is not None]
            mid = [(b["lo"] * b["hi"]) ** 0.5 for b in buckets]
            ax.plot(mid, [b["accuracy"] for b in buckets], marker="o", color=f"C{i}", label=row["label"])
            ax.fill_between(mid, [b["interval"][0] for b in buckets], [b["interval"][1] for b in buckets],
                            color=f"C{i}", alpha=0.15)
        ax.axhline(doc["chance"], color="gray", ls="--", lw=0.8, label="chance")
        ax.axvline(doc["plan"]["train_length"], color="gray", ls=":", lw=0.8)
        ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="query-to-pair distance (tokens)", ylabel="accuracy",
               title=f"evaluated at {length:,} tokens")
        edges = [e for e in doc["buckets"] if e <= length]
        ax.set_xticks(edges, [f"{e // 1024}K" if e >= 1024 else str(e) for e in edges])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for i, row in enumerate(doc["rows"]):
        curve = row["curve"]
        window = 10
        smooth = [sum(c["accuracy"] for c in curve[max(0, j - window + 1): j + 1]) / min(window, j + 1)
                  for j in range(len(curve))]
        axes[-1].plot([c["step"] for c in curve], smooth, color=f"C{i}", label=row["label"])
    axes[-1].axvline(doc["plan"]["short_steps"], color="gray", ls=":", lw=0.8)
    axes[-1].set(xlabel="step (dotted: start of the long phase)", ylabel="training accuracy on answers (mean of 10)",
                 title="training")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    plan = doc["plan"]
    fig.suptitle(f"Associative recall at distance: {plan['num_layers']} layers x {plan['embed_dim']}, trained at "
                 f"{plan['train_length']:,}; {doc['device']}", fontsize=10)
    save_figure(fig, path, dpi=100)
