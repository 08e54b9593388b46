"""The `trl-pplmask` command: one subcommand per module of `trl_pplmask.commands`, imported when it runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
        "trl_pplmask.hub.cli",
        "Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures).",
    ),
    "push": ("trl_pplmask.hub.cli", "Upload a built folder to a Hub dataset repo (or --dry-run)."),
    "self-output": (
        "trl_pplmask.generation.cli",
        "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder.",
    ),
    "eval": (
        "trl_pplmask.evaluation.cli",
        "Forgetting report: target and non-target tasks, base against fine-tuned models.",
    ),
    "sft": (
        "trl_pplmask.sft",
        "`trl sft` with Selective Token Masking: every trl sft flag and recipe, plus pplmask_* settings.",
    ),
    "study": (
        "trl_pplmask.study.main",
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
    modules = [module for name, (module, _) in COMMANDS.items() if argv is None or name in (named, *CORE)]
    for module in dict.fromkeys(modules):
        try:
            register = importlib.import_module(module).register_cli
        except ImportError as err:
            if argv is None or named not in COMMANDS or COMMANDS[named][0] != module:
                continue  # listed by name below; running it reports the missing dependency
            raise SystemExit(f"trl-pplmask {named}: error: {err}") from None
        register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        # `sft` is parsed by TRL's own parser (every `trl sft` flag and YAML recipe), not by argparse here
        return _run_sft(argv[1:])
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return run_command(args.func, args, f"trl-pplmask {args.command}")


def _run_sft(argv: list[str]) -> int:
    if argv and set(argv) <= {"-h", "--help"}:
        return _sft_help()
    from .sft import cli as sft_cli

    try:
        return sft_cli(argv)
    except (ValueError, OSError, ImportError, TypeError) as err:
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask sft: error: {err}", file=sys.stderr)
        return 2


def _sft_help() -> int:
    """Print `sft --help`, TRL's parser's own text, from a cache when a previous call made it.

    Building TRL's parser imports torch, transformers and peft (4-6 s on a laptop CPU) for a text that depends only on
    their versions, on `sft.py` and on the terminal's width; so the text is made once per such combination and kept
    in `$TRL_PPLMASK_CACHE/help/` (a folder that cannot be written only costs the speed-up).
    """
    import hashlib
    import io
    import shutil

    from .models import cache_dir
    from .utils import atomic_write_text, package_version

    packages = ("trl-pplmask", "trl", "transformers", "peft", "accelerate")
    key = hashlib.sha256(Path(__file__).with_name("sft.py").read_bytes())
    for part in (
        sys.version,
        Path(sys.argv[0]).name,
        shutil.get_terminal_size().columns,
        *map(package_version, packages),
    ):
        key.update(f"\0{part}".encode())
    path = cache_dir() / "help" / f"sft-{key.hexdigest()[:20]}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        from .sft import cli as sft_cli

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                sft_cli(["--help"])
            except SystemExit as exit:
                if exit.code not in (0, None):
                    raise
        text = buffer.getvalue()
        with contextlib.suppress(OSError):
            atomic_write_text(path, text)
    sys.stdout.write(text)
    raise SystemExit(0)  # as argparse's --help does


if __name__ == "__main__":
    sys.exit(main())
