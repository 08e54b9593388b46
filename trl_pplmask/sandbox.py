"""Run untrusted Python code (model-written solutions and their tests) in a contained subprocess.

Every call gets a fresh process tree, a fresh temporary working directory and a minimal environment, and is killed
with everything it started when it runs out of time. What is enforced depends on what the OS lets this process do;
`describe_isolation()` reports what is active, and tests/test_sandbox.py attacks each point.

Always:

- **Time**: wall-clock timeout (default 10 s), after which the whole process group and every process found by the
  sweep below is SIGKILLed; `RLIMIT_CPU` as a second line.
- **Memory**: `RLIMIT_AS` per process (default 1 GiB), and a watchdog that kills the tree when the resident memory of
  all its processes together exceeds `total_memory_limit` (a fork bomb multiplies the per-process limit).
- **Files**: `RLIMIT_FSIZE` caps every file it writes (default 16 MiB), `RLIMIT_NOFILE` its open files, no core
  dumps. The working directory is a fresh temporary directory, removed afterwards.
- **Environment**: built from an allow-list (`PATH`, `HOME`/`TMPDIR` pointing to the working directory, locale,
  thread counts): nothing of the parent's environment is inherited, so `HF_TOKEN` and any `*TOKEN*`/`*KEY*`/`*SECRET*`
  variable are absent. Python runs in isolated mode (`-I`: no `PYTHON*` variables, no user site, no script directory
  on `sys.path`). No file descriptor other than stdin (`/dev/null`), stdout and stderr is inherited.
- **Output**: stdout and stderr are read through pipes into buffers of at most `max_output_bytes` each (the head and
  the tail are kept), so an endless `print` cannot exhaust the parent's memory.
- **Parent process**: the code runs under an intermediate process, so `os.getppid()` is never the pipeline.
- **Crashes**: any exception in the sandbox machinery is reported as `status="error"`; `run_code` never raises.

As root (`drop_privileges` defaults to on), in addition:

- The code runs as a dedicated unprivileged uid leased to one run at a time (`uid_base` ... `uid_base + uid_count - 1`,
  never a uid that belongs to an account; a lock file makes the lease exclusive across processes). Hence it cannot
  signal the pipeline (`os.kill` gets `EPERM`) or read its `/proc/<pid>/environ`, cannot read root-private files
  (`/root`, mode 0700), and cannot write anywhere except its working directory and world-writable directories
  (`/tmp`, `/var/tmp`, `/dev/shm`, ...). `RLIMIT_NPROC` is enforced (it is not for root), which stops fork bombs, and
  at the end every process of that uid is killed, including ones that escaped the process group with `setsid()`.
  Files it left at the top level of the shared temporary directories are removed.
- Network: a new, empty network namespace (`unshare(CLONE_NEWNET)`): no interface but a downed loopback, so no
  connection to the internet or to services on the host's localhost.
- Processes: new PID and mount namespaces (`unshare(CLONE_NEWPID | CLONE_NEWNS)`) where the kernel allows them. The
  code is PID 1 of its own PID namespace and sees a fresh `/proc` mounted there (mounts made private first, so it
  never appears on the host): it cannot list the host's processes, read their command lines or address them by PID,
  and everything it started dies with it. `describe_isolation().private_proc` says whether this is active; where it
  is not (e.g. a container whose seccomp profile refuses `unshare`), a warning is logged and the code can list every
  process of the host and read its command line. What remains visible either way: the host's other mounts (`/sys`,
  `/dev`, world-readable files), and the kernel-wide information in `/proc` (`/proc/cpuinfo`, `/proc/meminfo`, ...).
- If the running interpreter is not executable by that uid (e.g. a pyenv install under `/root`), the first
  interpreter it can run (`/usr/bin/python3`, ...) runs the code instead: only the standard library is guaranteed.

As a normal user, where unprivileged user namespaces are allowed (most Linux distributions):

- New user, PID and network namespaces: the code is PID 1 of its own PID namespace, so it cannot address the pipeline
  (or any other process outside) by PID, and everything it started dies with it; the kernel denies it the
  pipeline's `/proc/<pid>/environ`; `RLIMIT_NPROC` counts only the sandbox's processes; networking is disabled as
  above. It runs as the pipeline's user otherwise: it can write wherever that user can.

Not enforced (say so where it matters):

- Without root and without user namespaces: networking is blocked only by an in-process guard that makes Python
  socket creation and name resolution fail (code using `ctypes` or a subprocess can bypass it); the code runs as the
  pipeline's user, so it can signal the pipeline if it finds its PID and read the pipeline's initial environment in
  `/proc/<pid>/environ`, and a process that calls `setsid()` escapes the final kill; `RLIMIT_NPROC` counts all
  processes of the user (it is set to their current number plus `max_processes`).
- As root without a usable unprivileged interpreter: no privilege drop, `RLIMIT_NPROC` is not enforced for root, so
  the process count is bounded only by the watchdog (polling); the code can write wherever root can.
- Reads: the code can read every world-readable file (e.g. the repository, a world-readable token file under a custom
  `HF_HOME`) and, without a private `/proc` (non-root mode, or root where the kernel refuses the namespaces), the
  command lines of all processes (`/proc/<pid>/cmdline`): pass tokens through the environment or a private file, not
  on the command line.
- Completion (`require_completion`): the runner reports that the program's code returned normally with a random
  nonce over a pipe only the pipeline reads; the nonce is in no file, argument, environment variable or descriptor
  of the program, so reading its own source, `/proc/self/*` or its descriptors and exiting early does not pass. The
  program shares its interpreter with the runner, though: code that deliberately inspects the interpreter's own
  memory (frames, `gc`, `ctypes`) can still find the nonce. No in-process check can rule that out, nor can it stop a
  solution from tampering with the objects the tests compare; treat a pass as "ran to its end", not as proof.
- Writes to world-writable directories other than the top level of the shared temporary directories are not cleaned
  up. Disk usage is bounded per file (`RLIMIT_FSIZE`), not in total.
- CPU: `RLIMIT_CPU` and the timeout bound time, not the share of the machine; run many checks through the bounded
  pool (`SandboxPool`, `run_many`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import itertools
import logging
import math
import os
import pwd
import re
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


logger = logging.getLogger(__name__)

SandboxStatus = Literal["passed", "failed", "timeout", "error", "killed"]
NetworkIsolation = Literal["auto", "namespace", "guard", "none"]

# Variable names that must never reach the sandbox, even when passed explicitly through `extra_env`.
SECRET_NAME_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_FALLBACK_INTERPRETERS = ("/usr/local/bin/python3", "/usr/bin/python3", "/bin/python3")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_WATCHDOG_INTERVAL = 0.1


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
    What the sandbox enforces on this machine with a given config (see the module docstring).

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


# --------------------------------------------------------------------------------------------------------------------
# The intermediate process. It runs as
# `python -I -c _RUNNER <program> <run_name> <parent netns> <guard> <nonce fd> <report fd> <uid> <private proc>`,
# installs the socket guard where no network namespace took effect, and runs the program in a forked child, so that
# the program's parent is this runner (and, in a PID namespace, the program is PID 1 there). It exits as the child did.
#
# Completion (`require_completion`): the pipeline writes a random nonce into a pipe whose read end is `<nonce fd>`;
# the runner reads it and closes that pipe before any untrusted code runs, so the nonce is in no file, argument,
# environment variable or open descriptor of the program. Only when the program's code returned normally does the
# child write the nonce to `<report fd>` (a pipe read by the pipeline only, never stdout).
#
# Private /proc (`<private proc>` = 1, root only): the runner starts as root in new PID and mount namespaces; the
# child, PID 1 of the new PID namespace, makes every mount private, mounts a fresh /proc that shows only the
# namespace's processes, then drops to `<uid>` before the program runs. The runner drops to `<uid>` too right after
# the fork; it is outside the program's PID namespace, hence invisible to it, and only waits.
# --------------------------------------------------------------------------------------------------------------------
_RUNNER = r"""
import os, sys
path, run_name, parent_netns, guard, nonce_fd, report_fd, uid, private_proc = sys.argv[1:9]
nonce_fd, report_fd, uid = int(nonce_fd), int(report_fd), int(uid)
if report_fd >= 0:
    os.set_inheritable(report_fd, False)  # not passed on to programs the code executes
