"""`trl-pplmask score`: tokenize a dataset as SFTTrainer does and add the per-token NLLs of a model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import EMBEDDED_MODEL_ALIAS
from ..hub.shards import DEFAULT_SHARD_ROWS
from ..hub.stream_input import INPUT_MODE_HELP, INPUT_MODES
from ..masking import IGNORE_INDEX, TRAINABLE_COLUMN, PplMaskConfig, completion_ppl, text_histogram
from ._args import output_dir_field
from ._command import Command
from ._io import (
    check_aligned,
    check_output_folder,
    check_positive,
    load_input,
    no_cache_beside_input,
    output_lock,
    save_atomically,
)


DEFAULT_MODEL = EMBEDDED_MODEL_ALIAS
LAYOUTS = ("auto", "shards", "save_to_disk")
# Manifest of a sharded --output-dir: hidden, so that `load_dataset(output)` reads the parquet shards alone
SCORE_MANIFEST = ".trl-pplmask-shards.json"
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
        input_mode (`str`): How `dataset` is read: `stream` (its parquet files, a shard's row groups at a time, see
            [`~trl_pplmask.hub.stream_input`]), `download` (`datasets.load_dataset`) or `auto`.
        output (`str`): New or empty folder for `Dataset.save_to_disk` or the parquet shards; `overwrite` replaces a
            non-empty one (and restarts a sharded run with other settings).
        max_length (`int`): `SFTConfig.max_length` used for training.
        layout (`str`), shard_rows (`int`), worker (`str` or `None`): How the output is written: parquet shards of
            `shard_rows` rows, streamed and resumable (see [`~trl_pplmask.hub.shards`]), or one `save_to_disk`
            folder; `auto` shards inputs of more than `shard_rows` rows. `worker` `"K/N"` takes every N-th shard.
        max_tokens_per_batch (`int` or `None`), score_all_tokens (`bool`), disable_adapter (`bool`),
        output_column (`str`): As in [`~trl_pplmask.scoring.ScoringConfig`].
        no_cache (`bool`): Neither read nor write the score cache (`<TRL_PPLMASK_CACHE>/scores`).
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
    input_mode: str = field(default="auto", metadata={"help": INPUT_MODE_HELP, "choices": INPUT_MODES})
    output: str = output_dir_field("New or empty folder for Dataset.save_to_disk.")
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output-dir (only once the new data is complete)."}
    )
    no_cache: bool = field(default=False, metadata={"help": "Neither read nor write cached scores; score again."})
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
    layout: str = field(
        default="auto",
        metadata={
            "help": "How --output-dir is written: shards (parquet files <split>-0000k-of-0000n.parquet, streamed "
            "shard by shard, resumable, split across the processes of a launch), save_to_disk (one "
            "Dataset.save_to_disk folder, all in memory), or auto (default): shards when the input has more than "
            "--shard-rows rows.",
            "choices": LAYOUTS,
        },
    )
    shard_rows: int = field(
        default=DEFAULT_SHARD_ROWS,
        metadata={"help": f"Rows per shard of the shards layout (default {DEFAULT_SHARD_ROWS})."},
    )
    worker: str | None = field(
        default=None,
        metadata={
            "help": "K/N: score only the shards i with i %% N == K (one task of a Slurm array, or one machine; no "
            "process group). Every worker writes into the same --output-dir; rerun without --worker to check it is "
            "complete. Default: the processes of the accelerate launch, or this one alone."
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


def _scoring_config(config: ScoreConfig, use_cache: bool = True, show_progress: bool = True):
    from ..scoring import ScoringConfig

    return ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch,
        score_all_tokens=config.score_all_tokens,
        disable_adapter=config.disable_adapter,
        output_column=config.output_column,
        use_cache=use_cache and not config.no_cache,
        show_progress=show_progress,
    )


def _check_rows(config: ScoreConfig, dataset) -> None:
    """The checks of the input that need no model."""
    if "input_ids" in dataset.column_names:
        _check_pretokenized(dataset, config.max_length)
    else:
        _check_assistant_turns(dataset)


def _tokenize(config: ScoreConfig, dataset, tokenizer, where: str = ""):
    """`dataset` as SFTTrainer tokenizes it (as it is when it has `input_ids`); warns of rows lost to truncation."""
    from ..data import ROW_ID_COLUMN, tokenize_dataset

    if "input_ids" in dataset.column_names:
        return dataset
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=config.max_length)
    dropped = len(dataset) - len(tokenized)
    if dropped == len(dataset) and not where:
        raise ValueError(
            f"All {len(dataset)} rows were dropped when truncating to --max-length {config.max_length} (no "
            "trainable token left within it). Raise --max-length to the SFTConfig.max_length used for training."
        )
    if dropped:
        ids = dataset[ROW_ID_COLUMN] if ROW_ID_COLUMN in dataset.column_names else range(len(dataset))
        kept = set(tokenized[ROW_ID_COLUMN]) if ROW_ID_COLUMN in tokenized.column_names else set()
        lost = [i for i in ids if i not in kept][:10]
        more = "..." if dropped > len(lost) else ""
        print(
            f"trl-pplmask score: warning: {where}{dropped} of {len(dataset)} rows dropped by truncation to "
            f"--max-length {config.max_length} (no trainable token left; row ids {lost}{more}).",
            file=sys.stderr,
        )
    return tokenized


def _score_tokenized(dataset, tokenized, model, tokenizer, scoring, split_across_processes: bool = True):
    """Add the NLLs (and entropies) of `tokenized` under `model`: the rows of `dataset`, tokenized."""
    from ..scoring import score_dataset

    if not ("input_ids" in dataset.column_names and TRAINABLE_COLUMN in dataset.column_names):
        return score_dataset(tokenized, model, tokenizer, scoring, split_across_processes=split_across_processes)
    # A masked dataset (`build`, `mask`): its labels hide the tokens masked by perplexity. Score every token SFT
    # trains on before masking (`trainable_mask`), as for the unmasked data, and keep the labels as they are.
    restored = [
        np.where(np.asarray(mask, dtype=bool), np.asarray(ids), IGNORE_INDEX).tolist()
        for ids, mask in zip(dataset["input_ids"], dataset[TRAINABLE_COLUMN])
    ]
    view = dataset.select_columns(["input_ids"]).add_column("labels", restored)
    scored = score_dataset(view, model, tokenizer, scoring, split_across_processes=split_across_processes)
    for column in (scoring.output_column, scoring.entropy_column):
        if column is not None:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, scored[column], feature=scored.features[column])
    return dataset


def _load_scoring_model(config: ScoreConfig):
    from ..models import load_model
    from ..scoring import distributed_state

    state = distributed_state()
    return load_model(config.model, adapter=config.adapter, dtype=config.dtype, device=state.device)


def _score(config: ScoreConfig, dataset):
    from ..models import load_tokenizer

    _check_rows(config, dataset)
    # Tokenize (cheap) before loading the model, so that truncation problems are reported first
    tokenized = (
        dataset if "input_ids" in dataset.column_names else _tokenize(config, dataset, load_tokenizer(config.model))
    )
    model, tokenizer = _load_scoring_model(config)
    return _score_tokenized(dataset, tokenized, model, tokenizer, _scoring_config(config)), tokenizer


def _print_summary(ppl: np.ndarray, config: PplMaskConfig) -> None:
    if ppl.size == 0:
        print("No completion tokens.")
        return
    print(f"Completion tokens: {ppl.size}; median perplexity {np.median(ppl):.2f}; ")
    print(f"above {config.threshold:g} (masked by STM): {100 * np.mean(ppl > config.threshold):.1f}%")
    print(text_histogram(ppl, config.threshold))


def _check_options(config: ScoreConfig) -> None:
    from ..hub.shards import parse_worker
    from ..hub.stream_input import check_input_mode
    from ..models import check_model_path

    check_positive("--max-length", config.max_length)
    check_positive("--max-tokens-per-batch", config.max_tokens_per_batch)
    check_positive("--limit", config.limit)
    check_positive("--shard-rows", config.shard_rows)
    check_input_mode(config.input_mode)
    if config.layout not in LAYOUTS:
        raise ValueError(f"--layout {config.layout!r} is not one of {', '.join(LAYOUTS)}.")
    if parse_worker(config.worker) is not None:
        if config.layout == "save_to_disk":
            raise ValueError("--worker needs --layout shards (a save_to_disk folder is written by one process).")
        if config.overwrite:
            raise ValueError(
                "--overwrite with --worker would let each worker delete the others' shards; empty --output-dir once, "
                "before starting the workers, instead."
            )
    _check_output_column(config.output_column)
    check_model_path(config.model)
    if config.adapter:
        check_model_path(config.adapter, "adapter")
    if not config.no_cache:  # the scores are cached after all the scoring: a read-only cache is said now
        from ..models import cache_dir
        from ..utils import check_writable

        where = cache_dir() / "scores"
        fix = "Set TRL_PPLMASK_CACHE to a writable folder, pass --no-cache"
        check_writable(where, f"The score cache {where}", fix)


def run(config: ScoreConfig) -> int:
    """Score `config.dataset` and save it to `config.output`; print a perplexity summary."""
    from ..hub.stream_input import in_memory
    from ..scoring import distributed_state

    _check_options(config)
    with no_cache_beside_input():
        dataset = load_input(config.dataset, config.split, config.dataset_config, config.limit, config.input_mode)
        _check_output_column(config.output_column, dataset)
        sharded = config.layout == "shards" or (config.layout == "auto" and len(dataset) > config.shard_rows)
        if sharded or config.worker is not None:
            return _run_sharded(config, dataset)
        dataset = in_memory(dataset)  # a small input: one save_to_disk folder
        output = check_output_folder(config.output, config.overwrite, config.dataset)
        # One writer per output: a second `score` into the same --output-dir is refused, naming this one's PID
        with output_lock(output, distributed_state().is_main_process):
            scored, _ = _score(config, dataset)
            if distributed_state().is_main_process:
                save_atomically(scored, output)
    if distributed_state().is_main_process:
        dropped = len(dataset) - len(scored)
        note = f" ({dropped} of {len(dataset)} rows dropped by truncation)" if dropped else ""
        print(f"Scored {len(scored)} examples{note} -> {config.output}")
        _print_summary(completion_ppl(scored, config.output_column), PplMaskConfig())
    return 0


def _shard_record(config: ScoreConfig) -> dict:
    """What decides the shards' content (the model's fingerprint is added once it is loaded)."""
    return {
        "command": "score",
        "input": {"dataset": config.dataset, "dataset_config": config.dataset_config, "split": config.split},
        "settings": {
            "model": config.model,
            "adapter": config.adapter,
            "dtype": config.dtype,
            "limit": config.limit,
            "max_length": config.max_length,
            "score_all_tokens": config.score_all_tokens,
            "disable_adapter": config.disable_adapter,
            "output_column": config.output_column,
        },
    }


def _run_sharded(config: ScoreConfig, dataset) -> int:
    """Score `dataset` shard by shard into `<output>/<split>-0000k-of-0000n.parquet` (see `trl_pplmask.hub.shards`)."""
    from ..constants import ROW_ID_COLUMN
    from ..hub.shards import ShardFolder, ShardPlan, count_tokens, current_workers, process_shards
    from ..hub.stream_input import with_row_ids
    from ..models import load_tokenizer
    from ..scoring import model_fingerprint

    output = Path(config.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output-dir {config.output} is a file; give a folder path (new, or empty).")
    check_output_folder(config.output, True, config.dataset)  # only the overlap with the input
    workers = current_workers(config.worker)
    if "input_ids" not in dataset.column_names:
        dataset = with_row_ids(dataset)  # over the whole input, not per shard: dropped rows stay traceable
    plan = ShardPlan(len(dataset), config.shard_rows, config.split)
    folder = ShardFolder(output, [plan], _shard_record(config), SCORE_MANIFEST, overwrite=config.overwrite)
    folder.check()
    for index in range(plan.num_shards):  # every check that needs no model, before any work
        rows = plan.rows(index)
        try:
            _check_rows(config, dataset.select(rows))
        except ValueError as err:
            raise ValueError(f"Rows {rows.start}-{rows.stop - 1} (shard {index}): {err}") from None
    load_tokenizer(config.model)  # a bad tokenizer fails here, before the model is loaded
    model, tokenizer = _load_scoring_model(config)
    folder.check_model(model_fingerprint(model))
    workers.barrier()  # every process checked the folder before anyone writes to it
    if workers.main or workers.explicit:
        folder.start()
    workers.barrier()
    scoring = _scoring_config(config, use_cache=False, show_progress=False)

    def work(rows):
        where = (
            f"rows {rows[ROW_ID_COLUMN][0]}-{rows[ROW_ID_COLUMN][-1]}: " if ROW_ID_COLUMN in rows.column_names else ""
        )
        tokenized = _tokenize(config, rows, tokenizer, where=where or "a shard: ")
        if len(tokenized) == 0:
            scored = tokenized
        else:
            scored = _score_tokenized(rows, tokenized, model, tokenizer, scoring, split_across_processes=False)
        return scored, {"rows": len(rows), "examples": len(scored), "tokens": count_tokens(scored)}

    process_shards(folder, plan, dataset, workers, work)
    workers.barrier()
    missing = folder.missing(plan)
    if missing:
        print(
            f"{workers.name()}: done; {plan.num_shards - len(missing)} of {plan.num_shards} shards of {config.output} "
            "are written. The other workers write the rest; rerun this command once they are done to check it.",
        )
        return 0
    if workers.main or workers.explicit:
        infos = folder.shard_infos(plan)
        examples = sum(i["examples"] for i in infos)
        dropped = sum(i["rows"] for i in infos) - examples
        note = f" ({dropped} of {len(dataset)} rows dropped by truncation)" if dropped else ""
        print(f"Scored {examples} examples{note} -> {config.output} ({plan.num_shards} parquet shards)")
        _print_shard_summary(output, plan, config.output_column, PplMaskConfig())
    return 0


def _shard_perplexities(path: Path, nll_column: str) -> np.ndarray:
    """Perplexities (float32) of the completion tokens of the shard at `path`."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    columns = [nll_column, TRAINABLE_COLUMN if TRAINABLE_COLUMN in pq.read_schema(path).names else "labels"]
    shard = Dataset(pq.read_table(path, columns=columns))
    return completion_ppl(shard, nll_column).astype(np.float32) if len(shard) else np.zeros(0, np.float32)


def _print_shard_summary(folder: Path, plan, nll_column: str, config: PplMaskConfig) -> None:
    """[`_print_summary`] of the completion tokens of every shard, read one shard at a time (for the counts, then
    twice for the exact median): memory does not grow with the number of rows."""
    from ..hub.shards import streamed_quantiles
    from ..masking import PPL_BINS, histogram_text

    def chunks():
        return (_shard_perplexities(folder / name, nll_column) for name in plan.names())

    count = above = 0
    counts = np.zeros(len(PPL_BINS) - 1, dtype=np.int64)
    for ppl in chunks():
        count, above = count + ppl.size, above + int(np.sum(ppl > config.threshold))
        counts += np.histogram(ppl, bins=np.array(PPL_BINS))[0]
    if count == 0:
        print("No completion tokens.")
        return
    median, _ = streamed_quantiles(chunks, dtype=np.float32)
    print(f"Completion tokens: {count}; median perplexity {median:.2f}; ")
    print(f"above {config.threshold:g} (masked by STM): {100 * above / count:.1f}%")
    print(histogram_text(counts, config.threshold))


COMMAND = Command(name="score", help=HELP, description=DESCRIPTION, config_class=ScoreConfig, run=run)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
