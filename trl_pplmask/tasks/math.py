"""MATH (Hendrycks et al. 2021): competition mathematics, the answer in the solution's last `\\boxed{}`.

Answers are compared with `math-verify` (the `eval` extra), imported when a check first runs.
"""

from __future__ import annotations

import functools
import re
import threading

from .base import Row, RowFormatError, Task, chat_pair, row_field


PROMPT = "Given a mathematics problem, determine the answer.\nProblem : {problem}\nAnswer: $"

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


def _timeout() -> int | None:
    # math-verify bounds its work with SIGALRM, which exists only in the main thread; elsewhere it runs unbounded
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_math_reference(answer: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)


def verify_math(row: Row, response: str) -> bool:
    """Whether `response`'s final answer is mathematically equivalent to the boxed answer of `row["solution"]`.

    The response's last `\\boxed{}` content is parsed by `math-verify` (without one, its last LaTeX expression or
    number). `math-verify` bounds its work with `SIGALRM`, which exists only in the main thread; elsewhere it runs
    without a time bound.
    """
    from math_verify import parse, verify

    solution = str(row_field(row, "solution", "math"))
    answer = last_boxed(solution)
    if answer is None:
        raise RowFormatError(f"The MATH reference solution has no \\boxed{{}} answer: {solution[-200:]!r}")
    timeout = _timeout()
    gold = _parse_math_reference(answer, timeout)
    # Only the last boxed answer counts, as for the reference (math-verify would merge several boxed answers into a
    # set); without one, math-verify picks the response's last expression
    boxed = last_boxed(response)
    predicted = parse(response if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold or not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=timeout))


def _math_expression(text: str) -> str | None:
    try:
        from math_verify import parse

        parsed = parse(text, parsing_timeout=_timeout())
    except Exception:  # math-verify failing on odd text means "no answer found"
        return None
    return str(parsed[-1]) if parsed else None


def extract_math_answer(text: str) -> str | None:
    """The last `\\boxed{}` content of `text`, else math-verify's last expression; `None` when there is none."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else _math_expression(text)


TASK = Task(
    name="math",
    hub_id="DigitalLearningGmbH/MATH-lighteval",
    hub_config="default",
    license="mit",
    prompt_template=PROMPT,
    to_conversation=lambda row: chat_pair(PROMPT.format(problem=row["problem"]), row["solution"]),
    eval_split="test",
    extract_answer=extract_math_answer,
    reference_answer=lambda row: last_boxed(str(row.get("solution", ""))),
    check=verify_math,
    local_files={"test": "paper/math/test.jsonl", "validation": "paper/math/validation.jsonl"},
    requires="math_verify",
)
