"""One split of a `<task>-pplmasked` config: tokenized as SFTTrainer does, scored, masked at the threshold; its
statistics and the perplexity histogram of the card, computed from the stored columns."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import IGNORE_INDEX, NLL_COLUMN, ROW_ID_COLUMN, TRAINABLE_COLUMN
from ..masking import PplMaskConfig, mask_dataset, masked_fraction


if TYPE_CHECKING:
    from datasets import Dataset

    from .pplmasked_config import BuildConfig

STAT_COLUMNS = ("num_completion_tokens", "num_masked", "masked_fraction")
OUTPUT_COLUMNS = ("input_ids", "labels", NLL_COLUMN, TRAINABLE_COLUMN, *STAT_COLUMNS)


def _flat(table, column: str, dtype) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False).astype(dtype)


def split_statistics(dataset: Dataset) -> dict[str, Any]:
    """Statistics of a built split over its completion (trainable) tokens, as the card shows them.

    Computed from the stored columns (`labels`, `token_nll`, `trainable_mask`), so the card always agrees with the
    parquet files.
    """
    table = dataset.select_columns(["labels", NLL_COLUMN, TRAINABLE_COLUMN]).with_format("arrow")[:]
    return combine_statistics([table_statistics(table)])


def table_statistics(table) -> dict[str, Any]:
    """The parts of [`split_statistics`] of one arrow table (a shard): counts, and the completion tokens' NLLs
    (float32, as stored) for the quantiles."""
    import pyarrow.compute as pc

    trainable = _flat(table, TRAINABLE_COLUMN, bool)
    masked = trainable & (_flat(table, "labels", np.int64) == IGNORE_INDEX)
    lengths = pc.list_value_length(table.column(TRAINABLE_COLUMN)).to_numpy(zero_copy_only=False)
    per_example_kept = (
        np.add.reduceat((trainable & ~masked).astype(np.int64), _offsets(lengths)) if len(lengths) else []
    )
    return {
        "examples": table.num_rows,
        "completion_tokens": int(trainable.sum()),
        "masked_tokens": int(masked.sum()),
        "examples_without_trainable_token": int(np.sum(np.asarray(per_example_kept) == 0)),
        "nll": _flat(table, NLL_COLUMN, np.float32)[trainable],
    }


def combine_statistics(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """[`split_statistics`] of a split from the [`table_statistics`] of its shards."""
    nll = np.concatenate([p["nll"] for p in parts]) if parts else np.zeros(0, np.float32)
    ppl = np.exp(nll.astype(np.float64))
    median = float(np.median(ppl)) if ppl.size else float("nan")
    return _statistics(parts, median, float(np.percentile(ppl, 90)) if ppl.size else float("nan"))


def shard_statistics(tables: Callable[[], Iterable[Any]]) -> dict[str, Any]:
    """[`combine_statistics`] of the shards that `tables()` yields (arrow tables, read one at a time, three times:
    memory does not grow with the number of shards); the same figures, the quantiles exact."""
    from .shards import streamed_quantiles

    parts = [{k: v for k, v in table_statistics(table).items() if k != "nll"} for table in tables()]
    median, (p90,) = streamed_quantiles(
        lambda: (table_statistics(table)["nll"] for table in tables()), [90], transform=np.exp
    )
    return _statistics(parts, median, p90)


def _statistics(parts: Sequence[dict[str, Any]], median_ppl: float, p90_ppl: float) -> dict[str, Any]:
    n, k = sum(p["completion_tokens"] for p in parts), sum(p["masked_tokens"] for p in parts)
    return {
        "examples": sum(p["examples"] for p in parts),
        "completion_tokens": n,
        "masked_tokens": k,
        "masked_fraction": masked_fraction(k, n),
        "median_ppl": median_ppl,
        "p90_ppl": p90_ppl,
        "examples_without_trainable_token": sum(p["examples_without_trainable_token"] for p in parts),
    }


def _offsets(lengths: np.ndarray) -> np.ndarray:
    # Start of each example in the flattened arrays; reduceat needs non-empty rows, which tokenization guarantees
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def completion_perplexities(dataset: Dataset) -> np.ndarray:
    """Perplexity `exp(token_nll)` of every completion token of a built split."""
    table = dataset.select_columns([NLL_COLUMN, TRAINABLE_COLUMN]).with_format("arrow")[:]
    return np.exp(_flat(table, NLL_COLUMN, np.float64)[_flat(table, TRAINABLE_COLUMN, bool)])


def build_split(
    dataset: Dataset,
    model,
    tokenizer,
    config: BuildConfig,
    strategy: str,
    conversation_columns: Sequence[str],
    split_across_processes: bool = True,
) -> tuple[Dataset, dict[str, Any]]:
    """Tokenize (as SFTTrainer), score and mask one split (or one shard of it: `split_across_processes=False` scores
    it in this process alone); return the output columns and what the card reports."""
    # datasets, and the tokenization and scoring that import torch, are imported here: not on the `--help` path
    from datasets import List, Value

    from ..data import tokenize_dataset
    from ..scoring import ScoringConfig, score_dataset

    tokenized = tokenize_dataset(dataset, tokenizer, max_length=config.max_length)
    scoring = ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch, use_cache=config.use_cache, cache_dir=config.cache_dir
    )
    scored = score_dataset(tokenized, model, tokenizer, scoring, split_across_processes=split_across_processes)
    mask_config = PplMaskConfig(strategy=strategy, threshold=config.threshold)
    masked, mask_stats = mask_dataset(scored, mask_config, drop_empty=config.drop_empty)
    if len(masked) == 0 and split_across_processes:
        raise_empty_split(config)
    keep = [*conversation_columns, ROW_ID_COLUMN, *OUTPUT_COLUMNS]
    masked = masked.select_columns(keep)
    # int8 is enough for a 0/1 mask and keeps the files small; flatten so shards are sliced from contiguous data
    masked = masked.cast_column(TRAINABLE_COLUMN, List(Value("int8"))).flatten_indices()
    info = {
        "strategy": strategy,
        "threshold": config.threshold if strategy != "none" else None,
        "rows_loaded": len(dataset),
        # SFTTrainer's preparation drops rows left with no label by truncation (prompt alone >= max_length)
        "rows_dropped_by_truncation": len(dataset) - len(tokenized),
        "examples_dropped_empty": mask_stats.get("examples_dropped", 0),
        "stats": split_statistics(masked),
        "num_bytes": masked.data.nbytes,  # in-memory size, the `num_bytes` of the card's `dataset_info`
    }
    return masked, info


def raise_empty_split(config: BuildConfig) -> None:
    """An empty split would make the whole config unloadable (`datasets` refuses data files without rows)."""
    raise ValueError(
        f"Every example of this split was left with no trainable token at threshold {config.threshold} and "
        "--drop-empty dropped them all: keep them (no --drop-empty) or use a higher threshold."
    )


def plot_ppl_histogram(ppl: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """Histogram of completion-token perplexities on a log axis, with the threshold and masked region marked."""
    plot_ppl_histogram_of_chunks(lambda: [ppl], threshold, path, title)


def plot_ppl_histogram_of_chunks(
    chunks: Callable[[], Iterable[np.ndarray]], threshold: float, path: Path, title: str
) -> None:
    """[`plot_ppl_histogram`] of the perplexities that `chunks()` yields (one shard at a time, read twice: the
    largest value decides the bins, then the counts add up)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = above = 0
    largest = 1.0
    for ppl in chunks():
        if ppl.size:
            largest = float(ppl.max()) if size == 0 else max(largest, float(ppl.max()))
        size, above = size + ppl.size, above + int(np.sum(ppl > threshold))
    top = max(largest, threshold) * 1.5
    bins = np.geomspace(1.0, top, 60)
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    for ppl in chunks():
        counts += np.histogram(np.clip(ppl, 1.0, None), bins=bins)[0]
    # Figure + Agg canvas directly: no pyplot global state, no display needed
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(bins[:-1], bins=bins, weights=counts, color="#4C72B0")  # each bin's count at its left edge
    ax.set_xscale("log")
    masked = 100 * above / size if size else 0.0
    ax.axvspan(threshold, top, color="#C44E52", alpha=0.12)
    ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}: {masked:.1f}% masked")
    ax.set_xlim(1.0, top)
    ax.set_xlabel("token perplexity exp(NLL), log scale")
    ax.set_ylabel("completion tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
