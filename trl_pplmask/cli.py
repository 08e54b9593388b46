"""The `trl-pplmask` command: one subcommand per module of `trl_pplmask.commands`, imported when it runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .commands._args import ArgumentParser
from .commands._run import run_command


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `trl-pplmask` parser. With `argv`, of the subcommands in `COMMANDS` only the one that `argv` names (and the
    light `score`, `mask` and `demo`) is defined (the others are listed by name and help), so that no unneeded module
    is imported; without, all are."""
    parser = ArgumentParser(
        prog="trl-pplmask",
        description="Selective Token Masking for TRL: score, mask and fine-tune without catastrophic forgetting.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _register_commands(sub, argv)
    return parser


# Every subcommand: name -> (module with a `register_cli(subparsers)`, one-line help). Only the module of the
# subcommand being run is imported (and those of `CORE`); the others are listed with their help alone, so that
# `trl-pplmask --help` never imports torch. The modules define their arguments without importing torch (the work
# imports it). `sft` is parsed by TRL's own parser (see `main`).
COMMANDS = {
    "score": (
        "trl_pplmask.commands.score",
        "Tokenize a dataset like SFTTrainer and add per-token NLLs (token_nll).",
    ),
    "mask": ("trl_pplmask.commands.mask", "Mask the labels of a scored dataset and add mask statistics."),
    "demo": ("trl_pplmask.commands.demo", "Score, mask and fine-tune the embedded model on GSM8K, on CPU."),
    "build": (
        "trl_pplmask.commands.build",
        "Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures).",
    ),
    "push": ("trl_pplmask.commands.push", "Upload a built folder to a Hub dataset repo (or --dry-run)."),
    "self-output": (
        "trl_pplmask.commands.self_output",
        "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder.",
    ),
    "eval": (
        "trl_pplmask.commands.eval",
        "Forgetting report: target and non-target tasks, base against fine-tuned models.",
    ),
    "sft": (
        "trl_pplmask.commands.sft",
        "`trl sft` with Selective Token Masking: every trl sft flag and recipe, plus pplmask_* settings.",
    ),
    "study": (
        "trl_pplmask.commands.study",
        "Forgetting study: train GT, STM and alternative arms with shared settings and compare them.",
    ),
}
# Defined whatever the subcommand, as they always were: their modules import nothing heavier than NumPy
CORE = ("score", "mask", "demo")


def _command_name(argv: Sequence[str] | None) -> str | None:
    """The subcommand of `argv` (the top-level parser has no option other than --help before it)."""
    for token in argv or ():
        if not token.startswith("-"):
            return token
    return None


def _register_commands(sub, argv: Sequence[str] | None = None) -> None:
    """Register the subcommand named in `argv` and those of `CORE` from their modules, and list every other one by
    name and help; without `argv`, register them all."""
    import importlib

    named = _command_name(argv)
    for name, (module, help_text) in COMMANDS.items():
        if argv is None or name in (named, *CORE):
            try:
                register = importlib.import_module(module).register_cli
            except ImportError as err:
                if argv is not None and name == named:
                    raise SystemExit(f"trl-pplmask {named}: error: {err}") from None
                # else listed by name below; running it reports the missing dependency
            else:
                register(sub)
                continue
        sub.add_parser(name, help=help_text, add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        # `sft` is parsed by TRL's own parser (every `trl sft` flag and YAML recipe), not by argparse here
        from .commands import sft

        return sft.main(argv[1:])
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return run_command(args.func, args, f"trl-pplmask {args.command}")


if __name__ == "__main__":
    sys.exit(main())
