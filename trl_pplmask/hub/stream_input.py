"""Shard-wise input: a split stored as parquet files (a Hub dataset, a local dataset folder or a `.parquet` file) read
a shard's rows at a time, straight from the files, without downloading or converting the split.

`datasets.load_dataset` downloads every data file of a split and converts it to an Arrow copy in its cache before the
first row is read: disk the size of the dataset, twice for a Hub dataset (the download and the Arrow copy). A sharded
run (see [`~trl_pplmask.hub.shards`]) needs less: the row count, to fix its shard plan, and then one shard's rows at a
time. [`ParquetSplit`] resolves the split's data files as `datasets` does (`load_dataset_builder`: the Hub's file
listing, the card's configs, the split patterns; nothing is downloaded but the card), reads each file's row count from
its parquet footer alone (range reads through fsspec: `hf://` for the Hub, the local file system otherwise), and
serves `select(range)`: the row groups that hold those rows, read, cast to the split's features as `load_dataset`
casts them, and returned as a `datasets.Dataset` of those rows. The rows, their features and so every shard written
from them are the same as from the memory-mapped `load_dataset` copy.

Only parquet data streams: JSON, CSV or other files have no index to start reading at a given row (a shard would read
the file from its start). `--input-mode auto` streams a Hub dataset stored as parquet and loads anything else as
before; `--input-mode stream` refuses what cannot stream, naming `--input-mode download`.
"""

from __future__ import annotations

import bisect
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import ROW_ID_COLUMN


if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, Features

logger = logging.getLogger(__name__)

INPUT_MODES = ("auto", "stream", "download")
INPUT_MODE_HELP = (
    "How the input is read: stream (parquet files read a shard's row groups at a time, straight from the Hub or the "
    "disk: nothing downloaded or converted whole), download (datasets.load_dataset: the split downloaded and "
    "converted to an Arrow copy in the datasets cache, then memory-mapped), or auto (default): stream a Hub dataset "
    "stored as parquet, download anything else."
)


@dataclass(frozen=True)
class ParquetPiece:
    """One data file of a split: where it is and how many rows each of its row groups holds (from its footer).

    Args:
        url (`str`): The file, as fsspec opens it (`hf://datasets/...` or a local path).
        row_group_rows (`tuple[int, ...]`): Rows of each row group, in order.
    """

    url: str
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    def row_groups(self, start: int, stop: int) -> tuple[list[int], int]:
        """The row groups holding the file's rows `start` to `stop - 1`, and the offset of `start` in the first."""
        ends = []
        total = 0
        for rows in self.row_group_rows:
            total += rows
            ends.append(total)
        first = bisect.bisect_right(ends, start)
        last = bisect.bisect_left(ends, stop)
        return list(range(first, last + 1)), start - (ends[first] - self.row_group_rows[first])


