"""Running an evaluation: every model on every task, cached results reused, then the report built and written."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import load_model
from .cache import ResultCache, eval_cache_root, model_identity, rows_fingerprint, task_settings
from .config import EvalConfig, ModelSpec
from .drift import evaluate_drift
from .generate import evaluate_generation
from .harness import backend_for, check_lm_eval_backend, lm_eval_settings, run_lm_eval
from .instruction_following import MISSING_CHECKER, checker_available, evaluate_instruction_following
from .loglik import evaluate_multiple_choice, evaluate_reference_nll
from .output import check_output_dir, write_report
from .report import build_report
from .results import TaskResult, aggregate
from .tasks import EvalTask, load_eval_rows, resolve_task


logger = logging.getLogger(__name__)

# Evaluator of each task kind (drift tasks, which also need the base model, are run by `_evaluate_model` itself)
EVALUATORS = {
    "generate": evaluate_generation,
    "instruct": evaluate_instruction_following,
    "multiple_choice": evaluate_multiple_choice,
    "nll": evaluate_reference_nll,
}


def _device(config: EvalConfig) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _evaluate_model(
    spec: ModelSpec,
    tasks: list[tuple[EvalTask, str]],
    rows: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    base: ModelSpec | None = None,
) -> dict[str, TaskResult]:
    """Evaluate one model on the tasks that missed the cache, each by its backend (`tasks` holds (task, backend)
    pairs); the model is loaded once, on the builtin evaluator's device, for both. `base` is the report's base model,
    the reference of drift tasks (defaults to `spec` itself). An lm-eval failure is an error: nothing falls back."""
    results: dict[str, TaskResult] = {}
    if not tasks:
        return results
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(spec.name_or_path, adapter=spec.adapter, dtype=config.dtype, device=_device(config))
    try:
        for task, backend in tasks:
            start = time.perf_counter()
            if backend == "lm-eval":
                items, stats = run_lm_eval(model, tokenizer, task, rows[task.name], config, spec.label)
            elif task.kind == "drift":
                items, stats = evaluate_drift(model, tokenizer, task, rows[task.name], config, spec, base or spec)
            else:
                items, stats = EVALUATORS[task.kind](model, tokenizer, task, rows[task.name], config, spec.label)
            results[task.name] = TaskResult(
                spec.label,
                task.name,
                aggregate(items, task.metrics),
                items,
                backend,
                time.perf_counter() - start,
                stats,
            )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _available(tasks: list[EvalTask], config: EvalConfig, notes: list[str]) -> list[EvalTask]:
    """The tasks that can run here; one whose optional checker is missing is left out with a note (an error for the
    target task)."""
    kept = []
    for task in tasks:
        if task.kind == "instruct" and not checker_available():
            if task.name == config.target:
                raise ValueError(f"The target task cannot run: {MISSING_CHECKER}.")
            notes.append(f"{task.name} skipped: {MISSING_CHECKER}")
            logger.warning(notes[-1])
            continue
        kept.append(task)
    return kept


def run_evaluation(
    models: Sequence[ModelSpec],
    config: EvalConfig | None = None,
    output_dir: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every task (reusing cached results) and build, and optionally write, the report.

    Args:
        models (`Sequence[ModelSpec]`): The base model first (see [`build_model_specs`]).
        config (`EvalConfig`, *optional*): Tasks and settings.
        output_dir (`str` or `Path`, *optional*): Where to write `report.json`, `report.md` and `report.png`.
        command (`str`, *optional*): The command line, recorded in the report.

    Returns:
        `dict`: the report (the content of `report.json`).
    """
    config = config or EvalConfig()
    check_lm_eval_backend(config)
    if output_dir is not None:
        check_output_dir(output_dir)
    models = list(models)
    if not models or not models[0].is_base or sum(m.is_base for m in models) != 1:
        raise ValueError("Pass exactly one base model, first (see build_model_specs).")
    if config.reference is not None and config.reference not in [m.label for m in models[1:]]:
        raise ValueError(
            f"The reference model {config.reference!r} is not among the fine-tuned models "
            f"{[m.label for m in models[1:]]}; pass its label (e.g. --adapter gt=PATH --reference gt)."
        )
    tasks = [resolve_task(name, config.splits) for name in config.tasks]
    notes: list[str] = []
    tasks = _available(tasks, config, notes)
    # Rows are loaded once and shared by every model; a --limit beyond a split fails here, before any model runs
    rows = {task.name: load_eval_rows(task, config.limit) for task in tasks}
    cache = ResultCache(eval_cache_root(config), config.use_cache)
    device = _device(config)
    fingerprints = {task.name: rows_fingerprint(rows[task.name]) for task in tasks}
    by_name = {task.name: task for task in tasks}
    results: dict[str, dict[str, TaskResult]] = {}

    base_identity = model_identity(models[0])

    def key(identity: str, task: EvalTask, backend: str) -> str:
        settings = task_settings(task, config, device)
        if task.kind == "drift":  # a drift result is relative to the base model
            settings["base_identity"] = base_identity
        if backend == "lm-eval":
            settings.update(lm_eval_settings(config))
        return cache.key(identity, task, config.limit, fingerprints[task.name], settings, backend)

    for spec in models:
        identity = model_identity(spec)
        todo = []
        results[spec.label] = {}
        for task in tasks:
            backend, why = backend_for(task, config)
            if why and why not in notes:
                notes.append(why)
            cached = cache.load(key(identity, task, backend))
            if cached is not None:
                cached.model, cached.cached = spec.label, True
                results[spec.label][task.name] = cached
            else:
                todo.append((task, backend))
        logger.info("%s: %d task(s) cached, %d to evaluate.", spec.label, len(tasks) - len(todo), len(todo))
        for name, result in _evaluate_model(spec, todo, rows, config, models[0]).items():
            # Keyed by the backend that produced it
            cache.save(key(identity, by_name[name], result.backend), result)
            results[spec.label][name] = result
    report = build_report(models, tasks, results, config, notes, command)
    if output_dir is not None:
        write_report(report, output_dir)
    return report


__all__ = ["run_evaluation"]
