"""One description per subcommand, from which its parser, its place in `trl-pplmask` and its `main` are generated.

TRL keeps one base for its commands (`trl/cli/commands/`); here a command module states what it is once, as a
[`Command`]: its name, help, the config dataclass its options come from and the function that runs it. Building the
parser imports nothing heavier than argparse, so that `--help` never loads torch.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._args import ArgumentParser, add_dataclass_arguments, from_namespace
from ._run import command_main


@dataclass(frozen=True)
class Command:
    """A `trl-pplmask` subcommand.

    Args:
        name (`str`): The subcommand's name (`trl-pplmask <name>`).
        help (`str`): One line, listed by `trl-pplmask --help`.
        run (`Callable`): Runs the command and returns its exit status: `run(config)`, with `prog=...` too when
            `pass_prog` is set, where `config` is the `config_class` instance of the parsed options (or the argparse
            namespace itself for a command without `config_class`).
        config_class (`type`, *optional*): Dataclass whose fields are the command's options (see
            `_args.add_dataclass_arguments`).
        description (`str`, *optional*): The text of the command's own `--help`; defaults to `help`.
        config_option (`bool`, *optional*, defaults to `True`): Accept TRL's YAML `--config FILE`.
        add_arguments (`Callable`, *optional*): Adds options that no dataclass field expresses (after the generated
            ones); a command without `config_class` defines all its options here.
        pass_prog (`bool`, *optional*, defaults to `False`): Pass the program name to `run` (for commands that name
            themselves in messages or records, and that `hub_scripts/` run under another name).
    """

    name: str
    help: str
    run: Callable[..., int]
    config_class: type | None = None
    description: str | None = None
    config_option: bool = True
    add_arguments: Callable[[argparse.ArgumentParser], Any] | None = None
    pass_prog: bool = False

    @property
    def prog(self) -> str:
        return f"trl-pplmask {self.name}"

    def define_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the command's options to `parser`."""
        if self.config_class is not None:
            add_dataclass_arguments(parser, self.config_class, config_option=self.config_option)
        if self.add_arguments is not None:
            self.add_arguments(parser)
        return parser

    def execute(self, args: argparse.Namespace, prog: str | None = None) -> int:
        """Run the command on parsed arguments."""
        settings = args if self.config_class is None else from_namespace(self.config_class, args)
        if self.pass_prog:
            return self.run(settings, prog=prog or self.prog)
        return self.run(settings)

    def make_parser(self, prog: str | None = None) -> ArgumentParser:
        """The command's own parser (`python -m trl_pplmask.commands.<name>`, `hub_scripts/`)."""
        return self.define_arguments(ArgumentParser(prog=prog or self.prog, description=self.description or self.help))

    def register_cli(self, subparsers) -> None:
        """Add the command to the `trl-pplmask` parser (called by `trl_pplmask.cli`)."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description or self.help)
        self.define_arguments(parser).set_defaults(func=functools.partial(self.execute, prog=self.prog), spec=self)

    def main(self, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        """Parse `argv` (default: `sys.argv[1:]`) and run the command; `prog` is its name in messages and records."""
        prog = prog or self.prog
        return command_main(self.make_parser(prog), functools.partial(self.execute, prog=prog), argv)
