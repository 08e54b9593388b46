"""Kill -9 at a random point of `build`, `self-output` and `eval`, then rerun: the output equals an uninterrupted run.

Each command runs as a real subprocess of the `trl-pplmask` CLI on a tiny random model and a few rows. The run is
timed once uninterrupted (the reference), then a second run into a fresh folder is killed with SIGKILL after a random
share of that time, and rerun with the same arguments. What a user gets after the rerun must be what the uninterrupted
run wrote (build times stamped into cards and `build_info.json` aside), nothing half-written may be visible after the
kill, no staging folder may be left behind, and the inputs must be unchanged. (`score` and `mask` have the same test in
`test_cli_errors.py`.)
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


# Build times differ between two runs by design; everything else a build writes is deterministic
_BUILT_AT = re.compile(rb"(\"built_at\": \"|- Built: )[0-9T:Z-]+")
# Keys of report.json that differ between two runs by design: wall times, dates, whether a result came from the cache
_VOLATILE = re.compile(r"time|seconds|created|date|_at$|^cached$")


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """Prompt/completion rows that also carry GSM8K's `answer` field, so that the gsm8k verifier can check them."""
    rows = [
        {
            "prompt": f"What is {i} + 3? ",
            "completion": f"{i} + 3 = {i + 3}. The answer is {i + 3}.",
            "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}",
        }
        for i in range(16)
    ]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(argv: list[str], cwd: Path, cache: Path, kill_after: float | None = None) -> tuple[int, float, str]:
    """Run `trl-pplmask ARGV` in `cwd`; with `kill_after`, SIGKILL it after that many seconds if still running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_PPLMASK_CACHE": str(cache)}
    start = time.perf_counter()
    command = [sys.executable, "-m", "trl_pplmask.cli", *argv]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    took = time.perf_counter() - start
    assert kill_after is not None or process.returncode == 0, err.decode()[-3000:]
    return process.returncode, took, err.decode()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes, build times blanked."""
    return {
        str(path.relative_to(folder)): _BUILT_AT.sub(rb"\1<time>", path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _eval_snapshot(folder: Path) -> dict[str, object]:
    """What an evaluation reports: report.json without its wall times, dates and `cached` flags (a rerun reads the
    results the killed run had finished from the cache, and says so), and the other files' names."""
    report = json.loads((folder / "report.json").read_text())

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not _VOLATILE.search(k)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {"report": strip(report), "files": sorted(p.name for p in folder.iterdir())}


def _command(name: str, model: Path, rows: Path, out: str) -> tuple[list[str], list[str]]:
    """(argv, names of the sibling entries a finished run leaves beside `out`)."""
    if name == "build":
        return ["build", "--dataset", str(rows), "--models", str(model), "--output-dir", out], [out]
    if name == "self-output":
        argv = ["self-output", "--dataset", str(rows), "--verifier", "gsm8k", "--models", str(model)]
        argv += ["--num-samples", "2", "--max-new-tokens", "6", "--batch-size", "2", "--output-dir", out]
        return argv, [out, f"{out}-checkpoints"]
    argv = ["eval", "--base", str(model), "--model", f"same={model}", "--tasks", "instruction_following"]
    # The cache folder is named relative to the working directory, so that both runs' reports name the same one
    argv += ["--limit", "6", "--instruction-max-new-tokens", "8", "--output-dir", out, "--cache-dir", "eval-cache"]
    return argv, [out, "eval-cache"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["build", "self-output", "eval"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(command, tmp_path, tiny_model_dir, rows_file):
    snapshot = _eval_snapshot if command == "eval" else _snapshot
    inputs_before = (_snapshot(tiny_model_dir), rows_file.read_bytes())

    reference = tmp_path / "reference"
    reference.mkdir()
    argv, leaves = _command(command, tiny_model_dir, rows_file, "out")
    _, took, _ = _run(argv, reference, reference / "cache")
    expected = snapshot(reference / "out")

    runs = tmp_path / "runs"
    runs.mkdir()
    argv, leaves = _command(command, tiny_model_dir, rows_file, "out")
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).uniform(0.25, 1.0) * took
    code, _, _ = _run(argv, runs, runs / "cache", kill_after=kill_after)
    where = f"killed after {kill_after:.1f} s of {took:.1f} s (exit {code}, seed {seed})"
    if code == 0 and (runs / "out").exists():  # not killed in time: the run finished
        assert snapshot(runs / "out") == expected, where
    elif command != "eval" and (runs / "out").exists():  # a folder that is visible is one a user may load: whole
        assert (runs / "out" / "README.md").is_file(), f"{where}: the folder has configs but no card"

    rerun = argv
    if command == "eval" and (runs / "out" / "report.json").exists():
        # The report was saved before the kill (or the run finished): eval keeps an existing report unless told to
        # replace it, so the rerun a user makes here is the one with --overwrite
        rerun = [*argv, "--overwrite"]
    _run(rerun, runs, runs / "cache")
    got = snapshot(runs / "out")
    if rerun is not argv:  # the report records the command line it was made by, --overwrite included
        got["report"]["command"] = got["report"]["command"].removesuffix(" --overwrite")
    assert got == expected, where
    left = sorted(p.name for p in runs.iterdir() if p.name != "cache")
    assert left == sorted(leaves), f"{where}: {left}"  # no staging folder or temporary file of the killed run
    assert (_snapshot(tiny_model_dir), rows_file.read_bytes()) == inputs_before, where


def test_a_swallowed_sigterm_still_keeps_the_output_out(tmp_path, monkeypatch):
    """SIGTERM raises SystemExit from its handler, which Python swallows when it lands inside a finalizer; the request
    is recorded too, and the step that swaps an output in checks it: no output appears, exit status 143."""
    from datasets import Dataset

    from trl_pplmask import utils
    from trl_pplmask.commands._io import save_atomically

    monkeypatch.setattr(utils, "_termination_signal", signal.SIGTERM)
    with pytest.raises(SystemExit) as exit:
        save_atomically(Dataset.from_dict({"a": [1, 2]}), tmp_path / "out")
    assert exit.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
