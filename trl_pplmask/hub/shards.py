"""Corpus-scale runs: a dataset processed shard by shard into parquet files in their final layout, resumably.

A run cuts its input into shards of `shard_rows` consecutive rows ([`ShardPlan`], fixed by the row count alone, so
known before anything is computed). Each shard is read, processed (tokenized, scored, masked), written as one
`<split>-0000k-of-0000n.parquet` file (a temporary file renamed into place: a reader never sees half a shard), and
freed: memory does not grow with the number of rows. A rerun skips the shards already written, so a kill -9 loses at
most the shards in flight.

Under `accelerate launch` (or one task of a Slurm array, with an explicit worker index) each process takes the shards
`i` with `i % num_workers == worker_index` and works alone: nothing is gathered, no process holds the whole dataset.
A shard's bytes depend only on its rows and the settings, so any number of processes, and any mix of runs and reruns,
write the same files.

Every shard carries, in its parquet metadata, the key of its run (the model's fingerprint, the settings and the shard
plan) and a hash of the input rows it was made from. A folder's `manifest` file records the same. A resumed run
refuses shards of another run (another model, configuration or setting), an input that changed under a finished
shard, and files in the folder that no run of ours wrote; `overwrite` discards the previous run's shards instead.

What a run reports over all its rows (a score summary, a build's split statistics and histogram) is computed from the
written shards, read back one at a time: [`streamed_quantiles`] gives numpy's exact median and percentiles without
holding every value. The memory-mapped input is read a shard at a time too, and this process's resident pages of it
are released after each shard ([`release_mapped_pages`]), so that even the file-backed part of the resident set does
not grow with the row count. A streamed input ([`~trl_pplmask.hub.stream_input`]) is never mapped: each shard reads
the row groups of its rows from the parquet files.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils import atomic_write_text


if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

    from .stream_input import ParquetSplit

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Parquet key-value metadata of every shard: which run wrote it, from which input rows
SHARD_METADATA_KEY = b"trl_pplmask.shard"
# Default rows per shard: minutes of work for a 7B model on one GPU (~300 tokens a row), under a minute for the
# embedded model on CPU; small enough that a kill loses little, large enough that the files are few
DEFAULT_SHARD_ROWS = 4096
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardPlan:
    """Which rows go into which shard: `num_rows` rows cut into consecutive shards of `shard_rows` (the last one
    shorter), named `<split>-0000k-of-0000n.parquet` as on the Hub.

    Args:
        num_rows (`int`): Rows of the input.
        shard_rows (`int`): Rows per shard.
        split (`str`): The split name that starts every file name.
    """

    num_rows: int
    shard_rows: int
    split: str

    def __post_init__(self):
        if self.shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {self.shard_rows}.")
        if self.num_rows <= 0:
            raise ValueError(f"The input of split {self.split!r} has no rows; there is nothing to process.")

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_rows / self.shard_rows))

    def rows(self, index: int) -> range:
        """The input rows of shard `index`."""
        return range(index * self.shard_rows, min((index + 1) * self.shard_rows, self.num_rows))

    def name(self, index: int) -> str:
        return f"{self.split}-{index:05d}-of-{self.num_shards:05d}.parquet"

    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.num_shards)]

    def assigned(self, worker_index: int, num_workers: int) -> list[int]:
        """The shards of worker `worker_index` of `num_workers`: shard `i` goes to worker `i % num_workers`."""
        return list(range(worker_index, self.num_shards, num_workers))

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_rows": self.num_rows,
            "shard_rows": self.shard_rows,
            "shards": self.num_shards,
        }


def parse_worker(spec: str | None) -> tuple[int, int] | None:
    """`"K/N"` (worker K of N, from 0) as `(K, N)`, `None` for `None`; anything else is a clear error."""
    if spec is None:
        return None
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(
            f"--worker {spec!r} must be K/N with 0 <= K < N (worker K of N, e.g. 0/8 for the first of 8 tasks of a "
            "Slurm array: --worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."
        )
    return index, count


def rows_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the rows of `dataset` (all columns, in order): what a shard was made from."""
    h = hashlib.sha256()
    h.update(json.dumps(dataset.column_names).encode())
    for start in range(0, len(dataset), 1024):
        batch = dataset[start : start + 1024]
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_key(record: dict[str, Any]) -> str:
    """The key of a run: a hash of what decides its output (model fingerprint, settings, shard plan)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """The run record a shard carries, or `None` for a parquet file without one (or not a parquet file)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - unreadable: not one of our shards
        return None
    raw = metadata.get(SHARD_METADATA_KEY)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


