"""Answer checkers: is a model's response to a task row correct?

A verifier is any callable `(row, response) -> bool`, where `row` holds the task's raw fields as `load_task` keeps
them (GSM8K `answer`; MATH `solution`; ARC-Challenge `answerKey`; MBPP `test_list`; HumanEval `source_prompt` (the
raw `prompt`), `test`, `entry_point`) and `response` is the model's text. Built-in verifiers:

- `gsm8k`: the number after the last `####` (else the last number of the response) equals the reference's, compared
  as exact rationals after stripping `$`, thousands separators, units and a trailing period.
- `math`: the response's last `\\boxed{}` answer (else its last expression) is equivalent, per `math-verify`, to
  the reference solution's last `\\boxed{}` answer.
- `arc_challenge`: the choice label after the last `Answer:` equals `answerKey`.
- `mbpp`: the response's code block, followed by the row's test asserts, runs without error in the sandbox.
- `humaneval`: the completed function (whole function or only its body) passes the row's `check(entry_point)`.

`get_verifier` returns a checker that never raises on a bad response: a crash while checking counts as "incorrect".
A row that lacks the reference fields raises `RowFormatError` instead, because that is a data problem and silently
scoring it as wrong would corrupt the results.

What each task checks lives with the task (`trl_pplmask.tasks`: `Task.check`, or `Task.test_program` for code);
this module runs the checks (code in the sandbox, in parallel) and accepts any task added to that registry.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence, Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .sandbox import (
    SandboxConfig,
    SandboxResult,
    SandboxUnavailableError,
    default_workers,
    describe_isolation,
    run_code,
)
from .sandbox.verdict import NotSplittable, TestPlan, plan_asserts, run_plan, trusted
from .tasks import TASKS, RowFormatError, get_task
from .tasks.arc_challenge import extract_choice, verify_arc_challenge
from .tasks.base import row_field
from .tasks.code import code_lines, extract_code
from .tasks.gsm8k import extract_gsm8k_answer, verify_gsm8k
from .tasks.humaneval import humaneval_program
from .tasks.math import last_boxed, verify_math
from .tasks.mbpp import mbpp_program


logger = logging.getLogger(__name__)

Verifier = Callable[[dict[str, Any], str], bool]

# `__name__` of test programs: not "__main__", so that a solution's `if __name__ == "__main__":` block (which often
# reads `input()` or prints demos) does not run, as in the reference HumanEval and MBPP evaluators
TEST_RUN_NAME = "__sandbox_test__"


def run_tests(program: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Run a test program in the sandbox, requiring it to run to its last line (an early `sys.exit(0)` fails).

    This trusts the program's own interpreter to report completion: it is what registered code tasks that give only
    a `test_program` get. MBPP and HumanEval are decided outside the sandbox instead (`mbpp_plan`, `humaneval_plan`).
    """
    return run_code(program, config, run_name=TEST_RUN_NAME, require_completion=True)


def _asserts(lines: Sequence[str], task: str) -> list[ast.Assert]:
    statements = []
    for line in lines:
        try:
            statements += ast.parse(line).body
        except SyntaxError as err:
            raise RowFormatError(f"The {task} row's test {line!r} is not valid Python: {err}.") from None
    return statements


def mbpp_plan(row: dict[str, Any], response: str) -> TestPlan:
    """How an MBPP response is checked: test imports, the response's code and setup code run in the sandbox; each
    assert of `test_list` is split into solution probes (run there) and a comparison decided here."""
    tests = _asserts(code_lines(row_field(row, "test_list", "mbpp")), "mbpp")
    if not tests:
        raise RowFormatError("The MBPP row's `test_list` is empty; there is nothing to check the code against.")
    imports = code_lines(row.get("test_imports"))
    setup = [*code_lines(row.get("test_setup_code")), *code_lines(row.get("test"))]
    code = "\n".join([*imports, extract_code(response), *setup]) + "\n"
    if not all(isinstance(test, ast.Assert) for test in tests):
        raise RowFormatError(f"The MBPP row's `test_list` must hold assert statements only: {tests!r}.")
    try:
        return plan_asserts(code, tests, imports)
    except NotSplittable:  # none in MBPP today: the whole assert, evaluated in the sandbox, must give True
        return plan_asserts(code, [ast.Assert(ast.Compare(t.test, [ast.Eq()], [ast.Constant(True)])) for t in tests])


