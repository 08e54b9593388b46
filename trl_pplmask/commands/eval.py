"""`trl-pplmask eval`: its arguments and the command.

Importing this module loads neither torch nor the data libraries, so that `trl-pplmask eval --help` answers fast; the
command imports the work when it runs. The options are generated (see `_args`) from [`EvalArguments`] (the models'
base, the report folder) and from [`~trl_pplmask.evaluation.EvalConfig`] (`--tasks` is a comma-separated list); only
the repeatable forms are written by hand: `--adapter` and `--model` (`[LABEL=]PATH` pairs, turned into model specs)
and `--split` (`DATASET=SPLIT` overrides, `EvalConfig.splits`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import EMBEDDED_MODEL_ALIAS
from ..evaluation.config import EvalConfig, build_model_specs
from ..evaluation.harness import LmEvalError, check_lm_eval_backend
from ..utils import OutputLock, check_writable
from ._args import add_dataclass_arguments, from_namespace, output_dir_field
from ._command import Command


HELP = "Forgetting report: target and non-target tasks, base against fine-tuned models."


@dataclass(kw_only=True)
class EvalArguments:
    """The options of `trl-pplmask eval` that are not [`~trl_pplmask.evaluation.EvalConfig`]'s.

    Args:
        base (`str`, *optional*, defaults to the embedded model): The model the fine-tuned ones started from.
        base_label (`str`, *optional*, defaults to `"base"`): Its row name in the report.
        output_dir (`str`, *optional*, defaults to `"eval_report"`): Folder of `report.json`, `report.md` and
            `report.png`.
        overwrite (`bool`, *optional*, defaults to `False`): Replace the report already in `output_dir`.
    """

    base: str = field(
        default=EMBEDDED_MODEL_ALIAS, metadata={"help": "Base model: Hub id, local path or the embedded alias."}
    )
    base_label: str = field(default="base", metadata={"help": "Row name of the base model."})
    output_dir: str = output_dir_field("Folder of report.json, report.md, report.png.", default="eval_report")
    overwrite: bool = field(
        default=False, metadata={"help": "Replace the report already in --output-dir (refused without it)."}
    )


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask eval`."""
    add_dataclass_arguments(parser, EvalArguments, config_option=False)
    parser.add_argument(
        "--adapter", action="append", metavar="[LABEL=]PATH", help="PEFT adapter trained on --base (repeatable)."
    )
    parser.add_argument("--model", action="append", metavar="[LABEL=]PATH", help="Full fine-tuned model (repeatable).")
    parser.add_argument("--split", action="append", metavar="DATASET=SPLIT", help="Split override (repeatable).")
    return add_dataclass_arguments(parser, EvalConfig, config_option=False)


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
    arguments = from_namespace(EvalArguments, args)
    config = from_namespace(EvalConfig, args, splits=_split_overrides(args.split or []))
    check_lm_eval_backend(config)  # a missing lm-eval is an error before any work, never a silent fallback
    specs = build_model_specs(arguments.base, args.adapter or [], args.model or [], arguments.base_label)
    command = " ".join(["trl-pplmask", *sys.argv[1:]]) if sys.argv else None
    output = arguments.output_dir
    check_output_dir(output)  # a file in the way is named as such before the lock tries to create beside it
    if config.use_cache:  # results are cached after each task: a cache that cannot be written is said now
        root = eval_cache_root(config)
        fix = "Pass --cache-dir with a writable folder (or set TRL_PPLMASK_CACHE), or pass --no-cache"
        check_writable(root, f"The eval cache {root}", fix)
    if (Path(output) / "report.json").exists() and not arguments.overwrite:
        raise ValueError(
            f"--output-dir {output} already holds a report (report.json). Pass --overwrite to replace it, or another "
            "--output-dir (cached results make a rerun with one more model cheap)."
        )
    try:
        with OutputLock(output, what="report folder (--output-dir)"):
            report = run_evaluation(specs, config, output, command)
    except LmEvalError as err:  # one line, as for bad input (the cause's traceback with TRL_PPLMASK_DEBUG set)
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask eval: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    print(f"Report -> {', '.join(str(Path(output) / name) for name in REPORT_FILES)}")
    return 0


DESCRIPTION = (
    "Evaluate a base model and fine-tuned versions of it (adapters or full models) on the target task and on "
    "non-target tasks; write report.json, report.md and report.png."
)


# `cmd_eval` receives the parsed namespace itself: EvalArguments, EvalConfig and the repeatable options
COMMAND = Command(name="eval", help=HELP, description=DESCRIPTION, run=cmd_eval, add_arguments=add_eval_args)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
