"""Each fine-tuned model against a reference fine-tuned model (e.g. plain SFT on the ground truth, `gt`).

A forgetting study asks two questions of every arm, relative to the reference arm, from the report's per-item results
alone (see [`trl_pplmask.evaluation`]); all gains are against the base model and signed so that positive is better:

- **share of the reference's target gain kept**: `gain_arm(target) / gain_ref(target)`. 1 = the same target gain as
  the reference, 0 = none, above 1 = more. Defined only when the reference improved the target (`gain_ref > 0`).
- **share of the reference's non-target degradation avoided**, per non-target task the reference made worse
  (`gain_ref < 0`): `1 - gain_arm / gain_ref`. 1 = the arm did not degrade that task at all, 0 = it degraded it as
  much as the reference, above 1 = it improved it, below 0 = it degraded it more. The summary is the mean over those
  tasks (each task's share is unitless, so accuracy, NLL and KL tasks average together).

Intervals are paired percentile bootstraps: every resample draws the same items for the base, the reference and the
arm (the indices of [`~trl_pplmask.metrics.forgetting.forgetting.bootstrap_indices`], as the forgetting summary), and
the mean share over tasks is taken per resample. A ratio is unstable when the reference's gain is small; each task
says whether the reference's own gain interval excludes 0 (`reference_significant`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics.forgetting.forgetting import bootstrap_indices, percentile_interval, resampled_means, weighted_mean


def _aligned(report: dict[str, Any], task: str, labels: Sequence[str], metric: str):
    """Per-item values of `metric` for each label, aligned by `row_id`, and the base model's item weights."""
    by_label = []
    for label in labels:
        items = report["results"][label][task]["items"]
        by_label.append({item["row_id"]: item for item in items})
    row_ids = sorted(by_label[0])
    for label, items in zip(labels, by_label):
        if sorted(items) != row_ids:
            raise ValueError(f"{label} and {labels[0]} were evaluated on different items of {task}.")
    values = [np.array([items[r]["scores"][metric] for r in row_ids], dtype=np.float64) for items in by_label]
    weights = np.array([by_label[0][r].get("weight", 1.0) for r in row_ids], dtype=np.float64)
    return values, weights


def _gains(report, task: dict[str, Any], labels: Sequence[str], indices: np.ndarray):
    """Point gains and resampled gains (signed, positive is better) of every label after the first (the base)."""
    metric = task["metrics"][0]
    sign = 1.0 if task["higher_is_better"] else -1.0
    values, weights = _aligned(report, task["name"], labels, metric)
    base_value = weighted_mean(values[0], weights)
    base_samples = resampled_means(values[0], weights, indices)
    points = [sign * (weighted_mean(v, weights) - base_value) for v in values[1:]]
    samples = [sign * (resampled_means(v, weights, indices) - base_samples) for v in values[1:]]
    return points, samples


def _ratio(numerator, denominator):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator != 0, numerator / np.where(denominator != 0, denominator, 1.0), np.nan)


