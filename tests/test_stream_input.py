"""Shard-wise input (`--input-mode stream`, trl_pplmask.hub.stream_input): a split stored as parquet files is read a
shard's row groups at a time, through fsspec, with nothing downloaded or converted whole. Exercised on a local folder
of parquet files (uneven files, several row groups each, shards that span file boundaries); a Hub id is mocked only
where its name is resolved. The shards written are byte-identical to the memory-mapped (`download`) path's, a kill -9
then rerun and two workers give the same bytes, and datasets' cache holds no Arrow copy of the input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from testing_utils import folder_bytes, kill_after_shards, run_cli


FILE_ROWS = (7, 13, 5)  # uneven files: shards of 4 rows start inside files and span their boundaries
ROW_GROUP_ROWS = 3
ROWS = sum(FILE_ROWS)
SHARD_ROWS = 4
SHARDS = -(-ROWS // SHARD_ROWS)


def _write_folder(folder: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    start = 0
    for k, count in enumerate(FILE_ROWS):
        table = pa.Table.from_pylist(rows[start : start + count])
        pq.write_table(table, folder / f"train-{k:05d}-of-{len(FILE_ROWS):05d}.parquet", row_group_size=ROW_GROUP_ROWS)
        start += count
    return folder


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """A dataset folder of 3 parquet files of 7, 13 and 5 prompt/completion rows, row groups of 3 rows."""
    rows = [
        {"prompt": f"What is {i} + 3? ", "completion": f"{i} + 3 = {i + 3}. The answer is {i + 3}."}
        for i in range(ROWS)
    ]
    return _write_folder(tmp_path_factory.mktemp("data") / "folder", rows)


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_PPLMASK_CACHE": str(root / "cache"),
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
    }


def _score_argv(model: Path, data: Path, out: Path, mode: str, *extra: str) -> list[str]:
    argv = ["score", "--dataset", str(data), "--model", str(model), "--output-dir", str(out), "--layout", "shards"]
    return argv + ["--shard-rows", str(SHARD_ROWS), "--input-mode", mode, *extra]


def _cli(argv: list[str], root: Path) -> subprocess.CompletedProcess:
    return run_cli(argv, _env(root))


def _arrow_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.arrow")) if folder.exists() else []


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, tiny_model_dir, parquet_folder) -> dict[str, bytes]:
    """The shards of today's memory-mapped path (`--input-mode download`): the reference."""
    root = tmp_path_factory.mktemp("download")
    _cli(_score_argv(tiny_model_dir, parquet_folder, root / "out", "download"), root)
    assert _arrow_files(root / "hf-datasets"), "load_dataset wrote an Arrow copy of the input (the check has teeth)"
    return folder_bytes(root / "out")


def _expected_reads(folder: Path) -> dict[int, set[tuple[str, tuple[int, ...]]]]:
    """Per shard, the (file, row groups) that hold its rows, worked out from the folder's layout row by row."""
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    where = [(files[k], i // ROW_GROUP_ROWS) for k, count in enumerate(FILE_ROWS) for i in range(count)]
    expected = {}
    for index in range(SHARDS):
        groups: dict[str, set[int]] = {}
        for file, group in where[index * SHARD_ROWS : (index + 1) * SHARD_ROWS]:
            groups.setdefault(file, set()).add(group)
        expected[index] = {(file, tuple(sorted(ids))) for file, ids in groups.items()}
    return expected


def test_a_streamed_split_serves_the_rows_of_load_dataset_from_their_row_groups(parquet_folder, monkeypatch):
    from trl_pplmask.data import load_any_dataset
    from trl_pplmask.hub import stream_input
    from trl_pplmask.hub.shards import ShardPlan, dataset_table

    reads = []
    original = stream_input.read_row_groups
    monkeypatch.setattr(
        stream_input, "read_row_groups", lambda url, ids: reads.append((url, tuple(ids))) or original(url, ids)
    )
    streamed = stream_input.with_row_ids(stream_input.load_split(str(parquet_folder), mode="stream"))
    whole = stream_input.with_row_ids(load_any_dataset(str(parquet_folder)))
    assert not reads, "the row counts come from the footers; no row group is read up front"
    assert len(streamed) == len(whole) == ROWS
    assert streamed.column_names == whole.column_names and streamed.features == whole.features
    plan, expected = ShardPlan(ROWS, SHARD_ROWS, "train"), _expected_reads(parquet_folder)
    assert any(len(files) > 1 for files in expected.values()), "a shard spans two files"
    for index in range(plan.num_shards):
        reads.clear()
        rows = plan.rows(index)
        shard = streamed.select(rows)
        assert dataset_table(shard).equals(dataset_table(whole.select(rows))) and shard.features == whole.features
        assert set(reads) == expected[index] and len(reads) == len(expected[index]), (index, reads)
    limited = stream_input.load_split(str(parquet_folder), mode="stream", limit=9)
    assert len(limited) == 9 and limited.select(range(5, 9))["prompt"] == whole.select(range(5, 9))["prompt"]
    with pytest.raises(ValueError, match="consecutive rows"):
        streamed.select(range(0, ROWS + 1))


def test_what_cannot_stream_is_refused_or_loaded_whole(tmp_path, parquet_folder, monkeypatch):
    """`stream` refuses a task, a JSON Lines file, a save_to_disk folder and a Hub dataset of JSON files, naming
    `--input-mode download`; `auto` streams a Hub dataset of parquet files and loads the others as before."""
    import datasets

    from trl_pplmask import data
    from trl_pplmask.hub.stream_input import ParquetSplit, load_split

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    json_folder = tmp_path / "json-folder"
    json_folder.mkdir()
    (json_folder / "train.jsonl").write_bytes(rows_file.read_bytes())
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).save_to_disk(str(saved))
    for spec, what in [
        ("gsm8k", "is a task"),
        (str(rows_file), "is a .jsonl file"),
        (str(saved), "is a save_to_disk folder"),
        (str(json_folder), "stores split 'train' as .jsonl files"),
    ]:
        with pytest.raises(ValueError, match=f"{what}.*--input-mode download"):
            load_split(spec, mode="stream")
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_split(str(parquet_folder), "test", mode="stream")
    # build opens its source splits the same way: a task under `stream` is refused as score refuses it
    from trl_pplmask.hub import BuildConfig
    from trl_pplmask.hub.source import load_source_splits

    with pytest.raises(ValueError, match="is a task.*--input-mode download"):
        load_source_splits(BuildConfig(dataset="gsm8k", input_mode="stream"))

    # A Hub id: only its name resolution is mocked (to the local folders); the files are read through fsspec
    resolve = datasets.load_dataset_builder
    hub = {"org/parquet-data": parquet_folder, "org/json-data": json_folder}
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name, config=None: resolve(str(hub[name]), config))
    loaded = []
    monkeypatch.setattr(data, "load_any_dataset", lambda *args: loaded.append(args[0]) or "loaded whole")
    streamed = load_split("org/parquet-data", mode="auto")
    assert isinstance(streamed, ParquetSplit) and len(streamed) == ROWS and not loaded
    assert load_split("org/json-data", mode="auto") == "loaded whole" and loaded == ["org/json-data"]
    with pytest.raises(ValueError, match="stores split 'train' as .jsonl files.*--input-mode download"):
        load_split("org/json-data", mode="stream")
    assert load_split(str(parquet_folder), mode="auto") == "loaded whole"  # auto streams Hub datasets only
    assert load_split("org/parquet-data", mode="download") == "loaded whole"