def write_shard(table: pa.Table, path: Path, metadata: dict[str, Any]) -> None:
    """Write `table` to `path` with `metadata` in its schema, atomically (a temporary file renamed into place)."""
    import pyarrow.parquet as pq

    schema_metadata = dict(table.schema.metadata or {})
    schema_metadata.update(_without_cache_fingerprint(schema_metadata))
    schema_metadata[SHARD_METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(schema_metadata)
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _without_cache_fingerprint(schema_metadata: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The `huggingface` schema metadata without its `fingerprint`: a key of `datasets`' cache, which depends on where
    the input was read from (the path of a local copy, the Arrow cache of a download), not on its rows. Without it, a
    shard's bytes are the same from any copy of the input, downloaded or streamed."""
    raw = schema_metadata.get(b"huggingface")
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(info, dict) or "fingerprint" not in info:
        return {}
    info.pop("fingerprint")
    return {b"huggingface": json.dumps(info).encode()}


def count_tokens(dataset: Dataset) -> int:
    """Tokens of `dataset` (the lengths of its `input_ids`), without reading them into Python."""
    import pyarrow.compute as pc

    if len(dataset) == 0:
        return 0
    return int(pc.sum(pc.list_value_length(dataset.flatten_indices().data.column("input_ids"))).as_py() or 0)


_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def release_mapped_pages(dataset: Dataset) -> int:
    """Drop this process's resident pages of the files that `dataset` memory-maps (its Arrow cache files); returns
    the bytes of mappings released.

    Reading a memory-mapped dataset makes every page read resident in this process (RssFile) until the kernel needs
    the memory, so a run over all rows of a large input would show a resident set that grows with the input although
    those pages are clean copies of the file. `madvise(MADV_DONTNEED)` on the read-only mappings of those files drops
    them; a later read faults them in again from the page cache, with the same bytes. Linux only (elsewhere: 0).
    """
    files = {os.path.realpath(entry["filename"]) for entry in getattr(dataset, "cache_files", []) or []}
    if not files or not sys.platform.startswith("linux"):
        return 0
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # Only read-only mappings: dropping the pages of a writable private one would lose its changes
                if len(fields) == 6 and fields[5].strip() in files and "w" not in fields[1]:
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    ranges.append((start, end - start))
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    released = 0
    for start, length in ranges:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) == 0:
            released += length
    return released


def release_free_memory() -> None:
    """Return the memory that the allocators hold free to the system: pyarrow's pool (`release_unused`) and, on
    glibc, the C heap (`malloc_trim`).

    Nothing in use is touched. Converting an input to Arrow (`load_dataset` of a JSON file) leaves tens of MB free but
    held, more for a larger file; given back, the resident set of a run no longer depends on the size of its input.
    """
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):  # pyarrow older than 9
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl)
            pass


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """32-bit unsigned keys of float32 `values` that sort as the values do (NaNs at either end)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))


def _value_of_key(key: int) -> np.float32:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _order_statistics(chunks: Callable[[], Iterable[np.ndarray]], ranks: Sequence[int]) -> dict[int, np.float32]:
    """The values at 0-based `ranks` of all float32 values that `chunks()` yields, in ascending order, reading the
    chunks twice: a radix selection on 32-bit sort keys, the high 16 bits in the first pass, the low in the second."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for chunk in chunks():
        counts += np.bincount(_sortable_keys(chunk) >> 16, minlength=1 << 16)
    ends = np.cumsum(counts)
    high = {rank: int(np.searchsorted(ends, rank, side="right")) for rank in ranks}
    low_counts = {bucket: np.zeros(1 << 16, dtype=np.int64) for bucket in set(high.values())}
    for chunk in chunks():
        keys = _sortable_keys(chunk)
        for bucket, bucket_counts in low_counts.items():
            bucket_counts += np.bincount(keys[keys >> 16 == bucket] & 0xFFFF, minlength=1 << 16)
    values = {}
    for rank, bucket in high.items():
        within = rank - (int(ends[bucket]) - int(counts[bucket]))
        low = int(np.searchsorted(np.cumsum(low_counts[bucket]), within, side="right"))
        values[rank] = _value_of_key(bucket << 16 | low)
    return values