def _open(url: str):
    """`url` opened for reading through fsspec (range reads for a remote file)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return fs.open(path, "rb")


def read_footer(url: str) -> tuple[tuple[int, ...], pa.Schema]:
    """The row counts of the row groups of the parquet file at `url`, and its schema, from its footer alone."""
    import pyarrow.parquet as pq

    with _open(url) as f:
        parquet = pq.ParquetFile(f)
        metadata = parquet.metadata
        return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)), parquet.schema_arrow


def read_row_groups(url: str, row_groups: Sequence[int]) -> pa.Table:
    """Row groups `row_groups` of the parquet file at `url`, and nothing else of it."""
    import pyarrow.parquet as pq

    with _open(url) as f:
        return pq.ParquetFile(f).read_row_groups(list(row_groups), use_threads=False)


class ParquetSplit:
    """The rows of one split stored as parquet files, read a range at a time (see the module's docstring).

    It offers what a sharded run uses of a `Dataset` (`len`, `column_names`, `features`, `select(range)`), so that
    [`~trl_pplmask.hub.shards.process_shards`] takes either.

    Args:
        files (`list[str]`): The split's data files, in order (fsspec URLs or local paths).
        features (`Features`, *optional*): The split's features (a card's `dataset_info`); by default those of the
            first file's schema, as `load_dataset` infers them.
        limit (`int`, *optional*): Only the first `limit` rows.
        row_ids (`bool`, *optional*, defaults to `False`): Add a `row_id` column, the row's index in the split.
    """

    def __init__(
        self, files: Sequence[str], features: Features | None = None, limit: int | None = None, row_ids: bool = False
    ):
        from datasets import Features

        if not files:
            raise ValueError("A split with no data files has no rows; there is nothing to process.")
        footers = [(url, *read_footer(url)) for url in files]
        self.pieces = [ParquetPiece(url, rows) for url, rows, _ in footers]
        self.file_features = features if features is not None else Features.from_arrow_schema(footers[0][2])
        self.starts = []
        total = 0
        for piece in self.pieces:
            self.starts.append(total)
            total += piece.num_rows
        self.num_rows = total if limit is None else min(limit, total)
        self.row_ids = row_ids

    def __len__(self) -> int:
        return self.num_rows

    @property
    def features(self) -> Features:
        """The features of the rows served: the files' (cast to), and `row_id` when added."""
        from datasets import Features, Value

        return Features({**self.file_features, **({ROW_ID_COLUMN: Value("int64")} if self.row_ids else {})})

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    def with_row_ids(self) -> ParquetSplit:
        """The same split with a `row_id` column (the row's index in the split), as `Dataset.add_column` adds it."""
        with_ids = copy.copy(self)
        with_ids.row_ids = True
        return with_ids

    def select(self, rows: range) -> Dataset:
        """Rows `rows` (a range with step 1) as a `Dataset`, read from the row groups that hold them."""
        from datasets import Dataset, DatasetInfo

        if not isinstance(rows, range) or rows.step != 1 or rows.start < 0 or rows.stop > self.num_rows:
            raise ValueError(f"A streamed split serves consecutive rows within 0-{self.num_rows}, not {rows!r}.")
        dataset = Dataset(self._table(rows.start, rows.stop), info=DatasetInfo(features=self.file_features.copy()))
        if self.row_ids:
            dataset = dataset.add_column(ROW_ID_COLUMN, list(rows))
        return dataset

    def _table(self, start: int, stop: int) -> pa.Table:
        """The rows `start` to `stop - 1` as one table in the split's schema."""
        import pyarrow as pa
        from datasets.table import table_cast

        schema = self.file_features.arrow_schema
        tables = []
        for piece, first in zip(self.pieces, self.starts):
            begin, end = max(start, first), min(stop, first + piece.num_rows)
            if begin >= end:
                continue
            groups, offset = piece.row_groups(begin - first, end - first)
            table = read_row_groups(piece.url, groups).slice(offset, end - begin)
            tables.append(table_cast(table, schema))  # as `load_dataset` casts every file to the split's features
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables).combine_chunks()


def with_row_ids(dataset: Dataset | ParquetSplit) -> Dataset | ParquetSplit:
    """`row_id` over the whole split (tokenization adds it per shard otherwise, from 0 in every shard); kept when the
    data has one."""
    if ROW_ID_COLUMN in dataset.column_names:
        return dataset
    if isinstance(dataset, ParquetSplit):
        return dataset.with_row_ids()
    return dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))


def in_memory(dataset: Dataset | ParquetSplit) -> Dataset:
    """`dataset` as a `Dataset` (a streamed split read whole: for inputs small enough for one `save_to_disk`)."""
    return dataset.select(range(len(dataset))) if isinstance(dataset, ParquetSplit) else dataset


def check_input_mode(mode: str) -> None:
    if mode not in INPUT_MODES:
        raise ValueError(f"--input-mode {mode!r} is not one of {', '.join(INPUT_MODES)}.")


