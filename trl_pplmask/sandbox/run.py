"""Running one program (`run_code`): launch it under the runner, collect its output within bounds, enforce the
timeout and the watchdog, kill everything it started and classify how it ended."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import signal
import subprocess
import time

from .config import SandboxConfig, SandboxIsolation, SandboxResult, SandboxStatus
from .isolation import describe_isolation
from .launch import (
    _CLONE_NEWNET,
    _CLONE_NEWNS,
    _CLONE_NEWPID,
    _CLONE_NEWUSER,
    _make_preexec,
    _minimal_env,
    _Plan,
    _rlimits,
    _workdir,
)
from .procs import _kill_processes, _processes, _remove_files_of
from .runner import _runner_command
from .uids import _uid_lease


logger = logging.getLogger(__package__)  # one logger for the whole sandbox, named as before the split

_WATCHDOG_INTERVAL = 0.1


class _CappedBuffer:
    """Keeps the first and last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data[-self.half :]
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        if self.truncated:
            dropped = self.total - len(self.head) - len(self.tail)
            data = bytes(self.head) + f"\n... [{dropped} bytes truncated] ...\n".encode() + bytes(self.tail)
        else:
            data = bytes(self.head + self.tail)
        return data.decode("utf-8", errors="replace")


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the process a zombie: its pid, hence its process group id, cannot be reused before we kill the
    # group and reap it, so `killpg` never reaches an unrelated group
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _read_ready(selector: selectors.BaseSelector, buffers: dict[int, _CappedBuffer], timeout: float) -> None:
    for key, _ in selector.select(timeout=timeout):
        data = os.read(key.fd, 1 << 16)
        if data:
            buffers[key.fd].write(data)
        else:
            selector.unregister(key.fd)


def _watchdog(config: SandboxConfig, isolation: SandboxIsolation, uid: int | None, session: int) -> str | None:
    procs = _processes(uid=uid) if uid is not None else _processes(uid=os.geteuid(), session=session)
    procs = [p for p in procs if not p.zombie]
    rss = sum(p.rss for p in procs)
    if config.total_memory_limit is not None and rss > config.total_memory_limit:
        limit_mib = config.total_memory_limit / 2**20
        return f"killed by the memory watchdog: {rss / 2**20:.0f} MiB resident > {limit_mib:.0f} MiB"
    if isolation.process_limit == "watchdog" and len(procs) > config.max_processes:
        return f"killed by the watchdog: {len(procs)} processes > max_processes={config.max_processes}"
    return None


def _supervise(
    proc: subprocess.Popen, config: SandboxConfig, isolation: SandboxIsolation, uid: int | None, start: float
) -> tuple[_CappedBuffer, _CappedBuffer, str | None]:
    """Collect output until the process exits, times out or trips the watchdog; then kill everything it started."""
    buffers = {proc.stdout.fileno(): _CappedBuffer(config.max_output_bytes)}
    buffers[proc.stderr.fileno()] = _CappedBuffer(config.max_output_bytes)
    reason = None
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        deadline, next_check = start + config.timeout, start + _WATCHDOG_INTERVAL
        while True:
            now = time.monotonic()
            if now >= deadline:
                reason = f"timeout: killed after {config.timeout:g} s"
                break
            wait = min(config.poll_interval, deadline - now)
            if selector.get_map():
                _read_ready(selector, buffers, wait)
            else:  # both pipes closed: the process is exiting, or detached its output; poll it more often
                time.sleep(min(wait, 0.005))
            if _has_exited(proc.pid):
                break
            if time.monotonic() >= next_check:
                reason = _watchdog(config, isolation, uid, proc.pid)
                if reason:
                    break
                next_check = time.monotonic() + _WATCHDOG_INTERVAL
        # Kill the group first (cheap, covers the common case), then sweep: by uid, that also catches processes that
        # left the group with setsid(); otherwise by session
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        if uid is not None:
            _kill_processes(uid=uid)
        else:
            _kill_processes(uid=os.geteuid(), session=proc.pid)
        proc.wait()
        # Whatever is still in the pipes: every writer is dead now, unless one escaped (non-root, setsid)
        drain_deadline = time.monotonic() + 1.0
        while selector.get_map() and time.monotonic() < drain_deadline:
            _read_ready(selector, buffers, 0.05)
    return buffers[proc.stdout.fileno()], buffers[proc.stderr.fileno()], reason


def _classify(returncode: int, reason: str | None) -> tuple[SandboxStatus, str]:
    if reason is not None:
        return ("timeout" if reason.startswith("timeout") else "killed"), reason
    if returncode == 0:
        return "passed", ""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {
            signal.SIGXCPU: " (CPU time limit)",
            signal.SIGXFSZ: " (file size limit)",
            signal.SIGKILL: " (CPU hard limit, the kernel's OOM killer, or the code itself)",
        }.get(sig, "")
        return "killed", f"killed by {name}{why}"
    return "failed", f"exited with status {returncode}"


