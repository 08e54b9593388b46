"""How a sandboxed process is started: what runs between fork and exec (namespaces, id maps, resource limits, uid),
its environment and its working directory."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .config import SandboxConfig, SandboxIsolation
from .procs import _user_task_count


_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000


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