def _clean(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _ci(samples: np.ndarray, confidence: float) -> list[float | None]:
    return [_clean(v) for v in percentile_interval(np.asarray(samples, dtype=np.float64), confidence)]


def compare_with_reference(
    report: dict[str, Any],
    reference: str,
    n_resamples: int | None = None,
    confidence: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Share of the reference's target gain kept and of its non-target degradation avoided, for every fine-tuned model
    of a report other than the reference (see the module docstring).

    Args:
        report (`dict`): A forgetting report ([`~trl_pplmask.evaluation.run_evaluation`]'s return value or a loaded
            `report.json`).
        reference (`str`): Label of the reference model (e.g. `"gt"`); not the base model.
        n_resamples (`int`, *optional*): Bootstrap resamples; defaults to the report's.
        confidence (`float`, *optional*): Interval level; defaults to the report's.
        seed (`int`, *optional*): Bootstrap seed; defaults to the report's.

    Returns:
        `dict` with `reference`, `target`, `reference_target_gain` (and `_ci`), `non_target_tasks`,
        `degraded_tasks` (the non-target tasks the reference made worse), `reference_tasks` (per non-target task the
        reference's `gain`, `gain_ci` and `significant`: whether that interval excludes 0), `notes`, and `arms`: per
        label `target_gain`, `target_gain_kept` (and `_ci`), `degradation_avoided` (mean over the degraded tasks, and
        `_ci`), `n_degraded_tasks`, and `tasks`: per non-target task `gain`, `reference_gain`, `degradation_avoided`
        (and `_ci`; `None` for a task the reference did not degrade).
    """
    settings = report.get("settings", {})
    n_resamples = n_resamples or settings.get("n_resamples", 1000)
    confidence = confidence or settings.get("confidence", 0.95)
    seed = settings.get("seed", 0) if seed is None else seed
    base = report["base"]
    labels = list(report["results"])
    if reference not in labels:
        raise ValueError(f"The reference model {reference!r} is not in the report; its models are {labels}.")
    if reference == base:
        raise ValueError(f"The reference must be a fine-tuned model, not the base model {base!r}.")
    arms = [label for label in labels if label not in (base, reference)]
    tasks = {t["name"]: t for t in report["tasks"]}
    target = report["target"]
    excluded = {target, *report.get("target_family", [])}
    non_target = [name for name in tasks if name not in excluded]
    notes: list[str] = []

    def gains_of(name: str):
        n = len(report["results"][base][name]["items"])
        indices = bootstrap_indices(n, n_resamples, seed)
        return _gains(report, tasks[name], [base, reference, *arms], indices)

    points, samples = gains_of(target)
    ref_target, ref_target_samples = points[0], samples[0]
    ref_target_ci = _ci(ref_target_samples, confidence)
    if ref_target <= 0:
        notes.append(
            f"{reference} did not improve the target {target} (gain {ref_target:+.4f}); the share of its target gain "
            "kept is undefined."
        )
    out_arms: dict[str, dict[str, Any]] = {
        arm: {
            "target_gain": _clean(points[k + 1]),
            "target_gain_kept": _clean(points[k + 1] / ref_target) if ref_target > 0 else None,
            "target_gain_kept_ci": _ci(_ratio(samples[k + 1], ref_target_samples), confidence)
            if ref_target > 0
            else [None, None],
            "tasks": {},
        }
        for k, arm in enumerate(arms)
    }
    degraded = []
    reference_tasks = {}
    avoided_samples: dict[str, list[np.ndarray]] = {arm: [] for arm in arms}
    for name in non_target:
        points, samples = gains_of(name)
        ref_gain, ref_samples = points[0], samples[0]
        ref_ci = _ci(ref_samples, confidence)
        significant = ref_ci[0] is not None and (ref_ci[0] > 0 or ref_ci[1] < 0)
        is_degraded = ref_gain < 0
        reference_tasks[name] = {"gain": _clean(ref_gain), "gain_ci": ref_ci, "significant": bool(significant)}
        if is_degraded:
            degraded.append(name)
        for k, arm in enumerate(arms):
            row = {
                "gain": _clean(points[k + 1]),
                "reference_gain": _clean(ref_gain),
                "degradation_avoided": None,
                "degradation_avoided_ci": [None, None],
            }
            if is_degraded:
                shares = 1.0 - _ratio(samples[k + 1], ref_samples)
                row["degradation_avoided"] = _clean(1.0 - points[k + 1] / ref_gain)
                row["degradation_avoided_ci"] = _ci(shares, confidence)
                avoided_samples[arm].append(shares)
            out_arms[arm]["tasks"][name] = row
    if not degraded:
        notes.append(f"{reference} degraded no non-target task; the share of its degradation avoided is undefined.")
    for arm in arms:
        rows = out_arms[arm]["tasks"]
        values = [rows[name]["degradation_avoided"] for name in degraded]
        out_arms[arm]["degradation_avoided"] = _clean(float(np.mean(values))) if values else None
        out_arms[arm]["degradation_avoided_ci"] = (
            _ci(np.mean(np.stack(avoided_samples[arm]), axis=0), confidence) if values else [None, None]
        )
        out_arms[arm]["n_degraded_tasks"] = len(values)
    return {
        "reference": reference,
        "target": target,
        "reference_target_gain": _clean(ref_target),
        "reference_target_gain_ci": ref_target_ci,
        "non_target_tasks": non_target,
        "degraded_tasks": degraded,
        "reference_tasks": reference_tasks,
        "confidence": confidence,
        "n_resamples": n_resamples,
        "notes": notes,
        "arms": out_arms,
    }


def _fmt(value: float | None, ci: Sequence[float | None] | None = None, percent: bool = True) -> str:
    def one(v):
        if v is None:
            return "n/a"
        return f"{100 * v:.0f}%" if percent else f"{v:+.3f}"

    if ci is None:
        return one(value)
    return f"{one(value)} [{one(ci[0])}, {one(ci[1])}]"


def reference_markdown(comparison: dict[str, Any]) -> list[str]:
    """Lines of the report's section on the models against the reference model."""
    reference, target = comparison["reference"], comparison["target"]
    level = f"{100 * comparison['confidence']:g}%"
    degraded = comparison["degraded_tasks"]
    lines = [
        "",
        f"## Against {reference}",
        "",
        f"Share of {reference}'s target gain kept (gain on {target} / {reference}'s gain "
        f"{_fmt(comparison['reference_target_gain'], comparison['reference_target_gain_ci'], percent=False)}), and "
        f"share of {reference}'s non-target degradation avoided (1 − gain / {reference}'s gain, on the non-target "
        f"tasks {reference} made worse: {', '.join(degraded) or 'none'}; 100% = no degradation, 0% = as much as "
        f"{reference}). Paired {level} bootstrap intervals.",
        "",
        f"| model | {target} gain kept | degradation avoided (mean) | "
        + " | ".join(f"avoided on {name}" for name in degraded)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in degraded) + " |",
    ]
    for arm, row in comparison["arms"].items():
        cells = [
            _fmt(row["target_gain_kept"], row["target_gain_kept_ci"]),
            _fmt(row["degradation_avoided"], row["degradation_avoided_ci"]),
        ]
        cells += [
            _fmt(row["tasks"][name]["degradation_avoided"], row["tasks"][name]["degradation_avoided_ci"])
            for name in degraded
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    unsure = [name for name in degraded if not comparison["reference_tasks"][name]["significant"]]
    if unsure:
        lines += ["", f"{reference}'s degradation of {', '.join(unsure)} is within noise (its interval includes 0)."]
    if comparison["notes"]:
        lines += ["", *(f"- {note}" for note in comparison["notes"])]
    return lines


__all__ = ["compare_with_reference", "reference_markdown"]
