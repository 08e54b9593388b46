"""Forgetting metrics: how a fine-tuned model compares with its base on the target task and on the other tasks.

This file is an `evaluate` module. It is self-contained (numpy, datasets, evaluate) so that it loads offline by path:

```python
import evaluate

forgetting = evaluate.load("path/to/trl_pplmask/metrics/forgetting")  # or trl_pplmask.metrics.FORGETTING_METRIC
forgetting.compute(
    predictions=[1, 0, 1, 1, 0.71, 0.64],     # per-item scores of the fine-tuned model
    references=[0, 0, 1, 1, 0.52, 0.60],      # per-item scores of the base model, same items in the same order
    tasks=["gsm8k", "gsm8k", "arc_challenge_mc", "arc_challenge_mc", "mbpp_nll", "mbpp_nll"],
    target="gsm8k",
    lower_is_better=["mbpp_nll"],
)
```

Definitions, per task `t` with per-item scores `x_i` (fine-tuned) and `b_i` (base) and weights `w_i` (1 by default;
the number of reference tokens for a token-weighted NLL):

- `score = sum(w x) / sum(w)`, `base = sum(w b) / sum(w)`, `delta = score - base`, `relative_delta = delta / |base|`
  (`None` when `base == 0`). These are raw differences: for a lower-is-better task a negative delta is an improvement.
- Gain: the same change **signed so that positive means better**: `gain = delta` for a higher-is-better task and
  `gain = -delta` for a lower-is-better one (an NLL that went down is a positive gain); likewise `relative_gain` and
  `gain_ci`. A negative gain on a non-target task is forgetting.
- Target gain: `gain` and `relative_gain` of the target task (positive = the target improved, whatever its metric's
  direction), with its paired interval `target_gain_ci`.
- Mean relative change over non-target tasks: the mean of `relative_gain` over the tasks that are not the target
  (nor in `target_family`), so that **positive means better**. A negative value is forgetting; this is the
  backward-transfer style summary of the paper.
- Bootstrap intervals: items are resampled with replacement, `n_resamples` times with a seeded generator, the same
  indices for the base and the fine-tuned model (a paired bootstrap), and the percentile interval at `confidence`
  is reported for `score`, `base` and `delta`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import evaluate
import numpy as np


_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): Per-item score of the fine-tuned model (1/0 for accuracy, a per-token NLL, ...).
    references (`list[float]`): Per-item score of the base model on the same items, in the same order.
    tasks (`list[str]`): Task name of each item.
    target (`str`, *optional*): The task the model was fine-tuned for. Without it, no target gain is reported and
        every task counts as non-target.
    target_family (`list[str]`, *optional*): Other task names that measure the target (e.g. `gsm8k_nll` when the
        target is `gsm8k`); they are excluded from the non-target mean.
    lower_is_better (`list[str]`, *optional*): Tasks whose metric improves when it decreases (NLL).
    weights (`list[float]`, *optional*): Per-item weights (e.g. reference token counts); defaults to 1.
    n_resamples (`int`, *optional*, defaults to 1000): Bootstrap resamples.
    confidence (`float`, *optional*, defaults to 0.95): Level of the bootstrap intervals.
    seed (`int`, *optional*, defaults to 0): Seed of the bootstrap's random generator.

Returns:
    `dict` with `target`, `target_gain`, `relative_target_gain`, `target_gain_ci` (positive is better, whatever the
    target metric's direction), `mean_relative_change` (non-target, positive is better), `non_target_tasks`, and
    `tasks`: for each task `n`, `score`, `base`, `delta`, `relative_delta` (raw), `gain`, `relative_gain` (signed,
    positive is better), `higher_is_better`, and `score_ci`, `base_ci`, `delta_ci`, `gain_ci` as `[low, high]`.

Example:
    >>> forgetting = evaluate.load("trl_pplmask/metrics/forgetting")
    >>> out = forgetting.compute(predictions=[1, 1, 0, 1], references=[0, 1, 1, 1], tasks=["a", "a", "b", "b"],
    ...                          target="a", n_resamples=200)
    >>> out["target_gain"], out["mean_relative_change"]
    (0.5, -0.5)
"""