def _check_function(test: str) -> tuple[list[ast.stmt], ast.FunctionDef | None]:
    module = ast.parse(test)
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    return module.body, checks[-1] if checks else None


def humaneval_plan(row: dict[str, Any], response: str) -> TestPlan:
    """How a HumanEval response is checked: a `check(candidate)` made only of asserts is split like MBPP's; any
    other check runs as trusted code (the prompt's helpers, the test) in a sandbox of its own, `candidate` relayed as
    data to the solution's sandbox."""
    entry_point = str(row_field(row, "entry_point", "humaneval"))
    test = str(row_field(row, "test", "humaneval"))
    program = humaneval_program(row, response)
    tail = f"{test}\n\ncheck({entry_point})\n"
    code = program[: -len(tail)]
    body, check = _check_function(test)
    if check is None or not check.args.args:
        raise RowFormatError(f"The humaneval row's `test` defines no `check(candidate)`: {test[:200]!r}.")
    candidate = check.args.args[0].arg
    asserts = [s for s in check.body if isinstance(s, ast.Assert)]
    docstrings = [s for s in check.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)]
    others = [s for s in body if s is not check and not _is_literal_assignment(s)]
    if len(asserts) + len(docstrings) == len(check.body) and not others:
        try:
            return plan_asserts(code, asserts, rename={candidate: entry_point})
        except NotSplittable:
            pass
    trusted_prompt = humaneval_program({**row, "test": "pass"}, f"def {entry_point}(*args, **kwargs):\n    pass\n")
    relay = trusted_prompt[: -len(f"pass\n\ncheck({entry_point})\n")] + f"{test}\n\ncheck(__candidate__)\n"
    return TestPlan(code=code, relay=relay, relay_names={"__candidate__": entry_point})


def _is_literal_assignment(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Assign) and trusted(statement.value)


def verify_code(task: str, row: dict[str, Any], response: str, sandbox_config: SandboxConfig | None = None) -> bool:
    """Whether the response passes a code task's tests: MBPP and HumanEval decided outside the sandbox, other
    registered code tasks by their `Task.test_program` running to its end."""
    if task == "mbpp":
        return verify_mbpp(row, response, sandbox_config)
    if task == "humaneval":
        return verify_humaneval(row, response, sandbox_config)
    return run_tests(get_task(task).test_program(row, response), sandbox_config).passed


def verify_mbpp(row: dict[str, Any], response: str, sandbox_config: SandboxConfig | None = None) -> bool:
    """Whether the response's code passes the MBPP row's `test_list` (values computed in the sandbox, compared
    here)."""
    return run_plan(mbpp_plan(row, response), sandbox_config)[0]


def verify_humaneval(row: dict[str, Any], response: str, sandbox_config: SandboxConfig | None = None) -> bool:
    """Whether the response's function passes the HumanEval row's `check(entry_point)`, decided outside its sandbox."""
    return run_plan(humaneval_plan(row, response), sandbox_config)[0]


# --------------------------------------------------------------------------------------------------------------------
# Registry views: what the task registry (`trl_pplmask.tasks`) holds, read when used, so that registered tasks count
# --------------------------------------------------------------------------------------------------------------------
class _Verifiers(Mapping):
    """Task name -> its checker `(row, response) -> bool` (code tasks run their test program in the sandbox)."""

    def __getitem__(self, name: str) -> Verifier:
        task = TASKS[name]
        return task.check if task.check is not None else functools.partial(verify_code, name)

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)


class _CodeTasks(AbstractSet):
    """Names of the registered tasks whose responses are programs."""

    def __contains__(self, name: object) -> bool:
        return name in TASKS and TASKS[name].is_code

    def __iter__(self) -> Iterator[str]:
        return (name for name, task in TASKS.items() if task.is_code)

    def __len__(self) -> int:
        return sum(1 for _ in self)


VERIFIERS: Mapping[str, Verifier] = _Verifiers()
CODE_TASKS: AbstractSet[str] = _CodeTasks()


def _safe(verifier: Callable[..., Any], name: str) -> Verifier:
    @functools.wraps(verifier)
    def checked(row: dict[str, Any], response: str) -> bool:
        try:
            return bool(verifier(row, response))
        except (RowFormatError, SandboxUnavailableError):
            raise
        except Exception as exc:  # a crash while checking a response means "not verified correct"
            logger.warning("Verifier %s raised %s: %s; counted as incorrect.", name, type(exc).__name__, exc)
            return False

    return checked


