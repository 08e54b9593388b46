"""GSM8K (Cobbe et al. 2021): grade school math word problems with a final number after `####`."""

from __future__ import annotations

import re
from fractions import Fraction

from .base import Row, RowFormatError, Task, chat_pair, row_field


# The paper's prompt (appier-research/robust-llm-finetunes), so that data built from the Hub matches its local copies
PROMPT = (
    "You are given a grade school math question. Please answer the question in the following format:\n\n"
    "Q: <Question>\nA: <Think step by step here> #### <number only answer>\n\n"
    'Format requirements : you must first output your reasoning before finalized with the " #### " format '
    "followed by the final numeric answer\n\nQ: {question}\nA: "
)

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


def verify_gsm8k(row: Row, response: str) -> bool:
    """Whether `response` ends with the same number as the GSM8K reference `row["answer"]`."""
    reference = extract_gsm8k_answer(str(row_field(row, "answer", "gsm8k")))
    if reference is None:
        raise RowFormatError(f"No number found in the GSM8K reference answer {row['answer']!r}.")
    predicted = extract_gsm8k_answer(response)
    return predicted is not None and predicted == reference


def _as_text(value: Fraction | None) -> str | None:
    return None if value is None else str(value)


TASK = Task(
    name="gsm8k",
    hub_id="openai/gsm8k",
    hub_config="main",
    license="mit",
    prompt_template=PROMPT,
    to_conversation=lambda row: chat_pair(PROMPT.format(question=row["question"]), row["answer"]),
    eval_split="test",
    extract_answer=lambda text: _as_text(extract_gsm8k_answer(text)),
    reference_answer=lambda row: _as_text(extract_gsm8k_answer(str(row.get("answer", "")))),
    check=verify_gsm8k,
    local_files={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
)
