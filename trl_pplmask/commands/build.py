"""`trl-pplmask build` (and `hub_scripts/build_pplmasked.py`): a Hub-layout `<task>-pplmasked` dataset folder."""

from __future__ import annotations

import argparse
import logging
import sys

from ..hub.card import fmt_number
from ..hub.folder import read_build_infos
from ..hub.pplmasked import build_pplmasked
from ..hub.pplmasked_config import BuildConfig
from ._args import command_line, from_namespace
from ._command import Command


HELP = "Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures)."
PROG = "trl-pplmask build"


def build_config_from_args(args: argparse.Namespace, prog: str = PROG) -> BuildConfig:
    """The [`~trl_pplmask.hub.BuildConfig`] of parsed `build` arguments, recording the equivalent command line."""
    config = from_namespace(BuildConfig, args)
    config.command = command_line(config, prog)
    return config


def check_score_cache(config: BuildConfig) -> None:
    """The score cache is written after each shard is scored: one that cannot be written is said before any work."""
    if not config.use_cache:
        return
    from pathlib import Path

    from ..models import cache_dir
    from ..utils import check_writable

    root = Path(config.cache_dir).expanduser() if config.cache_dir else cache_dir() / "scores"
    fix = "Pass --cache-dir with a writable folder (or set TRL_PPLMASK_CACHE), pass --no-cache"
    check_writable(root, f"The score cache {root}", fix)


def run(config: BuildConfig, prog: str = PROG) -> int:
    """Run a build of `config` (its options parsed; the command line that reproduces it is recorded) and print a
    summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config.command = command_line(config, prog)
    check_score_cache(config)
    output = build_pplmasked(config)
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            stats = split_info["stats"]
            print(
                f"{name}/{split}: {stats['examples']} examples, {stats['completion_tokens']} completion tokens, "
                f"{100 * stats['masked_fraction']:.1f}% masked ({split_info['strategy']}), median ppl "
                f"{fmt_number(stats['median_ppl'])}, p90 {fmt_number(stats['p90_ppl'])}, "
                f"{stats['examples_without_trainable_token']} without trainable token"
            )
    print(f"Built {output} (load it with datasets.load_dataset({str(output)!r}, <config>))")
    return 0


COMMAND = Command(name="build", help=HELP, config_class=BuildConfig, run=run, pass_prog=True)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
