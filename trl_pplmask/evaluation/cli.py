"""Arguments of `trl-pplmask eval`, defined without importing torch (the work: `trl_pplmask.evaluation`)."""

from __future__ import annotations

import argparse


# The data sets of `trl_pplmask.data.TASKS`, in its order (a test checks that the two agree)
DATASETS = ("gsm8k", "mbpp", "math", "arc_challenge", "humaneval")
DEFAULT_TASKS = ("gsm8k", "math", "mbpp", "humaneval", "arc_challenge")
GENERATION_TASKS = ("gsm8k", "math", "arc_challenge", "mbpp", "humaneval")
INSTRUCTION_TASK = "instruction_following"
BACKENDS = ("builtin", "lm-eval")

HELP = "Forgetting report: target and non-target tasks, base against fine-tuned models."


def task_names() -> list[str]:
    """Every task name `eval` accepts (as `trl_pplmask.evaluation.available_tasks`)."""
    return [
        *GENERATION_TASKS,
        "arc_challenge_mc",
        INSTRUCTION_TASK,
        *(f"{name}_nll" for name in DATASETS),
        *(f"{name}_drift" for name in DATASETS),
    ]


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask eval`."""
    from .cli import DEFAULT_MODEL

    parser.add_argument("--base", default=DEFAULT_MODEL, help="Base model: Hub id, local path or the embedded alias.")
    parser.add_argument("--base-label", default="base", help="Row name of the base model.")
    parser.add_argument(
        "--adapter", action="append", metavar="[LABEL=]PATH", help="PEFT adapter trained on --base (repeatable)."
    )
    parser.add_argument("--model", action="append", metavar="[LABEL=]PATH", help="Full fine-tuned model (repeatable).")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"Comma-separated: {task_names()}.")
    parser.add_argument("--target", help="The fine-tuning task, one of --tasks (default: the first).")
    parser.add_argument("--limit", type=int, help="Evaluate the first N items of each task.")
    parser.add_argument("--split", action="append", metavar="DATASET=SPLIT", help="Split override (repeatable).")
    parser.add_argument("--output", default="eval_report", help="Folder of report.json, report.md, report.png.")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Generation budget per answer.")
    parser.add_argument(
        "--instruction-max-new-tokens", type=int, default=192, help="Budget of the instruction_following answers."
    )
    parser.add_argument(
        "--drift-max-new-tokens", type=int, default=96, help="Budget of the base answers scored by <task>_drift."
    )
    parser.add_argument("--max-tokens-per-batch", type=int, help="Token budget of a batch (default: by device).")
    parser.add_argument("--max-batch-size", type=int, default=64, help="Most prompts per generation batch.")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16.")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available).")
    parser.add_argument("--nll-max-length", type=int, default=2048, help="max_length of the <task>_nll tokenization.")
    parser.add_argument("--code-timeout", type=float, default=10.0, help="Seconds per sandboxed code test.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples of the intervals.")
    parser.add_argument("--confidence", type=float, default=0.95, help="Level of the bootstrap intervals.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of torch and of the bootstrap (default: 0).")
    parser.add_argument(
        "--reference",
        metavar="LABEL",
        help="A fine-tuned model (e.g. gt) the others are compared with: share of its target gain kept and of its "
        "non-target degradation avoided.",
    )
    parser.add_argument(
        "--backend",
        default="builtin",
        choices=BACKENDS,
        help="builtin: the paper's prompts, offline, sandboxed code. lm-eval: lm-evaluation-harness for gsm8k and "
        "arc_challenge_mc (harness prompts, Hub data), builtin for the rest.",
    )
    parser.add_argument("--cache-dir", help="Result cache (default: <TRL_PPLMASK_CACHE>/eval).")
    parser.add_argument("--no-cache", action="store_true", help="Neither read nor write cached results.")
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import cmd_eval as run

    return run(args)


def register_cli(subparsers) -> None:
    """Add `eval` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    parser = subparsers.add_parser(
        "eval",
        help=HELP,
        description="Evaluate a base model and fine-tuned versions of it (adapters or full models) on the target "
        "task and on non-target tasks; write report.json, report.md and report.png.",
    )
    add_eval_args(parser)
    parser.set_defaults(func=cmd_eval)
