"""The bubblewrap sandbox: what it runs, what it bounds, what it hides, and how verdicts are split (attacks on it are
in tests/test_sandbox_attacks.py)."""

from __future__ import annotations

import ast
import json
import os
import socket
import textwrap

import pytest

from trl_pplmask.sandbox import (
    SandboxConfig,
    SandboxPool,
    SandboxUnavailableError,
    describe_isolation,
    run_code,
    run_many,
)
from trl_pplmask.sandbox.bwrap import seccomp_filter
from trl_pplmask.sandbox.runner import RUNNER
from trl_pplmask.sandbox.verdict import NotSplittable, decode, split_assert


ISOLATION = describe_isolation()


def run(code: str, **config) -> object:
    return run_code(textwrap.dedent(code), SandboxConfig(**{"timeout": 5, **config}))


def test_isolation_is_reported():
    assert ISOLATION.sandboxed and os.path.basename(ISOLATION.bwrap) == "bwrap"
    assert ISOLATION.host_uid != 0  # never root on the host
    assert "RLIMIT_AS" in ISOLATION.memory


def test_refuses_without_bubblewrap():
    missing = SandboxConfig(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        describe_isolation(missing)
    with pytest.raises(SandboxUnavailableError):
        run_code("print(1)", missing)
    from trl_pplmask.verifiers import get_verifier

    with pytest.raises(SandboxUnavailableError):
        get_verifier("mbpp", missing)
    opted_in = SandboxConfig(bwrap="/nonexistent/bwrap", allow_unsandboxed=True)
    assert not describe_isolation(opted_in).sandboxed
    assert run_code("print(1)", opted_in).stdout == "1\n"


def test_ordinary_programs():
    assert run("print(sum(range(10)))").stdout == "45\n"
    failed = run("raise ValueError('boom')")
    assert failed.status == "failed" and "ValueError: boom" in failed.stderr and "<string>" not in failed.stderr
    assert run("import sys; sys.exit(3)").returncode == 3
    assert run("import sys; sys.exit(0)").passed
    early = run_code("import os; os._exit(0)\nprint(1)", SandboxConfig(timeout=5), require_completion=True)
    assert not early.passed and "before its last line" in early.detail


def test_limits():
    assert run("while True: pass", timeout=1).status == "timeout"
    memory = run("x = bytearray(2 << 30)", memory_limit=1 << 30)
    assert memory.status == "failed" and "MemoryError" in memory.stderr
    big = run("open('f', 'wb').write(b'x' * (32 << 20))", file_size_limit=1 << 20)
    assert big.status in ("killed", "failed") and not big.passed
    bomb = """
    import os, time
    for _ in range(20):
        if os.fork() == 0:
            x = bytearray(300 << 20)
            for i in range(0, len(x), 4096):
                x[i] = 1
            time.sleep(30)
    time.sleep(30)
    """
    watched = run(bomb, timeout=20, total_memory_limit=800 << 20)
    assert watched.status == "killed" and "memory check" in watched.detail


def test_nothing_of_the_host_is_visible_or_writable():
    code = """
    import json, os
    seen = {p: os.path.exists(p) for p in ("/work", "/root", "/etc/passwd", "/run", "/home", "/var")}
    writable = {}
    for p in ("/", "/usr", "/usr/bin", "/dev"):  # /dev: a 64 KiB tmpfs
        try:
            with open(os.path.join(p, "x"), "w") as f:
                f.write("x" * (1 << 20))
            writable[p] = True
        except OSError:
            writable[p] = False
    procs = [p for p in os.listdir("/proc") if p.isdigit()]
    print(json.dumps({"seen": seen, "writable": writable, "procs": len(procs), "env": dict(os.environ)}))
    """
    out = json.loads(run(code, extra_env={"MY_SETTING": "1"}).stdout)
    assert not any(out["seen"].values()), out["seen"]
    assert not any(out["writable"].values()), out["writable"]
    assert out["procs"] <= 3  # bwrap's init, the runner, nothing of the host
    assert out["env"]["MY_SETTING"] == "1" and not any("TOKEN" in name for name in out["env"])
    with pytest.raises(ValueError, match="secrets"):
        SandboxConfig(extra_env={"HF_TOKEN": "x"})


def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        code = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)\n    print('open')\n"
        code += "except OSError:\n    print('blocked')"
        assert run(code).stdout.strip() == "blocked"
    finally:
        server.close()


def test_seccomp_filter_is_well_formed():
    program = seccomp_filter("x86_64")
    assert len(program) % 8 == 0 and len(program) // 8 < 64
    assert len(seccomp_filter("aarch64")) % 8 == 0
    refused = run("import os\ntry:\n    os.memfd_create('x')\nexcept OSError as e:\n    print(e.errno)")
    assert refused.stdout.strip() == "1"


def test_pool_is_bounded_and_ordered():
    with SandboxPool(SandboxConfig(timeout=5), max_workers=2) as pool:
        results = pool.map([f"print({i})" for i in range(4)])
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert [r.stdout for r in run_many(["print(1)", "print(2)"])] == ["1\n", "2\n"]
    with pytest.raises(ValueError):
        SandboxPool(max_workers=0)


# --------------------------------------------------------------------------------------------------------------------
# Verdicts: splitting asserts and decoding values
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "test, probes, skeleton",
    [
        ("f(3) == [1, 2]", ["f(3)"], "_p0 == [1, 2]"),
        ("set(f(x)) == set([1, 2])", ["set(f(x))"], "_p0 == set([1, 2])"),
        ("math.isclose(f(2), 3.14, rel_tol=0.001)", ["f(2)"], "math.isclose(_p0, 3.14, rel_tol=0.001)"),
        ("abs(f(2) - 3.14) < 0.001", ["f(2)"], "abs(_p0 - 3.14) < 0.001"),
        ("not f(1)", ["f(1)"], "not _p0"),
        ("f(1) == g(2)", ["f(1)", "g(2)"], "_p0 == _p1"),
        ("f(1).lower() == 'a'", ["f(1).lower()"], "_p0 == 'a'"),
    ],
)
def test_split_assert(test, probes, skeleton):
    found: list = []
    assert ast.unparse(split_assert(ast.parse(test, mode="eval").body, found)) == skeleton
    assert [ast.unparse(p) for p in found] == probes


def test_expected_values_never_reach_a_probe():
    with pytest.raises(NotSplittable):
        split_assert(ast.parse("[x + 1 for x in f(1)] == [2]", mode="eval").body, [])


def test_decode_matches_the_runner():
    namespace: dict = {}
    exec(RUNNER[RUNNER.index("SCALARS =") : RUNNER.index("def reply")], namespace)  # the runner's own codec
    values = [None, True, 1, 2.5, "s", b"b", 1j, (1, [2]), {1: {"a"}}, frozenset({3}), [(1, 2)], {(1, 2): None}]
    for value in values:
        back = decode(json.loads(json.dumps(namespace["encode"](value))))
        assert back == value and type(back) is type(value)
    with pytest.raises(ValueError):
        decode({"x": 1})
    with pytest.raises(TypeError):
        namespace["encode"](object())
