"""Isolation probing: what the sandbox can enforce on this machine with a given config, probed once per config and
process (`describe_isolation`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading

from .config import SandboxConfig, SandboxIsolation
from .launch import (
    _CLONE_NEWNET,
    _CLONE_NEWNS,
    _CLONE_NEWPID,
    _CLONE_NEWUSER,
    _UNSHARE,
    _make_preexec,
    _minimal_env,
    _Plan,
    _workdir,
)
from .runner import _runner_command
from .uids import _uid_lease


logger = logging.getLogger(__package__)  # one logger for the whole sandbox, named as before the split

_FALLBACK_INTERPRETERS = ("/usr/local/bin/python3", "/usr/bin/python3", "/bin/python3")


def _launches(plan: _Plan, workdir: str = "/") -> bool:
    """Whether `plan` starts an interpreter that runs (a probe, not a sandboxed run: no limits)."""
    try:
        completed = subprocess.run(
            [plan.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env=_minimal_env(workdir),
            preexec_fn=_make_preexec(plan),
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0


_PRIVATE_PROC_PROBE = (
    "import os\nprint(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getuid())"
)


def _private_proc_works(executable: str, uid: int | None) -> bool:
    """Whether the runner, started as root in new PID and mount namespaces, gives the program a /proc of its own."""
    if _UNSHARE is None:
        return False
    try:
        with _workdir(uid) as workdir:
            program = os.path.join(workdir, "main.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write(_PRIVATE_PROC_PROBE)
            os.chmod(program, 0o644)
            completed = subprocess.run(
                _runner_command(executable, program, uid=uid, private_proc=True),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=workdir,
                env=_minimal_env(workdir),
                preexec_fn=_make_preexec(_Plan(executable, None, _CLONE_NEWPID | _CLONE_NEWNS, False)),
                timeout=30,
            )
    except (OSError, subprocess.SubprocessError):
        return False
    expected = f"1 ['1'] {os.getuid() if uid is None else uid}"
    if completed.returncode != 0 or completed.stdout.decode(errors="replace").strip() != expected:
        logger.info("Sandbox: no private /proc (%s)", completed.stderr.decode(errors="replace").strip()[-500:])
        return False
    return True


def _candidate_interpreters(config: SandboxConfig) -> list[str]:
    if config.python_executable is not None:
        return [config.python_executable]
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", sys.executable)]
    found += [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "", *_FALLBACK_INTERPRETERS]
    unique = []
    for path in found:
        if path and path not in unique and os.path.isfile(path):
            unique.append(path)
    return unique


def _probe_isolation(config: SandboxConfig) -> SandboxIsolation:
    is_root = os.geteuid() == 0
    want_drop = is_root if config.drop_privileges is None else config.drop_privileges
    if want_drop and not is_root:
        raise ValueError("drop_privileges=True needs the pipeline to run as root; leave it at None otherwise.")
    executable = config.python_executable or sys.executable
    privilege_drop = False
    if want_drop:
        with _uid_lease(config) as uid:
            for candidate in _candidate_interpreters(config):
                if _launches(_Plan(candidate, uid, 0, False)):
                    executable, privilege_drop = candidate, True
                    break
        if not privilege_drop:
            if config.drop_privileges:
                raise RuntimeError(
                    f"No interpreter among {_candidate_interpreters(config)} is executable by an unprivileged uid; "
                    "install a system python3 or set SandboxConfig.python_executable to one outside /root."
                )
            logger.warning(
                "Sandbox: running as root but no interpreter is executable by an unprivileged uid, so sandboxed code "
                "runs as root (RLIMIT_NPROC not enforced, writes unrestricted). Install a system python3 to fix this."
            )
        elif executable != sys.executable:
            logger.info(
                "Sandbox: code runs with %s (the current interpreter is not reachable by the sandbox uid).", executable
            )

    want_netns = config.network_isolation in ("auto", "namespace") and _UNSHARE is not None
    user_ns = pid_ns = netns = private_proc = False
    if is_root:
        with _uid_lease(config) if privilege_drop else contextlib.nullcontext() as uid:
            if want_netns:
                netns = _launches(_Plan(executable, uid, _CLONE_NEWNET, False))
            pid_ns = private_proc = _private_proc_works(executable, uid)
        if not private_proc:
            logger.warning(
                "Sandbox: running as root but new PID and mount namespaces are not available, so sandboxed code can "
                "list the host's processes and read their command lines in /proc."
            )
    elif _UNSHARE is not None:
        # A user namespace gives an unprivileged process its own PID (and network) namespace
        options = [_CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNET] if want_netns else []
        for flags in [*options, _CLONE_NEWUSER | _CLONE_NEWPID]:
            if _launches(_Plan(executable, None, flags, True)):
                user_ns, pid_ns, netns = True, True, bool(flags & _CLONE_NEWNET)
                break
    if config.network_isolation == "namespace" and not netns:
        raise RuntimeError(
            "network_isolation='namespace' but this process may not create a network namespace (needs root or "
            "unprivileged user namespaces); use network_isolation='auto' to fall back to the socket guard."
        )
    if netns:
        network = "namespace"
    elif config.network_isolation == "none":
        network = "none"
    else:
        network = "socket-guard"
        if config.network_isolation == "auto":
            logger.warning("Sandbox: no network namespace available; only an in-process guard blocks networking.")
    enforced = privilege_drop or user_ns or not is_root
    return SandboxIsolation(
        privilege_drop, user_ns, pid_ns, network, executable, "rlimit" if enforced else "watchdog", private_proc
    )


_ISOLATION_CACHE: dict[tuple, SandboxIsolation] = {}
_ISOLATION_LOCK = threading.Lock()


def describe_isolation(config: SandboxConfig | None = None) -> SandboxIsolation:
    """What the sandbox enforces here with `config`: probed once per config and process, then cached.

    Args:
        config (`SandboxConfig`, *optional*): Settings to probe; defaults to `SandboxConfig()`.

    Returns:
        `SandboxIsolation`: privilege drop, namespaces, network mode, interpreter and how the process count is bounded.
    """
    config = config or SandboxConfig()
    key = (
        os.geteuid(),
        config.drop_privileges,
        config.network_isolation,
        config.python_executable,
        config.uid_base,
        config.uid_count,
    )
    with _ISOLATION_LOCK:
        if key not in _ISOLATION_CACHE:
            _ISOLATION_CACHE[key] = _probe_isolation(config)
        return _ISOLATION_CACHE[key]


def network_isolation(config: SandboxConfig | None = None) -> str:
    """How networking is disabled for sandboxed code here: `"namespace"`, `"socket-guard"` or `"none"`."""
    return describe_isolation(config).network
