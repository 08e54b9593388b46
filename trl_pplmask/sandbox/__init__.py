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

Layout: `config` (settings, results, what is enforced), `runner` (the intermediate process's program),
`launch` (how a process is started: namespaces, ids, limits, environment, working directory), `isolation` (probing
what this machine allows), `uids` (leasing sandbox uids), `procs` (process bookkeeping through /proc), `run` (running
one program: `run_code`), `pool` (running many: `SandboxPool`, `run_many`). Standard library only.
"""

# Also importable from here, as before the split (outside `__all__`): the literal types and the secret-name pattern
from .config import SECRET_NAME_PATTERN as SECRET_NAME_PATTERN
from .config import NetworkIsolation as NetworkIsolation
from .config import SandboxConfig, SandboxIsolation, SandboxResult
from .config import SandboxStatus as SandboxStatus
from .isolation import describe_isolation, network_isolation
from .pool import SandboxPool, default_workers, run_many
from .run import run_code


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
