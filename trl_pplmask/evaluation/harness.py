"""The lm-evaluation-harness bridge (`--backend lm-eval`): which tasks it runs, on which data, and its samples as our
items.

A task runs through lm-eval's own task (its prompt, few-shot examples, answer extraction and metrics) and lm-eval's
`HFLM` wrapped around the model the builtin evaluators use (loaded once by [`~trl_pplmask.models.load_model`], on the
same device: CUDA only when present, or `--device`). With a local data mirror (`TRL_PPLMASK_DATA_DIR`), the task
reads the mirror's files: the YAMLs of `lm_eval_tasks/` include lm-eval's installed task and replace only its data set
by local `data_files`; they are filled in with the mirror's paths and handed to lm-eval's
`TaskManager(include_path=...)`. Without a mirror, lm-eval's task reads the Hub as usual. Every document lm-eval
evaluated is checked against the row the builtin evaluator reads (same position, same question), so that results of
both backends pair item for item.

`lm_eval` itself is imported only when a task runs through it (it is an optional dependency). Nothing falls back:
a failure is an error naming the task and the model.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from ..tasks import get_task
from .config import EvalConfig
from .tasks import EvalTask, resolve_task


TASK_TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
INSTALL_HINT = "pip install 'trl-pplmask[lm-eval]' (or pip install lm-eval)"


class LmEvalError(RuntimeError):
    """lm-eval failed on a task (the message names the task, the model, the data and the ways out; the cause is
    chained). Nothing falls back to the builtin evaluator."""


@dataclass(frozen=True)
class LmEvalTask:
    """How one of our tasks runs in lm-evaluation-harness.

    Args:
        task (`str`): lm-eval's own task, run as is when no local data mirror is set (data from the Hub).
        folder (`str`): The folder of lm-eval's task folder (`lm_eval/tasks/<folder>`) that defines `task`.
        local_task (`str`): The task of the template `lm_eval_tasks/<template>`: lm-eval's task on the mirror's files.
        template (`str`): File name of that template.
        metrics (`dict[str, tuple[str, str]]`): Our metric -> (lm-eval's per-sample metric, the filter it is read
            under).
        question (`str`): The document field that must equal our row's, position by position.
    """

    task: str
    folder: str
    local_task: str
    template: str
    metrics: dict[str, tuple[str, str]]
    question: str = "question"


# our task -> how lm-eval runs it
LM_EVAL_TASKS: dict[str, LmEvalTask] = {
    "gsm8k": LmEvalTask(
        "gsm8k", "gsm8k", "pplmask_gsm8k", "gsm8k.yaml", {"accuracy": ("exact_match", "flexible-extract")}
    ),
    "arc_challenge_mc": LmEvalTask(
        "arc_challenge",
        "arc",
        "pplmask_arc_challenge",
        "arc_challenge.yaml",
        {"acc_norm": ("acc_norm", "none"), "acc": ("acc", "none")},
    ),
}


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def check_lm_eval_backend(config: EvalConfig) -> None:
    """Refuse `backend="lm-eval"` before any work when lm-eval is not installed (nothing falls back).

    Raises:
        ValueError: lm-eval is requested and missing.
    """
    if config.backend == "lm-eval" and not lm_eval_available():
        raise ValueError(
            f"--backend lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}, or use "
            "--backend builtin."
        )


def lm_eval_settings(config: EvalConfig) -> dict[str, Any]:
    """What an lm-eval result depends on beyond the model and rows (part of its cache key): lm-eval's version, where
    its data comes from, and the settings `run_lm_eval` passes."""
    from ..data import data_dir
    from ..utils import package_version

    root = data_dir()
    return {
        "lm_eval": package_version("lm_eval"),
        "lm_eval_data": str(root) if root is not None else "Hub",
        "max_new_tokens": config.max_new_tokens,
        "max_batch_size": config.max_batch_size,
        "seed": config.seed,
    }


def _stock_dir() -> Path:
    """The installed lm-eval's task folder (`lm_eval/tasks`)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _substitute(value: Any, values: dict[str, str]) -> Any:
    """`value` (a parsed YAML tree) with `${name}` replaced in every string."""
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return Template(value).substitute(values) if isinstance(value, str) else value


