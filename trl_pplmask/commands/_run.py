"""Running a command: the errors it reports in one line (exit status 2), and SIGTERM ended like Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable, Sequence

from ..utils import request_termination
from ._args import OUTPUT_DIR_OPTION


# What a command reports as `<prog>: error: <message>` rather than a traceback (OSError: files, network)
REPORTED_ERRORS = (ValueError, OSError, ImportError, TypeError)


@contextlib.contextmanager
def terminate_cleanly():
    """SIGTERM ends the command as SIGINT does, through its `finally` blocks: staging folders are removed and no
    partial output is left (the default action would kill the process on the spot). Exit status 143."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        request_termination(signum)  # checked again before any output is swapped in, should this exit be swallowed
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def call_reporting_errors(function: Callable[[], int], prog: str) -> int:
    """`function()`; an error of [`REPORTED_ERRORS`] is printed as `<prog>: error: ...` and returns 2 (raised
    instead when `TRL_PPLMASK_DEBUG` is set)."""
    try:
        return function()
    except REPORTED_ERRORS as err:
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """`command(args)` with SIGTERM ended like Ctrl-C ([`terminate_cleanly`]) and its errors reported in one line
    ([`call_reporting_errors`]); a full disk is said with the folders the command writes ([`disk_full_message`])."""

    def run() -> int:
        with terminate_cleanly():
            try:
                return command(args)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(disk_full_message(err, args)) from err
                raise

    return call_reporting_errors(run, prog)


def disk_full_message(err: OSError, args: argparse.Namespace) -> str:
    """A full disk (or quota) in one line: the file when the error names it, the folders the command writes (a write
    to a full disk names no file), and what to do."""
    # Every command run here spells its output folder --output-dir, whether its setting is `output` or `output_dir`
    options = (("output", OUTPUT_DIR_OPTION), ("output_dir", OUTPUT_DIR_OPTION), ("cache_dir", "--cache-dir"))
    places = [f"{option} {value}" for name, option in options if (value := getattr(args, name, None))]
    where = f" writing {err.filename}" if err.filename else ""
    written = " and ".join(places) or "its output"
    return (
        f"{err.strerror or err}{where}: the disk holding {written} (or the cache, TRL_PPLMASK_CACHE) is full. "
        "Free space there (or choose a folder on another disk) and rerun."
    )


def command_main(
    parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int], argv: Sequence[str] | None
) -> int:
    """The `main` of a command module: parse `argv` (default: `sys.argv[1:]`) with `parser` and run `command`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser.parse_args(None if argv is None else list(argv))
    return run_command(command, args, parser.prog)
