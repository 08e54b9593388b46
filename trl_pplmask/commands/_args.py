"""Command-line options generated from a command's config dataclass, and TRL's YAML `--config FILE`.

A command describes its settings as a dataclass in TRL's style, one field per option with its help in the metadata:
`threshold: float = field(default=2.5, metadata={"help": "..."})`. [`add_dataclass_arguments`] makes each field an
argparse option: `--` and the field name with dashes (`output_column` -> `--output-column`, read back as
`args.output_column`); `int`, `float` or `str` from the annotation (`| None` allowed); `bool` -> a flag
(`store_true`, the field's default as the default); `list[...]` -> several values (`nargs`, `+` unless the metadata
says otherwise); no default -> required. The metadata may also give `choices`, `metavar`, `nargs`, `aliases` (more
option strings) and `positional: True`.

transformers' `HfArgumentParser` (which TRL's parser extends) is not used: importing it imports transformers and
torch, which `--help` must not, and it spells every option with underscores too and makes a `bool` field an option
that takes a value.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar


T = TypeVar("T")

CONFIG_HELP = (
    "YAML file of settings, as in TRL: one per option, named like it with underscores (e.g. `max_length: 512`); "
    "options given on the command line override it."
)


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that reads TRL's `--config FILE` once [`add_config_option`] added it: the YAML's
    settings are parsed as if given before the command line's options, so that those override them. A parser without
    that option parses as argparse does."""

    reads_config = False

    def parse_known_args(self, args=None, namespace=None):
        if self.reads_config:
            args = list(sys.argv[1:] if args is None else args)
            path = _config_path(args)
            if path is not None:
                args = [*self._config_tokens(path), *args]
        return super().parse_known_args(args, namespace)

    def _config_tokens(self, path: str) -> list[str]:
        """The options that the settings of the YAML file `path` stand for."""
        from ..utils import read_yaml

        try:
            settings = read_yaml(Path(path).expanduser(), f"--config {path}")
        except OSError as err:
            self.error(f"--config {path}: {err.strerror or err}")
        except ValueError as err:  # not UTF-8, not YAML, a tag: file, line and column
            self.error(str(err))
        if settings is None:
            return []
        if not isinstance(settings, dict):
            self.error(f"--config {path} must map settings to values (e.g. `max_length: 512`).")
        options = {a.dest: a for a in self._actions if a.option_strings and a.dest not in ("help", "config")}
        tokens = []
        for key, value in settings.items():
            action = options.get(str(key).replace("-", "_"))
            if action is None:
                if any(a.dest == key and not a.option_strings for a in self._actions):
                    self.error(f"--config {path}: {key!r} is given on the command line, not in the file.")
                self.error(f"--config {path}: unknown setting {key!r}; the settings are: {', '.join(options)}.")
            try:
                tokens += _option_tokens(action, value)
            except ValueError as err:
                self.error(f"--config {path}: {key}: {err}")
        return tokens


def _config_path(args: list[str]) -> str | None:
    """The last `--config FILE` (or `--config=FILE`) of `args`; a `--config` without a value is left to argparse."""
    path = None
    for index, token in enumerate(args):
        if token == "--":
            break
        if token == "--config" and index + 1 < len(args):
            path = args[index + 1]
        elif token.startswith("--config="):
            path = token.partition("=")[2]
    return path


def _option_tokens(action: argparse.Action, value: Any) -> list[str]:
    """The command-line tokens that give `action` the YAML `value` (argparse converts and checks them)."""
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if value is None:
        return []
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"takes true or false, got {value!r}")
        return [flag] if value == action.const else []
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [flag, *map(str, values)]
    if isinstance(value, (list, dict)):
        raise ValueError(f"takes one value, got {value!r}")
    return [f"{flag}={value}"]  # `=`: a value that starts with `-` stays a value


def add_config_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TRL's `--config FILE`. A plain `argparse.ArgumentParser` (a subparser of one) becomes an
    [`ArgumentParser`], the class that reads the file."""
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = ArgumentParser
    elif not isinstance(parser, ArgumentParser):
        raise TypeError(f"--config needs a trl_pplmask.commands._args.ArgumentParser, not {type(parser).__name__}.")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.reads_config = True
    return parser


def _annotation(hint: Any) -> Any:
    """`X` of `X | None` (`Optional[X]`), else `hint`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return hint


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, config_class: type, config_option: bool = True
) -> argparse.ArgumentParser:
    """Add one option per field of the dataclass `config_class` (see the module's documentation), in field order,
    then `--config FILE` unless `config_option` is false."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        kind = _annotation(hints[field.name])
        kwargs: dict[str, Any] = {"help": meta["help"]}
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        if meta.get("positional"):
            parser.add_argument(field.name, **kwargs)
            continue
        if "default" not in kwargs:
            kwargs["required"] = True
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            kwargs["nargs"] = meta.get("nargs", "+")
            (item,) = typing.get_args(kind)
            if item is not str:
                kwargs["type"] = item
        elif kind in (int, float):
            kwargs["type"] = kind
        elif kind is not str:
            raise TypeError(f"{config_class.__name__}.{field.name}: no option for the type {kind!r}.")
        parser.add_argument("--" + field.name.replace("_", "-"), *meta.get("aliases", ()), **kwargs)
    if config_option:
        add_config_option(parser)
    return parser


def from_namespace(config_class: type[T], args: argparse.Namespace) -> T:
    """The `config_class` instance of arguments parsed from [`add_dataclass_arguments`] options."""
    return config_class(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config_class)})