def render_task_dir(out_dir: str | Path, root: str | Path, tasks: Sequence[str] | None = None) -> Path:
    """Fill in the templates of `lm_eval_tasks/` for the data mirror `root`: the folder to pass to lm-eval's
    `TaskManager(include_path=..., include_defaults=False)` (the templates include lm-eval's own task files by
    path, so its index of every task, two minutes to build on a busy CPU, is not needed).

    `${lm_eval_tasks}` becomes the installed lm-eval's task folder, `${<split>}` the mirror's file of that split (the
    task registry's `local_files`, as the builtin evaluator reads them).

    Args:
        out_dir (`str` or `Path`): Where the filled-in YAMLs are written (a scratch folder).
        root (`str` or `Path`): The local data mirror (`TRL_PPLMASK_DATA_DIR`).
        tasks (`Sequence[str]`, *optional*): Our task names whose templates to fill in; defaults to all of
            [`LM_EVAL_TASKS`].

    Raises:
        FileNotFoundError: a split's file is missing from the mirror.
    """
    import yaml

    out_dir, root = Path(out_dir), Path(root)
    stock = _stock_dir()
    for name in LM_EVAL_TASKS if tasks is None else tasks:
        spec = LM_EVAL_TASKS[name]
        local_files = get_task(resolve_task(name).dataset).local_files
        paths = {split: root / relative for split, relative in local_files.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"lm-eval task {spec.local_task} reads the local data mirror, but {missing} are missing; check "
                f"TRL_PPLMASK_DATA_DIR={root}, or unset it to read {spec.task}'s data from the Hub."
            )
        values = {"lm_eval_tasks": str(stock), **{split: str(path) for split, path in paths.items()}}
        config = _substitute(yaml.safe_load((TASK_TEMPLATES / spec.template).read_text()), values)
        (out_dir / spec.template).write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def lm_eval_samples_to_items(samples: Sequence[dict[str, Any]], task: EvalTask) -> list[dict[str, Any]]:
    """Per-item results, in the builtin evaluators' format, from lm-eval's logged samples
    (`simple_evaluate(log_samples=True)`), one sample per document and filter.

    `prompt` is lm-eval's context (its few-shot examples included); multiple-choice items also carry `choices` (the
    continuations) and `loglik` (lm-eval's log-likelihood of each, as the builtin's items do), generation items
    `generation_kwargs` (lm-eval's, `max_gen_toks` included)."""
    metric_map = LM_EVAL_TASKS[task.name].metrics
    items: dict[int, dict[str, Any]] = {}
    for sample in samples:
        doc_id = int(sample["doc_id"])
        item = items.setdefault(doc_id, {"row_id": doc_id, "scores": {}})
        for ours, (theirs, filter_name) in metric_map.items():
            if sample.get("filter", "none") == filter_name and theirs in sample:
                item["scores"][ours] = float(sample[theirs])
                arguments = sample.get("arguments") or [()]  # one (context, continuation or gen_kwargs) per request
                item["prompt"] = str(arguments[0][0] if arguments[0] else "")[:10000]
                if task.kind == "multiple_choice":
                    item["choices"] = [str(request[1]) for request in arguments if len(request) > 1]
                elif len(arguments[0]) > 1:
                    item["generation_kwargs"] = arguments[0][1]
                item["output"] = str(sample.get("resps", ""))[:10000]
                item["extracted"] = str(sample.get("filtered_resps", ""))
                item["reference"] = str(sample.get("target", ""))
                if task.kind == "multiple_choice" and sample.get("filtered_resps"):
                    item["loglik"] = [float(resp[0]) for resp in sample["filtered_resps"]]
    missing = [doc for doc, item in items.items() if set(item["scores"]) != set(metric_map)]
    if missing:
        raise ValueError(
            f"lm-eval samples of {task.name} lack metrics {sorted(metric_map)} for documents {missing[:5]}."
        )
    return [items[doc] for doc in sorted(items)]


def check_documents(samples: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], task: EvalTask) -> None:
    """lm-eval evaluated exactly our rows, in order: document `i` has row `i`'s question.

    Raises:
        ValueError: other documents or another order (another copy of the data set, another split).
    """
    field = LM_EVAL_TASKS[task.name].question
    docs = {int(s["doc_id"]): s.get("doc", {}) for s in samples}
    if sorted(docs) != list(range(len(rows))):
        raise ValueError(
            f"lm-eval evaluated documents {sorted(docs)[:5]}... of {task.name}, not the {len(rows)} rows of "
            f"{task.dataset}/{task.split}."
        )
    for doc_id, doc in sorted(docs.items()):
        if doc.get(field) != rows[doc_id].get(field):
            raise ValueError(
                f"lm-eval's document {doc_id} of {task.name} is not row {doc_id} of {task.dataset}/{task.split} "
                f"({field} {str(doc.get(field))[:60]!r} vs {str(rows[doc_id].get(field))[:60]!r}): the two backends "
                "read different copies of the data. Set TRL_PPLMASK_DATA_DIR for both, or unset it for both."
            )