def get_verifier(task_or_callable: str | Verifier, sandbox_config: SandboxConfig | None = None) -> Verifier:
    """A checker `(row, response) -> bool` for a task name or a user callable.

    The returned checker never raises because of the response: any exception inside it counts as incorrect (and is
    logged). A row lacking the task's reference fields raises `RowFormatError`.

    Args:
        task_or_callable (`str` or `Callable`): One of `gsm8k`, `math`, `arc_challenge`, `mbpp`, `humaneval`, or any
            callable `(row, response) -> bool`.
        sandbox_config (`SandboxConfig`, *optional*): Limits for the code tasks' sandbox.

    Returns:
        `Callable[[dict, str], bool]`
    """
    if callable(task_or_callable):
        return _safe(task_or_callable, getattr(task_or_callable, "__name__", repr(task_or_callable)))
    if task_or_callable not in VERIFIERS:
        raise ValueError(
            f"No verifier for task {task_or_callable!r}; choose one of {sorted(VERIFIERS)} or pass a callable "
            "(row, response) -> bool."
        )
    task = TASKS[task_or_callable]
    if task.requires is not None and importlib.util.find_spec(task.requires) is None:
        # Checked here: inside the checker the ImportError would silently count every answer as wrong
        package = task.requires.replace("_", "-")
        raise ImportError(f"The {task.name} verifier needs `{package}`: pip install 'trl-pplmask[eval]'.")
    verifier = VERIFIERS[task_or_callable]
    if task.is_code:
        describe_isolation(sandbox_config)  # refuses here, before any work, where bubblewrap cannot run
    if task.is_code and sandbox_config is not None:
        verifier = functools.partial(verifier, sandbox_config=sandbox_config)
    return _safe(verifier, task_or_callable)


def check_rows(task_or_callable: str | Verifier, rows: Sequence[dict[str, Any]]) -> None:
    """Refuse, before any generation, rows that lack the reference fields a built-in task's checker reads.

    Each row is checked as its answers will be, with an empty response (for code tasks only the test program is
    built: nothing runs). A user callable is not probed (what it reads is its own business).

    Raises:
        RowFormatError: naming the first row that cannot be checked and why.
    """
    if callable(task_or_callable):
        return
    task = get_task(task_or_callable)
    probe = task.test_program if task.is_code else task.check
    for index, row in enumerate(rows):
        try:
            probe(row, "")
        except RowFormatError as err:
            raise RowFormatError(f"Row {index}: {err}") from None


def verify_batch(
    task_or_callable: str | Verifier,
    rows: Sequence[dict[str, Any]],
    responses: Sequence[str],
    *,
    sandbox_config: SandboxConfig | None = None,
    max_workers: int | None = None,
) -> list[bool]:
    """Check many responses; code tasks run in parallel through a bounded worker pool.

    Args:
        task_or_callable (`str` or `Callable`): As in `get_verifier`.
        rows (`Sequence[dict]`): Task rows, one per response (repeat a row for several samples of it).
        responses (`Sequence[str]`): Model responses.
        sandbox_config (`SandboxConfig`, *optional*): Limits for the code tasks' sandbox.
        max_workers (`int`, *optional*): Parallel checks. Defaults to `default_workers()` for code tasks, and to 1
            (in the calling thread, where `math-verify` can bound its time) for the others and for callables.

    Returns:
        `list[bool]`: correctness, in input order.
    """
    if len(rows) != len(responses):
        raise ValueError(f"Got {len(rows)} rows but {len(responses)} responses; pass one row per response.")
    verifier = get_verifier(task_or_callable, sandbox_config)
    if max_workers is None:
        max_workers = default_workers() if task_or_callable in CODE_TASKS else 1
    if max_workers <= 1:
        return [verifier(row, response) for row, response in zip(rows, responses)]
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trl-pplmask-verify") as pool:
        return list(pool.map(verifier, rows, responses))


__all__ = [
    "CODE_TASKS",
    "RowFormatError",
    "VERIFIERS",
    "Verifier",
    "check_rows",
    "extract_choice",
    "extract_code",
    "extract_gsm8k_answer",
    "get_verifier",
    "humaneval_program",
    "last_boxed",
    "mbpp_plan",
    "mbpp_program",
    "humaneval_plan",
    "run_tests",
    "verify_arc_challenge",
    "verify_batch",
    "verify_gsm8k",
    "verify_humaneval",
    "verify_math",
    "verify_code",
    "verify_mbpp",
]
