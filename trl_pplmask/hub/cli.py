"""Command line: `trl-pplmask build` and `trl-pplmask push` (registered by `trl_pplmask.cli`), and the `hub_scripts`
wrappers of both."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from ..constants import EMBEDDED_MODEL_ALIAS
from .card import fmt_number
from .folder import read_build_infos
from .pplmasked import build_pplmasked
from .pplmasked_config import BuildConfig
from .publish import PushError, push_folder
from .source import FORMATS


def add_build_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask build` (also used by `hub_scripts/build_pplmasked.py`)."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="Task (gsm8k, mbpp, math, arc_challenge), Hub dataset id, or local .jsonl/.parquet file or folder.",
    )
    parser.add_argument("--dataset-config", help="Config of a Hub dataset.")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="TRL format every row must follow.")
    parser.add_argument("--models", nargs="+", default=[EMBEDDED_MODEL_ALIAS], help="Scoring models: one config each.")
    parser.add_argument("--config-names", nargs="+", help="Config name per model (default: slug of the model name).")
    parser.add_argument(
        "--default-config",
        help="Config that load_dataset(repo) loads without a config name (default: the one the card already marks, "
        "else the first built).",
    )
    parser.add_argument("--splits", nargs="+", default=["train"], help="Splits to build (default: train).")
    parser.add_argument("--unmasked-splits", nargs="*", default=["test"], help="Splits left unmasked (default: test).")
    parser.add_argument(
        "--threshold", type=float, default=2.5, help="Perplexity threshold of the labels (paper: 2.5)."
    )
    parser.add_argument("--limit", type=int, help="Use only the first N rows of each split.")
    parser.add_argument("--max-length", type=int, default=1024, help="SFTConfig.max_length used for training.")
    parser.add_argument("--drop-empty", action="store_true", help="Drop examples left with no trainable token.")
    parser.add_argument("--max-shard-size", default="500MB", help="Largest parquet shard (default: 500MB).")
    parser.add_argument("--dtype", default="auto", help="Scoring dtype: auto, float32, bfloat16 or float16.")
    parser.add_argument("--max-tokens-per-batch", type=int, help="Scoring token budget per batch.")
    parser.add_argument("--no-cache", action="store_true", help="Rescore even if identical scores are cached.")
    parser.add_argument("--cache-dir", help="Where scores are cached (default: the trl-pplmask cache).")
    parser.add_argument("--output-dir", help="Folder to write (default: <dataset>-pplmasked).")
    parser.add_argument("--repo-id", help="Hub repo the folder is for (usage snippets, default of push).")
    parser.add_argument("--pretty-name", help="Card title.")
    parser.add_argument("--license", help="License of the source data (known for the tasks).")
    parser.add_argument("--language", nargs="+", default=["en"], help="Languages of the data (default: en).")
    parser.add_argument("--card-template", help="Jinja template of the card (default: trl_pplmask/cards/).")
    return parser


def build_config_from_args(args: argparse.Namespace, prog: str = "trl-pplmask build") -> BuildConfig:
    """The [`~trl_pplmask.hub.BuildConfig`] of parsed `add_build_args` arguments, recording the equivalent command
    line."""
    return BuildConfig(
        **folder_settings_from_args(args, prog),
        splits=list(args.splits),
        format=args.format,
        threshold=args.threshold,
        unmasked_splits=list(args.unmasked_splits),
        max_length=args.max_length,
        drop_empty=args.drop_empty,
        max_tokens_per_batch=args.max_tokens_per_batch,
        use_cache=not args.no_cache,
        cache_dir=args.cache_dir,
        default_config=args.default_config,
    )


def folder_settings_from_args(args: argparse.Namespace, prog: str) -> dict[str, Any]:
    """The settings that every builder reads from the same options (data, models, output folder, card), and the
    command line that reproduces the build."""
    return {
        "dataset": args.dataset,
        "output_dir": args.output_dir,
        "models": list(args.models),
        "config_names": args.config_names,
        "dataset_config": args.dataset_config,
        "limit": args.limit,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "repo_id": args.repo_id,
        "pretty_name": args.pretty_name,
        "license": args.license,
        "language": list(args.language),
        "template_path": args.card_template,
        "command": command_line(args, prog),
    }


def command_line(args: argparse.Namespace, prog: str) -> str:
    """The command that reproduces a build: every build option spelled out, defaults included, so a later change
    of defaults cannot change what it builds. Cache and output options do not change the data and are left out."""
    parts = shlex.split(prog)
    skip = {"func", "command", "no_cache", "cache_dir", "output_dir", "card_template", "max_tokens_per_batch"}
    for key, value in vars(args).items():
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


def add_push_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask push` (also used by `hub_scripts/push.py`)."""
    parser.add_argument("folder", help="Folder written by `trl-pplmask build`.")
    parser.add_argument("--repo-id", help="org/name of the dataset repo (default: the --repo-id of the build).")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    parser.add_argument("--revision", help="Branch to push to (created when missing).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--commit-message", help="Commit message.")
    parser.add_argument("--dry-run", action="store_true", help="List the files and sizes that would be uploaded.")
    return parser


def cmd_build(args: argparse.Namespace, prog: str = "trl-pplmask build") -> int:
    """Run a build from parsed arguments and print a summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = build_config_from_args(args, prog)
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


def cmd_push(args: argparse.Namespace, prog: str = "trl-pplmask push") -> int:
    """Push a built folder; a failed push prints why and returns 1."""
    try:
        result = push_folder(
            args.folder,
            repo_id=args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            token=args.token,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
        )
    except PushError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(
            f"Pushed {args.folder}: {getattr(result, 'commit_url', None) or getattr(result, 'pr_url', None) or result}"
        )
    return 0


def register_cli(subparsers) -> None:
    """Add `build` and `push` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    build = subparsers.add_parser(
        "build", help="Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures)."
    )
    add_build_args(build)
    build.set_defaults(func=cmd_build)
    push = subparsers.add_parser("push", help="Upload a built folder to a Hub dataset repo (or --dry-run).")
    add_push_args(push)
    push.set_defaults(func=cmd_push)