def lm_eval_task_name(task: EvalTask) -> str:
    """The lm-eval task that runs `task`: the local one with a data mirror, lm-eval's own (Hub data) without."""
    from ..data import data_dir

    spec = LM_EVAL_TASKS[task.name]
    return spec.local_task if data_dir() is not None else spec.task


def run_lm_eval(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label: str):
    """Evaluate one task through lm-evaluation-harness: the same interface as the builtin evaluators.

    Args:
        model: The loaded causal LM (PEFT models too), on its device; lm-eval's `HFLM` wraps it.
        tokenizer: Its tokenizer.
        task (`EvalTask`): One of [`LM_EVAL_TASKS`].
        rows (`list[dict]`): The rows the builtin evaluator reads (the first `config.limit` of the split); lm-eval
            evaluates as many documents and each is checked against its row.
        config (`EvalConfig`): `max_new_tokens` (lm-eval's `max_gen_toks` of generation tasks), `max_batch_size`,
            `seed`.
        label (`str`): The model's label (in error messages).

    Raises:
        LmEvalError: lm-eval failed (nothing falls back to the builtin evaluator).
        ValueError: lm-eval evaluated other documents than `rows`.

    Returns:
        `tuple[list[dict], dict]`: the items and statistics (`lm_eval_task`, `data`, lm-eval's own aggregates).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..data import data_dir  # imports the data libraries: kept lazy, so that `eval --help` stays light

    name, spec = lm_eval_task_name(task), LM_EVAL_TASKS[task.name]
    root = data_dir()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.max_batch_size)
    try:
        with tempfile.TemporaryDirectory(prefix="pplmask-lm-eval-tasks-") as scratch:
            # Only the task's own folder is indexed (lm-eval's whole index takes minutes to build)
            folder = render_task_dir(scratch, root, [task.name]) if root else _stock_dir() / spec.folder
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            output = simple_evaluate(
                model=lm,
                tasks=[name],
                task_manager=manager,
                limit=len(rows),
                log_samples=True,
                gen_kwargs={"max_gen_toks": config.max_new_tokens},
                bootstrap_iters=0,
                random_seed=config.seed,
                numpy_random_seed=config.seed,
                torch_random_seed=config.seed,
            )
    except Exception as exc:  # nothing falls back: say what failed, where, and the ways out
        where = f"the local data mirror {root}" if root else "the Hub (TRL_PPLMASK_DATA_DIR is not set)"
        raise LmEvalError(
            f"lm-eval failed on {task.name} (lm-eval task {name}, data from {where}) for model {label}: "
            f"{type(exc).__name__}: {exc}. Fix the cause, or evaluate with --backend builtin."
        ) from exc
    samples = output["samples"][name]
    check_documents(samples, rows, task)
    items = lm_eval_samples_to_items(samples, task)
    aggregates = {k: float(v) for k, v in output["results"][name].items() if isinstance(v, (int, float))}
    data = str(root) if root is not None else "Hub"
    return items, {"lm_eval_task": name, "data": data, "lm_eval_results": aggregates}


def backend_for(task: EvalTask, config: EvalConfig) -> tuple[str, str | None]:
    """(backend that evaluates `task`, a note when it is not the requested one): with `backend="lm-eval"`, tasks
    lm-eval has no equivalent of run builtin (the report names each task's backend)."""
    if config.backend != "lm-eval":
        return "builtin", None
    if not lm_eval_available():
        raise ValueError(f"--backend lm-eval: lm-evaluation-harness is not installed; {INSTALL_HINT}.")
    if task.name not in LM_EVAL_TASKS:
        return "builtin", f"lm-eval has no equivalent of {task.name}: evaluated by the builtin evaluator"
    return "lm-eval", None


__all__ = [
    "LM_EVAL_TASKS",
    "LmEvalError",
    "LmEvalTask",
    "check_documents",
    "check_lm_eval_backend",
    "lm_eval_available",
    "lm_eval_samples_to_items",
    "lm_eval_settings",
    "lm_eval_task_name",
    "render_task_dir",
    "run_lm_eval",
]
