"""`trl-pplmask score`: tokenize a dataset as SFTTrainer does and add the per-token NLLs of a model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..constants import EMBEDDED_MODEL_ALIAS
from ..masking import IGNORE_INDEX, TRAINABLE_COLUMN, PplMaskConfig, completion_ppl, text_histogram
from ._args import ArgumentParser, add_dataclass_arguments, from_namespace
from ._io import check_aligned, check_output_folder, check_positive, load_input, no_cache_beside_input, save_atomically
from ._run import command_main


DEFAULT_MODEL = EMBEDDED_MODEL_ALIAS
DATASET_HELP = (
    "Task name (gsm8k, mbpp, math, arc_challenge, humaneval), saved dataset folder, .jsonl/.parquet file, or Hub "
    "dataset id."
)
HELP = "Tokenize a dataset like SFTTrainer and add per-token NLLs (token_nll)."
DESCRIPTION = (
    "Tokenize a dataset exactly as SFTTrainer does and add the per-token NLL of every trainable token under --model. "
    "A dataset that is already tokenized (e.g. from `build` or `mask`) is scored as it is, on every token SFT trains "
    "on before masking. The output folder is written atomically."
)


@dataclass(kw_only=True)
class ScoreConfig:
    """Settings of `trl-pplmask score`, one command-line option each (`output_column` is `--output-column`).

    Parameters:
        model (`str`): Hub id, local path or the embedded alias of the scoring model.
        adapter (`str` or `None`): PEFT adapter loaded on top of `model`.
        dtype (`str`): `auto`, `float32`, `bfloat16` or `float16`.
        dataset (`str`): Task name, saved dataset folder, .jsonl/.parquet file or Hub dataset id.
        dataset_config (`str` or `None`), split (`str`), limit (`int` or `None`): Which rows of `dataset`.
        output (`str`): New or empty folder for `Dataset.save_to_disk`; `overwrite` replaces a non-empty one.
        max_length (`int`): `SFTConfig.max_length` used for training.
        max_tokens_per_batch (`int` or `None`), score_all_tokens (`bool`), disable_adapter (`bool`),
        output_column (`str`): As in [`~trl_pplmask.scoring.ScoringConfig`].
    """

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id, local path or the embedded alias (default)."})
    adapter: str | None = field(
        default=None, metadata={"help": "PEFT adapter (Hub id or path) loaded on top of --model."}
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    dataset: str = field(metadata={"help": DATASET_HELP})
    dataset_config: str | None = field(default=None, metadata={"help": "Config of a Hub dataset."})
    split: str = field(default="train", metadata={"help": "Split to use (default: train)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    output: str = field(metadata={"help": "New or empty folder for Dataset.save_to_disk."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output (only once the new data is complete)."}
    )
    max_length: int = field(default=1024, metadata={"help": "SFTConfig.max_length used for training."})
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget per batch (default: by device)."}
    )
    score_all_tokens: bool = field(default=False, metadata={"help": "Score prompt tokens too."})
    disable_adapter: bool = field(default=False, metadata={"help": "Score with the PEFT adapter disabled."})
    output_column: str = field(
        default="token_nll",
        metadata={
            "help": "Column for the NLLs (default token_nll; token_nll_dpf for DPF's fine-tuned model). Never an "
            "existing non-NLL column such as labels or input_ids."
        },
    )


# Columns that `score` must never overwrite with NLLs: what training reads, and what `mask` writes
_PROTECTED_COLUMNS = (
    "input_ids",
    "labels",
    "attention_mask",
    "position_ids",
    "completion_mask",
    "assistant_masks",
    TRAINABLE_COLUMN,
    "row_id",
    "num_completion_tokens",
    "num_masked",
    "masked_fraction",
)


def _check_output_column(name: str, dataset=None) -> None:
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif name in _PROTECTED_COLUMNS:
        problem = "is a column that training or `mask` reads"
    elif dataset is not None and name in dataset.column_names:
        feature = dataset.features[name]
        inner = getattr(feature, "feature", None)
        if getattr(inner, "dtype", None) not in ("float32", "float64"):
            problem = f"is an existing column of the dataset ({feature})"
    if problem:
        raise ValueError(
            f"--output-column {name!r} {problem}; writing NLLs there would destroy it. Use another name, e.g. the "
            "default `token_nll` (or `token_nll_dpf` for DPF's fine-tuned model)."
        )


def _check_pretokenized(dataset, max_length: int) -> None:
    """A dataset that already has `input_ids` is scored as it is: it must agree with --max-length and itself."""
    check_aligned(dataset, [c for c in ("labels", TRAINABLE_COLUMN) if c in dataset.column_names])
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(lengths, default=0)
    if longest > max_length:
        row = lengths.index(longest)
        raise ValueError(
            f"Row {row} already has {longest} tokens, more than --max-length {max_length}. The dataset is "
            "tokenized, so `score` does not truncate it; SFT would, and the NLLs would no longer match. Pass "
            f"--max-length {longest} or more (the SFTConfig.max_length used for training), or score the raw data."
        )


def _check_assistant_turns(dataset) -> None:
    """Conversational rows whose assistant turns are all empty have nothing to train on (like an empty completion)."""
    for column in ("messages", "completion", "conversations"):
        if column not in dataset.column_names:
            continue
        for row, turns in enumerate(dataset[column]):
            if not isinstance(turns, list):
                continue
            for turn in turns:
                if not isinstance(turn, dict):
                    continue
                role = turn.get("role", turn.get("from"))
                content = turn.get("content", turn.get("value"))
                if role in ("assistant", "gpt") and (content is None or not str(content).strip()):
                    raise ValueError(
                        f"Row {row}: column {column!r} has an empty assistant turn; there is nothing to score or "
                        "train on there. Fix or drop that row."
                    )


def _score(config: ScoreConfig, dataset):
    from ..data import ROW_ID_COLUMN, tokenize_dataset
    from ..models import load_model, load_tokenizer
    from ..scoring import ScoringConfig, distributed_state, score_dataset

    scoring = ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch,
        score_all_tokens=config.score_all_tokens,
        disable_adapter=config.disable_adapter,
        output_column=config.output_column,
    )
    pretokenized = "input_ids" in dataset.column_names
    if pretokenized:
        _check_pretokenized(dataset, config.max_length)
        tokenized = dataset
    else:
        _check_assistant_turns(dataset)
        # Tokenize (cheap) before loading the model, so that truncation problems are reported first
        tokenized = tokenize_dataset(dataset, load_tokenizer(config.model), max_length=config.max_length)
        dropped = len(dataset) - len(tokenized)
        if dropped == len(dataset):
            raise ValueError(
                f"All {len(dataset)} rows were dropped when truncating to --max-length {config.max_length} (no "
                "trainable token left within it). Raise --max-length to the SFTConfig.max_length used for training."
            )
        if dropped:
            kept = set(tokenized[ROW_ID_COLUMN]) if ROW_ID_COLUMN in tokenized.column_names else set()
            lost = [i for i in range(len(dataset)) if i not in kept][:10]
            more = "..." if dropped > len(lost) else ""
            print(
                f"trl-pplmask score: warning: {dropped} of {len(dataset)} rows dropped by truncation to --max-length "
                f"{config.max_length} (no trainable token left; row ids {lost}{more}).",
                file=sys.stderr,
            )
    state = distributed_state()
    model, tokenizer = load_model(config.model, adapter=config.adapter, dtype=config.dtype, device=state.device)
    if not (pretokenized and TRAINABLE_COLUMN in dataset.column_names):
        return score_dataset(tokenized, model, tokenizer, scoring), tokenizer
    # A masked dataset (`build`, `mask`): its labels hide the tokens masked by perplexity. Score every token SFT
    # trains on before masking (`trainable_mask`), as for the unmasked data, and keep the labels as they are.
    restored = [
        np.where(np.asarray(mask, dtype=bool), np.asarray(ids), IGNORE_INDEX).tolist()
        for ids, mask in zip(dataset["input_ids"], dataset[TRAINABLE_COLUMN])
    ]
    view = dataset.select_columns(["input_ids"]).add_column("labels", restored)
    scored = score_dataset(view, model, tokenizer, scoring)
    for column in (scoring.output_column, scoring.entropy_column):
        if column is not None:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, scored[column], feature=scored.features[column])
    return dataset, tokenizer


def _print_summary(dataset, config: PplMaskConfig, nll_column: str) -> None:
    ppl = completion_ppl(dataset, nll_column)
    if ppl.size == 0:
        print("No completion tokens.")
        return
    print(f"Completion tokens: {ppl.size}; median perplexity {np.median(ppl):.2f}; ")
    print(f"above {config.threshold:g} (masked by STM): {100 * np.mean(ppl > config.threshold):.1f}%")
    print(text_histogram(ppl, config.threshold))


def run(config: ScoreConfig) -> int:
    """Score `config.dataset` and save it to `config.output`; print a perplexity summary."""
    from ..models import check_model_path
    from ..scoring import distributed_state

    check_positive("--max-length", config.max_length)
    check_positive("--max-tokens-per-batch", config.max_tokens_per_batch)
    check_positive("--limit", config.limit)
    _check_output_column(config.output_column)
    check_model_path(config.model)
    if config.adapter:
        check_model_path(config.adapter, "adapter")
    output = check_output_folder(config.output, config.overwrite, config.dataset)
    with no_cache_beside_input():
        dataset = load_input(config.dataset, config.split, config.dataset_config, config.limit)
        _check_output_column(config.output_column, dataset)
        scored, _ = _score(config, dataset)
        if distributed_state().is_main_process:
            save_atomically(scored, output)
    if distributed_state().is_main_process:
        dropped = len(dataset) - len(scored)
        note = f" ({dropped} of {len(dataset)} rows dropped by truncation)" if dropped else ""
        print(f"Scored {len(scored)} examples{note} -> {config.output}")
        _print_summary(scored, PplMaskConfig(threshold=2.5), config.output_column)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    return run(from_namespace(ScoreConfig, args))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return add_dataclass_arguments(parser, ScoreConfig)


def make_parser(prog: str = "trl-pplmask score") -> ArgumentParser:
    return add_arguments(ArgumentParser(prog=prog, description=DESCRIPTION))


def register_cli(subparsers) -> None:
    """Add `score` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    add_arguments(subparsers.add_parser("score", help=HELP, description=DESCRIPTION)).set_defaults(func=cmd_score)


def main(argv: Sequence[str] | None = None, prog: str = "trl-pplmask score") -> int:
    return command_main(make_parser(prog), cmd_score, argv)


if __name__ == "__main__":
    sys.exit(main())
