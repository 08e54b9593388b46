"""`report.png`: each task's primary metric per model with its interval, and each model's gain against the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import ordered_tasks


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """`report.png`: grouped bars (one group per task's primary metric, one bar per model) with bootstrap
    intervals; lower-is-better metrics (NLL, KL) get their own panel. With fine-tuned models, a second row shows each
    model's gain against the base with its paired interval, signed so that positive is better (up = better in
    every panel)."""
    import matplotlib  # imported on use, to select the file-only backend before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ordered_tasks(report)
    panels = [[t for t in tasks if t["higher_is_better"]], [t for t in tasks if not t["higher_is_better"]]]
    panels = [p for p in panels if p]
    labels = list(report["results"])
    gains = report.get("forgetting") or {}
    n_rows = 2 if gains else 1
    fig, axes = plt.subplots(
        n_rows,
        len(panels),
        figsize=(max(7.0, 1.6 * len(tasks) * max(1, len(labels)) / 2 + 2), 4.2 * n_rows),
        squeeze=False,
    )
    width = 0.8 / len(labels)

    def ticks(ax, panel):
        ax.set_xticks(np.arange(len(panel)))
        ax.set_xticklabels(
            [
                f"{t['name']}\n({t['metrics'][0]})" + ("\n[target]" if t["name"] == report["target"] else "")
                for t in panel
            ]
        )
        ax.grid(axis="y", alpha=0.3)

    for ax, panel in zip(axes[0], panels):
        x = np.arange(len(panel))
        top = 0.0
        for k, label in enumerate(labels):
            values, lows, highs = [], [], []
            for t in panel:
                metric = t["metrics"][0]
                value = report["results"][label][t["name"]]["metrics"][metric]
                low, high = report["intervals"][label][t["name"]][metric]
                values.append(value)
                lows.append(value - (low if low is not None else value))
                highs.append((high if high is not None else value) - value)
            offsets = x + (k - (len(labels) - 1) / 2) * width
            bars = ax.bar(offsets, values, width, yerr=[lows, highs], capsize=3, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
            top = max(top, max(v + h for v, h in zip(values, highs)))
        ax.set_ylim(0, max(top * 1.15, 0.1))  # zero scores still show an axis, and the value labels fit
        ticks(ax, panel)
        ax.set_ylabel("higher is better" if panel[0]["higher_is_better"] else "lower is better (per token)")
    axes[0][0].legend(fontsize="small")
    if gains:
        gain_width = 0.8 / len(gains)
        for ax, panel in zip(axes[1], panels):
            x = np.arange(len(panel))
            for k, (label, summary) in enumerate(gains.items()):
                rows = [summary["tasks"][t["name"]] for t in panel]
                values = [r["gain"] if r["gain"] is not None else 0.0 for r in rows]
                lows = [v - (r["gain_ci"][0] if r["gain_ci"][0] is not None else v) for v, r in zip(values, rows)]
                highs = [(r["gain_ci"][1] if r["gain_ci"][1] is not None else v) - v for v, r in zip(values, rows)]
                offsets = x + (k - (len(gains) - 1) / 2) * gain_width
                color = f"C{labels.index(label)}" if label in labels else None
                bars = ax.bar(offsets, values, gain_width, yerr=[lows, highs], capsize=3, label=label, color=color)
                ax.bar_label(bars, fmt="%+.3f", fontsize="x-small", padding=2)
            ax.axhline(0.0, color="black", linewidth=0.8)
            ticks(ax, panel)
            ax.set_ylabel(f"gain vs {report['base']} (positive = better)")
    level = f"{100 * report['settings']['confidence']:g}%"
    fig.suptitle(
        f"Target {report['target']}: models against {report['base']}\n({level} bootstrap intervals)", fontsize="medium"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_report"]
