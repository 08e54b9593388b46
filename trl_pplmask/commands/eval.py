"""`trl-pplmask eval`: its arguments and the command.

Importing this module loads neither torch nor the data libraries, so that `trl-pplmask eval --help` answers fast; the
command imports the work when it runs. Its options are written with argparse rather than generated from a dataclass
(`_args`): `--adapter` and `--model` are repeatable `[LABEL=]PATH` pairs, `--split` repeatable `DATASET=SPLIT`
overrides and `--tasks` a comma-separated list, all turned into an [`~trl_pplmask.evaluation.EvalConfig`] and model
specs by `cmd_eval`; and its help lists the tasks that `trl_pplmask.evaluation` knows when it is imported.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..constants import EMBEDDED_MODEL_ALIAS
from ..evaluation.config import BACKENDS, EvalConfig, build_model_specs
from ..evaluation.harness import LmEvalError, check_lm_eval_backend
from ..evaluation.tasks import DEFAULT_TASKS, available_tasks
from ..utils import OutputLock, check_writable
from ._command import Command


HELP = "Forgetting report: target and non-target tasks, base against fine-tuned models."


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask eval`."""
    parser.add_argument(
        "--base", default=EMBEDDED_MODEL_ALIAS, help="Base model: Hub id, local path or the embedded alias."
    )
    parser.add_argument("--base-label", default="base", help="Row name of the base model.")
    parser.add_argument(
        "--adapter", action="append", metavar="[LABEL=]PATH", help="PEFT adapter trained on --base (repeatable)."
    )
    parser.add_argument("--model", action="append", metavar="[LABEL=]PATH", help="Full fine-tuned model (repeatable).")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"Comma-separated: {available_tasks()}.")
    parser.add_argument("--target", help="The fine-tuning task, one of --tasks (default: the first).")
    parser.add_argument("--limit", type=int, help="Evaluate the first N items of each task.")
    parser.add_argument("--split", action="append", metavar="DATASET=SPLIT", help="Split override (repeatable).")
    parser.add_argument("--output", default="eval_report", help="Folder of report.json, report.md, report.png.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the report already in --output (refused without it)."
    )
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
        help="builtin: the paper's prompts, offline, sandboxed code. lm-eval: lm-evaluation-harness's own gsm8k and "
        "arc_challenge tasks for gsm8k and arc_challenge_mc (harness prompts; data from TRL_PPLMASK_DATA_DIR when "
        "set, else the Hub; an lm-eval failure is an error), builtin for the rest (the report names each task's "
        "backend).",
    )
    parser.add_argument("--cache-dir", help="Result cache (default: <TRL_PPLMASK_CACHE>/eval).")
    parser.add_argument("--no-cache", action="store_true", help="Neither read nor write cached results.")
    return parser


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
    # The work imports torch and the data libraries: imported here, so that `eval --help` stays light
    from ..evaluation.cache import eval_cache_root
    from ..evaluation.markdown import render_markdown
    from ..evaluation.output import REPORT_FILES, check_output_dir
    from ..evaluation.runner import run_evaluation

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
    check_lm_eval_backend(config)  # a missing lm-eval is an error before any work, never a silent fallback
    specs = build_model_specs(args.base, args.adapter or [], args.model or [], args.base_label)
    command = " ".join(["trl-pplmask", *sys.argv[1:]]) if sys.argv else None
    check_output_dir(args.output)  # a file in the way is named as such before the lock tries to create beside it
    if config.use_cache:  # results are cached after each task: a cache that cannot be written is said now
        root = eval_cache_root(config)
        fix = "Pass --cache-dir with a writable folder (or set TRL_PPLMASK_CACHE), or pass --no-cache"
        check_writable(root, f"The eval cache {root}", fix)
    if (Path(args.output) / "report.json").exists() and not args.overwrite:
        raise ValueError(
            f"--output {args.output} already holds a report (report.json). Pass --overwrite to replace it, or another "
            "--output (cached results make a rerun with one more model cheap)."
        )
    try:
        with OutputLock(args.output, what="report folder (--output)"):
            report = run_evaluation(specs, config, args.output, command)
    except LmEvalError as err:  # one line, as for bad input (the cause's traceback with TRL_PPLMASK_DEBUG set)
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask eval: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    print(f"Report -> {', '.join(str(Path(args.output) / name) for name in REPORT_FILES)}")
    return 0


DESCRIPTION = (
    "Evaluate a base model and fine-tuned versions of it (adapters or full models) on the target task and on "
    "non-target tasks; write report.json, report.md and report.png."
)


# The options are written by hand (`add_eval_args`): `cmd_eval` receives the parsed namespace itself
COMMAND = Command(name="eval", help=HELP, description=DESCRIPTION, run=cmd_eval, add_arguments=add_eval_args)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
