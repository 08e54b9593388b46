"""`trl-pplmask study`: run or plan a forgetting study described by a YAML file ([`~trl_pplmask.study.run_study`])."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..study.config import load_study_config
from ..study.plan import render_plan
from ..study.runner import arm_status, run_study
from ..study.train import missing_features
from ._command import Command


HELP = "Forgetting study: train GT, STM and alternative arms with shared settings and compare them."
DESCRIPTION = (
    "Run (or resume) a forgetting study described by a YAML file (see studies/): prepare the target rows, train every "
    "arm with `trl-pplmask sft`, evaluate the base model and every arm on the same items, and write report.json, "
    "report.md, report.png and study.json into the study's output_dir."
)


@dataclass(kw_only=True)
class StudyArguments:
    """Options of `trl-pplmask study`. Its settings are the study YAML itself (`--config`, a
    [`~trl_pplmask.study.StudyConfig`]), so it takes no YAML of options besides."""

    config: str = field(metadata={"help": "Study YAML, e.g. studies/gsm8k-smollm2-135m-cpu.yaml."})
    output_dir: str | None = field(default=None, metadata={"help": "Override the YAML's output_dir."})
    plan: bool = field(
        default=False, metadata={"help": "Validate and print the stages; run nothing.", "aliases": ("--dry-run",)}
    )


def run(arguments: StudyArguments) -> int:
    """Run or plan the study (`plan`: print the stages and the state of every arm)."""
    config = load_study_config(arguments.config)
    if arguments.output_dir:
        config.output_dir = arguments.output_dir
    if arguments.plan:
        print(render_plan(config))
        problems = missing_features(config)
        for label, status in arm_status(config).items():
            print(f"  arm {label}: {status}")
        if problems:
            print("Not runnable with this installation yet:\n  " + "\n  ".join(problems))
        return 0
    print(render_plan(config), flush=True)
    command = " ".join(["trl-pplmask", *sys.argv[1:]]) if sys.argv else None
    try:
        run_study(config, command)
    except RuntimeError as err:  # a training subprocess failed: its log tail is in the message
        print(f"trl-pplmask study: error: {err}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(
    name="study", help=HELP, description=DESCRIPTION, config_class=StudyArguments, run=run, config_option=False
)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
