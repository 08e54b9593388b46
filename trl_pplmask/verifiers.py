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
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import re
import textwrap
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

from .sandbox import SandboxConfig, SandboxResult, default_workers, run_code


logger = logging.getLogger(__name__)

Verifier = Callable[[dict[str, Any], str], bool]

# `__name__` of test programs: not "__main__", so that a solution's `if __name__ == "__main__":` block (which often
# reads `input()` or prints demos) does not run, as in the reference HumanEval and MBPP evaluators
TEST_RUN_NAME = "__sandbox_test__"


class RowFormatError(ValueError):
    """A dataset row lacks the reference fields a verifier needs (a data problem, not a wrong answer)."""


def _field(row: dict[str, Any], name: str, task: str) -> Any:
    value = row.get(name)
    if value is None:
        raise RowFormatError(
            f"The {task} verifier needs the row field {name!r}, but the row has only {sorted(row)}. Load the data "
            "with `trl_pplmask.data.load_task`, which keeps the task's raw fields."
        )
    return value


# --------------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------------
# A number: optional sign, digits with or without thousands separators, optional decimals or fraction. Not preceded
# by a letter, digit or period, so "x2" or the "5" of "1.5" are not numbers of their own.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")


def _numbers(text: str) -> list[str]:
    # Currency signs and Unicode minus signs would otherwise split or hide numbers ("-$5", "−3")
    text = text.replace("$", "").replace("\u2212", "-").replace("\\!", "")
    return _NUMBER.findall(text)


def _to_fraction(number: str) -> Fraction | None:
    try:
        return Fraction(number.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k_answer(text: str) -> Fraction | None:
    """The final numeric answer of a GSM8K-style text: the first number after the last `####`, otherwise the last
    number in the text; `None` when there is none.

    Args:
        text (`str`): Reference answer or model response.

    Returns:
        `Fraction` or `None`: the value, exact (`"1,234.50"` -> `Fraction(2469, 2)`).
    """
    if "####" in text:
        found = _numbers(text.rsplit("####", 1)[1])
        if found:
            return _to_fraction(found[0])
    found = _numbers(text)
    return _to_fraction(found[-1]) if found else None


def verify_gsm8k(row: dict[str, Any], response: str) -> bool:
    """Whether `response` ends with the same number as the GSM8K reference `row["answer"]`."""
    reference = extract_gsm8k_answer(str(_field(row, "answer", "gsm8k")))
    if reference is None:
        raise RowFormatError(f"No number found in the GSM8K reference answer {row['answer']!r}.")
    predicted = extract_gsm8k_answer(response)
    return predicted is not None and predicted == reference


# --------------------------------------------------------------------------------------------------------------------
# MATH
# --------------------------------------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`, braces balanced; `None` if
    there is none."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1 : i].strip()
        else:  # `\boxed 5`: the argument runs to the next whitespace or `$`
            argument = re.match(r"[^\s$]+", text[start:])
            if argument:
                return argument.group(0)
    return None


@functools.lru_cache(maxsize=4096)
def _parse_math_reference(answer: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)


def verify_math(row: dict[str, Any], response: str) -> bool:
    """Whether `response`'s final answer is mathematically equivalent to the boxed answer of `row["solution"]`.

    The response's last `\\boxed{}` content is parsed by `math-verify` (without one, its last LaTeX expression or
    number). `math-verify` bounds its work with `SIGALRM`, which exists only in the main thread; elsewhere it runs
    without a time bound.
    """
    from math_verify import parse, verify

    solution = str(_field(row, "solution", "math"))
    answer = last_boxed(solution)
    if answer is None:
        raise RowFormatError(f"The MATH reference solution has no \\boxed{{}} answer: {solution[-200:]!r}")
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _parse_math_reference(answer, timeout)
    # Only the last boxed answer counts, as for the reference (math-verify would merge several boxed answers into a
    # set); without one, math-verify picks the response's last expression
    boxed = last_boxed(response)
    predicted = parse(response if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold or not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=timeout))


# --------------------------------------------------------------------------------------------------------------------
# ARC-Challenge
# --------------------------------------------------------------------------------------------------------------------
# "Answer: B", "**Answer:** (B)", "answer: B." -- the label is a capital letter or a digit (some ARC rows use 1-4),
# standing alone (so "Answer: Because" is not "B")
_ARC_ANSWER = re.compile(r"(?i:answer)\s*[*_]*\s*:\s*[*_\s]*\(?\s*([A-Z0-9])\s*\)?(?![A-Za-z0-9])")


def extract_choice(text: str) -> str | None:
    """The choice label after the last `Answer:` in `text`, or `None`."""
    found = _ARC_ANSWER.findall(text)
    return found[-1] if found else None


def verify_arc_challenge(row: dict[str, Any], response: str) -> bool:
    """Whether the label after the last `Answer:` in `response` is `row["answerKey"]`."""
    key = str(_field(row, "answerKey", "arc_challenge")).strip()
    return extract_choice(response) == key