def streamed_quantiles(
    chunks: Callable[[], Iterable[np.ndarray]],
    percentiles: Sequence[float] = (),
    dtype: type = np.float64,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, list[float]]:
    """`np.median(v)` and `np.percentile(v, q)` (linear) of `v = transform(np.concatenate(list(chunks())).astype(
    dtype))`, exactly, but holding one chunk at a time: `chunks()` is called three times (a count, then the two
    passes of a radix selection) and must yield the same float32 values each time.

    Args:
        chunks (`Callable`): Returns an iterable of float32 arrays (for example, one per shard, read from disk).
        percentiles (`Sequence[float]`, *optional*): Percentiles (0-100) besides the median.
        dtype (`type`, *optional*, defaults to `np.float64`): The dtype the values are computed in.
        transform (`Callable`, *optional*): A non-decreasing function applied to the values in `dtype` (`np.exp`
            for perplexities from NLLs): it keeps their order, so only the selected values need it.

    Returns:
        `(median, [percentile, ...])`: NaN for no values, or when a value is NaN (as numpy).
    """
    count = nans = 0
    for chunk in chunks():
        count += len(chunk)
        nans += int(np.isnan(chunk).sum())
    if count == 0 or nans:
        return float("nan"), [float("nan")] * len(percentiles)
    middle = [(count - 1) // 2, count // 2]
    # numpy's linear method (`np.percentile`): the virtual index, its neighbours (bounded to the first and last
    # value) and the weight, computed as there, so that the results are the same to the bit
    neighbours = []
    for q in percentiles:
        quantile = np.float64(q) / 100
        virtual = (count - 1) * quantile
        below = float(np.floor(virtual))
        if virtual >= count - 1:
            below = -1.0
            ranks_of = (count - 1, count - 1)
        elif virtual < 0:
            below = 0.0
            ranks_of = (0, 0)
        else:
            ranks_of = (int(below), int(below) + 1)
        neighbours.append((*ranks_of, virtual - below))
    ranks = set(middle) | {rank for below, above, _ in neighbours for rank in (below, above)}
    selected = _order_statistics(chunks, sorted(ranks))

    def value(rank: int) -> np.ndarray:
        converted = np.asarray(selected[rank], dtype=dtype)
        return np.asarray(transform(converted), dtype=dtype) if transform is not None else converted

    median = np.mean(np.array([value(rank) for rank in middle[: 2 - count % 2]], dtype=dtype))
    results = []
    for below, above, gamma in neighbours:
        a, b = value(below), value(above)
        gamma = np.asarray(gamma, dtype=np.float64)
        difference = b - a
        results.append(float(b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma))
    return float(median), results


def dataset_table(dataset: Dataset) -> pa.Table:
    """The arrow table of `dataset` as it would be saved (indices applied, `datasets` features in its metadata)."""
    return dataset.flatten_indices().data.table


class ShardFolder:
    """One folder of shards of one run: what is finished, what may stay, what is refused.

    Args:
        directory (`Path`): The folder (created when missing).
        plans (`list[ShardPlan]`): The shard plans written there (one per split).
        record (`dict`): What decides the output (JSON-serialisable): settings, plan and, once known, the model.
        manifest (`str` or `Path`): The manifest file: a name in `directory`, or a path elsewhere (a build keeps it
            out of the config folder it publishes).
        allowed (`Iterable[str]`): Other names that may be in the folder (a build's `build_info.json`).
        overwrite (`bool`): Discard the shards of another run instead of refusing them.
    """

    def __init__(
        self,
        directory: Path,
        plans: list[ShardPlan],
        record: dict[str, Any],
        manifest: str | Path,
        allowed: Iterable[str] = (),
        overwrite: bool = False,
    ):
        self.directory = Path(directory)
        self.plans = plans
        self.record = record
        self.manifest_path = manifest if isinstance(manifest, Path) else self.directory / manifest
        self.manifest = self.manifest_path.name if self.manifest_path.parent == self.directory else None
        self.allowed = set(allowed)
        self.overwrite = overwrite

    @property
    def key(self) -> str:
        return run_key({**self.record, "plans": [plan.as_dict() for plan in self.plans]})

    def _expected_names(self) -> set[str]:
        names = {name for plan in self.plans for name in plan.names()}
        return names | {f".{name}{_TMP_SUFFIX}" for name in names} | {self.manifest} - {None} | self.allowed

    def check(self, what: str = "--output-dir") -> None:
        """Before any work: refuse foreign files and a previous run with other settings (unless `overwrite`).

        Reads only; safe to run on every process at once.
        """
        if not self.directory.is_dir():
            return
        previous = self._read_manifest()
        if previous is not None and not self.overwrite:
            changed = _differences(previous.get("record", {}), self.record, skip=("model",))
            plans = [plan.as_dict() for plan in self.plans]
            if previous.get("plans") != plans:
                changed.append(f"shard plan: {previous.get('plans')} -> {plans}")
            if changed:
                raise ValueError(
                    f"{what} {self.directory} holds shards of a run with other settings ({'; '.join(changed[:4])}); "
                    "they cannot be resumed. Rerun with the same settings to finish that run, pass --overwrite to "
                    "start again, or choose another folder."
                )
        expected = self._expected_names()
        present = [p.name for p in self.directory.iterdir()]
        foreign = sorted(name for name in present if name not in expected and not self._manifest_in_flight(name))
        if foreign and not (self.overwrite and previous is not None):
            raise ValueError(
                f"{what} {self.directory} holds files that this run would not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): it is not an earlier run of the same command. Choose a new "
                "or empty folder" + (", or pass --overwrite to replace it." if previous is not None else ".")
            )
        if previous is None and not self.overwrite and any(name != self.manifest for name in present):
            raise ValueError(
                f"{what} {self.directory} holds shards but no {self.manifest_path.name}: they were not written by a "
                "run of this command. Choose a new or empty folder, or pass --overwrite to replace them."
            )

    def _manifest_in_flight(self, name: str) -> bool:
        """Whether `name` is the manifest being written by another worker right now (`atomic_write_text`'s hidden
        temporary name), which independent workers starting together see."""
        return self.manifest is not None and name.startswith(f".{self.manifest}.") and name.endswith(_TMP_SUFFIX)

    def check_model(self, fingerprint: str, what: str = "--output-dir") -> None:
        """Once the model is loaded: refuse to resume the shards of another model (unless `overwrite`)."""
        self.record = {**self.record, "model": fingerprint}
        previous = self._read_manifest()
        if previous is None or self.overwrite:
            return
        before = previous.get("record", {}).get("model")
        if before is not None and before != fingerprint:
            raise ValueError(
                f"{what} {self.directory} holds shards scored by another model (fingerprint {before[:12]}, now "
                f"{fingerprint[:12]}): the weights or the model changed. Rerun with the model of that run, pass "
                "--overwrite to start again, or choose another folder."
            )

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.manifest_path
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("kind") != "trl-pplmask-shards":
            raise ValueError(
                f"{path} is not a shard manifest of trl-pplmask (unreadable or of another tool). Remove the folder "
                "or choose another one."
            )
        return manifest

    def start(self) -> None:
        """Write the manifest (after [`check`] and [`check_model`] passed), discarding another run's shards if
        `overwrite`. The main process calls it; the others wait for it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for path in self.directory.iterdir():
                if path.is_file() and path.name not in self.allowed and path != self.manifest_path:
                    path.unlink()
        manifest = {
            "kind": "trl-pplmask-shards",
            "version": MANIFEST_VERSION,
            "key": self.key,
            "record": self.record,
            "plans": [plan.as_dict() for plan in self.plans],
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def finished(self, plan: ShardPlan, index: int, rows_sha256: str) -> bool:
        """Whether shard `index` of `plan` is written by this run; a shard of another run, or one whose input rows
        changed, is an error (the folder would mix two datasets)."""
        path = self.directory / plan.name(index)
        if not path.is_file():
            return False
        metadata = read_shard_metadata(path)
        if metadata is None or metadata.get("key") != self.key:
            raise ValueError(
                f"{path} was written by another run (other model, settings or shard plan); it cannot be mixed into "
                "this one. Pass --overwrite to start again, or choose another folder."
            )
        if metadata.get("rows_sha256") != rows_sha256:
            raise ValueError(
                f"The input rows {plan.rows(index).start}-{plan.rows(index).stop - 1} changed since {path} was "
                "written: the input is not the one of the run being resumed. Pass --overwrite to start again."
            )
        return True

    def write(self, plan: ShardPlan, index: int, table: pa.Table, rows_sha256: str, info: dict[str, Any]) -> None:
        """Write shard `index` atomically, with the run key, the input hash and `info` (per-shard figures)."""
        metadata = {"key": self.key, "index": index, "rows_sha256": rows_sha256, "info": info}
        write_shard(table, self.directory / plan.name(index), metadata)

    def shard_infos(self, plan: ShardPlan) -> list[dict[str, Any]]:
        """The `info` of every shard of `plan` (all must be written)."""
        infos = []
        for index in range(plan.num_shards):
            metadata = read_shard_metadata(self.directory / plan.name(index))
            if metadata is None or metadata.get("key") != self.key:
                raise ValueError(f"Shard {plan.name(index)} of {self.directory} is missing or of another run.")
            infos.append(metadata.get("info", {}))
        return infos

    def missing(self, plan: ShardPlan) -> list[int]:
        return [i for i in range(plan.num_shards) if not (self.directory / plan.name(i)).is_file()]


def _differences(before: dict[str, Any], now: dict[str, Any], skip: Iterable[str] = ()) -> list[str]:
    keys = sorted((set(before) | set(now)) - set(skip))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


class Progress:
    """Progress of one worker's shards, logged after each one: shards and rows done in the folder (every worker's),
    the tokens per second of all workers together and of this one, and the ETA of the whole run.

    The figures of all workers come from the folder itself (a shard's token count is in its metadata), so they need
    no process group: independent tasks of a Slurm array see each other's shards as they land.
    """

    def __init__(self, folder: ShardFolder, plan: ShardPlan, mine: list[int], worker: str, enabled: bool = True):
        self.folder, self.plan, self.mine, self.worker, self.enabled = folder, plan, mine, worker, enabled
        self.start = time.perf_counter()
        self.tokens = 0
        self.done_mine = 0
        self.before = set(range(plan.num_shards)) - set(folder.missing(plan)) if enabled else set()
        self._tokens_of: dict[int, int] = {}

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        self.done_mine += 1
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        missing = self.folder.missing(self.plan)
        done = set(range(self.plan.num_shards)) - set(missing)
        rows = self.plan.num_rows - sum(len(self.plan.rows(i)) for i in missing)
        new = done - self.before  # made by any worker since this one started
        all_tokens = sum(self._shard_tokens(i) for i in new)
        eta = f"{_duration(elapsed / len(new) * len(missing))}" if new else "unknown"
        print(
            f"[{self.worker}] {self.plan.split}: shards {len(done)}/{self.plan.num_shards}, rows {rows}/"
            f"{self.plan.num_rows}; {all_tokens / elapsed:.0f} tok/s over all workers ({self.tokens / elapsed:.0f} "
            f"here); ETA {eta}",
            file=sys.stderr,
            flush=True,
        )

    def _shard_tokens(self, index: int) -> int:
        """The tokens of a finished shard, from its metadata (read once)."""
        if index not in self._tokens_of:
            metadata = read_shard_metadata(self.folder.directory / self.plan.name(index)) or {}
            self._tokens_of[index] = int(metadata.get("info", {}).get("tokens", 0))
        return self._tokens_of[index]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@dataclass
class Workers:
    """Which worker this process is: `index` of `count`, from the launcher or an explicit `--worker K/N`; `explicit`
    when given (independent tasks, no process group), `main` when this worker writes what is shared."""

    index: int
    count: int
    explicit: bool

    @property
    def main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Wait for the other processes of a launch (not for independent tasks, which never wait)."""
        if not self.explicit and self.count > 1:
            from ..scoring import distributed_state

            distributed_state().wait_for_everyone()

    def name(self) -> str:
        return f"worker {self.index}/{self.count}"


def current_workers(worker: str | None = None) -> Workers:
    """This process's worker index and count: `--worker K/N` when given, else the accelerate launch's processes."""
    parsed = parse_worker(worker)
    if parsed is not None:
        return Workers(parsed[0], parsed[1], explicit=True)
    from ..scoring import distributed_state

    state = distributed_state()
    return Workers(state.process_index, state.num_processes, explicit=False)


def process_shards(
    folder: ShardFolder,
    plan: ShardPlan,
    source: Dataset | ParquetSplit,
    workers: Workers,
    work: Callable[[Dataset], tuple[Dataset, dict[str, Any]]],
    show_progress: bool = True,
) -> list[int]:
    """Make this worker's missing shards of `plan`: `work(rows)` turns the input rows of a shard into the dataset to
    write and its per-shard figures (stored in the shard's metadata). Returns the shards made here.

    Args:
        folder (`ShardFolder`): Where the shards go (checked and started).
        plan (`ShardPlan`): The shard plan of `source`.
        source (`Dataset` or `ParquetSplit`): The whole input, memory-mapped or streamed from its parquet files
            ([`~trl_pplmask.hub.stream_input.ParquetSplit`]); only a shard's rows are read at a time.
        workers (`Workers`): This worker.
        work (`Callable`): Rows of one shard -> (output dataset, info).
        show_progress (`bool`, *optional*, defaults to `True`): Log progress after each shard.
    """
    import datasets

    mine = plan.assigned(workers.index, workers.count)
    release_mapped_pages(source)  # what the checks of every row read before
    release_free_memory()  # what loading (converting) the input left free but held
    progress = Progress(folder, plan, mine, workers.name(), enabled=show_progress)
    made = []
    bars, caching = datasets.is_progress_bar_enabled(), datasets.is_caching_enabled()
    datasets.disable_progress_bars()  # one line per shard instead of every map's bar
    # Each shard's maps into temporary files, not cache files kept beside the input: with caching on, the resident
    # set grew by about 2 MB a shard (benchmarks/diag_corpus_memory.py --command build)
    datasets.disable_caching()
    try:
        for index in mine:
            made += _process_shard(folder, plan, index, source, work, progress)
    finally:
        if bars:
            datasets.enable_progress_bars()
        if caching:
            datasets.enable_caching()
    return made


def _process_shard(folder: ShardFolder, plan: ShardPlan, index: int, source: Dataset, work, progress) -> list[int]:
    """Shard `index`: skipped when this run finished it, else made and written. Returns `[index]` if made."""
    from ..utils import raise_if_termination_requested

    rows = source.select(plan.rows(index))
    rows_hash = rows_fingerprint(rows)
    if folder.finished(plan, index, rows_hash):
        progress.update(0)
        return []
    output, info = work(rows)
    raise_if_termination_requested()
    folder.write(plan, index, dataset_table(output), rows_hash, info)
    del rows, output
    release_mapped_pages(source)  # the pages of this shard's rows: resident memory stays that of one shard
    release_free_memory()
    progress.update(info.get("tokens", 0))
    return [index]


PRESCORE_MANIFEST = "manifest.json"


def score_in_shards(
    dataset: Dataset,
    model: Any,
    tokenizer: Any,
    scoring: Any,
    root: Path,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    show_progress: bool = True,
) -> Dataset:
    """Score a tokenized `dataset` shard by shard into a folder of parquet shards under `root`, each process of a
    launch its own shards, and return the whole scored dataset, memory-mapped (what `trl-pplmask sft`'s
    `pplmask_prescore` trains on).

    The folder is named by a hash of everything the scores depend on (the rows of every shard, the model's
    fingerprint, the scoring settings): an identical later call (a rerun, another arm of a study) reads the finished
    shards back, a call killed midway resumes with the shards it had not finished, and anything else gets a folder
    of its own. No process holds the whole dataset's scores; the processes meet only before and after the scoring.

    Args:
        dataset (`Dataset`): Tokenized rows (`input_ids`, optionally `labels`), as
            [`~trl_pplmask.scoring.score_dataset`] takes them.
        model (`torch.nn.Module`): The scoring model, whole (not sharded) on this process.
        tokenizer (`PreTrainedTokenizerBase`): Supplies the pad token id.
        scoring (`ScoringConfig`): Scoring settings (its cache is not used: the folder is the cache).
        root (`Path`): Where the folders of such runs live; every process of a launch must see the same folder (on
            several machines: a shared file system).
        shard_rows (`int`, *optional*, defaults to `DEFAULT_SHARD_ROWS`): Rows per shard.
        show_progress (`bool`, *optional*, defaults to `True`): Log progress after each shard (the main process).
    """
    import dataclasses

    import datasets

    from ..scoring import adapter_context, distributed_state, model_fingerprint, score_dataset

    workers = current_workers()
    plan = ShardPlan(len(dataset), shard_rows, "train")
    with adapter_context(model, scoring.disable_adapter):
        weights = model_fingerprint(model)
    settings = {k: getattr(scoring, k) for k in ("score_all_tokens", "disable_adapter", "output_column")}
    settings["entropy_column"] = scoring.entropy_column
    record = {
        "command": "prescore",
        "rows": [rows_fingerprint(dataset.select(plan.rows(i))) for i in range(plan.num_shards)],
        "model": weights,
        "settings": settings,
    }
    folder = ShardFolder(Path(root) / run_key(record), [plan], record, PRESCORE_MANIFEST)
    folder.check("The pre-scoring folder")
    workers.barrier()
    if workers.main and folder.missing(plan):
        folder.start()
    workers.barrier()
    per_shard = dataclasses.replace(scoring, use_cache=False, show_progress=False)

    def work(rows):
        scored = score_dataset(rows, model, tokenizer, per_shard, split_across_processes=False)
        return scored, {"rows": len(rows), "tokens": count_tokens(scored)}

    process_shards(folder, plan, dataset, workers, work, show_progress=show_progress and workers.main)
    workers.barrier()
    missing = folder.missing(plan)
    if missing:
        raise RuntimeError(
            f"After every process finished pre-scoring, {len(missing)} of {plan.num_shards} shards are missing from "
            f"{folder.directory} on {workers.name()}: the processes do not share that folder (machines with separate "
            "disks). Set TRL_PPLMASK_CACHE to a folder on a file system that every machine sees."
        )
    files = [str(folder.directory / name) for name in plan.names()]
    with distributed_state().main_process_first():  # one process converts, the others read its cache
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            scored = datasets.load_dataset("parquet", data_files=files, split="train")
        finally:
            if bars:
                datasets.enable_progress_bars()
    return scored
