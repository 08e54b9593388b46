"""Remove the source data (prompts and reference answers of the evaluation items) from a `report.json`, so that a
study's report can be committed without copying the data sets into the repository.

Metrics, intervals, the forgetting summary and every per-item score stay; so do the models' own outputs.

    python benchmarks/strip_report_data.py benchmarks/results/study-gsm8k-smollm2-135m-cpu/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


SOURCE_FIELDS = ("prompt", "reference", "references", "choices", "context", "question")


def strip(report: dict) -> int:
    """Drop the source-data fields of every item in place; return how many fields were removed."""
    removed = 0
    for by_task in report["results"].values():
        for result in by_task.values():
            for item in result.get("items", []):
                for field in SOURCE_FIELDS:
                    if field in item:
                        del item[field]
                        removed += 1
    report["stripped_fields"] = list(SOURCE_FIELDS)
    return removed


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        report = json.loads(path.read_text())
        removed = strip(report)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{path}: removed {removed} source-data fields")


if __name__ == "__main__":
    main()
