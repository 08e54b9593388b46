"""Evaluating a study's models and writing its report (every result read back from the evaluation cache)."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

from .config import StudyConfig
from .layout import StudyPaths


def model_specs(config: StudyConfig, paths: StudyPaths, labels: list[str]):
    """Evaluation specs: the base model first, then one per trained arm (adapter or full model)."""
    from ..evaluation import ModelSpec

    specs = [ModelSpec("base", config.model, None, True)]
    for arm in config.arms:
        if arm.kind == "base" or arm.label not in labels:
            continue
        path = str(paths.arm(arm.label))
        specs.append(ModelSpec(arm.label, config.model, path) if config.use_peft else ModelSpec(arm.label, path))
    return specs


def evaluate_model(config: StudyConfig, specs, label: str) -> None:
    """Evaluate one model (and the base, cached) so that the final report reads every result from the cache."""
    from ..evaluation import run_evaluation

    base = specs[0]
    chosen = [base] if label == base.label else [base, next(s for s in specs if s.label == label)]
    run_evaluation(chosen, dataclasses.replace(config.eval.eval_config(), reference=None))


def write_study_report(config: StudyConfig, paths: StudyPaths, specs, command: str | None) -> dict[str, Any]:
    """The report of every model (all results from the cache), with every arm compared with `gt` when it ran: share
    of GT's target gain kept and of its non-target degradation avoided (`reference_comparison`)."""
    from ..evaluation import run_evaluation

    eval_config = config.eval.eval_config()
    labels = [spec.label for spec in specs[1:]]
    if eval_config.reference is None and "gt" in labels and len(labels) > 1:
        eval_config = dataclasses.replace(eval_config, reference="gt")
    elif eval_config.reference is not None and eval_config.reference not in labels:
        eval_config = dataclasses.replace(eval_config, reference=None)  # e.g. the reference arm was left out
    return run_evaluation(specs, eval_config, paths.root, command)


def relative_to_gt(report: dict[str, Any]) -> dict[str, Any] | None:
    """Per arm against the reference arm (`gt`): the report's `reference_comparison`, or `None`."""
    return report.get("reference_comparison")


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
