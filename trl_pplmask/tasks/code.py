"""What the code tasks (MBPP, HumanEval) share: reading the program out of a response."""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a response: the first ```python code block, else the first code block of any language, else
    the whole text. An unterminated block (a truncated generation) runs to the end of the text."""
    blocks = _FENCE.findall(text)
    for language, body in blocks:
        if language.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def is_python(code: str) -> bool:
    """Whether `code` parses as a module, or as a function body (HumanEval answers may hold only the body)."""
    for candidate in (code, "def _answer():\n" + textwrap.indent(textwrap.dedent(code), "    ")):
        try:
            ast.parse(candidate)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


def extract_program(text: str) -> str | None:
    """The code of a response as the report shows it; `None` when it is empty or not valid Python."""
    code = extract_code(text)
    return code if code.strip() and is_python(code) else None


def code_lines(value: Any) -> list[str]:
    """A row's field of code lines (a string or a list of strings) as a list of non-blank lines."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [line for line in value if isinstance(line, str) and line.strip()]
