"""How close two runs of the same forgetting study came: trained weights, metrics and per-item outputs.

    python benchmarks/compare_studies.py RUN_A RUN_B [--report-a PATH] [--report-b PATH]

RUN_A and RUN_B are study output folders (`output_dir` of the study YAML, with `arms/<arm>/`). Prints, per arm, whether
the trained adapter files are byte-identical and the final training loss of each run; then, per model and task, the
largest difference of any metric and how many per-item outputs differ. `--report-a` (e.g. the committed
`benchmarks/results/<study>/report.json`) replaces RUN_A's own report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _train_loss(arm: Path) -> float | None:
    config = arm / "pplmask_config.json"
    return json.loads(config.read_text()).get("train_loss") if config.is_file() else None


def compare_arms(a: Path, b: Path) -> list[str]:
    """One line per arm of RUN_A: adapter identical or not, and both training losses."""
    lines = []
    for arm in sorted(p for p in (a / "arms").iterdir() if p.is_dir()):
        other = b / "arms" / arm.name
        weights = [_sha256(folder / "adapter_model.safetensors") for folder in (arm, other)]
        same = "identical" if weights[0] and weights[0] == weights[1] else "DIFFERENT"
        losses = [_train_loss(folder) for folder in (arm, other)]
        lines.append(f"{arm.name:12s} adapter {same:9s} train_loss {losses[0]} vs {losses[1]}")
    return lines


def compare_reports(a: dict, b: dict) -> list[str]:
    """One line per (model, task) of report A: the largest metric difference and the count of differing outputs."""
    lines = []
    for model, tasks in a["results"].items():
        for task, result in tasks.items():
            other = b["results"].get(model, {}).get(task)
            if other is None:
                lines.append(f"{model:12s} {task:24s} missing from the second report")
                continue
            metrics = result["metrics"]
            delta = max((abs(metrics[k] - other["metrics"].get(k, float("nan"))) for k in metrics), default=0.0)
            items = list(zip(result.get("items", []), other.get("items", [])))
            outputs = sum(x.get("output") != y.get("output") for x, y in items)
            scores = sum(x.get("scores") != y.get("scores") for x, y in items)
            lines.append(
                f"{model:12s} {task:24s} max |metric difference| {delta:.2e}; items with another output "
                f"{outputs}/{len(items)}, another score {scores}/{len(items)}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="First study output folder.")
    parser.add_argument("run_b", type=Path, help="Second study output folder.")
    parser.add_argument("--report-a", type=Path, help="report.json to use for the first run (default: its own).")
    parser.add_argument("--report-b", type=Path, help="report.json to use for the second run (default: its own).")
    args = parser.parse_args(argv)
    print("\n".join(compare_arms(args.run_a, args.run_b)))
    reports = [
        json.loads((path or run / "report.json").read_text())
        for path, run in ((args.report_a, args.run_a), (args.report_b, args.run_b))
    ]
    print("\n".join(compare_reports(*reports)))


if __name__ == "__main__":
    main()
