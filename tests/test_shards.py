"""Sharded, resumable `score` and `build` (trl_pplmask.hub.shards): the shard plan, kill -9 then rerun, 2 processes
against 1, and the refusals (foreign files, another model, changed settings, changed input)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import folder_bytes, kill_after_shards, run_cli

from trl_pplmask.hub.shards import ShardPlan, parse_worker


ROWS = 24
SHARD_ROWS = 4


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"What is {i} + 3? ", "completion": f"{i} + 3 = {i + 3}. The answer is {i + 3}."}
        for i in range(ROWS)
    ]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_PPLMASK_CACHE": str(cache)}


def _score_argv(model: Path, rows: Path, out: Path, *extra: str) -> list[str]:
    argv = ["score", "--dataset", str(rows), "--model", str(model), "--output-dir", str(out)]
    return argv + ["--layout", "shards", "--shard-rows", str(SHARD_ROWS), *extra]


def _cli(argv: list[str], cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(argv, _env(cache), check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, rows_file) -> dict[str, bytes]:
    """An uninterrupted one-process sharded `score`."""
    root = tmp_path_factory.mktemp("reference")
    _cli(_score_argv(tiny_model_dir, rows_file, root / "out"), root / "cache")
    return folder_bytes(root / "out")


def test_shard_plan_is_fixed_by_the_row_count():
    plan = ShardPlan(num_rows=10, shard_rows=4, split="train")
    assert plan.num_shards == 3
    assert plan.names() == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [plan.rows(i) for i in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert plan.assigned(0, 2) == [0, 2] and plan.assigned(1, 2) == [1]
    assert sorted(plan.assigned(0, 5) + plan.assigned(1, 5) + plan.assigned(2, 5)) == [0, 1, 2]
    with pytest.raises(ValueError, match="shard_rows must be positive"):
        ShardPlan(num_rows=10, shard_rows=0, split="train")
    assert parse_worker("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "x", "1"):
        with pytest.raises(ValueError, match="K/N"):
            parse_worker(bad)


def test_sharded_output_loads_and_equals_the_in_memory_score(tmp_path, tiny_model_dir, rows_file, reference, capsys):
    import numpy as np
    from datasets import load_dataset, load_from_disk

    from trl_pplmask.commands.score import _print_shard_summary, _print_summary, _shard_perplexities
    from trl_pplmask.masking import PplMaskConfig

    assert sorted(reference) == [".trl-pplmask-shards.json"] + [
        f"train-0000{i}-of-00006.parquet" for i in range(ROWS // SHARD_ROWS)
    ]
    folder = tmp_path / "ref"
    folder.mkdir()
    for name, data in reference.items():
        (folder / name).write_bytes(data)
    sharded = load_dataset(str(folder), split="train")
    argv = [
        "score",
        "--dataset",
        str(rows_file),
        "--model",
        str(tiny_model_dir),
        "--output-dir",
        str(tmp_path / "disk"),
    ]
    _cli([*argv, "--layout", "save_to_disk"], tmp_path / "cache")
    whole = load_from_disk(str(tmp_path / "disk"))
    assert sharded.features == whole.features
    assert sharded["row_id"] == list(range(ROWS)) == whole["row_id"]
    assert sharded["input_ids"] == whole["input_ids"] and sharded["labels"] == whole["labels"]
    for a, b in zip(sharded["token_nll"], whole["token_nll"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # The summary of a sharded run, read a shard at a time, is the one of all its perplexities at once
    plan, config = ShardPlan(ROWS, SHARD_ROWS, "train"), PplMaskConfig(threshold=2.5)
    capsys.readouterr()
    _print_shard_summary(folder, plan, "token_nll", config)
    streamed = capsys.readouterr().out
    _print_summary(np.concatenate([_shard_perplexities(folder / name, "token_nll") for name in plan.names()]), config)
    assert streamed == capsys.readouterr().out and "median perplexity" in streamed


def test_streamed_quantiles_are_numpys_to_the_bit():
    """Median and percentiles of values read chunk by chunk (a radix selection) equal numpy's on all values."""
    import numpy as np

    from trl_pplmask.hub.shards import streamed_quantiles

    rng = np.random.default_rng(0)
    for trial in range(60):
        size = int(rng.integers(1, 600))
        values = [
            rng.normal(size=size),
            rng.integers(0, 4, size=size),  # ties
            10.8 + 1e-4 * rng.normal(size=size),  # all in one bucket of the first pass
        ][trial % 3].astype(np.float32)
        chunks = np.array_split(values, int(rng.integers(1, 6)))
        median, percentiles = streamed_quantiles(lambda c=chunks: iter(c), [90, 50, 0, 100, 33.3], transform=np.exp)
        ppl = np.exp(values.astype(np.float64))
        assert median == np.median(ppl)
        assert percentiles == [np.percentile(ppl, q) for q in (90, 50, 0, 100, 33.3)]
        assert streamed_quantiles(lambda c=chunks: iter(c), dtype=np.float32)[0] == np.median(values)
    assert np.isnan(streamed_quantiles(lambda: iter([np.zeros(0, np.float32)]), [90])[1][0])


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of its mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            inside = len(fields) > 5 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
def test_a_shard_keeps_only_its_own_input_pages_resident(tmp_path):
    """Reading a memory-mapped input makes its pages resident: after each shard they are released, so that the
    resident input stays about one shard whatever the number of rows (before, it grew to the whole file)."""
    from datasets import Dataset, load_from_disk

    from trl_pplmask.hub.shards import ShardFolder, Workers, process_shards

    rows = 2048
    Dataset.from_dict({"text": [f"{i:06d} " + "x" * 4000 for i in range(rows)]}).save_to_disk(tmp_path / "in")
    source = load_from_disk(str(tmp_path / "in"))  # memory-mapped, about 8 MB
    mapped = Path(os.path.realpath(source.cache_files[0]["filename"]))
    plan = ShardPlan(rows, 256, "train")
    folder = ShardFolder(tmp_path / "out", [plan], {"command": "test"}, "manifest.json")
    folder.start()
    resident = []

    def work(shard):
        resident.append(_resident_kib(mapped))  # what earlier shards left resident (this shard's rows not read yet)
        return shard.map(lambda row: {"length": len(row["text"])}), {"rows": len(shard), "tokens": 0}

    process_shards(folder, plan, source, Workers(0, 1, explicit=True), work, show_progress=False)
    assert len(resident) == plan.num_shards and len(folder.missing(plan)) == 0
    # A shard is 1,000 KiB of the 8,000 KiB file; the kernel's read-ahead maps up to a few shards' worth around it
    shard_kib = 256 * 4000 // 1024
    assert max(resident) < 4 * shard_kib, f"input resident (KiB) before each shard: {resident}"
    assert Dataset.from_parquet(str(tmp_path / "out" / plan.name(7)))["length"] == [4007] * 256  # data intact


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_is_byte_identical(tmp_path, tiny_model_dir, rows_file, reference):
    out = tmp_path / "out"
    code, written = kill_after_shards(_score_argv(tiny_model_dir, rows_file, out), _env(tmp_path / "cache"), out)
    assert code == -signal.SIGKILL and 2 <= len(written) < ROWS // SHARD_ROWS, written
    for name in written:  # what is visible is whole: exactly the uninterrupted run's bytes
        assert (out / name).read_bytes() == reference[name]

    rerun = _cli(_score_argv(tiny_model_dir, rows_file, out), tmp_path / "cache")
    assert folder_bytes(out) == reference
    assert f"shards {ROWS // SHARD_ROWS}/{ROWS // SHARD_ROWS}" in rerun.stderr


