"""Test verdicts the solution cannot forge: the expected values never enter its sandbox, and the trusted parent
decides.

A test is a list of `assert` statements. Each is split (`split_assert`) into *probes*, the smallest expressions that
involve the solution and hold no expected value (`f(x)` in `assert f(x) == y`, both sides of
`assert f(a) == g(b)`), and a *skeleton* with the probes as placeholders (`_p0 == y`). The probes run in the solution's
sandbox and come back as tagged plain data, rebuilt here as built-in objects (`decode`); the skeleton, made of
literals and a few pure built-ins only (`SAFE_NAMES`, `math.<SAFE_MATH>`), is evaluated here. Probes that involve only
test imports (`sys.getsizeof(...)`) run in a second sandbox that holds no solution. Assert shapes, and how many of each
the data sets hold, are in the README ("Sandbox").

Checks that are not a list of asserts (HumanEval checks with loops or helpers: `relay`) run as trusted test code in
a sandbox of their own, where the candidate is a proxy: each call goes to the solution's sandbox as data and its
result comes back as data; the verdict is that sandbox's report, which the solution has no way to reach.
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .config import SandboxConfig
from .run import run_jobs


SAFE_NAMES = frozenset(
    "abs all any bool complex dict float frozenset int isinstance len list max min range reversed round set sorted "
    "str sum tuple type zip".split()
)
SAFE_MATH = frozenset("isclose fabs sqrt floor ceil log exp pi e inf nan".split())
_MATH = SimpleNamespace(**{name: getattr(math, name) for name in SAFE_MATH})
_ENV = {"__builtins__": {}, "math": _MATH, **{name: getattr(builtins, name) for name in SAFE_NAMES}}
_PREDICATES = (ast.Compare, ast.BoolOp, ast.UnaryOp)  # always applied here, never inside the sandbox
_STRUCTURE = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Subscript, ast.Tuple, ast.List, ast.Set, ast.Dict)
_FORBIDDEN = (ast.Lambda, ast.comprehension, ast.NamedExpr, ast.Starred, ast.Await, ast.Yield, ast.YieldFrom)


class NotSplittable(ValueError):
    """An assert whose test cannot be split into solution probes and a trusted skeleton."""


def _safe_call(node: ast.AST) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    if isinstance(func, ast.Name):
        return func.id in SAFE_NAMES
    return isinstance(func, ast.Attribute) and _is_math(func)


def _is_math(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in SAFE_MATH


def trusted(node: ast.AST) -> bool:
    """Whether the parent may evaluate `node`: literals and safe built-ins only, no solution names."""
    for sub in ast.walk(node):
        if isinstance(sub, _FORBIDDEN) or (isinstance(sub, ast.Name) and sub.id not in SAFE_NAMES | {"math"}):
            return False
        if isinstance(sub, ast.Attribute) and not _is_math(sub):
            return False
        if isinstance(sub, ast.Call) and not _safe_call(sub):
            return False
    return True


def _holds_expected(node: ast.AST) -> bool:
    """Whether `node` holds a literal outside the arguments of the solution's calls (an expected value)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Call) and not _safe_call(node):
        return False  # its arguments are inputs of the solution
    return any(_holds_expected(child) for child in ast.iter_child_nodes(node))


def split_assert(test: ast.expr, probes: list[ast.expr]) -> ast.expr:
    """The skeleton of an assert's test; the probes it needs are appended to `probes` (placeholder `_p<i>`)."""
    if trusted(test):
        return test
    if not isinstance(test, _PREDICATES) and not _holds_expected(test):
        probes.append(test)
        return ast.Name(id=f"_p{len(probes) - 1}", ctx=ast.Load())
    if not (isinstance(test, _STRUCTURE) or _safe_call(test)):
        raise NotSplittable(ast.unparse(test))
    clone = type(test)(**{name: getattr(test, name) for name in test._fields})
    for name, value in ast.iter_fields(test):
        if isinstance(value, ast.expr):
            setattr(clone, name, split_assert(value, probes))
        elif isinstance(value, list):
            items = [split_assert(v, probes) if isinstance(v, ast.expr) else v for v in value]
            setattr(clone, name, items)
    if isinstance(test, ast.Call):
        clone.func = test.func
        clone.keywords = [ast.keyword(k.arg, split_assert(k.value, probes)) for k in test.keywords]
    return clone


def decode(value: Any) -> Any:
    """Tagged plain data (the runner's `encode`) back to built-in objects; anything else raises `ValueError`."""
    if value is None or type(value) in (bool, int, float):
        return value
    if type(value) is not dict or len(value) != 1:
        raise ValueError(f"not tagged data: {type(value).__name__}")
    ((tag, body),) = value.items()
    if tag == "s" and type(body) is str:
        return body
    if tag == "c":
        return complex(float(body[0]), float(body[1]))
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "d":
        return {decode(k): decode(v) for k, v in body}
    kinds = {"t": tuple, "l": list, "f": frozenset, "z": set}
    if tag not in kinds or type(body) is not list:
        raise ValueError(f"unknown tag {tag!r}")
    return kinds[tag](decode(item) for item in body)


@dataclass
class Check:
    """One assert: its skeleton (evaluated here) and its probes (evaluated in a sandbox), by source."""

    source: str
    skeleton: ast.Expression
    probes: list[str]


