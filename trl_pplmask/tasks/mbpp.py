"""MBPP (Austin et al. 2021): short Python functions checked by the row's asserts, run in the sandbox."""

from __future__ import annotations

from .base import Row, RowFormatError, Task, chat_pair, row_field
from .code import code_lines, extract_code, extract_program


PROMPT = (
    "Please refer the given test cases and generate a python function for my problem. Make sure the written code is "
    "wrapped in code block : ```python\n<your code>\n```\n>>> Problem:\n{text}\n>>> Test Cases:\n{tests}\n"
)


def mbpp_program(row: Row, response: str) -> str:
    """The test program of an MBPP row: test imports, the response's code, setup code, then the row's asserts.

    Setup code (`test_setup_code`, stored as `test` in the paper's copy) comes after the solution because it may use
    the solution's definitions (task 927 builds trees of the solution's `Node` class).
    """
    tests = code_lines(row_field(row, "test_list", "mbpp"))
    if not tests:
        raise RowFormatError("The MBPP row's `test_list` is empty; there is nothing to check the code against.")
    setup = [*code_lines(row.get("test_setup_code")), *code_lines(row.get("test"))]
    parts = [*code_lines(row.get("test_imports")), extract_code(response), *setup]
    return "\n".join(parts) + "\n\n" + "\n".join(tests) + "\n"


def _conversation(row: Row):
    tests = "\n".join(row["test_list"])
    return chat_pair(PROMPT.format(text=row["text"], tests=tests), f"```python\n{row['code']}\n```")


TASK = Task(
    name="mbpp",
    hub_id="google-research-datasets/mbpp",
    hub_config="full",
    license="cc-by-4.0",
    prompt_template=PROMPT,
    to_conversation=_conversation,
    eval_split="validation",
    extract_answer=extract_program,
    reference_answer=lambda row: "\n".join(row.get("test_list") or []),
    test_program=mbpp_program,
    local_files={"train": "paper/mbpp/train.jsonl", "validation": "paper/mbpp/validation.jsonl"},
)
