"""Attacks on the code-execution sandbox: each must be contained and reported, and the test process must survive.

The fork bomb runs only where the kernel enforces the process limit (`process_limit == "rlimit"`), so that these tests
cannot take down a shared machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from trl_pplmask.sandbox import (
    SandboxConfig,
    SandboxPool,
    describe_isolation,
    network_isolation,
    run_code,
    run_many,
)


SANDBOX_DIR = Path(__file__).resolve().parents[1] / "trl_pplmask" / "sandbox"
SANDBOX_FILE = SANDBOX_DIR / "run.py"  # a root-owned file of the repository that the code must not modify
ISOLATION = describe_isolation()
# Whether the code is unable to signal the pipeline: another uid, or a PID namespace that hides it
PARENT_PROTECTED = ISOLATION.privilege_drop or ISOLATION.pid_namespace


def _alive(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :].split()[0] != b"Z"


def _live_processes_running(path: str) -> list[int]:
    """Live processes whose command line mentions `path`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if path.encode() in cmdline and _alive(int(pid)):
            found.append(int(pid))
    return found


def _live_processes_of(uid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _owned_by(p, uid) and _alive(int(p))]


def _owned_by(pid: str, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def test_isolation_is_reported():
    assert ISOLATION.network in ("namespace", "socket-guard")
    assert network_isolation() == ISOLATION.network
    assert os.path.isfile(ISOLATION.python_executable)
    if os.geteuid() == 0 and ISOLATION.privilege_drop:
        assert ISOLATION.process_limit == "rlimit"


def test_ordinary_programs():
    ok = run_code("print(sum(range(10)))")
    assert (ok.passed, ok.status, ok.returncode, ok.stdout) == (True, "passed", 0, "45\n")
    failing = run_code("def f():\n    raise KeyError('boom')\nf()")
    assert (failing.passed, failing.status, failing.returncode) == (False, "failed", 1)
    assert "KeyError: 'boom'" in failing.stderr and "main.py" in failing.stderr
    syntax = run_code("def broken(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_require_completion_catches_early_exit():
    code = "import sys\nsys.exit(0)\nassert False"
    assert run_code(code).passed  # plain semantics: status 0 is success
    early = run_code(code, require_completion=True)
    assert not early.passed and early.status == "failed" and "before its last line" in early.detail
    done = run_code("print('hi')", require_completion=True)
    assert done.passed and done.stdout == "hi\n"  # the completion marker is removed from the output


def test_completion_cannot_be_forged():
    # The program searches everything it can read for the completion signal (its source, its command line and
    # environment, every open file descriptor), replays whatever looks like one on every descriptor and exits with
    # status 0 before the tests run: it must not count as completed
    attack = textwrap.dedent(
        """
        import os, re, sys
        pattern = re.compile(rb"trl-pplmask-completed-[0-9a-f]+|[0-9a-f]{32,}")
        found = set()
        for path in (__file__, "main.py", "/proc/self/cmdline", "/proc/self/environ"):
            try:
                found.update(pattern.findall(open(path, "rb").read()))
            except OSError:
                pass
        for fd in range(3, 256):
            try:
                os.set_blocking(fd, False)
                found.update(pattern.findall(os.read(fd, 1 << 16)))
            except OSError:
                pass
        for token in found:
            for fd in range(1, 256):
                try:
                    os.write(fd, b"\\n" + token + b"\\n")
                except OSError:
                    pass
        os._exit(0)
        """
    )
    forged = run_code(attack + "\nassert False, 'the tests never ran'\n", require_completion=True)
    assert not forged.passed and forged.status == "failed", forged
    assert "before its last line" in forged.detail
    # The same search in a program that does run to its end still passes
    honest = run_code(attack.replace("os._exit(0)", "print('searched')"), require_completion=True)
    assert honest.passed and honest.stdout.endswith("searched\n"), honest


def test_infinite_loop_times_out():
    result = run_code("while True:\n    pass", SandboxConfig(timeout=1))
    assert not result.passed and result.status == "timeout" and result.returncode == -signal.SIGKILL
    assert 1 <= result.duration < 3


def test_whole_process_tree_is_killed_on_timeout():
    # The child leaves the process group with setsid() and ignores SIGTERM: only the sweep catches it
    code = textwrap.dedent(
        """
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("child", os.readlink("/proc/self"), os.path.abspath(__file__), flush=True)
            time.sleep(60)
        print("parent", os.readlink("/proc/self"), os.path.abspath(__file__), flush=True)
        time.sleep(60)
        """
    )
    result = run_code(code, SandboxConfig(timeout=1.5))
    assert result.status == "timeout"
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 2
    # Every process of the run has the program's path on its command line: none of them is left, as the host sees it
    assert _live_processes_running(lines[0][2]) == []
    if not ISOLATION.private_proc:  # /proc/self is the host's PID (with a private /proc it is the namespace's)
        assert not any(_alive(int(line[1])) for line in lines)


def test_process_limit_is_enforced():
    if ISOLATION.process_limit != "rlimit":
        pytest.skip("RLIMIT_NPROC is not enforced here (root without a privilege drop)")
    code = textwrap.dedent(
        """
        import os, time
        started = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                continue
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            started += 1
        print(started)
        """
    )
    result = run_code(code, SandboxConfig(timeout=5, max_processes=8))
    assert result.passed, result
    assert int(result.stdout) < 8  # the runner and the program itself count too


def test_fork_bomb_is_contained():
    if ISOLATION.process_limit != "rlimit":
        pytest.skip("a real fork bomb is only run where the kernel bounds the process count")
    bomb = textwrap.dedent(
        """
        import os
        print(os.getuid(), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    start = time.monotonic()
    result = run_code(bomb, SandboxConfig(timeout=2, max_processes=16))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 10
    if ISOLATION.privilege_drop:
        uid = int(result.stdout.split()[0])
        assert uid != os.geteuid() and _live_processes_of(uid) == []
    # The machine still works, and so does the sandbox
    assert run_code("print('alive')").stdout == "alive\n"


def test_memory_bomb():
    config = SandboxConfig(memory_limit=512 << 20)
    result = run_code("x = bytearray(8 << 30)", config)
    assert result.status == "failed" and "MemoryError" in result.stderr
    growing = run_code("chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))", config)
    assert growing.status == "failed" and "MemoryError" in growing.stderr


def test_memory_watchdog_bounds_a_forked_memory_bomb():
    # Each process stays under RLIMIT_AS, together they do not: the watchdog kills the tree
    code = textwrap.dedent(
        """
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                break
        data = b"\\x01" * (400 << 20)
        time.sleep(30)
        """
    )
    result = run_code(code, SandboxConfig(timeout=20, total_memory_limit=800 << 20))
    assert result.status == "killed" and "memory watchdog" in result.detail
    assert result.duration < 10


def test_working_directory_is_fresh_and_removed():
    code = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    first, second = run_code(code), run_code(code)
    first_dir, second_dir = first.stdout.splitlines()[0], second.stdout.splitlines()[0]
    assert first_dir != second_dir
    assert first.stdout.splitlines()[1] == "['main.py', 'scratch.txt']"
    assert not os.path.exists(first_dir) and not os.path.exists(second_dir)


def test_file_size_limit():
    result = run_code("open('big', 'wb').write(b'0' * (4 << 20))", SandboxConfig(file_size_limit=1 << 20))
    assert result.status == "failed" and "File too large" in result.stderr


def test_writing_outside_the_working_directory():
    if not ISOLATION.privilege_drop:
        pytest.skip("without a privilege drop the code may write wherever the pipeline's user may")
    protected = tempfile.mkdtemp(prefix="trl_pplmask_protected_")  # root-owned, like the repository
    os.chmod(protected, 0o755)
    shared = Path(tempfile.gettempdir()) / f"trl_pplmask_escape_{os.getpid()}_{time.time_ns()}"
    try:
        code = textwrap.dedent(
            f"""
            for path in [{os.path.join(protected, "escape.txt")!r}, {str(SANDBOX_FILE)!r}]:
                try:
                    open(path, "a").write("pwned")
                    print("wrote", path)
                except OSError as exc:
                    print(type(exc).__name__)
            open({str(shared)!r}, "w").write("left behind")
            import os
            print(os.path.exists({str(shared)!r}))
            """
        )
        result = run_code(code)
        assert result.stdout.split() == ["PermissionError", "PermissionError", "True"], result
        assert os.listdir(protected) == []
        assert "pwned" not in SANDBOX_FILE.read_text()
        assert not shared.exists()  # removed with what the sandbox uid left in the shared temporary directories
    finally:
        shutil.rmtree(protected, ignore_errors=True)
        shared.unlink(missing_ok=True)


def test_secrets_are_not_inherited(monkeypatch):
    secrets = {
        "HF_TOKEN": "hf_sandbox_test_secret",
        "OPENAI_API_KEY": "sk-sandbox-test",
        "AWS_SECRET_ACCESS_KEY": "aws-sandbox-test",
        "DB_PASSWORD": "pw-sandbox-test",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    code = textwrap.dedent(
        f"""
        import json, os
        try:
            parent = open("/proc/{os.getpid()}/environ", "rb").read().decode(errors="replace")
        except OSError as exc:
            parent = type(exc).__name__
        print(json.dumps({{"env": dict(os.environ), "parent": parent}}))
        """
    )
    result = run_code(code)
    assert result.passed, result
    seen = json.loads(result.stdout)
    assert not set(secrets) & set(seen["env"])
    assert not any(value in result.stdout for value in secrets.values())
    if ISOLATION.private_proc:
        assert seen["parent"] == "FileNotFoundError"  # the pipeline is not even visible in the sandbox's /proc
    elif ISOLATION.privilege_drop:
        assert seen["parent"] == "PermissionError"
    with pytest.raises(ValueError, match="secrets"):
        SandboxConfig(extra_env={"HF_TOKEN": "x"})


@pytest.mark.parametrize("mode", ["auto", "guard"])
def test_network_is_blocked(mode):
    config = SandboxConfig(network_isolation=mode)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = textwrap.dedent(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("connected")
            except OSError as exc:
                print(type(exc).__name__)
            """
        )
        result = run_code(code, config)
        assert result.passed and result.stdout.strip() != "connected", result
        with pytest.raises(TimeoutError):
            server.accept()
    if mode == "guard":
        assert describe_isolation(config).network == "socket-guard"
        guarded = run_code("import socket\nsocket.socket()", config)
        assert guarded.status == "failed" and "network access is disabled" in guarded.stderr


def test_cannot_kill_the_parent():
    if not PARENT_PROTECTED:
        pytest.skip("neither a privilege drop nor a PID namespace is available: the pipeline is not protected")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        code = textwrap.dedent(
            f"""
            import os, signal
            print(os.getppid() != {os.getpid()})
            for sig in (signal.SIGUSR1, signal.SIGKILL):
                try:
                    os.kill({os.getpid()}, sig)
                    print("sent")
                except OSError as exc:
                    print(type(exc).__name__)
            """
        )
        result = run_code(code)
        time.sleep(0.2)
        assert received == []
        lines = result.stdout.split()
        assert lines[0] == "True" and "sent" not in lines, result
        # Killing its own parent (the intermediate runner) ends only the sandboxed run
        suicide = run_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(30)")
        assert suicide.status == "killed" and suicide.duration < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _kernel_allows_private_proc() -> bool:
    """Root here may create PID and mount namespaces and mount a /proc in them (checked with util-linux unshare)."""
    tool = shutil.which("unshare")
    if os.geteuid() != 0 or tool is None:
        return False
    probe = [tool, "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_host_processes_are_invisible():
    if os.geteuid() != 0:
        pytest.skip("as a normal user the sandbox has a PID namespace but the host's /proc (documented limitation)")
    if not _kernel_allows_private_proc():
        pytest.skip("this kernel or container does not let root create PID and mount namespaces with a fresh /proc")
    mounts_before = Path("/proc/self/mountinfo").read_text()
    code = textwrap.dedent(
        f"""
        import json, os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        try:
            parent = open("/proc/{os.getpid()}/cmdline", "rb").read().decode(errors="replace")
        except OSError as exc:
            parent = type(exc).__name__
        try:
            os.kill({os.getpid()}, 0)
            reachable = "reachable"
        except OSError as exc:
            reachable = type(exc).__name__
        print(json.dumps({{"pids": pids, "me": os.getpid(), "parent": parent, "kill": reachable}}))
        """
    )
    result = run_code(code)
    assert result.passed, result
    seen = json.loads(result.stdout)
    assert seen["me"] == 1 and seen["pids"] == [1], seen  # only itself: no host process, not even the runner
    assert seen["parent"] == "FileNotFoundError" and seen["kill"] == "ProcessLookupError"
    assert ISOLATION.pid_namespace and ISOLATION.private_proc
    # The sandbox's /proc stayed in its own mount namespace
    assert Path("/proc/self/mountinfo").read_text() == mounts_before


def test_huge_stdout_is_truncated_and_memory_bounded():
    cap = 64 << 10
    tracemalloc.start()
    try:
        endless = run_code("while True:\n    print('x' * 10000)", SandboxConfig(timeout=1.5, max_output_bytes=cap))
        large = run_code("import sys\nsys.stdout.write('y' * (200 << 20))\nprint('END')\nsys.stderr.write('oops')")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert endless.status == "timeout" and endless.stdout_truncated
    assert len(endless.stdout) < cap + 100 and "bytes truncated" in endless.stdout
    assert large.passed and large.stdout_truncated and large.stdout.endswith("END\n")
    assert large.stderr == "oops" and not large.stderr_truncated
    assert peak < 8 << 20  # the 200 MiB were read in chunks and dropped, never held


def test_sandbox_errors_never_raise():
    broken = run_code("print(1)", SandboxConfig(python_executable="/nonexistent/python3", drop_privileges=False))
    assert (broken.passed, broken.status, broken.returncode) == (False, "error", None)
    assert "sandbox error" in broken.detail
    not_code = run_code(None)  # type: ignore[arg-type]
    assert not_code.status == "error"


def test_pool_is_bounded_and_ordered():
    codes = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)]
    start = time.monotonic()
    with SandboxPool(max_workers=2) as pool:
        results = pool.map(codes)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert 1.0 <= elapsed < 4.0  # two at a time: two rounds of 0.5 s
    assert [r.status for r in run_many(["pass", "1/0", "pass"], max_workers=3)] == ["passed", "failed", "passed"]


# Run as an unprivileged user: load the sandbox package by path (it needs only the standard library) and run each probe
# program, with PIPELINE replaced by the driver's own PID (the driver plays the pipeline)
_UNPRIVILEGED_DRIVER = """
import importlib.util, json, os, sys
package = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "sandbox", os.path.join(package, "__init__.py"), submodule_search_locations=[package]
)
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
results = {"isolation": sandbox.describe_isolation().__dict__}
for name, code in json.loads(sys.argv[2]).items():
    result = sandbox.run_code(code.replace("PIPELINE", str(os.getpid())), sandbox.SandboxConfig(timeout=1.5))
    results[name] = [result.status, *result.stdout.split()]
print(json.dumps(results))
"""

_UNPRIVILEGED_PROBES = {
    "kill": """
import os
try:
    os.kill(PIPELINE, 0)
    print("reachable")
except OSError as exc:
    print(type(exc).__name__)
""",
    "net": """
import socket
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
""",
    "env": """
import os
print("HF_TOKEN" in os.environ)
try:
    print("HF_TOKEN" in open("/proc/PIPELINE/environ").read())
except OSError as exc:
    print(type(exc).__name__)
""",
    "tree": """
import os, time
if os.fork() == 0:
    os.setsid()
    print(os.readlink("/proc/self"), flush=True)
    time.sleep(60)
time.sleep(60)
""",
}


def _traversable_by_others(directory: Path) -> bool:
    """Whether any user can reach files in `directory`: every component is world-searchable (o+x)."""
    path = directory.resolve()
    try:
        return all(os.stat(part).st_mode & 0o001 for part in [path, *path.parents])
    except OSError:
        return False


@contextlib.contextmanager
def _copy_readable_by_others(source: Path):
    """A copy of the folder `source` in a fresh temporary directory (folders 0755, files 0644) under a world-searchable
    parent."""
    candidates = [tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]
    parent = next((Path(c) for c in candidates if os.path.isdir(c) and _traversable_by_others(Path(c))), None)
    if parent is None:
        pytest.skip(f"no temporary directory among {candidates} is reachable by an unprivileged user")
    directory = Path(tempfile.mkdtemp(prefix="trl_pplmask_unprivileged_", dir=parent))
    try:
        os.chmod(directory, 0o755)
        copy = directory / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        for folder, _, files in os.walk(copy):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        yield copy
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_unprivileged_mode():
    """The sandbox as a normal user runs it: user, PID and network namespaces where allowed, else the fallbacks."""
    interpreter = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if interpreter is None:
        pytest.skip("no system python3 to run the sandbox as an unprivileged user")
    # The clone may sit where user 65534 cannot read (CI clones into a mode-0700 folder): run a copy of the sandbox
    # package from a directory that user can reach
    with _copy_readable_by_others(SANDBOX_DIR) as sandbox_copy:
        completed = subprocess.run(
            [interpreter, "-I", "-c", _UNPRIVILEGED_DRIVER, str(sandbox_copy), json.dumps(_UNPRIVILEGED_PROBES)],
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_sandbox_test_secret"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    isolation = report["isolation"]
    assert not isolation["privilege_drop"]
    # Without namespaces, reaching the pipeline's PID and /proc/<pid>/environ are documented limitations
    if isolation["pid_namespace"]:
        assert report["kill"] == ["passed", "ProcessLookupError"]  # that PID does not exist in the sandbox
    assert report["env"][:2] == ["passed", "False"]  # not inherited
    if isolation["user_namespace"]:
        assert report["env"][2] == "PermissionError"
    # Blocked: no route in an empty network namespace (OSError), or by the guard (PermissionError); a refused
    # connection would mean that the host's loopback was reached
    assert report["net"] == ["passed", "OSError" if isolation["network"] == "namespace" else "PermissionError"]
    assert report["tree"][0] == "timeout"
    if isolation["pid_namespace"]:
        assert not _alive(int(report["tree"][1]))  # the setsid() child died with the namespace
