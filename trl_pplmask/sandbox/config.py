"""Settings of the sandbox (`SandboxConfig`), the outcome of a run (`SandboxResult`) and what it enforces here
(`SandboxIsolation`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal


SandboxStatus = Literal["passed", "failed", "timeout", "error", "killed"]
NetworkIsolation = Literal["auto", "namespace", "guard", "none"]

# Variable names that must never reach the sandbox, even when passed explicitly through `extra_env`.
SECRET_NAME_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


@dataclass
class SandboxConfig:
    r"""
    Limits and isolation settings of the code-execution sandbox.

    Args:
        timeout (`float`, *optional*, defaults to `10.0`):
            Wall-clock seconds before the process tree is killed (status `"timeout"`). `RLIMIT_CPU` is set to
            `ceil(timeout) + 1` CPU seconds.
        memory_limit (`int`, *optional*, defaults to `1 << 30`):
            Address-space limit of each process in bytes (`RLIMIT_AS`). Python raises `MemoryError` beyond it.
        total_memory_limit (`int` or `None`, *optional*, defaults to `2 << 30`):
            Resident memory of all the sandbox's processes together, in bytes, checked by a watchdog every 0.1 s;
            exceeding it kills the tree (status `"killed"`). `None` disables the watchdog's memory check.
        file_size_limit (`int`, *optional*, defaults to `16 << 20`):
            Largest file the code may write, in bytes (`RLIMIT_FSIZE`).
        max_processes (`int`, *optional*, defaults to `32`):
            Processes and threads the code may run at once (`RLIMIT_NPROC`, or the watchdog where the kernel does not
            enforce it).
        max_open_files (`int`, *optional*, defaults to `256`):
            Open file descriptors per process (`RLIMIT_NOFILE`).
        max_output_bytes (`int`, *optional*, defaults to `64 << 10`):
            Bytes of stdout and of stderr kept; beyond it the head and the tail are kept and the rest is dropped
            while reading, so the parent's memory stays bounded.
        network_isolation (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: a network namespace where the OS allows it, otherwise the in-process socket guard.
            `"namespace"`: require a network namespace (runs fail with status `"error"` if unavailable).
            `"guard"`: only the in-process socket guard. `"none"`: leave networking alone.
        drop_privileges (`bool` or `None`, *optional*, defaults to `None`):
            Run the code as a dedicated unprivileged uid. `None` does so when the pipeline runs as root (needed there:
            root ignores `RLIMIT_NPROC` and may signal any process). `True` requires it.
        uid_base (`int`, *optional*, defaults to `64000`):
            First uid of the range leased to sandboxed runs when dropping privileges.
        uid_count (`int`, *optional*, defaults to `64`):
            Size of that range: the number of runs that can be in flight at once on this machine.
        python_executable (`str` or `None`, *optional*, defaults to `None`):
            Interpreter that runs the code. `None`: the current one, or when dropping privileges the first of the
            current one and the system's `python3` that the sandbox uid can execute.
        extra_env (`dict[str, str]`, *optional*):
            Additional environment variables for the code. Names that look like secrets are refused.
        poll_interval (`float`, *optional*, defaults to `0.05`):
            Seconds between checks of the process while it runs.
    """

    timeout: float = 10.0
    memory_limit: int = 1 << 30
    total_memory_limit: int | None = 2 << 30
    file_size_limit: int = 16 << 20
    max_processes: int = 32
    max_open_files: int = 256
    max_output_bytes: int = 64 << 10
    network_isolation: NetworkIsolation = "auto"
    drop_privileges: bool | None = None
    uid_base: int = 64000
    uid_count: int = 64
    python_executable: str | None = None
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    poll_interval: float = 0.05

    def __post_init__(self):
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}.")
        for name in ("memory_limit", "file_size_limit", "max_processes", "max_open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.total_memory_limit is not None and self.total_memory_limit <= 0:
            raise ValueError(f"total_memory_limit must be positive or None, got {self.total_memory_limit}.")
        if self.network_isolation not in ("auto", "namespace", "guard", "none"):
            raise ValueError(
                f"network_isolation must be 'auto', 'namespace', 'guard' or 'none', got {self.network_isolation!r}."
            )
        if self.uid_base <= 0 or self.uid_count <= 0:
            raise ValueError("uid_base and uid_count must be positive.")
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
            `"timeout"` (killed after `timeout` seconds); `"killed"` (ended by a signal or by the watchdog: CPU,
            file-size or memory limits); `"error"` (the sandbox itself could not run it).
        returncode (`int` or `None`): Exit status of the process (negative: killed by that signal); `None` if it never
            started.
        stdout (`str`): Captured standard output, truncated to `max_output_bytes` (head and tail).
        stderr (`str`): Captured standard error, truncated likewise.
        duration (`float`): Wall-clock seconds of the run.
        stdout_truncated (`bool`): Whether stdout was longer than the cap.
        stderr_truncated (`bool`): Whether stderr was longer than the cap.
        detail (`str`): Why it ended as it did, in words (empty when it passed).
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


@dataclass(frozen=True)
class SandboxIsolation:
    """
    What the sandbox enforces on this machine with a given config (see the package docstring).

    Args:
        privilege_drop (`bool`): Code runs as a leased unprivileged uid.
        user_namespace (`bool`): Code runs in its own user namespace (non-root mode).
        pid_namespace (`bool`): Code is PID 1 of its own PID namespace and cannot address outside processes.
        private_proc (`bool`): Code sees a `/proc` of its own PID namespace (root mode): it cannot list the host's
            processes or read their command lines.
        network (`str`): `"namespace"` (empty network namespace), `"socket-guard"` (in-process guard only) or `"none"`.
        python_executable (`str`): Interpreter that runs the code.
        process_limit (`str`): `"rlimit"` (kernel-enforced `RLIMIT_NPROC`) or `"watchdog"` (polled).
    """

    privilege_drop: bool
    user_namespace: bool
    pid_namespace: bool
    network: str
    python_executable: str
    process_limit: str
    private_proc: bool = False
