"""Sandbox uids: leased exclusively (flock across processes), so that "every process of this uid" is exactly this
run."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import pwd
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .config import SandboxConfig
from .procs import _kill_processes, _processes, _remove_files_of


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