@dataclass
class TestPlan:
    """How a response is checked.

    Args:
        code (`str`): The solution's program (imports, solution, setup), run in the solution's sandbox.
        checks (`list[Check]`): Split asserts, decided here.
        reference_code (`str`): Imports for probes that involve no solution (run without the solution).
        reference_probes (`set[str]`): Which probes those are.
        relay (`str` or `None`): Trusted test code run in its own sandbox with `relay_names` proxied to the solution.
        relay_names (`dict[str, str]`): Name in the test code -> function of the solution it calls.
    """

    code: str
    checks: list[Check] = field(default_factory=list)
    reference_code: str = ""
    reference_probes: set[str] = field(default_factory=set)
    relay: str | None = None
    relay_names: dict[str, str] = field(default_factory=dict)


def plan_asserts(code: str, asserts: Iterable[ast.Assert], imports: Sequence[str] = (), rename=None) -> TestPlan:
    """Split asserts into a `TestPlan` (`rename`: a test-side name -> the solution's, e.g. `candidate`)."""
    import_names = {
        (alias.asname or alias.name).split(".")[0]
        for stmt in ast.parse("\n".join(imports)).body
        if isinstance(stmt, (ast.Import, ast.ImportFrom))
        for alias in stmt.names
    }
    plan = TestPlan(code=code, reference_code="\n".join(imports))
    for node in asserts:
        test = node.test
        if rename:
            test = ast.fix_missing_locations(_Rename(rename).visit(test))
        probes: list[ast.expr] = []
        skeleton = ast.fix_missing_locations(ast.Expression(split_assert(test, probes)))
        sources = [ast.unparse(probe) for probe in probes]
        for probe, source in zip(probes, sources):
            names = {n.id for n in ast.walk(probe) if isinstance(n, ast.Name)}
            if names <= import_names | SAFE_NAMES:
                plan.reference_probes.add(source)
        plan.checks.append(Check(ast.unparse(node), skeleton, sources))
    return plan


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(id=self.names.get(node.id, node.id), ctx=node.ctx)


def _probe_job(code: str, probes: list[str]) -> tuple[dict, int]:
    read, write = os.pipe()
    job = {"mode": "probes", "code": code, "run_name": "__sandbox_test__", "probes": probes}
    return {**job, "fds": {"out": write}, "channel_fds": [read]}, read


def _values(channel: str, count: int) -> list[tuple[bool, Any]]:
    """(ok, value) per probe, from the runner's JSON lines; a short or malformed channel fails every probe."""
    out = []
    for line in channel.splitlines()[:count]:
        try:
            answer = json.loads(line)
            out.append((True, decode(answer["v"])) if "v" in answer else (False, answer.get("e")))
        except (ValueError, KeyError, TypeError, RecursionError):
            out.append((False, "malformed"))
    return out + [(False, "missing")] * (count - len(out))


def run_plan(plan: TestPlan, config: SandboxConfig | None = None) -> tuple[bool, str]:
    """Run a `TestPlan` in sandboxes and decide here. Returns (passed, why not)."""
    if plan.relay is not None:
        return _run_relay(plan, config)
    solution = [p for check in plan.checks for p in check.probes if p not in plan.reference_probes]
    reference = sorted({p for check in plan.checks for p in check.probes if p in plan.reference_probes})
    jobs = [_probe_job(plan.code, solution)[0]]
    if reference:
        jobs.append(_probe_job(plan.reference_code, reference)[0])
    results = run_jobs(jobs, config)
    if not results[0].passed:
        return False, results[0].detail or "the solution's sandbox failed"
    values = dict(zip(reference, _values(results[1].channel, len(reference)))) if reference else {}
    solution_values = iter(_values(results[0].channel, len(solution)))
    for check in plan.checks:
        env = dict(_ENV)
        for i, probe in enumerate(check.probes):
            ok, value = values[probe] if probe in plan.reference_probes else next(solution_values)
            if not ok:
                return False, f"{check.source}: {probe} gave {value} (an exception, or not plain data)"
            env[f"_p{i}"] = value
        try:
            if not eval(compile(check.skeleton, "<check>", "eval"), env):  # noqa: S307 (literals, data, safe built-ins)
                return False, f"failed: {check.source}"
        except Exception as exc:
            return False, f"{check.source}: {type(exc).__name__} while comparing"
    return True, ""


def _run_relay(plan: TestPlan, config: SandboxConfig | None) -> tuple[bool, str]:
    calls_read, calls_write = os.pipe()
    answers_read, answers_write = os.pipe()
    done_read, done_write = os.pipe()
    server = {"mode": "serve", "code": plan.code, "run_name": "__sandbox_test__"}
    server["fds"] = {"out": answers_write, "in": calls_read}
    check = {"mode": "check", "code": plan.relay, "run_name": "__sandbox_check__", "remote": plan.relay_names}
    check["fds"] = {"out": calls_write, "in": answers_read, "done": done_write}
    check["channel_fds"] = [done_read]
    _, tests = run_jobs([server, check], config)
    if tests.passed and '"done"' in tests.channel:
        return True, ""
    return False, tests.detail or tests.stderr[-300:] or "the check did not complete"
