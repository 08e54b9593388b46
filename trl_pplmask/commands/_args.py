"""Command-line options generated from a command's config dataclass, and TRL's YAML `--config FILE`.

A command describes its settings as a dataclass in TRL's style, one field per option with its help in the metadata:
`threshold: float = field(default=2.5, metadata={"help": "..."})`. [`add_dataclass_arguments`] makes each field an
argparse option: `--` and the field name with dashes (`output_column` -> `--output-column`, read back as
`args.output_column`); `int`, `float` or `str` from the annotation (`| None` allowed); `bool` -> a flag
(`store_true`; a field that defaults to `True` is turned off by a flag named in `option`, e.g. `--no-cache` for
`use_cache`); `list[...]` -> several values (`nargs`, `+` unless the metadata says otherwise); no default -> required.
The metadata may also give `choices`, `metavar`, `nargs`, `type` (a function of the one value given, e.g. a
comma-separated list), `option` (the option's name when it is not the field's, or `None`: the field is no option, it
keeps its default or is set by the command), `aliases` (more option strings), `deprecated` (old spellings, still
accepted with a warning) and `positional: True`. A field whose type is itself such a dataclass (`generation:
SelfOutputConfig`) stands for the options of its fields, in its place. YAML `--config` settings are named like a
field or like its option. [`command_line`] spells a config's settings back as options.

transformers' `HfArgumentParser` (which TRL's parser extends) is not used: importing it imports transformers and
torch, which `--help` must not, and it spells every option with underscores too and makes a `bool` field an option
that takes a value.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from collections.abc import Iterator
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
        actions = [a for a in self._actions if a.option_strings and a.dest not in ("help", "config")]
        options = {setting_name(a): a for a in actions}  # named like the option (`no_cache`) or its field
        fields = {a.dest: a for a in actions if a.dest not in options}
        tokens = []
        for key, value in settings.items():
            name = str(key).replace("-", "_")
            action = options.get(name)
            if action is None and name in fields:  # the field's name: `use_cache: false` is `--no-cache`
                action, value = fields[name], _field_value(fields[name], value)
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


def setting_name(action: argparse.Action) -> str:
    """The name of `action`'s setting in a YAML `--config` file: its option with underscores (`no_cache`)."""
    return next(s for s in action.option_strings if s.startswith("--"))[2:].replace("-", "_")


def _field_value(action: argparse.Action, value: Any) -> Any:
    """The YAML `value` of a flag named by its field rather than its option (`use_cache: false` for `--no-cache`):
    whether to give the flag."""
    if action.nargs == 0 and isinstance(value, bool):
        return value == action.const
    return value


def _option_tokens(action: argparse.Action, value: Any) -> list[str]:
    """The command-line tokens that give `action` the YAML `value` (argparse converts and checks them); a flag
    (`--no-cache`) is given for `true`."""
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if value is None:
        return []
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"takes true or false, got {value!r}")
        return [flag] if value else []
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [flag, *map(str, values)]
    if isinstance(value, (list, dict)):
        raise ValueError(f"takes one value, got {value!r}")
    return [f"{flag}={value}"]  # `=`: a value that starts with `-` stays a value


OUTPUT_DIR_OPTION = "--output-dir"  # the one spelling of a command's output folder (TRL spells it --output_dir)


def output_dir_field(help: str, **kwargs: Any) -> Any:
    """The field of a command's output folder: `--output-dir`, as `build`, `self-output` and `study` (and the
    datasets and huggingface-cli commands) spell it; `--output`, its old spelling in `score`, `mask`, `demo` and
    `eval`, is still accepted with a warning.

    Args:
        help (`str`): The option's help.
        kwargs: `default=` (none: the option is required).
    """
    metadata = {
        "help": f"{help} (--output: the old spelling, deprecated.)",
        "option": OUTPUT_DIR_OPTION,
        "metavar": "OUTPUT_DIR",
        "deprecated": ("--output",),
    }
    return dataclasses.field(metadata=metadata, **kwargs)


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


def _nested_class(hint: Any) -> type | None:
    """The dataclass of a field annotated `hint` whose fields are options in its place (`generation:
    SelfOutputConfig`), else None."""
    kind = _annotation(hint)
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _option_fields(config_class: type) -> Iterator[tuple[dataclasses.Field, type | None]]:
    """The fields of `config_class` that are options or stand for a dataclass of options, each with that dataclass
    (None for an option), in field order."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.metadata.get("option", "") is not None:  # `option: None`: set by the command, or left at its default
            yield field, _nested_class(hints[field.name])


def option_name(field: dataclasses.Field) -> str:
    """The option of a dataclass field: `option` in its metadata, else `--` and the field's name with dashes."""
    return field.metadata.get("option", "--" + field.name.replace("_", "-"))


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, config_class: type, config_option: bool = True
) -> argparse.ArgumentParser:
    """Add one option per field of the dataclass `config_class` (see the module's documentation), in field order,
    then `--config FILE` unless `config_option` is false."""
    hints = typing.get_type_hints(config_class)
    for field, nested in _option_fields(config_class):
        if nested is not None:
            add_dataclass_arguments(parser, nested, config_option=False)
            continue
        meta = field.metadata
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
        kwargs.update(_value_kwargs(config_class, field, _annotation(hints[field.name])))
        option = option_name(field)
        renamed = option[2:] != field.name.replace("_", "-")
        if renamed and "action" not in kwargs and "choices" not in kwargs:  # `--bootstrap BOOTSTRAP`, not the field
            kwargs.setdefault("metavar", option[2:].replace("-", "_").upper())
        deprecated = tuple(meta.get("deprecated", ()))
        if deprecated:
            kwargs["action"] = _warning_action(parser, kwargs.get("action", "store"), deprecated)
        parser.add_argument(option, *meta.get("aliases", ()), *deprecated, dest=field.name, **kwargs)
    if config_option:
        add_config_option(parser)
    return parser


