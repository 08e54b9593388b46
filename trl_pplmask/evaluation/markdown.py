"""`report.md`: the results table, the bootstrap intervals, the forgetting summary and the notes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .reference_arm import reference_markdown
from .report import ordered_tasks


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _other_budgets(tasks: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    budgets = []
    if any(t["kind"] == "instruct" for t in tasks):
        budgets.append(f"instruction_following {settings.get('instruction_max_new_tokens')}")
    if any(t["kind"] == "drift" for t in tasks):
        budgets.append(f"drift base answers {settings.get('drift_max_new_tokens')}")
    return f" ({', '.join(budgets)})" if budgets else ""


def _backends(report: dict[str, Any], tasks: list[dict[str, Any]]) -> str:
    """The backend that evaluated each task (as the results say, not as requested): `builtin`, or e.g.
    `lm-eval (gsm8k, arc_challenge_mc), builtin (mbpp_nll)` when they differ."""
    by_backend: dict[str, list[str]] = {}
    for t in tasks:
        backend = report["results"][report["base"]][t["name"]].get("backend", "builtin")
        by_backend.setdefault(backend, []).append(t["name"])
    if len(by_backend) == 1:
        return next(iter(by_backend))
    return ", ".join(f"{backend} ({', '.join(names)})" for backend, names in by_backend.items())


def _with_ci(value: float | None, ci: Sequence[float | None]) -> str:
    return f"{_fmt(value, True)} [{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]"


def _arrow(task: dict[str, Any], metric: str | None = None) -> str:
    if metric is not None and metric in task.get("undirected", ()):
        return "·"  # no better direction (e.g. a drift task's predictive entropy)
    return "↑" if task["higher_is_better"] else "↓"


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: the results table (rows = models, columns = task metrics, target first, deltas against the
    base), the bootstrap intervals, and the forgetting summary."""
    tasks = ordered_tasks(report)
    columns = [(t, m) for t in tasks for m in t["metrics"]]
    base = report["base"]
    results, intervals = report["results"], report["intervals"]
    settings = report["settings"]
    level = f"{100 * settings['confidence']:g}%"
    items = ", ".join(f"{t['name']} {t['n']}" for t in tasks)
    lines = [
        "# Forgetting report",
        "",
        f"Target task: **{report['target']}**. Base model: **{base}**. "
        f"Items per task: {items}. "
        f"Greedy decoding, max_new_tokens {settings['max_new_tokens']}{_other_budgets(tasks, settings)}. "
        f"Backend: {_backends(report, tasks)}.",
        "",
        "## Results",
        "",
        "Rows are models, columns are task metrics (↑ higher is better, ↓ lower is better, · neither); "
        f"fine-tuned models show the change against {base} in parentheses.",
        "",
        "| model | " + " | ".join(f"{t['name']} {m} {_arrow(t, m)}" for t, m in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for label, by_task in results.items():
        cells = []
        for t, m in columns:
            value = by_task[t["name"]]["metrics"][m]
            cell = _fmt(value)
            if label != base:
                cell += f" ({_fmt(value - results[base][t['name']]['metrics'][m], signed=True)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{level} bootstrap intervals ({settings['n_resamples']} resamples of the items, seed {settings['seed']}):",
        "",
        "| model | " + " | ".join(f"{t['name']} {m}" for t, m in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for label in results:
        cells = [
            f"[{_fmt(intervals[label][t['name']][m][0])}, {_fmt(intervals[label][t['name']][m][1])}]"
            for t, m in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _forgetting_lines(report, tasks, level)
    if report.get("reference_comparison"):
        lines += reference_markdown(report["reference_comparison"])
    if report["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    cached = [f"{label}/{name}" for label, by_task in results.items() for name, r in by_task.items() if r["cached"]]
    if cached:
        lines += ["", f"Reused from the cache: {', '.join(cached)}."]
    lines += [
        "",
        "Every per-item result (prompts, outputs, extracted answers) is in `report.json`; the forgetting summary can "
        "be recomputed from it with `evaluate.load(trl_pplmask.metrics.FORGETTING_METRIC)`.",
        "",
    ]
    return "\n".join(lines)


def _forgetting_lines(report: dict[str, Any], tasks: list[dict[str, Any]], level: str) -> list[str]:
    if not report["forgetting"]:
        return []
    primary = [t for t in tasks if t["name"] != report["target"]]
    lines = [
        "",
        f"## Forgetting summary (against {report['base']}, primary metrics)",
        "",
        "Every gain is signed so that **positive is better**, whatever the metric's direction (for a ↓ metric such as "
        "NLL, gain = base − model): a negative gain on a non-target task is forgetting, a negative target gain means "
        "the target got worse. The mean relative change averages the relative gains of the non-target tasks. "
        f"Gains show their paired {level} bootstrap interval.",
        "",
        f"| model | {report['target']} gain | relative gain | mean relative change (non-target) | "
        + " | ".join(f"gain {t['name']} {t['metrics'][0]}" for t in primary)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in primary) + " |",
    ]
    for label, summary in report["forgetting"].items():
        target_row = summary["tasks"][report["target"]]
        cells = [
            _with_ci(summary["target_gain"], target_row["gain_ci"]),
            _pct(summary["relative_target_gain"]),
            _pct(summary["mean_relative_change"]),
        ]
        cells += [
            _with_ci(summary["tasks"][t["name"]]["gain"], summary["tasks"][t["name"]]["gain_ci"]) for t in primary
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


__all__ = ["render_markdown"]
