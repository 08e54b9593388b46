"""ARC-Challenge (Clark et al. 2018): grade-school science multiple choice; the answer is a choice label."""

from __future__ import annotations

import re

from .base import Row, Task, chat_pair, row_field


PROMPT = (
    "Answer the following multiple choice science question. Think briefly, then finish with a line of the form "
    '"Answer: X" where X is the letter of the correct choice.\n\nQuestion: {question}\n{choices}\n'
)

# "Answer: B", "**Answer:** (B)", "answer: B." -- the label is a capital letter or a digit (some ARC rows use 1-4),
# standing alone (so "Answer: Because" is not "B")
_ARC_ANSWER = re.compile(r"(?i:answer)\s*[*_]*\s*:\s*[*_\s]*\(?\s*([A-Z0-9])\s*\)?(?![A-Za-z0-9])")


def extract_choice(text: str) -> str | None:
    """The choice label after the last `Answer:` in `text`, or `None`."""
    found = _ARC_ANSWER.findall(text)
    return found[-1] if found else None


def verify_arc_challenge(row: Row, response: str) -> bool:
    """Whether the label after the last `Answer:` in `response` is `row["answerKey"]`."""
    key = str(row_field(row, "answerKey", "arc_challenge")).strip()
    return extract_choice(response) == key


def _conversation(row: Row):
    choices = "\n".join(f"{label}. {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return chat_pair(PROMPT.format(question=row["question"], choices=choices), f"Answer: {row['answerKey']}")


TASK = Task(
    name="arc_challenge",
    hub_id="allenai/ai2_arc",
    hub_config="ARC-Challenge",
    license="cc-by-sa-4.0",
    prompt_template=PROMPT,
    to_conversation=_conversation,
    eval_split="test",
    extract_answer=extract_choice,
    reference_answer=lambda row: row.get("answerKey"),
    check=verify_arc_challenge,
    local_files={
        "train": "paper/arc_challenge/train.jsonl",
        "validation": "paper/arc_challenge/validation.jsonl",
        "test": "paper/arc_challenge/test.jsonl",
    },
)
