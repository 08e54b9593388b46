"""The program of the intermediate process between the pipeline and the sandboxed code, and its command line.

`_RUNNER` is passed to the interpreter with `-c`, never as a file: the sandbox uid need not be able to read this
package (a clone may sit in a mode-0700 folder), and the interpreter may be another one (a system `python3`) that
has nothing installed. So `_RUNNER` must stay self-contained: standard library only, nothing from `trl_pplmask`.
"""

from __future__ import annotations


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
