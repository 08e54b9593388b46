"""What one (model, task) evaluation measured ([`TaskResult`]) and the per-item aggregates."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics.forgetting.forgetting import weighted_mean


@dataclass
class TaskResult:
    """Everything measured for one (model, task).

    Args:
        model (`str`): Model label.
        task (`str`): Task name.
        metrics (`dict[str, float]`): Aggregates over the items.
        items (`list[dict]`): One dict per item: `row_id`, `scores` (metric -> value), `weight` (NLL tasks), the
            prompt, raw output, extracted and reference answers.
        backend (`str`): `builtin` or `lm-eval`.
        seconds (`float`): Time it took (of the original run, for a cached result).
        stats (`dict`): Counts such as `unparsed` and `truncated` outputs.
        cached (`bool`): Whether it came from the cache in this run.
    """

    model: str
    task: str
    metrics: dict[str, float]
    items: list[dict[str, Any]]
    backend: str = "builtin"
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def aggregate(items: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """Weighted mean of each metric over the items (weight 1 unless an item has `weight`)."""
    weights = np.array([item.get("weight", 1.0) for item in items], dtype=np.float64)
    return {
        m: weighted_mean(np.array([item["scores"][m] for item in items], dtype=np.float64), weights) for m in metrics
    }


def item_values(result: TaskResult, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-item values of a metric and the items' weights, ordered by `row_id`."""
    items = sorted(result.items, key=lambda item: item["row_id"])
    values = np.array([item["scores"][metric] for item in items], dtype=np.float64)
    weights = np.array([item.get("weight", 1.0) for item in items], dtype=np.float64)
    return values, weights


__all__ = ["TaskResult", "aggregate", "item_values"]
