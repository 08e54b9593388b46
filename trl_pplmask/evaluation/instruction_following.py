"""`instruction_following`: a non-target accuracy that a small base model actually has.

A 135M model is at chance on ARC-Challenge and near 0 on GSM8K/MBPP, so those cannot show it forgetting. This task
asks for short texts on everyday topics under one verifiable constraint each (prompts built here from templates ×
topics × constraint kinds, IFEval style), and checks the answers with the IFEval instruction checkers of the
[`if-verifiable`](https://pypi.org/project/if-verifiable/) package (Google's IFEval checkers: strict and loose
following), not with hand-written checks.

Constraint kinds are those the embedded SmolLM2-135M-Instruct follows part of the time under greedy decoding, so that
a drop can show (measured on 4 prompts each: include a word 1/4, use a word twice 2/4, avoid the topic's obvious word
3/4, at least 50 words 3/4, fewer than 60 words 3/4, a P.S. at the end 2/4, a *highlighted* phrase 1/4). Kinds it
never followed in that probe (no commas, a quoted answer, a [placeholder], a fixed closing sentence, a first word,
*** paragraphs, all lowercase or capitals, a JSON key, bullet lists, a <<title>>) are left out: they cannot fall.

Rows are interleaved so that the first `limit` rows cover every kind evenly: row `i` has kind `i % 7`, topic
`(i // 7) % 8` and template `(i // 7) % 4`; there are 56 rows. Metrics: `accuracy` (strict following) and
`loose_accuracy` (IFEval's loose variant: also accepted after removing the first/last line or markdown asterisks).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .generate import generate_greedy, render_prompts


CHECKER_PACKAGE = "if-verifiable"
MISSING_CHECKER = (
    "instruction_following needs the IFEval checkers of the if-verifiable package (Python >= 3.11): "
    "pip install 'trl-pplmask[eval]' or pip install if-verifiable"
)

TOPICS: tuple[tuple[str, str, str], ...] = (
    # (topic, its obvious word (to avoid), an unrelated word (to include))
    ("the ocean", "water", "friend"),
    ("a city park", "trees", "music"),
    ("learning to cook", "food", "river"),
    ("the night sky", "stars", "garden"),
    ("a rainy day", "rain", "book"),
    ("riding a bicycle", "wheels", "morning"),
    ("a visit to the zoo", "animals", "family"),
    ("planting a vegetable garden", "plants", "window"),
)
TEMPLATES: tuple[str, ...] = (
    "Write a short paragraph about {topic}.",
    "Describe {topic} in a few sentences.",
    "Explain {topic} to a child.",
    "Tell me about {topic}.",
)


@dataclass(frozen=True)
class ConstraintKind:
    """One kind of verifiable constraint.

    Args:
        name (`str`): Short name, recorded per item.
        instruction_id (`str`): The IFEval instruction id whose checker verifies it.
        kwargs (`Callable`): `(topic, avoid, include) -> dict`, the checker's arguments.
        text (`Callable`): `(topic, avoid, include) -> str`, the sentence appended to the prompt.
    """

    name: str
    instruction_id: str
    kwargs: Callable[[str, str, str], dict[str, Any]]
    text: Callable[[str, str, str], str]


CONSTRAINTS: tuple[ConstraintKind, ...] = (
    ConstraintKind(
        "include_word",
        "keywords:existence",
        lambda topic, avoid, include: {"keywords": [include]},
        lambda topic, avoid, include: f'Use the word "{include}" in your answer.',
    ),
    ConstraintKind(
        "word_twice",
        "keywords:frequency",
        lambda topic, avoid, include: {"keyword": include, "frequency": 2, "relation": "at least"},
        lambda topic, avoid, include: f'Use the word "{include}" at least twice.',
    ),
    ConstraintKind(
        "avoid_word",
        "keywords:forbidden_words",
        lambda topic, avoid, include: {"forbidden_words": [avoid]},
        lambda topic, avoid, include: f'Do not use the word "{avoid}".',
    ),
    ConstraintKind(
        "min_words",
        "length_constraints:number_words",
        lambda topic, avoid, include: {"num_words": 50, "relation": "at least"},
        lambda topic, avoid, include: "Answer with at least 50 words.",
    ),
    ConstraintKind(
        "max_words",
        "length_constraints:number_words",
        lambda topic, avoid, include: {"num_words": 60, "relation": "less than"},
        lambda topic, avoid, include: "Answer in fewer than 60 words.",
    ),
    ConstraintKind(
        "postscript",
        "detectable_content:postscript",
        lambda topic, avoid, include: {"postscript_marker": "P.S."},
        lambda topic, avoid, include: "At the end, add a postscript starting with P.S.",
    ),
    ConstraintKind(
        "highlight",
        "detectable_format:number_highlighted_sections",
        lambda topic, avoid, include: {"num_highlights": 1},
        lambda topic, avoid, include: "Highlight at least one phrase with markdown, i.e. *highlighted phrase*.",
    ),
)


def checker_available() -> bool:
    """Whether the IFEval checkers (`if-verifiable`) are importable."""
    return importlib.util.find_spec("if_verifiable") is not None


def build_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """The task's rows: `row_id`, `prompt` (a one-turn conversation), `kind`, `instruction_id`, `kwargs`, `topic`.

    Args:
        limit (`int`, *optional*): The first `limit` rows (every kind in turn); larger than the task is an error.
    """
    total = len(CONSTRAINTS) * len(TOPICS)
    if limit is not None and limit > total:
        raise ValueError(
            f"--limit {limit} is larger than instruction_following, which has {total} rows; use --limit {total} or "
            "less."
        )
    rows = []
    for i in range(total if limit is None else limit):
        kind = CONSTRAINTS[i % len(CONSTRAINTS)]
        j = i // len(CONSTRAINTS)
        topic, avoid, include = TOPICS[j % len(TOPICS)]
        text = TEMPLATES[j % len(TEMPLATES)].format(topic=topic) + " " + kind.text(topic, avoid, include)
        rows.append(
            {
                "row_id": i,
                "prompt": [{"role": "user", "content": text}],
                "kind": kind.name,
                "instruction_id": kind.instruction_id,
                "kwargs": kind.kwargs(topic, avoid, include),
                "topic": topic,
            }
        )
    return rows


def check_following(row: dict[str, Any], response: str) -> tuple[bool, bool]:
    """`(strict, loose)`: whether `response` follows the row's constraint, by the IFEval checker of `if-verifiable`.

    Raises:
        ImportError: `if-verifiable` is not installed.
    """
    try:
        from if_verifiable import evaluate_output_for_sample
        from if_verifiable.types import IFEvalSample
    except ImportError as exc:
        raise ImportError(MISSING_CHECKER) from exc
    sample = IFEvalSample(
        key=int(row["row_id"]),
        prompt=row["prompt"][-1]["content"],
        instruction_id_list=[row["instruction_id"]],
        kwargs=[dict(row["kwargs"])],
    )
    _, scores = evaluate_output_for_sample("ifeval", sample, response)
    return bool(scores.binary_strict), bool(scores.binary_loose)


def evaluate_instruction_following(model, tokenizer, task, rows, config, label):
    """Greedy answers to the rows' prompts, checked by the IFEval checkers; `accuracy` (strict) and
    `loose_accuracy` per item."""
    prompts = render_prompts(tokenizer, rows)
    generations = generate_greedy(
        model,
        tokenizer,
        prompts,
        config.instruction_max_new_tokens,
        config.max_tokens_per_batch,
        config.max_batch_size,
        config.show_progress,
        desc=f"{label} {task.name}",
    )
    items = []
    for row, prompt, generation in zip(rows, prompts, generations):
        strict, loose = check_following(row, generation["output"])
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {"accuracy": float(strict), "loose_accuracy": float(loose)},
                "prompt": prompt,
                "output": generation["output"],
                "kind": row["kind"],
                "instruction_id": row["instruction_id"],
                "kwargs": row["kwargs"],
                "new_tokens": generation["new_tokens"],
                "truncated": generation["truncated"],
            }
        )
    by_kind: dict[str, list[float]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item["scores"]["accuracy"])
    stats = {
        "truncated": sum(item["truncated"] for item in items),
        "accuracy_by_kind": {kind: sum(v) / len(v) for kind, v in by_kind.items()},
    }
    return items, stats


__all__ = [
    "CONSTRAINTS",
    "TEMPLATES",
    "TOPICS",
    "ConstraintKind",
    "build_rows",
    "check_following",
    "checker_available",
    "evaluate_instruction_following",
]