def _parent_netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _read_report(fd: int, limit: int = 4096) -> bytes:
    """What is in the completion pipe once every writer is gone (non-blocking: an escaped writer cannot hang us)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(OSError):
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    return data


def _run(
    code: str,
    config: SandboxConfig,
    run_name: str,
    uid: int | None,
    isolation: SandboxIsolation,
    workdir: str,
    nonce: bytes | None = None,
):
    program = os.path.join(workdir, "main.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(code)
    os.chmod(program, 0o644)
    netns = _CLONE_NEWNET if isolation.network == "namespace" else 0
    drop_in_runner = isolation.private_proc and uid is not None
    if isolation.private_proc:
        # Root: the runner starts as root in new PID and mount namespaces and its child drops to `uid` after
        # mounting a private /proc (see _RUNNER in runner.py)
        flags, plan_uid = _CLONE_NEWPID | _CLONE_NEWNS | netns, None
    elif isolation.pid_namespace:
        flags, plan_uid = _CLONE_NEWUSER | _CLONE_NEWPID | netns, uid
    else:
        flags, plan_uid = netns, uid
    plan = _Plan(isolation.python_executable, plan_uid, flags, isolation.user_namespace, _rlimits(config, isolation))
    parent_netns = _parent_netns() if isolation.network == "namespace" else ""
    pipes: list[int] = []
    nonce_fd = report_fd = report_read = -1
    try:
        if nonce is not None:
            # The nonce travels through a pipe the runner empties and closes before the program starts
            nonce_fd, nonce_write = os.pipe()
            pipes += [nonce_fd, nonce_write]
            os.write(nonce_write, nonce)
            os.close(nonce_write)
            pipes.remove(nonce_write)
            report_read, report_fd = os.pipe()
            pipes += [report_read, report_fd]
        start = time.monotonic()
        proc = subprocess.Popen(
            _runner_command(
                isolation.python_executable,
                program,
                run_name,
                parent_netns,
                isolation.network == "socket-guard",
                nonce_fd,
                report_fd,
                uid if drop_in_runner else None,
                isolation.private_proc,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_minimal_env(workdir, config.extra_env),
            start_new_session=True,
            preexec_fn=_make_preexec(plan),
            umask=0o077,
            pass_fds=tuple(fd for fd in (nonce_fd, report_fd) if fd >= 0),
        )
        for fd in (nonce_fd, report_fd):  # only the runner holds these now
            if fd >= 0:
                os.close(fd)
                pipes.remove(fd)
        try:
            stdout, stderr, reason = _supervise(proc, config, isolation, uid, start)
        finally:
            if proc.returncode is None:  # supervision itself failed: never leave the tree running
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _kill_processes(uid=uid) if uid is not None else _kill_processes(uid=os.geteuid(), session=proc.pid)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        completed = nonce is not None and _read_report(report_read) == nonce
    finally:
        for fd in pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
    return proc.returncode, stdout, stderr, reason, time.monotonic() - start, completed


def run_code(
    code: str,
    config: SandboxConfig | None = None,
    *,
    run_name: str = "__main__",
    require_completion: bool = False,
) -> SandboxResult:
    """Run untrusted Python source in the sandbox and report how it ended. Never raises.

    Args:
        code (`str`): Python source, run as a file `main.py` in a fresh temporary working directory.
        config (`SandboxConfig`, *optional*): Limits and isolation; defaults to `SandboxConfig()`.
        run_name (`str`, *optional*, defaults to `"__main__"`): `__name__` of the program. Test harnesses use another
            name so that a solution's `if __name__ == "__main__":` block (often reading `input()`) does not run,
            as in the reference HumanEval and MBPP evaluators.
        require_completion (`bool`, *optional*, defaults to `False`): Count the run as passed only if the program ran
            to its end: its code returned normally, after which the sandbox's runner (not the program) reports a
            random nonce over a pipe that only the pipeline reads. The nonce never appears in the program's file,
            arguments, environment or descriptors, so exiting early with status 0 (`sys.exit(0)`, `os._exit(0)`,
            `unittest.main()`) before the tests ran, or replaying anything the program can read, is a failure.

    Returns:
        `SandboxResult`
    """
    config = config or SandboxConfig()
    nonce = secrets.token_bytes(32) if require_completion else None
    start = time.monotonic()
    try:
        isolation = describe_isolation(config)
        lease = _uid_lease(config) if isolation.privilege_drop else contextlib.nullcontext()
        with lease as uid:
            try:
                with _workdir(uid) as workdir:
                    returncode, stdout, stderr, reason, duration, completed = _run(
                        code, config, run_name, uid, isolation, workdir, nonce
                    )
            finally:
                if uid is not None:
                    _kill_processes(uid=uid)
                    _remove_files_of(uid)
    except Exception as exc:  # the sandbox failing must never take the pipeline down
        logger.warning("Sandbox run failed to execute: %s: %s", type(exc).__name__, exc)
        return SandboxResult(
            passed=False,
            status="error",
            returncode=None,
            stdout="",
            stderr="",
            duration=time.monotonic() - start,
            detail=f"sandbox error: {type(exc).__name__}: {exc}",
        )
    status, detail = _classify(returncode, reason)
    out = stdout.text()
    if require_completion:
        if status == "passed" and not completed:
            status, detail = "failed", "exited with status 0 before its last line (sys.exit/os._exit in the code?)"
    return SandboxResult(
        passed=status == "passed",
        status=status,
        returncode=returncode,
        stdout=out,
        stderr=stderr.text(),
        duration=duration,
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        detail=detail,
    )