# --------------------------------------------------------------------------------------------------------------------
# Code tasks
# --------------------------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a response: the first ```python code block, else the first code block of any language, else
    the whole text. An unterminated block (a truncated generation) runs to the end of the text."""
    blocks = _FENCE.findall(text)
    for language, body in blocks:
        if language.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def _lines(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [line for line in value if isinstance(line, str) and line.strip()]


def mbpp_program(row: dict[str, Any], response: str) -> str:
    """The test program of an MBPP row: test imports, the response's code, setup code, then the row's asserts.

    Setup code (`test_setup_code`, stored as `test` in the paper's copy) comes after the solution because it may use
    the solution's definitions (task 927 builds trees of the solution's `Node` class).
    """
    tests = _lines(_field(row, "test_list", "mbpp"))
    if not tests:
        raise RowFormatError("The MBPP row's `test_list` is empty; there is nothing to check the code against.")
    setup = [*_lines(row.get("test_setup_code")), *_lines(row.get("test"))]
    parts = [*_lines(row.get("test_imports")), extract_code(response), *setup]
    return "\n".join(parts) + "\n\n" + "\n".join(tests) + "\n"


def _prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if re.match(r"\s*(import|from)\s+\w", line))


def _humaneval_prompt(row: dict[str, Any]) -> str:
    # `load_task` keeps the raw prompt as `source_prompt`: its `prompt` column holds the chat messages
    for name in ("source_prompt", "prompt"):
        if isinstance(row.get(name), str):
            return row[name]
    raise RowFormatError(
        f"The humaneval verifier needs the function's prompt as a string in `source_prompt` (as `load_task` keeps "
        f"it) or `prompt`; the row has {sorted(row)}."
    )


def humaneval_program(row: dict[str, Any], response: str) -> str:
    """The test program of a HumanEval row, for a response holding the whole function or only its body.

    - Whole function (the code defines `entry_point`): the prompt (with `pass` as body, so that its imports and
      helper functions exist) followed by the response's code, which redefines the function.
    - Body only: the prompt followed by the body, indented under the signature if the model dropped the indentation.

    The row's `test` and `check(entry_point)` follow.
    """
    prompt = _humaneval_prompt(row)
    test = str(_field(row, "test", "humaneval"))
    entry_point = str(_field(row, "entry_point", "humaneval"))
    code = extract_code(response)
    if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        stub = prompt.rstrip() + "\n    pass\n"
        try:
            ast.parse(stub)
            program = stub + "\n\n" + code
        except SyntaxError:  # a prompt that does not end inside the function: keep only its imports
            program = _prompt_imports(prompt) + "\n\n" + code
    else:
        body = code.strip("\n")
        first = next((line for line in body.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            body = textwrap.indent(body, "    ")
        program = prompt + body + "\n"
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


def run_tests(program: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Run a test program in the sandbox, requiring it to run to its last line (an early `sys.exit(0)` fails)."""
    return run_code(program, config, run_name=TEST_RUN_NAME, require_completion=True)


def verify_mbpp(row: dict[str, Any], response: str, sandbox_config: SandboxConfig | None = None) -> bool:
    """Whether the response's code passes the MBPP row's `test_list` in the sandbox."""
    return run_tests(mbpp_program(row, response), sandbox_config).passed


def verify_humaneval(row: dict[str, Any], response: str, sandbox_config: SandboxConfig | None = None) -> bool:
    """Whether the response's function passes the HumanEval row's `check(entry_point)` in the sandbox."""
    return run_tests(humaneval_program(row, response), sandbox_config).passed


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------
VERIFIERS: dict[str, Verifier] = {
    "gsm8k": verify_gsm8k,
    "math": verify_math,
    "arc_challenge": verify_arc_challenge,
    "mbpp": verify_mbpp,
    "humaneval": verify_humaneval,
}
CODE_TASKS = frozenset({"mbpp", "humaneval"})


def _safe(verifier: Callable[..., Any], name: str) -> Verifier:
    @functools.wraps(verifier)
    def checked(row: dict[str, Any], response: str) -> bool:
        try:
            return bool(verifier(row, response))
        except RowFormatError:
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
    if task_or_callable == "math" and importlib.util.find_spec("math_verify") is None:
        # Checked here: inside the checker the ImportError would silently count every answer as wrong
        raise ImportError("The math verifier needs `math-verify`: pip install 'trl-pplmask[eval]'.")
    verifier = VERIFIERS[task_or_callable]
    if task_or_callable in CODE_TASKS and sandbox_config is not None:
        verifier = functools.partial(verifier, sandbox_config=sandbox_config)
    return _safe(verifier, task_or_callable)


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
    "extract_choice",
    "extract_code",
    "extract_gsm8k_answer",
    "get_verifier",
    "humaneval_program",
    "last_boxed",
    "mbpp_program",
    "run_tests",
    "verify_arc_challenge",
    "verify_batch",
    "verify_gsm8k",
    "verify_humaneval",
    "verify_math",
    "verify_mbpp",
]
