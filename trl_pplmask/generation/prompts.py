"""Rows of a self-output run: the prompt and reference answer of a task row, the paper's rephrase prompt, the seeds of
its samples, and the [`GenerationRequest`] a row becomes."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..constants import ROW_ID_COLUMN
from .config import SelfOutputConfig


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The paper's rephrase prompt (appier-research/robust-llm-finetunes, after Yang et al. 2024, "Self-Distillation
# Bridges Distribution Gap in Language Model Fine-Tuning"), kept word for word so that data matches the paper's.
REPHRASE_TEMPLATE = (
    "Below are an instruction that describes a task along with a reference answer. Using the reference answer as a "
    "guide, write your own response.\n### Instruction:\n{instruction}\n### Reference Answer:\n{reference}\n"
    "### Response:"
)


def _as_messages(value: Any, role: str, where: str, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise ValueError(
        f"{where}: column {column!r} must be a string or a non-empty list of {{role, content}} messages, got "
        f"{value!r:.200}. Load the data with `trl_pplmask.data.load_task` or convert it to TRL's prompt/completion "
        "format."
    )


def row_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The prompt messages and the reference answer text of a prompt/completion row."""
    where = f"row {row.get(ROW_ID_COLUMN)!r}"
    prompt = _as_messages(row.get("prompt"), "user", where, "prompt")
    completion = _as_messages(row.get("completion"), "assistant", where, "completion")
    if len(completion) != 1 or completion[0].get("role", "assistant") != "assistant":
        raise ValueError(f"{where}: the completion must be a single assistant message, got {completion!r:.200}.")
    return prompt, completion[0]["content"]


def rephrase_messages(prompt: list[dict[str, str]], reference: str) -> list[dict[str, str]]:
    """The paper's rephrase prompt for a task prompt and its reference answer (a single user message).

    The instruction is the text of the prompt's messages (its user turns for a multi-turn prompt; system turns stay as
    they are, ahead of the rephrase request).
    """
    system = [m for m in prompt if m.get("role") == "system"]
    instruction = "\n\n".join(m["content"] for m in prompt if m.get("role") != "system")
    return [
        *system,
        {"role": "user", "content": REPHRASE_TEMPLATE.format(instruction=instruction, reference=reference)},
    ]


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from a base seed and keys (row id, sample index, purpose), stable across processes and runs."""
    digest = hashlib.sha256(json.dumps([seed, *keys], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def row_fingerprint(row: dict[str, Any]) -> str:
    """Content hash of a row: a checkpoint record only applies to the row it was generated for."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class GenerationRequest:
    """One row to sample responses for.

    Args:
        row_id: The row's id.
        messages (`list[dict]`): What the model is shown (the task prompt, or the rephrase prompt).
        prompt_ids (`list[int]`): `messages` through the chat template, with the generation prompt.
        seeds (`list[int]`): One seed per sample.
    """

    row_id: Any
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    seeds: list[int]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the model is prompted with: `messages` through the chat template, with the generation prompt."""
    # Exactly the prompt tokens SFTTrainer builds for a conversational prompt (`add_generation_prompt=True`)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def prepare_rows(dataset: Dataset) -> list[dict[str, Any]]:
    """The rows of `dataset`, each with a unique `row_id`; a malformed row fails here, before any generation."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to generate.")
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Self-output generation needs TRL prompt/completion data (the completion is the reference answer); "
            f"missing {missing} in columns {dataset.column_names}. Load a task with `trl_pplmask.data.load_task`."
        )
    if ROW_ID_COLUMN not in dataset.column_names:
        logger.warning("The dataset has no %r column; rows are identified by their position.", ROW_ID_COLUMN)
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    rows = list(dataset)
    seen: set = set()
    for row in rows:
        row_id = row[ROW_ID_COLUMN]
        if row_id is None or row_id in seen:
            raise ValueError(f"row_id {row_id!r} is missing or repeated; each row needs a unique id to resume safely.")
        seen.add(row_id)
        row_messages(row)  # fail on a malformed row before any generation
    return rows


def make_requests(
    rows: list[dict[str, Any]], config: SelfOutputConfig, tokenizer: PreTrainedTokenizerBase
) -> list[GenerationRequest]:
    """The [`GenerationRequest`] of every row: what the model is shown (per `config.mode`) and one seed per sample."""
    requests = []
    for row in rows:
        prompt, reference = row_messages(row)
        messages = prompt if config.mode == "self-output" else rephrase_messages(prompt, reference)
        row_id = row[ROW_ID_COLUMN]
        seeds = [derive_seed(config.seed, row_id, "sample", k) for k in range(config.num_samples)]
        requests.append(GenerationRequest(row_id, messages, prompt_ids(tokenizer, messages), seeds))
    return requests
