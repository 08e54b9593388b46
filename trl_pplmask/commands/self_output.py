"""`trl-pplmask self-output` (and `hub_scripts/build_self_output.py`): verified self-output or rephrase SFT data in a
Hub-layout `<task>-self-output` folder.

The options are the fields of [`~trl_pplmask.hub.self_output_config.SelfOutputBuildConfig`] and, in the place of its
`generation`, of [`~trl_pplmask.generation.SelfOutputConfig`] (see `_args`); they are defined without importing torch,
so that `--help` answers fast. The build ([`~trl_pplmask.hub.self_output.build_self_output`]) is imported when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..hub.self_output_config import SelfOutputBuildConfig
from ._args import command_line, from_namespace
from ._command import Command


HELP = "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder."
DESCRIPTION = (
    HELP + " For every row, sample --num-samples responses, keep a verified one (or the ground truth), and write one "
    "config per generating model; interrupted runs resume from --checkpoint-dir."
)
PROG = "trl-pplmask self-output"


def build_config_from_args(args: argparse.Namespace, prog: str = PROG) -> SelfOutputBuildConfig:
    """The [`~trl_pplmask.hub.self_output_config.SelfOutputBuildConfig`] of parsed `self-output` arguments, recording
    the equivalent command line."""
    config = from_namespace(SelfOutputBuildConfig, args)
    config.command = command_line(config, prog)
    return config


def run(config: SelfOutputBuildConfig, prog: str = PROG) -> int:
    """Run a build of `config` (its options parsed; the command line that reproduces it is recorded) and print a
    summary per config."""
    from ..hub.card import fmt_percent
    from ..hub.folder import read_build_infos
    from ..hub.self_output import build_self_output  # imports torch: only when a build runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config.command = command_line(config, prog)
    output = build_self_output(config)
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            print(
                f"{name}/{split}: {s['rows']} rows ({s['rows_self']} self, {s['rows_ground_truth']} ground truth, "
                f"{s['rows_skipped']} skipped); sample accuracy {fmt_percent(s['sample_accuracy'])}; tokens with "
                f"ppl > {s['threshold']:g}: chosen {fmt_percent(s['chosen']['high_ppl_share'])}, ground truth "
                f"{fmt_percent(s['ground_truth']['high_ppl_share'])}"
            )
    print(f"Built {output} (load it with datasets.load_dataset({str(output)!r}, <config>))")
    return 0


COMMAND = Command(
    name="self-output", help=HELP, description=DESCRIPTION, config_class=SelfOutputBuildConfig, run=run, pass_prog=True
)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
