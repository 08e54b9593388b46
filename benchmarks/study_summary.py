"""The README's "Does it work?" table from a study's `report.json`: one row per arm, each task's primary metric
(absolute for the base, change against the base with its paired 95% interval for the arms), and the predictive
entropy on the drift prompts.

    python benchmarks/study_summary.py benchmarks/results/study-gsm8k-smollm2-135m-cpu/report.json
    python benchmarks/study_summary.py REPORT_A REPORT_B   # one table of both runs' arms

With several reports (the same study run in parts, e.g. `studies/reruns/gsm8k-smollm2-135m-cpu-objectives.yaml` beside
the full study), the table lists every arm of the first report, then the arms only the later ones have. Every model
that two reports share (at least the base, which every arm is compared with) must have the same metrics and the same
per-item outputs and scores in both; otherwise the arms were not measured against the same reference and the script
stops, naming what differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(task: dict) -> str:
    low, high = task["delta_ci"]
    return f"{task['delta']:+.3f} [{low:+.3f}, {high:+.3f}]"


def summary(report: dict) -> str:
    base = report["base"]
    labels = list(report["results"])
    first = next(label for label in labels if label != base)
    names = list(report["forgetting"][first]["tasks"])
    drift = [n for n in names if n.endswith("_drift")]
    header = [f"{n} {'↑' if report['forgetting'][first]['tasks'][n]['higher_is_better'] else '↓'}" for n in names]
    header += [f"{n} entropy" for n in drift]
    lines = [
        "| arm | " + " | ".join(header) + " |",
        "| --- | " + " | ".join("---:" for _ in header) + " |",
    ]
    for label in labels:
        results = report["results"][label]
        if label == base:
            cells = [f"{report['forgetting'][first]['tasks'][n]['base']:.3f}" for n in names]
        else:
            cells = [_cell(report["forgetting"][label]["tasks"][n]) for n in names]
        cells += [f"{results[n]['metrics']['entropy']:.3f}" for n in drift]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _same_result(a: dict, b: dict) -> bool:
    """Same metrics and the same per-item outputs and scores (timings and cache flags aside)."""

    def items(result: dict) -> list[tuple]:
        return [(item.get("row_id"), item.get("output"), item.get("scores")) for item in result.get("items", [])]

    return a["metrics"] == b["metrics"] and items(a) == items(b)


def shared_model_differences(first: dict, other: dict) -> list[str]:
    """`model/task` pairs that both reports hold but whose results differ; also a differing base or task list."""
    problems = []
    if first["base"] != other["base"]:
        problems.append(f"base model label {first['base']!r} vs {other['base']!r}")
    if first["base"] not in other["results"]:
        problems.append(f"the base {first['base']!r} is not in the second report")
    for model in sorted(set(first["results"]) & set(other["results"])):
        tasks_a, tasks_b = first["results"][model], other["results"][model]
        if set(tasks_a) != set(tasks_b):
            problems.append(f"{model}: tasks {sorted(tasks_a)} vs {sorted(tasks_b)}")
            continue
        problems += [f"{model}/{task}" for task in tasks_a if not _same_result(tasks_a[task], tasks_b[task])]
    return problems


def merge(reports: list[dict]) -> dict:
    """One report holding every arm of `reports` (the first report's, then those only later ones have).

    Raises:
        ValueError: when two reports disagree on a model they share (see [`shared_model_differences`]).
    """
    merged = json.loads(json.dumps(reports[0]))
    for index, other in enumerate(reports[1:], start=2):
        problems = shared_model_differences(merged, other)
        if problems:
            raise ValueError(
                f"report {index} was not measured against the same reference as report 1; these differ: "
                + ", ".join(problems[:8])
            )
        for label in other["results"]:
            if label not in merged["results"]:
                merged["results"][label] = other["results"][label]
                merged["forgetting"][label] = other["forgetting"][label]
    return merged


def main() -> None:
    paths = sys.argv[1:] or ["benchmarks/results/study-gsm8k-smollm2-135m-cpu/report.json"]
    reports = [json.loads(Path(path).read_text()) for path in paths]
    try:
        print(summary(merge(reports)))
    except ValueError as error:
        sys.exit(f"study_summary.py: {error}")


if __name__ == "__main__":
    main()
