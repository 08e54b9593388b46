"""The evaluation's tasks: the names `eval` accepts and the [`EvalTask`] each resolves to.

What a data set is (its splits, default evaluation split, metric, how answers are read and checked) comes from the
task registry (`trl_pplmask.tasks`), read when needed, so that a registered task is evaluated like a built-in one:
`<task>` (generation, when it has a checker), `<task>_nll` and `<task>_drift`. The module imports neither torch nor
the data libraries, so that `trl-pplmask eval --help` can list the tasks.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..tasks import TASKS, get_task


DEFAULT_TASKS = ("gsm8k", "math", "mbpp", "humaneval", "arc_challenge")
INSTRUCTION_TASK = "instruction_following"
MC_CONTEXT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class EvalTask:
    """One evaluated task.

    Args:
        name (`str`): Task name as given (`gsm8k`, `arc_challenge_mc`, `math_nll`, ...).
        kind (`str`): `generate`, `multiple_choice` or `nll`.
        dataset (`str`): The data set it reads ([`~trl_pplmask.data.load_task`] name).
        split (`str`): Split it reads.
        metrics (`tuple[str, ...]`): Metric names; the first is the primary one (table, forgetting summary, figure).
        higher_is_better (`bool`): Whether the primary metric improves upwards.
        undirected (`tuple[str, ...]`): Secondary metrics with no better direction (a drift task's `entropy`).
    """

    name: str
    kind: str
    dataset: str
    split: str
    metrics: tuple[str, ...]
    higher_is_better: bool = True
    undirected: tuple[str, ...] = ()

    @property
    def primary(self) -> str:
        return self.metrics[0]


def available_tasks() -> list[str]:
    """Every accepted task name."""
    datasets = list(TASKS)
    return [
        *datasets,
        "arc_challenge_mc",
        INSTRUCTION_TASK,
        *(f"{name}_nll" for name in datasets),
        *(f"{name}_drift" for name in datasets),
    ]


def default_split(dataset: str, splits: dict[str, str] | None = None) -> str:
    """The split a task reads: the override in `splits`, else its registered `eval_split`."""
    return (splits or {}).get(dataset) or get_task(dataset).eval_split


def resolve_task(name: str, splits: dict[str, str] | None = None) -> EvalTask:
    """The [`EvalTask`] of a task name; a clear error for unknown names.

    Args:
        name (`str`): A name from [`available_tasks`].
        splits (`dict[str, str]`, *optional*): Split overrides per data set.
    """
    if name in TASKS:
        return EvalTask(name, "generate", name, default_split(name, splits), (TASKS[name].metric,))
    if name == "arc_challenge_mc":
        return EvalTask(
            name, "multiple_choice", "arc_challenge", default_split("arc_challenge", splits), ("acc_norm", "acc")
        )
    if name == INSTRUCTION_TASK:
        return EvalTask(name, "instruct", name, "builtin", ("accuracy", "loose_accuracy"))
    if name.endswith("_nll") and name.removesuffix("_nll") in TASKS:
        dataset = name.removesuffix("_nll")
        return EvalTask(name, "nll", dataset, default_split(dataset, splits), ("nll",), False)
    if name.endswith("_drift") and name.removesuffix("_drift") in TASKS:
        dataset = name.removesuffix("_drift")
        return EvalTask(name, "drift", dataset, default_split(dataset, splits), ("kl", "entropy"), False, ("entropy",))
    close = difflib.get_close_matches(str(name), available_tasks(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"Unknown task {name!r}{hint}; choose from {available_tasks()}.")


def load_eval_rows(task: EvalTask, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` rows of a task's split (all without a limit), as plain dicts.

    Raises:
        ValueError: `limit` is larger than the split.
    """
    # Imported here, not above: both import torch or datasets, and this module stays light for `eval --help`
    if task.kind == "instruct":  # prompts built by the project, not a data set
        from .instruction_following import build_rows

        return build_rows(limit)
    from ..data import load_task

    dataset = load_task(task.dataset, task.split)
    if limit is not None:
        if limit > len(dataset):
            raise ValueError(
                f"--limit {limit} is larger than {task.dataset}/{task.split}, which has {len(dataset)} rows; use "
                f"--limit {len(dataset)} or less (or omit --limit to evaluate the whole split)."
            )
        dataset = dataset.select(range(limit))
    return dataset.to_list()


def extract_answer(task: str, text: str) -> str | None:
    """The answer a verifier reads in a model's output, for the report; `None` when there is none (counted wrong).

    Args:
        task (`str`): A registered task (`Task.extract_answer`: the GSM8K number, the MATH `\\boxed{}` content,
            the ARC label after `Answer:`, the code of MBPP and HumanEval when it is valid Python, ...).
        text (`str`): The model's output.
    """
    if task not in TASKS:
        raise ValueError(f"No answer extraction for task {task!r}; generation tasks are {list(TASKS)}.")
    return TASKS[task].extract_answer(text)


def reference_answer(task: str, row: dict[str, Any]) -> str | None:
    """The reference answer of a row, for the report (what `extract_answer` is compared with)."""
    return get_task(task).reference_answer(row)


__all__ = [
    "DEFAULT_TASKS",
    "EvalTask",
    "available_tasks",
    "default_split",
    "extract_answer",
    "load_eval_rows",
    "reference_answer",
    "resolve_task",
]
