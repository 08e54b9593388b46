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

`instruction_following` ([`trl_pplmask.evaluation.instruction_following`]) builds its prompts from templates ×
verifiable constraints that the small base model follows part of the time, and checks them with the IFEval checkers of
`if-verifiable` (skipped, with a note, when that package is missing). `<task>_drift` also reports each model's mean
predictive entropy at those positions (`entropy`, no better direction);
see [`trl_pplmask.evaluation.drift`].

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
model cards): `gsm8k` and `arc_challenge_mc` then run through the harness's own `gsm8k` and `arc_challenge` tasks (its
prompts, few-shot examples, answer extraction and metrics) on the same loaded model and device as the builtin
evaluators. With `TRL_PPLMASK_DATA_DIR` set they read the local mirror (the task YAMLs of `lm_eval_tasks/`, lm-eval's
task with local `data_files`), else the Hub; each document is checked against the builtin's row. Other tasks stay
builtin, the code tasks included, which the harness would execute unsandboxed, and the report's header names each
task's backend. Nothing falls back: a missing `lm-eval` is an error before any work, a failing one an error naming the
task and the model. On `arc_challenge_mc` both backends give the same `acc` and `acc_norm` item for item
(`tests/test_lm_eval.py`; benchmarks/RESULTS.md has the embedded model's figure).

Example (CPU, the embedded model against two adapters trained on GSM8K):

```bash
trl-pplmask eval --base smollm2-135m-instruct --adapter gt=out/sft-gt --adapter stm=out/sft-stm \\
    --target gsm8k --tasks gsm8k,gsm8k_nll,arc_challenge_mc,mbpp_nll --limit 50 --output-dir reports/gsm8k
```

Modules, one job each: `tasks` (task names, splits, rows and answers), `config` (settings, model specs), `generate`,
`loglik`, `drift` and `instruction_following` (the evaluators), `harness` (the lm-evaluation-harness bridge), `cache`,
`results`, `runner` (run_evaluation), `report` (the report dict), `reference_arm`, `markdown`, `plot` and `output` (the
report folder); the command, `trl-pplmask eval`, is `trl_pplmask.commands.eval`. The names below are imported from
them on first use, so that importing this package (and `trl-pplmask eval --help`) loads no torch.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports


# Public names and their modules, imported on first use (PEP 562)
_EXPORTS = {
    "EvalConfig": "config",
    "ModelSpec": "config",
    "build_model_specs": "config",
    "parse_model_arg": "config",
    "EvalTask": "tasks",
    "available_tasks": "tasks",
    "extract_answer": "tasks",
    "load_eval_rows": "tasks",
    "resolve_task": "tasks",
    "TaskResult": "results",
    "aggregate": "results",
    "generate_greedy": "generate",
    "choice_requests": "loglik",
    "continuation_nll": "loglik",
    "evaluate_multiple_choice": "loglik",
    "lm_eval_samples_to_items": "harness",
    "ResultCache": "cache",
    "run_evaluation": "runner",
    "build_report": "report",
    "load_forgetting_metric": "report",
    "render_markdown": "markdown",
    "REPORT_FILES": "output",
    "write_report": "output",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see; test_layers checks that it equals _EXPORTS
    from .cache import ResultCache as ResultCache
    from .config import (
        EvalConfig as EvalConfig,
        ModelSpec as ModelSpec,
        build_model_specs as build_model_specs,
        parse_model_arg as parse_model_arg,
    )
    from .generate import generate_greedy as generate_greedy
    from .harness import lm_eval_samples_to_items as lm_eval_samples_to_items
    from .loglik import (
        choice_requests as choice_requests,
        continuation_nll as continuation_nll,
        evaluate_multiple_choice as evaluate_multiple_choice,
    )
    from .markdown import render_markdown as render_markdown
    from .output import REPORT_FILES as REPORT_FILES, write_report as write_report
    from .report import build_report as build_report, load_forgetting_metric as load_forgetting_metric
    from .results import TaskResult as TaskResult, aggregate as aggregate
    from .runner import run_evaluation as run_evaluation
    from .tasks import (
        EvalTask as EvalTask,
        available_tasks as available_tasks,
        extract_answer as extract_answer,
        load_eval_rows as load_eval_rows,
        resolve_task as resolve_task,
    )


__all__ = sorted(_EXPORTS)
