"""The task registry (`trl_pplmask.tasks`): adding a task is adding one file, and every consumer then accepts it."""

from __future__ import annotations

import sys

import pytest

from trl_pplmask import tasks
from trl_pplmask.data import load_task
from trl_pplmask.evaluation.tasks import available_tasks, extract_answer, reference_answer, resolve_task
from trl_pplmask.tasks import Task, chat_pair, get_task, register_task, unregister_task
from trl_pplmask.verifiers import CODE_TASKS, VERIFIERS, get_verifier, verify_batch


# A whole task in one file: its data (shipped with it), prompt, answer reading and checker
TINY_TASK_FILE = """
from trl_pplmask.tasks import Task, chat_pair

ROWS = [{"a": 2, "b": 3}, {"a": 10, "b": -4}, {"a": 0, "b": 7}]
PROMPT = "Add {a} and {b}. End with 'Sum: <number>'."


def _answer(text):
    return text.rsplit("Sum:", 1)[1].strip() if "Sum:" in text else None


TASK = Task(
    name="tiny_sum",
    hub_id="example/tiny-sum",
    hub_config=None,
    license="mit",
    prompt_template=PROMPT,
    to_conversation=lambda row: chat_pair(PROMPT.format(**row), f"Sum: {row['a'] + row['b']}"),
    eval_split="test",
    extract_answer=_answer,
    reference_answer=lambda row: str(row["a"] + row["b"]),
    check=lambda row, response: _answer(response) == str(row["a"] + row["b"]),
    load_split=lambda split: [dict(row) for row in ROWS],
)
"""


@pytest.fixture
def tiny_task_file(tmp_path, monkeypatch):
    """`tiny_sum.py` dropped into the tasks package's search path, discovered as the built-in tasks are."""
    (tmp_path / "tiny_sum.py").write_text(TINY_TASK_FILE)
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    tasks._discover()
    yield get_task("tiny_sum")
    unregister_task("tiny_sum")
    sys.modules.pop("trl_pplmask.tasks.tiny_sum", None)


def test_builtin_tasks_in_their_order():
    assert tasks.task_names()[:5] == ["gsm8k", "mbpp", "math", "arc_challenge", "humaneval"]
    assert {name for name in tasks.TASKS if get_task(name).is_code} >= {"mbpp", "humaneval"}
    assert get_task("gsm8k").metric == "accuracy" and get_task("mbpp").metric == "pass@1"


def test_a_task_file_is_all_it_takes(tiny_task_file):
    task = tiny_task_file
    # Loading: conversational prompt/completion rows with a row id and the raw fields
    dataset = load_task("tiny_sum", "test", limit=2)
    assert dataset[1]["completion"] == [{"role": "assistant", "content": "Sum: 6"}]
    assert dataset[1]["prompt"][0]["content"] == "Add 10 and -4. End with 'Sum: <number>'."
    assert dataset["row_id"] == [0, 1] and dataset[0]["a"] == 2
    # Verifying: the checker the verifiers (and self-output) use
    rows = dataset.to_list()
    assert verify_batch("tiny_sum", rows, ["Sum: 5", "Sum: 7"]) == [True, False]
    assert "tiny_sum" in VERIFIERS and "tiny_sum" not in CODE_TASKS
    assert get_verifier("tiny_sum")(rows[0], "no idea") is False
    # Evaluating: generation accuracy, reference NLL and drift, on its evaluation split
    assert {"tiny_sum", "tiny_sum_nll", "tiny_sum_drift"} <= set(available_tasks())
    evaluated = resolve_task("tiny_sum")
    assert (evaluated.kind, evaluated.split, evaluated.metrics) == ("generate", "test", ("accuracy",))
    assert resolve_task("tiny_sum_drift").dataset == "tiny_sum"
    assert extract_answer("tiny_sum", "so... Sum: 5") == "5" and reference_answer("tiny_sum", rows[0]) == "5"
    assert task.license == "mit"


def test_a_registered_code_task_runs_its_program_in_the_sandbox():
    task = register_task(
        Task(
            name="tiny_code",
            hub_id="example/tiny-code",
            hub_config=None,
            license="mit",
            prompt_template="Write f() returning {value}.",
            to_conversation=lambda row: chat_pair(f"Write f() returning {row['value']}.", "def f(): ..."),
            eval_split="test",
            extract_answer=lambda text: text,
            reference_answer=lambda row: str(row["value"]),
            test_program=lambda row, response: f"{response}\nassert f() == {row['value']}\n",
        )
    )
    try:
        assert task.is_code and "tiny_code" in CODE_TASKS and task.metric == "pass@1"
        rows = [{"value": 3}, {"value": 3}]
        assert verify_batch("tiny_code", rows, ["def f():\n    return 3", "def f():\n    return 4"]) == [True, False]
    finally:
        unregister_task("tiny_code")
    assert "tiny_code" not in CODE_TASKS


def test_registry_refuses_what_it_cannot_use():
    gsm8k = get_task("gsm8k")
    with pytest.raises(ValueError, match="already registered"):
        register_task(gsm8k.replace(license="other"))
    with pytest.raises(ValueError, match="exactly one of `check`"):
        gsm8k.replace(name="both", test_program=lambda row, response: "")
    with pytest.raises(TypeError, match="Task"):
        register_task({"name": "dict"})
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        load_task("gsm9k")
