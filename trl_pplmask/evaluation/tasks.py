"""What the evaluation knows of each task: names, data sets and splits, metrics, rows, answers.

Everything specific to one task lives here, in one place: the task names, the default split of each data set, the
[`EvalTask`] a name resolves to (kind, data set, split, metrics), the rows a task reads, the multiple-choice prompt,
and how an answer is read from a model's output and from a row. The module imports neither torch nor the data
libraries, so that `trl-pplmask eval --help` can list the tasks.
"""

from __future__ import annotations

import ast
import difflib
import textwrap
import threading
from dataclasses import dataclass
from typing import Any

from ..verifiers import CODE_TASKS, extract_choice, extract_code, extract_gsm8k_answer, last_boxed


# The data sets of `trl_pplmask.data.TASKS`, in its order (a test checks that the two agree)
DATASETS = ("gsm8k", "mbpp", "math", "arc_challenge", "humaneval")
DEFAULT_TASKS = ("gsm8k", "math", "mbpp", "humaneval", "arc_challenge")
GENERATION_TASKS = ("gsm8k", "math", "arc_challenge", "mbpp", "humaneval")
INSTRUCTION_TASK = "instruction_following"
DEFAULT_SPLITS = {"gsm8k": "test", "math": "test", "arc_challenge": "test", "mbpp": "validation", "humaneval": "test"}
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
    return [
        *GENERATION_TASKS,
        "arc_challenge_mc",
        INSTRUCTION_TASK,
        *(f"{name}_nll" for name in DATASETS),
        *(f"{name}_drift" for name in DATASETS),
    ]


def resolve_task(name: str, splits: dict[str, str] | None = None) -> EvalTask:
    """The [`EvalTask`] of a task name; a clear error for unknown names.

    Args:
        name (`str`): A name from [`available_tasks`].
        splits (`dict[str, str]`, *optional*): Split overrides per data set.
    """
    splits = splits or {}
    if name in GENERATION_TASKS:
        metric = "pass@1" if name in CODE_TASKS else "accuracy"
        return EvalTask(name, "generate", name, splits.get(name, DEFAULT_SPLITS[name]), (metric,))
    if name == "arc_challenge_mc":
        split = splits.get("arc_challenge", DEFAULT_SPLITS["arc_challenge"])
        return EvalTask(name, "multiple_choice", "arc_challenge", split, ("acc_norm", "acc"))
    if name == INSTRUCTION_TASK:
        return EvalTask(name, "instruct", name, "builtin", ("accuracy", "loose_accuracy"))
    if name.endswith("_nll") and name.removesuffix("_nll") in DATASETS:
        dataset = name.removesuffix("_nll")
        return EvalTask(name, "nll", dataset, splits.get(dataset, DEFAULT_SPLITS[dataset]), ("nll",), False)
    if name.endswith("_drift") and name.removesuffix("_drift") in DATASETS:
        dataset = name.removesuffix("_drift")
        split = splits.get(dataset, DEFAULT_SPLITS[dataset])
        return EvalTask(name, "drift", dataset, split, ("kl", "entropy"), False, ("entropy",))
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


def _math_expression(text: str) -> str | None:
    try:
        from math_verify import parse

        # math-verify bounds its time with SIGALRM, which only the main thread can use (as in `verify_math`)
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        parsed = parse(text, parsing_timeout=timeout)
    except Exception:  # math-verify failing on odd text means "no answer found"
        return None
    return str(parsed[-1]) if parsed else None


def _is_python(code: str) -> bool:
    """Whether `code` parses as a module, or as a function body (HumanEval answers may hold only the body)."""
    for candidate in (code, "def _answer():\n" + textwrap.indent(textwrap.dedent(code), "    ")):
        try:
            ast.parse(candidate)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


def extract_answer(task: str, text: str) -> str | None:
    """The answer a verifier reads in a model's output, for the report; `None` when there is none (counted wrong).

    Uses the verifiers' own extractors: the GSM8K number, the MATH `\\boxed{}` content (else math-verify's last
    expression), the ARC label after `Answer:`, the code of MBPP and HumanEval (`None` when it is not valid Python).

    Args:
        task (`str`): A generation task name.
        text (`str`): The model's output.
    """
    if task == "gsm8k":
        value = extract_gsm8k_answer(text)
        return None if value is None else str(value)
    if task == "math":
        boxed = last_boxed(text)
        return boxed if boxed is not None else _math_expression(text)
    if task == "arc_challenge":
        return extract_choice(text)
    if task in CODE_TASKS:
        code = extract_code(text)
        return code if code.strip() and _is_python(code) else None
    raise ValueError(f"No answer extraction for task {task!r}; generation tasks are {list(GENERATION_TASKS)}.")


def reference_answer(task: str, row: dict[str, Any]) -> str | None:
    """The reference answer of a row, for the report (what `extract_answer` is compared with)."""
    if task == "gsm8k":
        value = extract_gsm8k_answer(str(row.get("answer", "")))
        return None if value is None else str(value)
    if task == "math":
        return last_boxed(str(row.get("solution", "")))
    if task == "arc_challenge":
        return row.get("answerKey")
    if task == "mbpp":
        return "\n".join(row.get("test_list") or [])
    if task == "humaneval":
        return f"check({row.get('entry_point')})"
    return None


__all__ = [
    "DEFAULT_SPLITS",
    "DEFAULT_TASKS",
    "EvalTask",
    "available_tasks",
    "extract_answer",
    "load_eval_rows",
    "reference_answer",
    "resolve_task",
]
