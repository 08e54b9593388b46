"""Source data of a build: where it comes from and under which license, loading its splits, and checking every row
against its TRL format and every model's chat template. All of it happens before anything is scored or written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import DatasetCard

from ..constants import ROW_ID_COLUMN
from ..models import load_tokenizer
from ..tasks import TASKS


if TYPE_CHECKING:
    from datasets import Dataset

    from .pplmasked_config import BuildConfig
    from .stream_input import ParquetSplit

# `trl_pplmask.data` imports trl, transformers and datasets (and torch with them): it is imported in the functions that
# use it, so that `trl-pplmask push` and `--help` start fast.

logger = logging.getLogger(__name__)

# Columns a TRL dataset format needs in every row. Plain and conversational prompt/completion share their fields.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "conversations": ("conversations",),
    "text": ("text",),
}
FORMATS = ("auto", *FORMAT_FIELDS)


def source_short_name(dataset: str) -> str:
    """`gsm8k` for the task, `my-data` for `org/my-data` or `path/to/my-data.jsonl`."""
    if dataset in TASKS:
        return dataset
    return Path(dataset.rstrip("/")).name.split(".")[0] or "dataset"


def _is_local(dataset: str) -> bool:
    return dataset not in TASKS and Path(dataset).expanduser().exists()


def describe_source(dataset: str, dataset_config: str | None = None, license: str | None = None) -> dict[str, Any]:
    """Where the data comes from and under which license, for the card.

    Args:
        dataset (`str`): A task name, a Hub dataset id, or a local file or folder.
        dataset_config (`str`, *optional*): Config of a Hub dataset.
        license (`str`, *optional*): License of the data, when the task or the Hub card does not say.
    """
    if dataset in TASKS:
        spec = TASKS[dataset]
        return {
            "dataset": dataset,
            "hub_id": spec.hub_id,
            "hub_config": spec.hub_config,
            "license": license or spec.license,
        }
    local = _is_local(dataset)
    license_ = license or (None if local else _hub_license(dataset))
    if license_ is None:
        logger.warning("License of %s is unknown; pass --license to record it in the card.", dataset)
    return {
        "dataset": dataset,
        "hub_id": None if local else dataset,
        "hub_config": dataset_config,
        "license": license_ or "unknown",
    }


def _hub_license(repo_id: str) -> str | None:
    # Best effort: the source card's license; offline or unreadable cards leave it unknown
    try:
        return DatasetCard.load(repo_id).data.license
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None


def load_source_splits(config: BuildConfig) -> dict[str, Dataset | ParquetSplit]:
    """Load every requested split of the source data (first `limit` rows), or open it to be read a shard at a time
    (`config.input_mode`, see [`~trl_pplmask.hub.stream_input`]); an empty split is an error."""
    from .stream_input import load_split

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
            # A task loads through its own loader (`stream` refuses it, naming why), anything else as its mode says
            dataset = load_split(config.dataset, split, config.dataset_config, config.limit, config.input_mode)
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


def resolve_format(dataset: Dataset | ParquetSplit, requested: str, where: str) -> str:
    """The format name of `FORMAT_FIELDS` that `dataset` follows; checks the columns of an explicit `requested`."""
    from ..data import detect_format

    if requested == "auto":
        detected = detect_format(dataset.select(range(1))[0])  # row 0 alone (of a streamed split too)
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