def load_split(
    spec: str, split: str = "train", config: str | None = None, limit: int | None = None, mode: str = "download"
) -> Dataset | ParquetSplit:
    """The input of a command: a [`ParquetSplit`] when `mode` streams it, else what
    [`~trl_pplmask.data.load_any_dataset`] loads.

    Args:
        spec (`str`): A task, a dataset folder or file, or a Hub dataset id (as `load_any_dataset` takes it).
        split (`str`, *optional*, defaults to `"train"`): The split.
        config (`str`, *optional*): The dataset config (Hub datasets and Hub-layout folders).
        limit (`int`, *optional*): Only the first `limit` rows.
        mode (`str`, *optional*, defaults to `"download"`): One of `INPUT_MODES` (see `INPUT_MODE_HELP`).

    Raises:
        ValueError: `mode` is `stream` and `spec` is not stored as parquet (naming `--input-mode download`).
    """
    from ..data import load_any_dataset

    check_input_mode(mode)
    if mode != "download":
        files, features = _parquet_files(spec, split, config, required=mode == "stream")
        if files is not None:
            streamed = ParquetSplit(files, features, limit)
            logger.info("Streaming %s split %s: %d rows in %d parquet files", spec, split, len(streamed), len(files))
            return streamed
    return load_any_dataset(spec, split, config, limit)


def _parquet_files(
    spec: str, split: str, config: str | None, required: bool
) -> tuple[list[str] | None, Features | None]:
    """The parquet data files of `split` of `spec` and the features its card declares, without downloading them;
    `(None, None)` when it is not stored as parquet (an error when `required`: `--input-mode stream`)."""
    from ..data import check_data_files, check_dataset_spec
    from ..tasks import TASKS

    def refuse(what: str) -> tuple[None, None]:
        if required:
            raise ValueError(
                f"--input-mode stream reads parquet files (a Hub dataset or dataset folder stored as parquet, or a "
                f".parquet file), but {spec} {what}. Pass --input-mode download (or auto) to load it with "
                "datasets.load_dataset (downloaded and converted to Arrow whole)."
            )
        return None, None

    if spec in TASKS:
        return refuse("is a task (loaded by its own loader)")
    check_dataset_spec(spec)
    path = Path(spec).expanduser()
    local = path.exists()
    if local and not required:
        return None, None  # auto streams Hub datasets; a local folder streams with --input-mode stream
    if path.is_file():
        if path.suffix != ".parquet":
            return refuse(f"is a {path.suffix or 'suffix-less'} file")
        if config is not None:
            raise ValueError(f"--dataset-config {config!r} names a config of a dataset folder, but {spec} is a file.")
        return [str(path)], None
    if local and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return refuse("is a save_to_disk folder (Arrow files, memory-mapped as they are: nothing is copied)")
    if local:
        check_data_files(path, config)
    builder = _builder(spec, config, required)
    if builder is None:
        return None, None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        known = sorted(map(str, data_files))
        raise ValueError(f"{spec} has no split {split!r}; it has {known}. Pass one with --split.")
    files = [str(url) for url in data_files[split]]
    others = sorted({Path(url.split("::")[0]).suffix or url for url in files if not url.endswith(".parquet")})
    if others:
        return refuse(f"stores split {split!r} as {', '.join(others)} files")
    return files, builder.info.features


def _builder(spec: str, config: str | None, required: bool) -> Any:
    """`datasets.load_dataset_builder(spec, config)`: the split's data files and the card's features (nothing but
    the card is downloaded); `None` when it fails and streaming is not `required` (loading then reports why)."""
    from datasets import load_dataset_builder

    try:
        return load_dataset_builder(spec, config)
    except Exception as err:  # noqa: BLE001 - not found, offline, HTTP errors, a missing config: said either way
        if required:
            raise ValueError(f"{spec!r}: its data files could not be listed for --input-mode stream: {err}") from err
        logger.info("%s: data files not listed (%s); loading it with datasets.load_dataset", spec, err)
        return None
