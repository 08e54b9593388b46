"""Process bookkeeping through /proc: finding, killing and cleaning up after the processes of a uid or session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass


_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