nonce = b""
if nonce_fd >= 0:
    while True:
        chunk = os.read(nonce_fd, 256)
        if not chunk:
            break
        nonce += chunk
    os.close(nonce_fd)
try:
    own_netns = os.readlink("/proc/self/ns/net")
except OSError:
    own_netns = ""
if guard == "1" or (parent_netns and own_netns == parent_netns):
    import _socket, errno, socket
    def _deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "network access is disabled in this sandbox")
    class _GuardedSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                _deny()
            super().__init__(family, type, proto, fileno)
    for _module in (socket, _socket):
        _module.socket = _module.SocketType = _GuardedSocket
        for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
            setattr(_module, _name, _deny)
    socket.create_connection = socket.create_server = _deny
def drop_privileges():
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # Changing uid made the process non-dumpable (its /proc entries root-owned): restore what exec would give, so
    # that the pipeline's sweeps find it (and its children) by uid
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
        raise OSError("privileges were not dropped")
if private_proc == "1":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
sys.stdout.flush()
sys.stderr.flush()
pid = os.fork()
if pid == 0:
    if private_proc == "1":
        try:
            # MS_REC | MS_PRIVATE first: the new /proc must never propagate to the host's mount table
            if libc.mount(None, b"/", None, 0x4000 | 0x40000, None) != 0:
                raise OSError(ctypes.get_errno(), "making mounts private: " + os.strerror(ctypes.get_errno()))
            # MS_NOSUID | MS_NODEV | MS_NOEXEC
            if libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None) != 0:
                raise OSError(ctypes.get_errno(), "mounting /proc: " + os.strerror(ctypes.get_errno()))
            if uid >= 0:
                drop_privileges()
        except BaseException as exc:
            os.write(2, ("sandbox setup failed: %s\n" % (exc,)).encode())
            os._exit(125)
    # What runpy.run_path does, without its import cost (tens of ms per run)
    sys.argv = [path]
    module = type(sys)(run_name)
    module.__file__ = path
    sys.modules[run_name] = module
    try:
        with open(path, "rb") as f:
            source = f.read()
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.exit(1)
    if report_fd >= 0:
        # The code returned normally: report completion on the channel the pipeline reads (after the output, so that
        # nothing the program printed is lost if the report is the last thing it does)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os.write(report_fd, nonce)
