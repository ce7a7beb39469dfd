"""The table, the summary line and the plots of ``longnet experiment table2``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longnet.utils.atomic import save_figure


def _name(row: dict[str, Any]) -> str:
    return f"{row['model']} {row['train_length']}"


def format_table(doc: dict[str, Any]) -> str:
    """One line per model: size, budget, perplexity [95% interval] at each eval length, copy gains."""
    lengths = [str(n) for n in doc["eval"]["lengths"]]
    header = ["model", "params", "tokens", "train PFLOP", "train s"] + [f"ppl@{n}" for n in lengths]
    distances = [str(c["distance"]) for c in doc["rows"][0]["copy"]["by_distance"]] if doc["rows"] else []
    header += [f"copy@{d}" for d in distances]
    cells = [header]
    for row in doc["rows"]:
        line = [_name(row), f"{row['parameters'] / 1e6:.2f}M", f"{row['tokens']:,}", f"{row['train_flops'] / 1e15:.3f}",
                f"{row['train_wall_s']:.0f}"]
        for n in lengths:
            lo, hi = row["interval"][n]
            line.append(f"{row['perplexity'][n]:.2f} [{lo:.2f}, {hi:.2f}]")
        line += [f"{c['gain']:+.2f}" for c in row["copy"]["by_distance"]]
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    o = doc["orderings"]
    lines.append("")
    lines.append(f"perplexity [bootstrap 95% interval over {doc['eval']['bootstrap_block']}-token blocks of "
                 f"{doc['eval']['tokens']:,} {doc['eval']['split']} tokens]; copy@d: loss drop (nats) on a "
                 f"{doc['rows'][0]['copy']['span'] if doc['rows'] else 0}-token span seen d tokens earlier, "
                 "against the same span after other text")
    lines.append(f"the paper's orderings: {o['agree']}/{o['checked']} hold here ({o['agree_significant']} beyond "
                 f"the noise), {o['disagree_significant']} reversed beyond the noise")
    for c in o["comparisons"]:
        if not c["agrees"] and c["significant"]:
            lines.append(f"  reversed: {c['ordering']} (loss difference {c['loss_difference']:+.4f}, "
                         f"95% [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}])")
    return "\n".join(lines)


def markdown_table(doc: dict[str, Any]) -> str:
    """Our perplexities [95% interval] beside the paper's Table 2, as a Markdown table."""
    lengths = [str(n) for n in doc["eval"]["lengths"]]
    head = "| model | params | train tokens | train FLOPs | train time | " + " | ".join(
        f"ours @{int(n):,}" for n in lengths) + " | " + " | ".join(f"paper @{int(n):,}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (5 + 2 * len(lengths))]
    for row in doc["rows"]:
        paper = doc["paper"].get(row.get("key", ""), {})
        ours = [f"{row['perplexity'][n]:.2f} [{row['interval'][n][0]:.2f}, {row['interval'][n][1]:.2f}]"
                for n in lengths]
        theirs = [f"{paper[n]:.2f}" if n in paper else "-" for n in lengths]
        lines.append(f"| {row['model']} {row['train_length']:,} | {row['parameters'] / 1e6:.2f}M | {row['tokens']:,} | "
                     f"{row['train_flops']:.2e} | {row['train_wall_s'] / 60:.1f} min | " + " | ".join(ours) + " | "
                     + " | ".join(theirs) + " |")
    return "\n".join(lines)


def summary_line(doc: dict[str, Any]) -> dict[str, Any]:
    """The last printed line: ``{"rows": [{model, train_length, tokens, perplexity, interval}, ...]}``."""
    keep = ("model", "train_length", "parameters", "tokens", "train_flops", "train_wall_s", "perplexity", "interval")
    return {"rows": [{k: row[k] for k in keep} for row in doc["rows"]],
            "orderings": {k: v for k, v in doc["orderings"].items() if k != "comparisons"}}


def plot_table2(doc: dict[str, Any], path: Path) -> None:
    """Three panels: perplexity against eval length (with intervals), loss against position in the
    longest window, copy gain against distance. Raises ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    lengths = doc["eval"]["lengths"]
    for i, row in enumerate(doc["rows"]):
        color, name = f"C{i}", _name(row)
        ppl = [row["perplexity"][str(n)] for n in lengths]
        err = [[p - row["interval"][str(n)][0] for p, n in zip(ppl, lengths)],
               [row["interval"][str(n)][1] - p for p, n in zip(ppl, lengths)]]
        axes[0].errorbar(lengths, ppl, yerr=err, color=color, marker="o", capsize=3, label=name)
        buckets = row["loss_by_position"]
        axes[1].plot([b["start"] for b in buckets], [b["loss"] for b in buckets], color=color, marker=".", label=name)
        copies = row["copy"]["by_distance"]
        axes[2].plot([c["distance"] for c in copies], [c["gain"] for c in copies], color=color, marker="o", label=name)
    axes[0].set(xscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
                title="perplexity against evaluation length")
    axes[0].set_xticks(lengths, [f"{n:,}" for n in lengths])
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set(xscale="log", xlabel=f"position in the {lengths[-1]:,}-token window (log2 buckets)",
                ylabel="mean loss (nats)", title="loss against position")
    axes[2].axhline(0, color="gray", lw=0.8)
    axes[2].set(xscale="log", xlabel="distance between the two copies (tokens)", ylabel="loss drop on the copy (nats)",
                title="copy probe")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    plan = doc["plan"]
    fig.suptitle(f"Table 2 in miniature: {plan['num_layers']} layers x {plan['embed_dim']}, {plan['num_heads']} heads, "
                 f"{plan['steps']} steps x {plan['tokens_per_step']:,} tokens; {doc['device']}", fontsize=10)
    save_figure(fig, path, dpi=100)