@pytest.mark.slow
def test_two_processes_and_two_workers_write_what_one_process_writes(tmp_path, tiny_model_dir, rows_file, reference):
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    launch += ["-m", "trl_pplmask.cli"]
    env = {**_env(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "launched"
    run = subprocess.run(
        [*launch, *_score_argv(tiny_model_dir, rows_file, out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert folder_bytes(out) == reference
    # Each process made its own shards: shard i on process i % 2, and nothing was gathered
    assert "[worker 0/2]" in run.stderr and "[worker 1/2]" in run.stderr

    # Independent workers (a Slurm array), one after the other: the first leaves half the shards, the second the rest
    out = tmp_path / "workers"
    first = _cli([*_score_argv(tiny_model_dir, rows_file, out), "--worker", "0/2"], tmp_path / "cache")
    assert "3 of 6 shards" in first.stdout
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"train-0000{i}-of-00006.parquet" for i in (0, 2, 4)]
    _cli([*_score_argv(tiny_model_dir, rows_file, out), "--worker", "1/2"], tmp_path / "cache")
    assert folder_bytes(out) == reference


def _copy(reference: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir()
    for name, data in reference.items():
        (folder / name).write_bytes(data)
    return folder


def test_refusals_before_any_work(tmp_path, tiny_model_dir, rows_file, reference):
    from trl_pplmask.commands.score import main

    # A folder holding files no run of ours wrote
    foreign = _copy(reference, tmp_path / "foreign")
    (foreign / "notes.txt").write_text("mine")
    argv = _score_argv(tiny_model_dir, rows_file, foreign)[1:]
    with pytest.raises(ValueError, match="holds files that this run would not write .*notes.txt"):
        _debug(main, argv)
    # Shards and no manifest
    bare = _copy(reference, tmp_path / "bare")
    (bare / ".trl-pplmask-shards.json").unlink()
    with pytest.raises(ValueError, match="holds shards but no"):
        _debug(main, _score_argv(tiny_model_dir, rows_file, bare)[1:])
    # Other settings: refused, then --overwrite starts again
    changed = _copy(reference, tmp_path / "changed")
    with pytest.raises(ValueError, match="other settings .*max_length"):
        _debug(main, _score_argv(tiny_model_dir, rows_file, changed, "--max-length", "512")[1:])
    with pytest.raises(ValueError, match="other settings .*shard plan"):
        _debug(main, [*_score_argv(tiny_model_dir, rows_file, changed)[1:-2], "--shard-rows", "5"])
    assert folder_bytes(changed) == reference  # nothing touched


def test_another_model_or_changed_input_is_refused_and_overwrite_restarts(
    tmp_path, tiny_model_dir, rows_file, reference
):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import tiny_llama

    from trl_pplmask.commands.score import main

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    tiny_llama(initializer_range=0.5).save_pretrained(other_model)  # same name in the record, other weights
    folder = _copy(reference, tmp_path / "model")
    with pytest.raises(ValueError, match="another model|other settings"):
        _debug(main, _score_argv(other_model, rows_file, folder)[1:])
    same_path = _copy(reference, tmp_path / "weights")
    record = json.loads((same_path / ".trl-pplmask-shards.json").read_text())
    record["record"]["settings"]["model"] = str(other_model)
    (same_path / ".trl-pplmask-shards.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="scored by another model"):
        _debug(main, _score_argv(other_model, rows_file, same_path)[1:])

    # The input changed (edited in place) under a finished shard: same settings, other rows
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(rows_file.read_bytes())
    folder = tmp_path / "input"
    assert _debug(main, _score_argv(tiny_model_dir, edited, folder)[1:]) == 0
    before = folder_bytes(folder)
    lines = edited.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "What is 1 + 3? ", "completion": "Four."})
    edited.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="rows 0-3 changed"):
        _debug(main, _score_argv(tiny_model_dir, edited, folder)[1:])
    assert folder_bytes(folder) == before  # nothing touched

    # --overwrite: the old shards go, the new run is whole
    assert _debug(main, [*_score_argv(tiny_model_dir, edited, folder)[1:], "--overwrite"]) == 0
    assert (folder / "train-00000-of-00006.parquet").read_bytes() != before["train-00000-of-00006.parquet"]
    last = "train-00005-of-00006.parquet"  # rows 20-23 did not change: the same data (another run's key)
    assert pq.read_table(folder / last).equals(pq.read_table(pa.BufferReader(reference[last])))


def _debug(main, argv: list[str]) -> int:
    """`main(argv)` with errors raised (TRL_PPLMASK_DEBUG) rather than printed."""
    os.environ["TRL_PPLMASK_DEBUG"] = "1"
    try:
        return main(argv)
    finally:
        del os.environ["TRL_PPLMASK_DEBUG"]


def test_build_refuses_to_resume_with_other_settings(tmp_path, tiny_model_dir, rows_file, monkeypatch):
    """A build killed midway keeps its work folder; a rerun with another threshold is refused, --overwrite restarts."""
    from trl_pplmask.commands.build import main

    out = tmp_path / "out"
    argv = ["--dataset", str(rows_file), "--models", str(tiny_model_dir), "--output-dir", str(out)]
    argv += ["--shard-rows", str(SHARD_ROWS), "--no-cache"]
    work = tmp_path / ".out-pplmask-work"
    config = tiny_model_dir.name
    from trl_pplmask.hub import pplmasked

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C right after the last shard

    with monkeypatch.context() as patch:
        patch.setattr(pplmasked.PplMaskedBuilder, "_summarise", killed)
        with pytest.raises(KeyboardInterrupt):
            _debug(main, argv)
    assert not out.exists() and len(list((work / config).glob("*.parquet"))) == ROWS // SHARD_ROWS
    with pytest.raises(ValueError, match="unfinished build of config .* other settings .*threshold"):
        _debug(main, [*argv, "--threshold", "3"])
    assert _debug(main, [*argv, "--threshold", "3", "--overwrite"]) == 0
    info = json.loads((out / config / "build_info.json").read_text())
    assert info["settings"]["threshold"] == 3 and len(info["splits"]["train"]["files"]) == ROWS // SHARD_ROWS
    # The statistics, read back a shard at a time (quantiles streamed), are those of the whole split at once
    from datasets import load_dataset

    from trl_pplmask.hub import split_statistics

    assert info["splits"]["train"]["stats"] == split_statistics(load_dataset(str(out), config, split="train"))
    assert not work.exists()


def test_prescoring_in_shards_resumes_and_equals_scoring_in_memory(tmp_path, monkeypatch):
    """`pplmask_prescore`'s path: shard by shard into a folder named by content; a rerun reads it back, a lost shard
    is all that a rerun scores, another model gets a folder of its own."""
    import numpy as np
    from _accelerate_score import build_dataset
    from conftest import tiny_llama

    import trl_pplmask.scoring as scoring
    from trl_pplmask.hub.shards import score_in_shards

    dataset = build_dataset()  # 7 rows
    model = tiny_llama(vocab_size=512, initializer_range=0.3)
    config = scoring.ScoringConfig(max_tokens_per_batch=64, show_progress=False, use_cache=False)
    expected = scoring.score_dataset(dataset, model, config=config)
    rows_scored = []
    original = scoring.batch_token_nll
    monkeypatch.setattr(
        scoring, "batch_token_nll", lambda m, ids, *a, **k: rows_scored.append(len(ids)) or original(m, ids, *a, **k)
    )

    scored = score_in_shards(dataset, model, None, config, tmp_path, shard_rows=3)
    assert sum(rows_scored) == 7 and scored.column_names == expected.column_names
    assert scored["row_id"] == list(range(7)) and scored["labels"] == expected["labels"]
    for column in ("token_nll", "token_entropy"):
        for got, want in zip(scored[column], expected[column]):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.glob("*.parquet")) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]

    rows_scored.clear()
    again = score_in_shards(dataset, model, None, config, tmp_path, shard_rows=3)
    assert rows_scored == [] and again["token_nll"] == scored["token_nll"]
    (folder / "train-00001-of-00003.parquet").unlink()  # as if killed before that shard was written
    score_in_shards(dataset, model, None, config, tmp_path, shard_rows=3)
    assert sum(rows_scored) == 3

    rows_scored.clear()
    other = tiny_llama(vocab_size=512, initializer_range=0.5)
    score_in_shards(dataset, other, None, config, tmp_path, shard_rows=3)
    assert sum(rows_scored) == 7 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
