"""Running jobs in sandboxes: start the runner under bwrap, hand it its job, collect its output and its result
channel within bounds, enforce the timeout and the memory check, and kill the sandbox (with everything in it: its
PID namespace dies with bwrap) when it ends or overruns."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import selectors
import signal
import subprocess
import tempfile
import time
from typing import Any

from .bwrap import bwrap_command, describe_isolation, host_uid, seccomp_filter, unsandboxed_command
from .config import SandboxConfig, SandboxIsolation, SandboxResult, SandboxStatus, SandboxUnavailableError


logger = logging.getLogger(__package__)

_WATCHDOG_INTERVAL = 0.1
CHANNEL_LIMIT = 16 << 20  # bytes of result channel kept; beyond it the run fails (values are small data)


class _CappedBuffer:
    """Keeps the first and last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail = (self.tail + data)[-self.half :]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        middle = f"\n... [{self.total - len(self.head) - len(self.tail)} bytes truncated] ...\n"
        data = bytes(self.head) + (middle.encode() if self.truncated else b"") + bytes(self.tail)
        return data.decode("utf-8", errors="replace")


def _rlimits(config: SandboxConfig) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(config.timeout) + 1,
        "RLIMIT_AS": config.memory_limit,
        "RLIMIT_FSIZE": config.file_size_limit,
        "RLIMIT_NOFILE": config.max_open_files,
        "RLIMIT_NPROC": config.max_processes,
        "RLIMIT_CORE": 0,
    }


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 for what has gone)."""
    total, todo = 0, [pid]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(child) for child in f.read().split()]
    return total


def _start(job: dict[str, Any], config: SandboxConfig, isolation: SandboxIsolation, workdir: str) -> subprocess.Popen:
    """Start one sandbox on `job` (its `fds` are inherited by number) and hand it the job on stdin."""
    job = {**job, "rlimits": _rlimits(config)}
    fds = list(job["fds"].values())
    seccomp_read = -1
    if isolation.sandboxed:
        seccomp_read, seccomp_write = os.pipe()
        os.write(seccomp_write, seccomp_filter())
        os.close(seccomp_write)
        command = bwrap_command(isolation.bwrap, isolation.python_executable, config, seccomp_read)
        fds.append(seccomp_read)
    else:
        command = unsandboxed_command(isolation.python_executable)
    as_root = os.geteuid() == 0 and isolation.sandboxed
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            start_new_session=True,
            user=host_uid(config) if as_root else None,
            group=host_uid(config) if as_root else None,
            extra_groups=[] if as_root else None,
        )
    finally:
        if seccomp_read >= 0:
            os.close(seccomp_read)
    try:
        proc.stdin.write(json.dumps(job).encode("utf-8"))
        proc.stdin.close()
    except OSError:  # it died before reading its job: its exit status says why
        pass
    return proc


def _read_ready(selector: selectors.BaseSelector, timeout: float) -> None:
    for key, _ in selector.select(timeout=timeout):
        data = os.read(key.fd, 1 << 16)
        if data:
            key.data.write(data)
        else:
            selector.unregister(key.fd)


def _supervise(
    procs: list[subprocess.Popen], channels: dict[int, _CappedBuffer], config: SandboxConfig, start: float
) -> tuple[list[tuple[_CappedBuffer, _CappedBuffer]], str | None]:
    """Collect output and channels until every sandbox exited, time ran out or memory overflowed; then kill all."""
    outputs = [(_CappedBuffer(config.max_output_bytes), _CappedBuffer(config.max_output_bytes)) for _ in procs]
    reason = None
    with selectors.DefaultSelector() as selector:
        for proc, (out, err) in zip(procs, outputs):
            selector.register(proc.stdout, selectors.EVENT_READ, out)
            selector.register(proc.stderr, selectors.EVENT_READ, err)
        for fd, buffer in channels.items():
            selector.register(fd, selectors.EVENT_READ, buffer)
        deadline, next_check = start + config.timeout, start + _WATCHDOG_INTERVAL
        while any(proc.poll() is None for proc in procs):
            now = time.monotonic()
            if now >= deadline:
                reason = f"timeout: killed after {config.timeout:g} s"
                break
            if selector.get_map():
                _read_ready(selector, min(config.poll_interval, deadline - now))
            else:
                time.sleep(min(config.poll_interval, deadline - now, 0.005))
            if config.total_memory_limit is not None and time.monotonic() >= next_check:
                rss = sum(_tree_rss(proc.pid) for proc in procs if proc.poll() is None)
                if rss > config.total_memory_limit:
                    reason = (
                        f"killed by the memory check: {rss >> 20} MiB resident > {config.total_memory_limit >> 20}"
                    )
                    break
                next_check = time.monotonic() + _WATCHDOG_INTERVAL
        for proc in procs:  # bwrap's death ends its PID namespace, hence everything the code started
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        drain_deadline = time.monotonic() + 1.0
        while selector.get_map() and time.monotonic() < drain_deadline:
            _read_ready(selector, 0.05)
    return outputs, reason


def _classify(returncode: int, reason: str | None) -> tuple[SandboxStatus, str]:
    if reason is not None:
        return ("timeout" if reason.startswith("timeout") else "killed"), reason
    if returncode == 0:
        return "passed", ""
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)"}.get(sig, "")
        return "killed", f"killed by signal {sig}{why}"
    return "failed", f"exited with status {returncode}"


def run_jobs(jobs: list[dict[str, Any]], config: SandboxConfig | None = None) -> list[SandboxResult]:
    """Run runner jobs side by side, each in its own sandbox, under one timeout (see `runner.RUNNER`).

    Each job's `fds` name descriptors of this process to hand to it by number; they are closed here once the
    sandboxes started. `channel_fds` (a job key, removed before the job is sent) lists read ends collected into that
    job's `SandboxResult.channel`.

    Raises:
        SandboxUnavailableError: bubblewrap cannot run here.
    """
    config = config or SandboxConfig()
    isolation = describe_isolation(config)
    start = time.monotonic()
    channels: dict[int, _CappedBuffer] = {}
    per_job = []
    for job in jobs:
        buffers = {fd: _CappedBuffer(CHANNEL_LIMIT) for fd in job.pop("channel_fds", [])}
        channels.update(buffers)
        per_job.append(buffers)
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory(prefix="trl-pplmask-sandbox-") as workdir:
            os.chmod(workdir, 0o755)  # the cwd bwrap starts from (nothing of it is visible inside)
            try:
                for job in jobs:
                    procs.append(_start(job, config, isolation, workdir))
            finally:
                for job in jobs:
                    for fd in job["fds"].values():
                        with contextlib.suppress(OSError):
                            os.close(fd)
            outputs, reason = _supervise(procs, channels, config, start)
    except SandboxUnavailableError:
        raise
    except Exception as exc:  # the sandbox failing must never take the pipeline down
        for proc in procs:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        logger.warning("Sandbox run failed to execute: %s: %s", type(exc).__name__, exc)
        detail = f"sandbox error: {type(exc).__name__}: {exc}"
        return [SandboxResult(False, "error", None, "", "", time.monotonic() - start, detail=detail) for _ in jobs]
    finally:
        for fd in channels:
            with contextlib.suppress(OSError):
                os.close(fd)
        for proc in procs:
            for stream in (proc.stdout, proc.stderr):
                stream.close()
    results = []
    for proc, (out, err), buffers in zip(procs, outputs, per_job):
        status, detail = _classify(proc.returncode, reason)
        channel = "".join(buffer.text() for buffer in buffers.values())
        if any(buffer.truncated for buffer in buffers.values()):
            status, detail = "failed", f"result channel over {CHANNEL_LIMIT} bytes"
        results.append(
            SandboxResult(
                passed=status == "passed",
                status=status,
                returncode=proc.returncode,
                stdout=out.text(),
                stderr=err.text(),
                duration=time.monotonic() - start,
                stdout_truncated=out.truncated,
                stderr_truncated=err.truncated,
                detail=detail,
                channel=channel,
            )
        )
    return results


def run_code(
    code: str,
    config: SandboxConfig | None = None,
    *,
    run_name: str = "__main__",
    require_completion: bool = False,
) -> SandboxResult:
    """Run untrusted Python source in a fresh sandbox and report how it ended.

    Args:
        code (`str`): Python source, run as `main.py` in the sandbox's private `/tmp`.
        config (`SandboxConfig`, *optional*): Limits; defaults to `SandboxConfig()`.
        run_name (`str`, *optional*, defaults to `"__main__"`): `__name__` of the program.
        require_completion (`bool`, *optional*, defaults to `False`): Count the run as passed only if the code returned
            normally (an early `sys.exit(0)` / `os._exit(0)` fails). The program could write the runner's report
            itself: use the verifiers (`trl_pplmask.sandbox.verdict`) to decide correctness, not this.

    Returns:
        `SandboxResult`

    Raises:
        SandboxUnavailableError: bubblewrap cannot run here (nothing ran); the message says how to fix it.
    """
    read, write = os.pipe()
    job = {"mode": "complete", "code": code, "run_name": run_name, "fds": {"out": write}, "channel_fds": [read]}
    (result,) = run_jobs([job], config)
    if require_completion and result.passed and '"done"' not in result.channel:
        result.passed, result.status = False, "failed"
        result.detail = "exited with status 0 before its last line (sys.exit/os._exit in the code?)"
    return result
