"""The lm-evaluation-harness bridge (`--backend lm-eval`): which tasks it runs, and its samples as our items.

`lm_eval` itself is imported only when a task runs through it (it is an optional dependency).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from ..models import resolve_model_path
from .config import EvalConfig, ModelSpec
from .tasks import EvalTask


# our task -> (lm-eval task, {our metric: (lm-eval per-sample metric, lm-eval filter)})
LM_EVAL_TASKS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "gsm8k": ("gsm8k", {"accuracy": ("exact_match", "flexible-extract")}),
    "arc_challenge_mc": ("arc_challenge", {"acc_norm": ("acc_norm", "none"), "acc": ("acc", "none")}),
}


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_samples_to_items(samples: Sequence[dict[str, Any]], task: EvalTask) -> list[dict[str, Any]]:
    """Per-item results, in the builtin evaluators' format, from lm-eval's logged samples
    (`simple_evaluate(log_samples=True)`), one sample per document and filter."""
    _, metric_map = LM_EVAL_TASKS[task.name]
    items: dict[int, dict[str, Any]] = {}
    for sample in samples:
        doc_id = int(sample["doc_id"])
        item = items.setdefault(doc_id, {"row_id": doc_id, "scores": {}})
        for ours, (theirs, filter_name) in metric_map.items():
            if sample.get("filter", "none") == filter_name and theirs in sample:
                item["scores"][ours] = float(sample[theirs])
                item["prompt"] = str(sample.get("arguments", ""))[:10000]
                item["output"] = str(sample.get("resps", ""))[:10000]
                item["extracted"] = str(sample.get("filtered_resps", ""))
                item["reference"] = str(sample.get("target", ""))
    missing = [doc for doc, item in items.items() if set(item["scores"]) != set(metric_map)]
    if missing:
        raise ValueError(
            f"lm-eval samples of {task.name} lack metrics {sorted(metric_map)} for documents {missing[:5]}."
        )
    return [items[doc] for doc in sorted(items)]


def run_lm_eval(spec: ModelSpec, task: EvalTask, config: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate one task through lm-evaluation-harness and return its per-item results."""
    import lm_eval

    args = {"pretrained": resolve_model_path(spec.name_or_path), "dtype": config.dtype}
    if spec.adapter:
        args["peft"] = spec.adapter
    lm_task, _ = LM_EVAL_TASKS[task.name]
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=[lm_task],
        limit=config.limit,
        log_samples=True,
        device=config.device,
        random_seed=config.seed,
        numpy_random_seed=config.seed,
        torch_random_seed=config.seed,
    )
    return lm_eval_samples_to_items(output["samples"][lm_task], task)


def _backend_for(task: EvalTask, config: EvalConfig) -> tuple[str, str | None]:
    """(backend to use, why it differs from the requested one)."""
    if config.backend != "lm-eval":
        return "builtin", None
    if not lm_eval_available():
        return "builtin", "lm-eval is not installed (pip install lm-eval); used the builtin evaluator"
    if task.name not in LM_EVAL_TASKS:
        return "builtin", f"lm-eval has no equivalent of {task.name}; used the builtin evaluator"
    return "lm-eval", None


__all__ = ["LM_EVAL_TASKS", "lm_eval_available", "lm_eval_samples_to_items", "run_lm_eval"]
