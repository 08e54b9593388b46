"""Scoring: the per-token NLL and sequence perplexity of a response under the scoring model, conditioned on the task
prompt, and the compact form in which checkpoints store the NLLs."""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from datasets import Dataset
from datasets.utils import logging as datasets_logging
from transformers import PreTrainedTokenizerBase

from ..constants import IGNORE_INDEX, NLL_COLUMN, ROW_ID_COLUMN
from ..data import tokenize_dataset
from ..scoring import ScoringConfig, score_dataset


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # Per-batch tokenization would print a `datasets` progress bar for every few rows
    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def completion_token_nll(
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens_per_batch: int | None = None,
) -> list[np.ndarray]:
    """NLL of each completion token of `responses` as answers to `prompts`, tokenized exactly as SFTTrainer does.

    The tokens are the ones SFT trains on (the response and the chat template's end of turn), so the sequence
    perplexity `exp(mean(nll))` of a response is that of its training tokens.
    """
    pairs = Dataset.from_dict(
        {
            "prompt": prompts,
            "completion": [[{"role": "assistant", "content": text}] for text in responses],
            ROW_ID_COLUMN: list(range(len(responses))),
        }
    )
    with _quiet_datasets():
        # max_length=None: a long response is scored whole (SFTTrainer's default of 1024 would cut it)
        tokenized = tokenize_dataset(pairs, tokenizer, max_length=None)
        scoring = ScoringConfig(max_tokens_per_batch=max_tokens_per_batch, use_cache=False, show_progress=False)
        scored = score_dataset(tokenized, model, tokenizer, scoring)
    by_id = {}
    for row_id, labels, nll in zip(scored[ROW_ID_COLUMN], scored["labels"], scored[NLL_COLUMN]):
        by_id[row_id] = np.asarray(nll, dtype=np.float32)[np.asarray(labels) != IGNORE_INDEX]
    return [by_id[i] for i in range(len(responses))]


def sequence_ppl(token_nll: np.ndarray) -> float:
    """Perplexity of a sequence: `exp` of the mean token NLL."""
    return float(math.exp(float(np.mean(token_nll, dtype=np.float64)))) if len(token_nll) else float("nan")


def encode_nll(nll: np.ndarray) -> str:
    # float32 bytes in base64: exact and ~4x smaller than JSON floats
    return base64.b64encode(np.asarray(nll, dtype="<f4").tobytes()).decode("ascii")


def decode_nll(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
