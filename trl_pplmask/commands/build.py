"""`trl-pplmask build` (and `hub_scripts/build_pplmasked.py`): a Hub-layout `<task>-pplmasked` dataset folder."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from ..constants import EMBEDDED_MODEL_ALIAS
from ..hub.card import fmt_number
from ..hub.folder import read_build_infos
from ..hub.pplmasked import build_pplmasked
from ..hub.pplmasked_config import BuildConfig
from ..hub.shards import DEFAULT_SHARD_ROWS
from ..hub.source import FORMATS
from ..hub.stream_input import INPUT_MODE_HELP, INPUT_MODES
from ..masking import mask_field
from ._args import from_namespace
from ._command import Command


HELP = "Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures)."
PROG = "trl-pplmask build"


@dataclass(kw_only=True)
class BuildArguments:
    """Settings of `trl-pplmask build`, one command-line option each (`max_length` is `--max-length`); the build
    runs on the [`~trl_pplmask.hub.BuildConfig`] made of them, which documents each."""

    dataset: str = field(
        metadata={
            "help": "Task (gsm8k, mbpp, math, arc_challenge), Hub dataset id, or local .jsonl/.parquet file or folder."
        }
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config of a Hub dataset."})
    format: str = field(default="auto", metadata={"help": "TRL format every row must follow.", "choices": FORMATS})
    models: list[str] = field(
        default_factory=lambda: [EMBEDDED_MODEL_ALIAS], metadata={"help": "Scoring models: one config each."}
    )
    config_names: list[str] | None = field(
        default=None, metadata={"help": "Config name per model (default: slug of the model name)."}
    )
    default_config: str | None = field(
        default=None,
        metadata={
            "help": "Config that load_dataset(repo) loads without a config name (default: the one the card already "
            "marks, else the first built)."
        },
    )
    splits: list[str] = field(
        default_factory=lambda: ["train"], metadata={"help": "Splits to build (default: train)."}
    )
    unmasked_splits: list[str] = field(
        default_factory=lambda: ["test"], metadata={"help": "Splits left unmasked (default: test).", "nargs": "*"}
    )
    threshold: float = mask_field("threshold")
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows of each split."})
    max_length: int = field(default=1024, metadata={"help": "SFTConfig.max_length used for training."})
    drop_empty: bool = field(default=False, metadata={"help": "Drop examples left with no trainable token."})
    input_mode: str = field(default="auto", metadata={"help": INPUT_MODE_HELP, "choices": INPUT_MODES})
    shard_rows: int = field(
        default=DEFAULT_SHARD_ROWS,
        metadata={
            "help": f"Source rows per parquet shard (default {DEFAULT_SHARD_ROWS}): built one at a time, each process "
            "of a launch its own, resumed after a kill."
        },
    )
    max_shard_size: str = field(
        default="500MB", metadata={"help": "Warn when a shard is larger than this in memory (default: 500MB)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Discard an unfinished earlier build with other settings or model, and replace a card edited by "
            "hand inside its generated part, instead of refusing (text outside the card's markers is always kept)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Scoring dtype: auto, float32, bfloat16 or float16."})
    max_tokens_per_batch: int | None = field(default=None, metadata={"help": "Scoring token budget per batch."})
    no_cache: bool = field(default=False, metadata={"help": "Rescore even if identical scores are cached."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where scores are cached (default: the trl-pplmask cache)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write (default: <dataset>-pplmasked)."})
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo the folder is for (usage snippets, default of push)."}
    )
    pretty_name: str | None = field(default=None, metadata={"help": "Card title."})
    license: str | None = field(default=None, metadata={"help": "License of the source data (known for the tasks)."})
    language: list[str] = field(
        default_factory=lambda: ["en"], metadata={"help": "Languages of the data (default: en)."}
    )
    card_template: str | None = field(default=None, metadata={"help": "Jinja template of the card (default: cards/)."})


def command_line(arguments, prog: str) -> str:
    """The command that reproduces a build: every build option of `arguments` (a dataclass of settings or parsed
    arguments) spelled out, defaults included, so a later change of defaults cannot change what it builds. Cache and
    output options and the input mode do not change the data and are left out."""
    if dataclasses.is_dataclass(arguments):
        values = {f.name: getattr(arguments, f.name) for f in dataclasses.fields(arguments)}
    else:
        values = vars(arguments)
    parts = shlex.split(prog)
    skip = {
        "func",
        "command",
        "config",
        "no_cache",
        "cache_dir",
        "output_dir",
        "card_template",
        "max_tokens_per_batch",
        "overwrite",
        "input_mode",
    }
    for key, value in values.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]  # an empty list stays explicit (`--unmasked-splits` alone)
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def folder_settings(arguments, prog: str) -> dict[str, Any]:
    """The settings that every builder reads from the same options (data, models, output folder, card), and the
    command line that reproduces the build (`arguments`: `build`'s or `self-output`'s)."""
    return {
        "dataset": arguments.dataset,
        "output_dir": arguments.output_dir,
        "models": list(arguments.models),
        "config_names": arguments.config_names,
        "dataset_config": arguments.dataset_config,
        "limit": arguments.limit,
        "dtype": arguments.dtype,
        "max_shard_size": arguments.max_shard_size,
        "repo_id": arguments.repo_id,
        "pretty_name": arguments.pretty_name,
        "license": arguments.license,
        "language": list(arguments.language),
        "template_path": arguments.card_template,
        "command": command_line(arguments, prog),
    }


def build_config(arguments: BuildArguments, prog: str = PROG) -> BuildConfig:
    """The [`~trl_pplmask.hub.BuildConfig`] of the settings, recording the equivalent command line."""
    return BuildConfig(
        **folder_settings(arguments, prog),
        splits=list(arguments.splits),
        format=arguments.format,
        threshold=arguments.threshold,
        unmasked_splits=list(arguments.unmasked_splits),
        max_length=arguments.max_length,
        drop_empty=arguments.drop_empty,
        input_mode=arguments.input_mode,
        shard_rows=arguments.shard_rows,
        overwrite=arguments.overwrite,
        max_tokens_per_batch=arguments.max_tokens_per_batch,
        use_cache=not arguments.no_cache,
        cache_dir=arguments.cache_dir,
        default_config=arguments.default_config,
    )


def build_config_from_args(args: argparse.Namespace, prog: str = PROG) -> BuildConfig:
    """The [`~trl_pplmask.hub.BuildConfig`] of parsed `build` arguments."""
    return build_config(from_namespace(BuildArguments, args), prog)


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


def run(arguments: BuildArguments, prog: str = PROG) -> int:
    """Run a build and print a summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = build_config(arguments, prog)
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


COMMAND = Command(name="build", help=HELP, config_class=BuildArguments, run=run, pass_prog=True)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
