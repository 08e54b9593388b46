"""`trl-pplmask sft`: parsed by TRL's own parser, not argparse: every `trl sft` flag and YAML recipe (`--config`), plus
the `pplmask_*` settings of [`~trl_pplmask.sft.PplMaskArguments`]. The training is `trl_pplmask.sft`; this module is
its command line: the listing in `trl-pplmask --help`, `sft --help` answered from a cache, and the errors."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ._run import call_reporting_errors


HELP = "`trl sft` with Selective Token Masking: every trl sft flag and recipe, plus pplmask_* settings."


def make_parser(prog: str = "trl-pplmask sft"):
    """TRL's parser of `trl-pplmask sft` (`TrlParser` of the `trl sft` dataclasses and `PplMaskArguments`); building
    it imports torch, transformers and peft."""
    from ..sft import make_parser as sft_parser

    return sft_parser(prog)


def register_cli(subparsers) -> None:
    """List `sft` in `trl-pplmask --help`; `trl_pplmask.cli.main` hands its arguments to [`main`]."""
    subparsers.add_parser("sft", add_help=False, help=HELP)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `trl-pplmask sft` on `argv` (the arguments after `sft`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and set(argv) <= {"-h", "--help"}:
        return _help()
    from ..sft import cli as sft_cli

    return call_reporting_errors(lambda: sft_cli(argv), "trl-pplmask sft")


def _help() -> NoReturn:
    """Print `sft --help`, TRL's parser's own text, from a cache when a previous call made it.

    Building TRL's parser imports torch, transformers and peft (4-6 s on a laptop CPU) for a text that depends only on
    their versions, on `trl_pplmask/sft.py` and on the terminal's width; so the text is made once per such combination
    and kept in `$TRL_PPLMASK_CACHE/help/` (a folder that cannot be written only costs the speed-up).
    """
    import hashlib
    import io
    import shutil

    from ..models import cache_dir
    from ..utils import atomic_write_text, package_version

    packages = ("trl-pplmask", "trl", "transformers", "peft", "accelerate")
    key = hashlib.sha256((Path(__file__).resolve().parents[1] / "sft.py").read_bytes())
    width = shutil.get_terminal_size().columns  # argparse wraps the text to it
    for part in (sys.version, width, *map(package_version, packages)):
        key.update(f"\0{part}".encode())
    path = cache_dir() / "help" / f"sft-{key.hexdigest()[:20]}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        from ..sft import cli as sft_cli

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