else:
    if report_fd >= 0:
        os.close(report_fd)
    if private_proc == "1" and uid >= 0:
        # The runner drops to the same uid: it holds nothing the program may not have, and the program can end the
        # run by killing it (it cannot address it otherwise: the runner is outside the program's PID namespace)
        try:
            drop_privileges()
        except BaseException as exc:
            os.write(2, ("sandbox setup failed: %s\n" % (exc,)).encode())
            os.kill(pid, 9)
            os._exit(125)
    import _signal  # not `signal`: its enum import costs more than the rest of the runner
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))
"""


# --------------------------------------------------------------------------------------------------------------------
# Isolation probing (once per config and process)
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything `preexec_fn` needs, computed in the parent so the child runs only plain syscalls."""

    executable: str
    uid: int | None
    unshare_flags: int
    map_ids: bool
    rlimits: tuple[tuple[int, tuple[int, int]], ...] = ()


def _libc_unshare() -> Callable[[int], None] | None:
    if hasattr(os, "unshare"):  # Python >= 3.12
        return os.unshare
    try:
        func = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None
    func.argtypes, func.restype = [ctypes.c_int], ctypes.c_int

    def unshare(flags: int) -> None:
        if func(flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return unshare


_UNSHARE = _libc_unshare()


def _make_preexec(plan: _Plan) -> Callable[[], None]:
    # Runs in the forked child before exec. It must stay minimal (no imports, no logging, no locks): the parent may
    # have other threads, and only plain syscalls are safe between fork and exec. Any exception aborts the launch.
    uid, gid = os.getuid(), os.getgid()
    id_maps = (f"{uid} {uid} 1".encode(), f"{gid} {gid} 1".encode())

    def write(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def preexec() -> None:
        if plan.unshare_flags:
            _UNSHARE(plan.unshare_flags)
            if plan.map_ids:
                # Map our own uid/gid into the new user namespace so that files keep their owner (an unmapped id
                # cannot create files); setgroups must be denied before an unprivileged process may write gid_map.
                write("/proc/self/setgroups", b"deny")
                write("/proc/self/uid_map", id_maps[0])
                write("/proc/self/gid_map", id_maps[1])
        for which, limit in plan.rlimits:
            resource.setrlimit(which, limit)
        if plan.uid is not None:
            os.setgroups([])
            os.setresgid(plan.uid, plan.uid, plan.uid)
            os.setresuid(plan.uid, plan.uid, plan.uid)

    return preexec


def _minimal_env(workdir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Numerical libraries would otherwise start one thread per core, each counting against RLIMIT_NPROC
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


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


def _runner_command(
    executable: str,
    program: str,
    run_name: str = "__main__",
    parent_netns: str = "",
    guard: bool = False,
    nonce_fd: int = -1,
    report_fd: int = -1,
    uid: int | None = None,
    private_proc: bool = False,
) -> list[str]:
    return [
        executable,
        "-I",
        "-c",
        _RUNNER,
        program,
        run_name,
        parent_netns,
        "1" if guard else "0",
        str(nonce_fd),
        str(report_fd),
        str(-1 if uid is None else uid),
        "1" if private_proc else "0",
    ]


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


# --------------------------------------------------------------------------------------------------------------------
# Sandbox uids: leased exclusively (flock across processes), so that "every process of this uid" is exactly this run
# --------------------------------------------------------------------------------------------------------------------
def _lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"trl_pplmask_sandbox_uids_{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(path)
    # The sandbox uids may write to /tmp: refuse a lock directory they could have planted or can modify
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{path} is not a private directory of uid {os.geteuid()}; remove it and retry.")
    return path


def _is_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


_LEASE_COUNTER = itertools.count()


@contextlib.contextmanager
def _uid_lease(config: SandboxConfig, wait: float = 120.0) -> Iterator[int]:
    """Lease an unused sandbox uid, clearing whatever a crashed previous holder left behind."""
    lock_dir = _lock_dir()
    deadline = time.monotonic() + wait
    while True:
        # Rotate the starting point: a uid just used may still have zombies (reaped by init a moment later) that
        # count against RLIMIT_NPROC
        offset = next(_LEASE_COUNTER)
        for i in range(config.uid_count):
            uid = config.uid_base + (offset + i) % config.uid_count
            if _is_account(uid):  # never borrow the identity of a real account
                continue
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            try:
                _kill_processes(uid=uid)
                if _processes(uid=uid):  # zombies not yet reaped: try another uid
                    continue
                _remove_files_of(uid)
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"All {config.uid_count} sandbox uids from {config.uid_base} stayed busy for {wait:.0f} s; lower the "
                "number of parallel workers or raise SandboxConfig.uid_count."
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------------
# Process bookkeeping through /proc
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Proc:
    pid: int
    session: int
    rss: int
    threads: int
    zombie: bool


def _processes(uid: int | None = None, session: int | None = None) -> list[_Proc]:
    """Processes of `uid` (the owner of /proc/<pid>) and/or in `session`; zombies included and flagged."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            if uid is not None and os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: parse after its closing parenthesis
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) < 22 or (session is not None and int(fields[3]) != session):
            continue
        found.append(
            _Proc(int(name), int(fields[3]), int(fields[21]) * _PAGE_SIZE, int(fields[17]), fields[0] == b"Z")
        )
    return found


def _kill_processes(uid: int | None = None, session: int | None = None, rounds: int = 200) -> bool:
    """SIGKILL every live process of `uid` / in `session` until none is left. Returns whether none is left."""
    for _ in range(rounds):
        alive = [p for p in _processes(uid, session) if not p.zombie]
        if not alive:
            return True
        for proc in alive:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.005)
    return False


def _remove_files_of(uid: int) -> None:
    """Remove what `uid` left at the top level of the shared temporary directories."""
    for directory in dict.fromkeys((tempfile.gettempdir(), *_SHARED_TMP_DIRS)):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _user_task_count() -> int:
    return sum(p.threads for p in _processes(uid=os.geteuid()))


def _rlimits(config: SandboxConfig, isolation: SandboxIsolation) -> tuple[tuple[int, tuple[int, int]], ...]:
    cpu = math.ceil(config.timeout) + 1
    nproc = config.max_processes
    if not isolation.privilege_drop and not isolation.user_namespace:
        # RLIMIT_NPROC counts every process of the user: allow what already runs plus the sandbox's budget
        nproc += _user_task_count()
    wanted = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.RLIMIT_AS: (config.memory_limit, config.memory_limit),
        resource.RLIMIT_FSIZE: (config.file_size_limit, config.file_size_limit),
        resource.RLIMIT_NOFILE: (config.max_open_files, config.max_open_files),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (nproc, nproc),
    }
    limits = []
    for which, (soft, hard) in wanted.items():
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((which, (soft, hard)))
    return tuple(limits)


# --------------------------------------------------------------------------------------------------------------------
# Running one program
# --------------------------------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def _workdir(uid: int | None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="trl_pplmask_sandbox_")
    try:
        if uid is not None:
            os.chown(path, uid, uid)
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, target, _exc_info):
        # The code may have removed its own permissions from what it created (only matters when not root)
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        with contextlib.suppress(OSError):
            func(target)

    shutil.rmtree(path, onerror=make_writable_and_retry)


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
        # mounting a private /proc (see _RUNNER)
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


def default_workers() -> int:
    """Default size of the worker pool: one sandbox per CPU core, at most 32."""
    return max(1, min(32, os.cpu_count() or 1))


class SandboxPool:
    """A bounded pool of worker threads, each running one sandboxed program at a time.

    Threads suffice: a worker only waits on its subprocess. The pool bounds how many programs run at once.

    Args:
        config (`SandboxConfig`, *optional*): Limits and isolation of every run.
        max_workers (`int`, *optional*): Programs run at once; defaults to `default_workers()`.

    Example:
    ```python
    with SandboxPool(SandboxConfig(timeout=5), max_workers=4) as pool:
        results = pool.map(["assert 1 + 1 == 2", "while True: pass"])
    ```
    """

    def __init__(self, config: SandboxConfig | None = None, max_workers: int | None = None):
        if max_workers is not None and max_workers <= 0:
            raise ValueError(f"max_workers must be positive, got {max_workers}.")
        self.config = config or SandboxConfig()
        self.max_workers = max_workers or default_workers()
        self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="trl-pplmask-sandbox")

    def submit(self, code: str, **kwargs) -> Future[SandboxResult]:
        """Schedule `run_code(code, self.config, **kwargs)`."""
        return self._executor.submit(run_code, code, self.config, **kwargs)

    def map(self, codes: Iterable[str], **kwargs) -> list[SandboxResult]:
        """Run all `codes` and return their results in the same order."""
        futures = [self.submit(code, **kwargs) for code in codes]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_many(
    codes: Iterable[str], config: SandboxConfig | None = None, *, max_workers: int | None = None, **kwargs
) -> list[SandboxResult]:
    """Run many programs through a bounded `SandboxPool`; results come back in input order.

    Args:
        codes (`Iterable[str]`): Python sources.
        config (`SandboxConfig`, *optional*): Limits and isolation of every run.
        max_workers (`int`, *optional*): Programs run at once; defaults to `default_workers()`.
        **kwargs: Passed to `run_code` (`run_name`, `require_completion`).

    Returns:
        `list[SandboxResult]`
    """
    with SandboxPool(config, max_workers) as pool:
        return pool.map(codes, **kwargs)


__all__ = [
    "SandboxConfig",
    "SandboxIsolation",
    "SandboxPool",
    "SandboxResult",
    "default_workers",
    "describe_isolation",
    "network_isolation",
    "run_code",
    "run_many",
]
