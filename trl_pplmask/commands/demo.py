"""`trl-pplmask demo`: score, mask and fine-tune the embedded model on GSM8K, on CPU (see `trl_pplmask.demo`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._args import ArgumentParser, add_dataclass_arguments, from_namespace
from ._run import command_main


HELP = "Score, mask and fine-tune the embedded model on GSM8K, on CPU."
DESCRIPTION = (
    "Score and mask GSM8K rows with the embedded model, save the masked dataset, then train a few LoRA steps with "
    "SFTTrainer and PplMaskCollator, on CPU and offline."
)


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of `trl-pplmask demo`, one command-line option each (`num_examples` is `--num-examples`).

    Parameters:
        output (`str`): Folder of the demo's outputs (the masked dataset and the adapter).
        num_examples (`int`): First N GSM8K training rows.
        max_steps (`int`): LoRA training steps with `SFTTrainer` and `PplMaskCollator`.
    """

    output: str = field(
        default="demo_output", metadata={"help": "Folder for the demo's outputs (default: demo_output)."}
    )
    num_examples: int = field(default=64, metadata={"help": "GSM8K rows used (default: 64)."})
    max_steps: int = field(default=10, metadata={"help": "LoRA training steps (default: 10)."})


def run(config: DemoConfig) -> int:
    from ..demo import run_demo

    return run_demo(output_dir=config.output, num_examples=config.num_examples, max_steps=config.max_steps)


def cmd_demo(args: argparse.Namespace) -> int:
    return run(from_namespace(DemoConfig, args))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return add_dataclass_arguments(parser, DemoConfig)


def make_parser(prog: str = "trl-pplmask demo") -> ArgumentParser:
    return add_arguments(ArgumentParser(prog=prog, description=DESCRIPTION))


def register_cli(subparsers) -> None:
    """Add `demo` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    add_arguments(subparsers.add_parser("demo", help=HELP, description=DESCRIPTION)).set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None, prog: str = "trl-pplmask demo") -> int:
    return command_main(make_parser(prog), cmd_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
