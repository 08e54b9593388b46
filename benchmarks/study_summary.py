"""The README's "Does it work?" table from a study's `report.json`: one row per arm, each task's primary metric
(absolute for the base, change against the base with its paired 95% interval for the arms), and the predictive
entropy on the drift prompts.

    python benchmarks/study_summary.py benchmarks/results/study-gsm8k-smollm2-135m-cpu/report.json
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


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/study-gsm8k-smollm2-135m-cpu/report.json")
    print(summary(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