def test_streamed_score_writes_the_bytes_of_the_memory_mapped_path_reading_only_each_shards_row_groups(
    tmp_path, tiny_model_dir, parquet_folder, downloaded, monkeypatch
):
    from trl_pplmask.commands.score import main
    from trl_pplmask.hub import stream_input

    # As a command: the same bytes, and no Arrow copy of the input in datasets' cache
    _cli(_score_argv(tiny_model_dir, parquet_folder, tmp_path / "out", "stream"), tmp_path)
    assert folder_bytes(tmp_path / "out") == downloaded
    assert _arrow_files(tmp_path / "hf-datasets") == []

    # In this process, every read counted: each is the row groups of one shard's rows, and every shard is read
    reads = []
    original = stream_input.read_row_groups
    monkeypatch.setattr(
        stream_input, "read_row_groups", lambda url, ids: reads.append((url, tuple(ids))) or original(url, ids)
    )
    monkeypatch.setenv("TRL_PPLMASK_DEBUG", "1")
    assert main(_score_argv(tiny_model_dir, parquet_folder, tmp_path / "again", "stream")[1:]) == 0
    expected = _expected_reads(parquet_folder)
    assert set(reads) == set().union(*expected.values()), reads
    # Per pass over the input (the checks before any work, then the work) each shard reads its own row groups once
    assert len(reads) == 2 * sum(len(calls) for calls in expected.values())
    assert folder_bytes(tmp_path / "again") == downloaded


@pytest.mark.slow
def test_a_streamed_run_killed_then_rerun_and_two_workers_write_the_same_bytes(
    tmp_path, tiny_model_dir, parquet_folder, downloaded
):
    out = tmp_path / "killed"
    code, written = kill_after_shards(_score_argv(tiny_model_dir, parquet_folder, out, "stream"), _env(tmp_path), out)
    assert code == -signal.SIGKILL and 2 <= len(written) < SHARDS, written
    rerun = _cli(_score_argv(tiny_model_dir, parquet_folder, out, "stream"), tmp_path)
    assert folder_bytes(out) == downloaded
    assert f"shards {SHARDS}/{SHARDS}" in rerun.stderr

    out = tmp_path / "workers"  # two independent workers (a Slurm array), one after the other
    first = _cli(_score_argv(tiny_model_dir, parquet_folder, out, "stream", "--worker", "0/2"), tmp_path)
    assert f"{(SHARDS + 1) // 2} of {SHARDS} shards" in first.stdout
    _cli(_score_argv(tiny_model_dir, parquet_folder, out, "stream", "--worker", "1/2"), tmp_path)
    assert folder_bytes(out) == downloaded
    assert _arrow_files(tmp_path / "hf-datasets") == []


def test_streamed_build_writes_the_shards_of_the_memory_mapped_build(tmp_path, tiny_model_dir, parquet_folder):
    from trl_pplmask.commands.build import main

    built = {}
    for mode in ("download", "stream"):
        out = tmp_path / mode
        argv = ["--dataset", str(parquet_folder), "--models", str(tiny_model_dir), "--output-dir", str(out)]
        os.environ["TRL_PPLMASK_DEBUG"] = "1"
        try:
            assert main([*argv, "--shard-rows", str(SHARD_ROWS), "--no-cache", "--input-mode", mode]) == 0
        finally:
            del os.environ["TRL_PPLMASK_DEBUG"]
        config = tiny_model_dir.name
        info = json.loads((out / config / "build_info.json").read_text())
        info.pop("built_at")
        built[mode] = ({p.name: p.read_bytes() for p in (out / config).glob("*.parquet")}, info)
    assert len(built["stream"][0]) == SHARDS and built["stream"] == built["download"]