_CITATION = """
@inproceedings{wu2025mitigating,
  title     = {Mitigating Forgetting in LLM Fine-Tuning via Low-Perplexity Token Learning},
  author    = {Wu, Chao-Chung and Tam, Zhi Rui and Lin, Chieh-Yen and Lee, Hung-yi and Chen, Yun-Nung},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  eprint    = {2501.14315},
}
"""


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """`sum(w x) / sum(w)`, or the plain mean without weights; NaN for no items (or zero total weight)."""
    values = np.asarray(values, dtype=np.float64)
    if weights is None:
        return float(values.mean()) if values.size else math.nan
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    return float((values * weights).sum() / total) if total > 0 else math.nan


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """`[n_resamples, n]` item indices drawn with replacement by a seeded generator (the same for every caller with
    the same arguments, which makes paired intervals possible)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_resamples, n))


def resampled_means(values: np.ndarray, weights: np.ndarray | None, indices: np.ndarray) -> np.ndarray:
    """The (weighted) mean of `values` in each bootstrap resample, `[n_resamples]` (NaN where a resample drew only
    zero-weight items).

    Args:
        values (`np.ndarray`): One value per item, `[n]`.
        weights (`np.ndarray` or `None`): One weight per item, `[n]`; `None` weighs every item 1.
        indices (`np.ndarray`): The resamples, `[n_resamples, n]` item indices (see [`bootstrap_indices`]).
    """
    values = np.asarray(values, dtype=np.float64)[indices]
    if weights is None:
        return values.mean(axis=1)
    weights = np.asarray(weights, dtype=np.float64)[indices]
    totals = weights.sum(axis=1)
    # A resample that drew only zero-weight items has no mean; it is left out of the percentiles
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, (values * weights).sum(axis=1) / totals, np.nan)


def percentile_interval(samples: np.ndarray, confidence: float) -> list[float]:
    """`[low, high]`: the central `confidence` percentile interval of bootstrap `samples` (NaNs left out; both NaN when
    nothing is left).

    Args:
        samples (`np.ndarray`): Bootstrap statistics, e.g. from [`resampled_means`].
        confidence (`float`): Coverage of the interval, e.g. 0.95.
    """
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def bootstrap_ci(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap interval of the (weighted) mean of per-item values.

    Args:
        values (`Sequence[float]`): Per-item scores.
        weights (`Sequence[float]`, *optional*): Per-item weights (a ratio-of-sums mean); defaults to equal weights.
        n_resamples (`int`, *optional*, defaults to 1000): Resamples of the items, with replacement.
        confidence (`float`, *optional*, defaults to 0.95): Level of the interval.
        seed (`int`, *optional*, defaults to 0): Seed of the random generator: the same inputs give the same interval.

    Returns:
        `list[float]`: `[low, high]`; `[nan, nan]` for no items.
    """
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return [math.nan, math.nan]
    indices = bootstrap_indices(values.size, n_resamples, seed)
    return percentile_interval(
        resampled_means(values, None if weights is None else np.asarray(weights), indices), confidence
    )


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")


def _relative(delta: float, base: float) -> float | None:
    if base == 0 or math.isnan(base) or math.isnan(delta):
        return None
    return delta / abs(base)


def _clean(value: float) -> float | None:
    # JSON has no NaN: an undefined number is None
    return None if value is None or math.isnan(value) else float(value)


def task_comparison(
    scores: np.ndarray,
    base: np.ndarray,
    weights: np.ndarray | None,
    higher_is_better: bool,
    n_resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    """Score, base, delta and their paired bootstrap intervals for one task (see the module docstring)."""
    score_value, base_value = weighted_mean(scores, weights), weighted_mean(base, weights)
    delta = score_value - base_value
    indices = bootstrap_indices(len(scores), n_resamples, seed)
    score_samples = resampled_means(scores, weights, indices)
    base_samples = resampled_means(base, weights, indices)
    sign = 1.0 if higher_is_better else -1.0
    relative = _relative(delta, base_value)
    return {
        "n": int(len(scores)),
        "score": _clean(score_value),
        "base": _clean(base_value),
        "delta": _clean(delta),
        "relative_delta": relative,
        "gain": _clean(sign * delta),
        "relative_gain": None if relative is None else sign * relative,
        "higher_is_better": higher_is_better,
        "score_ci": [_clean(v) for v in percentile_interval(score_samples, confidence)],
        "base_ci": [_clean(v) for v in percentile_interval(base_samples, confidence)],
        "delta_ci": [_clean(v) for v in percentile_interval(score_samples - base_samples, confidence)],
        "gain_ci": [_clean(v) for v in percentile_interval(sign * (score_samples - base_samples), confidence)],
    }


def forgetting_summary(
    predictions: Sequence[float],
    references: Sequence[float],
    tasks: Sequence[str],
    target: str | None = None,
    target_family: Sequence[str] = (),
    lower_is_better: Sequence[str] = (),
    weights: Sequence[float] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The forgetting metrics from per-item scores; the computation behind the `evaluate` module (same arguments)."""
    _check_confidence(confidence)
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}.")
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    tasks = np.asarray([str(t) for t in tasks], dtype=object)
    if not len(predictions) == len(references) == len(tasks):
        raise ValueError(
            f"predictions, references and tasks must have one entry per item; got {len(predictions)}, "
            f"{len(references)} and {len(tasks)}."
        )
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) != len(predictions):
            raise ValueError(f"weights has {len(weights)} entries for {len(predictions)} items.")
    names = list(dict.fromkeys(tasks.tolist()))  # first-seen order
    if target is not None and target not in names:
        raise ValueError(f"The target task {target!r} has no items; tasks present: {names}.")
    per_task = {}
    for name in names:
        select = tasks == name
        per_task[name] = task_comparison(
            predictions[select],
            references[select],
            None if weights is None else weights[select],
            name not in set(lower_is_better),
            n_resamples,
            confidence,
            seed,
        )
    excluded = {target, *target_family}
    non_target = [name for name in names if name not in excluded]
    changes = [per_task[name]["relative_gain"] for name in non_target if per_task[name]["relative_gain"] is not None]
    target_row = per_task.get(target, {})
    return {
        "target": target,
        "target_gain": target_row.get("gain"),
        "relative_target_gain": target_row.get("relative_gain"),
        "target_gain_ci": target_row.get("gain_ci"),
        "mean_relative_change": float(np.mean(changes)) if changes else None,
        "non_target_tasks": non_target,
        "n_averaged": len(changes),
        "tasks": per_task,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Forgetting(evaluate.Metric):
    """Target gain and non-target change of a fine-tuned model against its base, with paired bootstrap intervals."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("float64"),
                    "tasks": datasets.Value("string"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2501.14315"],
        )

    def _compute(
        self,
        predictions,
        references,
        tasks,
        target=None,
        target_family=(),
        lower_is_better=(),
        weights=None,
        n_resamples=1000,
        confidence=0.95,
        seed=0,
    ) -> dict:
        return forgetting_summary(
            predictions,
            references,
            tasks,
            target=target,
            target_family=target_family,
            lower_is_better=lower_is_better,
            weights=weights,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )
