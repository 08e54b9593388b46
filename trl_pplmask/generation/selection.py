"""Selection: which correct response a row keeps (or its fallback), and the output dataset built from checkpoint
records."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, Features, List, Value

from ..constants import ROW_ID_COLUMN
from .config import SELECTIONS, SOURCE_GROUND_TRUTH, SOURCE_SELF, SelfOutputConfig
from .prompts import derive_seed, row_messages
from .scoring import decode_nll


_MESSAGE = {"role": Value("string"), "content": Value("string")}
_CANDIDATE = {"text": Value("string"), "correct": Value("bool"), "truncated": Value("bool"), "ppl": Value("float64")}


def select_candidate(
    candidates: Sequence[dict[str, Any]],
    selection: str,
    select_truncated: bool = False,
    rng: random.Random | None = None,
) -> int | None:
    """Index of the candidate a row keeps, or `None` when none is correct (and selectable).

    Args:
        candidates (`Sequence[dict]`): Each with `correct`, `ppl` and `truncated`.
        selection (`str`): `lowest_ppl` (ties go to the earlier sample), `first` or `random`.
        select_truncated (`bool`, *optional*, defaults to `False`): Whether truncated responses may be kept.
        rng (`random.Random`, *optional*): Source of `random` selection.
    """
    eligible = [
        i
        for i, c in enumerate(candidates)
        if c["correct"] and (select_truncated or not c.get("truncated", False)) and math.isfinite(c["ppl"])
    ]
    if not eligible:
        return None
    if selection == "lowest_ppl":
        return min(eligible, key=lambda i: (candidates[i]["ppl"], i))
    if selection == "first":
        return eligible[0]
    if selection == "random":
        return (rng or random.Random(0)).choice(eligible)
    raise ValueError(f"Unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}.")


def output_features(dataset_features: Features | None = None) -> Features:
    """Schema of the self-output dataset (message columns follow the source's message schema when it has one)."""
    messages = List(_MESSAGE)
    if dataset_features is not None and isinstance(dataset_features.get("prompt"), List):
        messages = dataset_features["prompt"]
    row_id = dataset_features.get(ROW_ID_COLUMN) if dataset_features is not None else None
    return Features(
        {
            "prompt": messages,
            "completion": messages,
            "messages": messages,
            "chosen_response": Value("string"),
            "source": Value("string"),
            "candidates": List(_CANDIDATE),
            "num_correct": Value("int32"),
            "chosen_ppl": Value("float64"),
            "ground_truth_ppl": Value("float64"),
            "chosen_token_nll": List(Value("float32")),
            "ground_truth_token_nll": List(Value("float32")),
            ROW_ID_COLUMN: row_id if row_id is not None else Value("int64"),
        }
    )


def assemble_dataset(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    config: SelfOutputConfig,
    features: Features | None = None,
) -> tuple[Dataset, dict[str, int]]:
    """Apply the selection rule and fallback to checkpoint records; return the dataset and the skipped-row counts.

    A pure function of its inputs: an interrupted-and-resumed run and an uninterrupted one assemble the same rows.
    """
    out: dict[str, list] = {name: [] for name in output_features(features)}
    skipped = {"rows": 0, "candidates": 0, "correct": 0, "truncated": 0, "rows_with_correct": 0}
    for row, record in zip(rows, records):
        prompt, reference = row_messages(row)
        candidates = record["candidates"]
        rng = random.Random(derive_seed(config.seed, row[ROW_ID_COLUMN], "select"))
        index = select_candidate(candidates, config.selection, config.select_truncated, rng)
        if index is None and config.fallback == "skip":
            skipped["rows"] += 1
            skipped["candidates"] += len(candidates)
            skipped["correct"] += sum(c["correct"] for c in candidates)
            skipped["truncated"] += sum(c["truncated"] for c in candidates)
            # correct but truncated responses only (with select_truncated=False)
            skipped["rows_with_correct"] += any(c["correct"] for c in candidates)
            continue
        if index is None:
            text, source = reference, SOURCE_GROUND_TRUTH
            chosen_nll, chosen_ppl = record["ground_truth"]["token_nll"], record["ground_truth"]["ppl"]
        else:
            text, source = candidates[index]["text"], SOURCE_SELF
            chosen_nll, chosen_ppl = candidates[index]["token_nll"], candidates[index]["ppl"]
        completion = [{"role": "assistant", "content": text}]
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["messages"].append(prompt + completion)
        out["chosen_response"].append(text)
        out["source"].append(source)
        out["candidates"].append([{k: c[k] for k in ("text", "correct", "truncated", "ppl")} for c in candidates])
        out["num_correct"].append(sum(c["correct"] for c in candidates))
        out["chosen_ppl"].append(chosen_ppl)
        out["ground_truth_ppl"].append(record["ground_truth"]["ppl"])
        out["chosen_token_nll"].append(decode_nll(chosen_nll).tolist())
        out["ground_truth_token_nll"].append(decode_nll(record["ground_truth"]["token_nll"]).tolist())
        out[ROW_ID_COLUMN].append(row[ROW_ID_COLUMN])
    return Dataset.from_dict(out, features=output_features(features)), skipped
