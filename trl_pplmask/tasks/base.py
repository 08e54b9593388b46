"""What the project knows about one task, in one place: [`Task`].

Standard library only at import time (the command line's `--help` lists task names without importing torch or
datasets); a task's checks import what they need (e.g. `math-verify`) when first called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


Row = dict[str, Any]
Conversation = dict[str, list[dict[str, str]]]


class RowFormatError(ValueError):
    """A dataset row lacks the reference fields a verifier needs (a data problem, not a wrong answer)."""


def row_field(row: Row, name: str, task: str) -> Any:
    """`row[name]`, or a `RowFormatError` that names the task, the field and the fields the row has."""
    value = row.get(name)
    if value is None:
        raise RowFormatError(
            f"The {task} verifier needs the row field {name!r}, but the row has only {sorted(row)}. Load the data "
            "with `trl_pplmask.data.load_task`, which keeps the task's raw fields."
        )
    return value


def chat_pair(user: str, assistant: str) -> Conversation:
    """A TRL conversational prompt/completion pair: one user turn, one assistant turn."""
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": assistant}]}


@dataclass(frozen=True)
class Task:
    """A task: its data, its prompt, how an answer is checked and how it is evaluated.

    Every module of the project that needs to know something about a task (the loaders, the verifiers, self-output
    generation, the forgetting report, dataset cards) reads it from here, so that adding a task is adding one file to
    `trl_pplmask/tasks/` (or calling [`register_task`] with a `Task` defined anywhere).

    Args:
        name (`str`):
            Name on the command line and in reports (`gsm8k`).
        hub_id (`str`):
            Hub dataset id, read when no local mirror (`TRL_PPLMASK_DATA_DIR`) is configured.
        hub_config (`str` or `None`):
            Config of the Hub dataset.
        license (`str`):
            License of the source data, carried into dataset cards.
        prompt_template (`str`):
            The paper's prompt, with `str.format` fields filled from a raw row by `to_conversation`.
        to_conversation (`Callable[[dict], dict]`):
            Raw row -> `{"prompt": [user message], "completion": [assistant message]}` (the SFT ground truth).
        eval_split (`str`):
            Split the forgetting report evaluates by default.
        extract_answer (`Callable[[str], str | None]`):
            The answer a checker reads in a model's output, shown in reports; `None` when there is none.
        reference_answer (`Callable[[dict], str | None]`):
            The reference answer of a raw row, shown in reports next to `extract_answer`.
        check (`Callable[[dict, str], bool]`, *optional*):
            Whether a response to a raw row is correct, for tasks checked without running code.
        test_program (`Callable[[dict, str], str]`, *optional*):
            For code tasks: the program (solution then tests) that passes iff the response is correct; the verifiers
            run it in the sandbox. Exactly one of `check` and `test_program` is given.
        local_files (`Mapping[str, str]`, *optional*):
            Split -> JSONL path relative to `TRL_PPLMASK_DATA_DIR`.
        hub_split_names (`Mapping[str, str]`, *optional*):
            Our split name -> the Hub dataset's, where they differ.
        load_split (`Callable[[str], list[dict]]`, *optional*):
            Reads a split's raw rows itself, for data that ships in a package rather than on the Hub or the mirror.
        requires (`str`, *optional*):
            Module `check` imports, and the install hint shown when it is missing (`"math_verify"`).
    """

    name: str
    hub_id: str
    hub_config: str | None
    license: str
    prompt_template: str
    to_conversation: Callable[[Row], Conversation]
    eval_split: str
    extract_answer: Callable[[str], str | None]
    reference_answer: Callable[[Row], str | None]
    check: Callable[[Row, str], bool] | None = None
    test_program: Callable[[Row, str], str] | None = None
    local_files: Mapping[str, str] = field(default_factory=dict)
    hub_split_names: Mapping[str, str] = field(default_factory=dict)
    load_split: Callable[[str], list[Row]] | None = None
    requires: str | None = None

    def __post_init__(self):
        if (self.check is None) == (self.test_program is None):
            raise ValueError(f"Task {self.name!r}: give exactly one of `check` (answers) and `test_program` (code).")

    @property
    def is_code(self) -> bool:
        """Whether responses are programs, checked by running `test_program` in the sandbox."""
        return self.test_program is not None

    @property
    def metric(self) -> str:
        """The forgetting report's metric for this task's generations."""
        return "pass@1" if self.is_code else "accuracy"

    def replace(self, **changes: Any) -> Task:
        """A copy with some fields changed (e.g. a registered task under another name)."""
        return dataclasses.replace(self, **changes)