def _value_kwargs(config_class: type, field: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """The `add_argument` settings of the values of `field` (of annotation `kind`, without `| None`)."""
    meta = field.metadata
    if "type" in meta:  # one value, converted by the given function
        return {"type": meta["type"]}
    if kind is bool:
        if field.default is True:  # only a flag named in `option` (`--no-cache`) can turn it off
            if "option" not in meta:
                raise TypeError(f"{config_class.__name__}.{field.name} defaults to True: name its flag in `option`.")
            return {"action": "store_false"}
        return {"action": "store_true"}
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return {"nargs": meta.get("nargs", "+"), **({} if item is str else {"type": item})}
    if kind in (int, float):
        return {"type": kind}
    if kind is not str:
        raise TypeError(f"{config_class.__name__}.{field.name}: no option for the type {kind!r}.")
    return {}


_WARNED: set[str] = set()  # the deprecated spellings already warned about in this process


def warn_deprecated(prog: str, spelling: str, option: str) -> None:
    """Say once per process, on stderr, that `spelling` is an old name of `option`."""
    if spelling not in _WARNED:
        _WARNED.add(spelling)
        print(f"{prog}: warning: {spelling} is deprecated; use {option} (the same option).", file=sys.stderr)


def _warning_action(parser: argparse.ArgumentParser, action: str, deprecated: tuple[str, ...]) -> type:
    """The argparse action `action` (`"store"`, `"store_true"`, ...) that warns when given under a `deprecated`
    spelling ([`warn_deprecated`])."""
    base = parser._registry_get("action", action, action)

    class WarningAction(base):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string in deprecated:
                warn_deprecated(parser.prog, option_string, self.option_strings[0])
            super().__call__(parser, namespace, values, option_string)

    return WarningAction


def from_namespace(config_class: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The `config_class` instance of arguments parsed from [`add_dataclass_arguments`] options; `values` sets the
    fields that are no option (those not given keep their default)."""
    for field, nested in _option_fields(config_class):
        if field.name not in values:
            values[field.name] = getattr(args, field.name) if nested is None else from_namespace(nested, args)
    return config_class(**values)


# Settings that do not change what a command writes (where, how fast, how the input is read, whether to replace),
# left out of its record
UNRECORDED_SETTINGS = frozenset(
    ("output_dir", "use_cache", "cache_dir", "template_path", "max_tokens_per_batch", "overwrite", "input_mode")
)


def command_line(config: Any, prog: str, unrecorded: frozenset[str] = UNRECORDED_SETTINGS) -> str:
    """The command that reproduces what `config` (a dataclass of [`add_dataclass_arguments`] options) makes: every
    option spelled out, defaults included, so that a later change of defaults cannot change it (a flag is given when
    it is set); the settings named in `unrecorded`, those that are None and the fields that are no option are left
    out.

    Args:
        config: The settings (`build`'s [`~trl_pplmask.hub.BuildConfig`], `self-output`'s
            [`~trl_pplmask.hub.self_output_config.SelfOutputBuildConfig`]).
        prog (`str`): The program that runs them (`trl-pplmask build`).
        unrecorded (`frozenset[str]`, *optional*): Fields to leave out.
    """
    return shlex.join([*shlex.split(prog), *_option_tokens_of(config, unrecorded)])


def _option_tokens_of(config: Any, unrecorded: frozenset[str]) -> list[str]:
    """The options that give `config`'s settings (see [`command_line`])."""
    parts = []
    for field, nested in _option_fields(type(config)):
        value = getattr(config, field.name)
        if nested is not None:
            parts += _option_tokens_of(value, unrecorded)
        elif field.name in unrecorded or value is None:
            continue
        elif isinstance(value, bool):  # a flag, given when it changes the default (`--no-cache` when False)
            if value != (field.default is True):
                parts.append(option_name(field))
        elif isinstance(value, list):  # an empty list stays explicit (`--unmasked-splits` alone)
            parts += [option_name(field), *map(str, value)]
        else:
            parts += [option_name(field), str(value)]
    return parts
