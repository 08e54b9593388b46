"""Rerun of the failing cases of issue 18's reliability survey, end to end through the `trl-pplmask` command line.

Every case of the issue's "Why" (items 1-7) is run as `trl-pplmask ...` subprocesses on a tiny random Llama saved with
the embedded tokenizer (where the weights do not matter) or on the embedded SmolLM2-135M-Instruct (the lm-eval
agreement, where they do), offline, on the local data mirror. Each case prints

    PASS  <id>  <what the survey found>  ->  <what happens now>

when the run gives one clear error (what, where, how to fix; no traceback) or the correct result, with its inputs
untouched, and FAIL with the commands' output otherwise. The inventory of which test covers each case is
benchmarks/results/reliability-survey-issue18.md.

Read-only folders and full disks are real where the process may mount (root in a container: a read-only bind mount, a
tmpfs of a chosen size); elsewhere a read-only folder is its mode (`chmod 555`) and the disk-full case is skipped.

Usage: TRL_PPLMASK_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/survey_reliability.py
       [--work DIR] [--only ID[,ID...]] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from testing_utils import TINY_THRESHOLD, sft_args  # noqa: E402  (the helpers the tests share, not a test module)


CLI = str(Path(sys.executable).parent / "trl-pplmask")
TOKEN = "hf_SURVEYplanted0123456789abcdef"  # a planted Hub token: no written file may hold it
ROWS = [
    {"prompt": "What is 2 + 3? ", "completion": "2 + 3 = 5. The answer is 5."},
    {"prompt": "What is 4 * 6? ", "completion": "4 * 6 = 24. The answer is 24."},
    {"prompt": "What is 9 - 7? ", "completion": "9 - 7 = 2. The answer is 2."},
]
MiB = 1 << 20


class Fail(Exception):
    """A case that did not behave: the message says what was wrong, `output` what the commands printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class Skip(Exception):
    """A case this machine cannot run (said in its line)."""


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n[exit {self.code}, {self.seconds:.1f} s]\n{self.out[-3000:]}{self.err[-3000:]}"
        )


@dataclass
class Case:
    item: str
    id: str
    found: str
    run: Callable[[Survey], str]


CASES: list[Case] = []


def case(item: str, case_id: str, found: str):
    """Register a case of item `item`: `found` is what the survey found; the function returns what happens now."""

    def register(fn: Callable[[Survey], str]) -> Callable[[Survey], str]:
        CASES.append(Case(item, case_id, found, fn))
        return fn

    return register


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (hidden ones included) by its path relative to it, with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def files_holding(folder: Path, secret: str = TOKEN) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def error_line(run: Run, *phrases: str) -> str:
    """The one `error:` line of a refused run, checked to hold `phrases`; `Fail` for an exit 0, a traceback, several
    errors or a missing phrase."""
    if run.code == 0:
        raise Fail("exit 0 where an error was expected", run.text)
    if "Traceback" in run.err or run.err.count("error:") != 1:
        raise Fail("not one clear error line (a traceback or several errors)", run.text)
    line = next(line for line in run.err.splitlines() if "error:" in line)
    missing = [p for p in phrases if p not in line]
    if missing:
        raise Fail(f"the error does not say {missing}", run.text)
    return line.split("error:", 1)[1].strip()


def short(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(condition: bool, message: str, *runs: Run) -> None:
    if not condition:
        raise Fail(message, "\n".join(r.text for r in runs))


def load_dataset_folder(path: Path):
    from datasets import load_from_disk

    return load_from_disk(str(path))


def report_metrics(folder: Path, task: str, label: str = "base") -> dict:
    return json.loads((folder / "report.json").read_text())["results"][label][task]


class Survey:
    def __init__(self, work: Path):
        self.work = work
        self._memo: dict[str, object] = {}
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRL_PPLMASK_CACHE": str(work / "cache"),  # a private score and eval cache
        }
        self.env.pop("TRL_PPLMASK_DEBUG", None)
        self.env.pop("HF_TOKEN", None)
        self.data_dir = Path(os.environ["TRL_PPLMASK_DATA_DIR"])
        self.can_mount = os.geteuid() == 0 and self._try_mount()

    # ---- processes -------------------------------------------------------------------------------------------------
    def cli(self, *argv, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> Run:
        argv = [CLI, *map(str, argv)]
        start = time.perf_counter()
        done = subprocess.run(
            argv,
            cwd=cwd or self.work,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Run(argv, done.returncode, done.stdout, done.stderr, time.perf_counter() - start)

    def python(self, code: str, *argv) -> Run:
        """`python -c code argv...` (the command line's entry point with something injected)."""
        full = [sys.executable, "-c", code, *map(str, argv)]
        start = time.perf_counter()
        done = subprocess.run(full, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=900)
        return Run(["python", "-c", "<CARD_WRITE_FAILS>", *full[3:]], done.returncode, done.stdout, done.stderr,
                   time.perf_counter() - start)  # fmt: skip

    def together(self, *argvs: list, env: dict | None = None, cwd: Path | None = None) -> list[Run]:
        """The command lines started at the same moment, each in a process of its own."""
        logs, procs = [], []
        start = time.perf_counter()
        for argv in argvs:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            full = [CLI, *map(str, argv)]
            procs.append(
                (
                    full,
                    subprocess.Popen(
                        full, cwd=cwd or self.work, env={**self.env, **(env or {})}, stdout=out, stderr=err
                    ),
                )
            )
            logs.append((out, err))
        runs = []
        for (full, proc), (out, err) in zip(procs, logs):
            code = proc.wait(timeout=1800)
            out.seek(0), err.seek(0)
            runs.append(Run(full, code, out.read(), err.read(), time.perf_counter() - start))
        return runs

    # ---- read-only folders and small disks -------------------------------------------------------------------------
    def _try_mount(self) -> bool:
        probe = self.work / ".mount-probe"
        probe.mkdir()
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], check=True, capture_output=True
            )
        except (OSError, subprocess.CalledProcessError):
            probe.rmdir()
            return False
        subprocess.run(["umount", str(probe)], check=True)
        probe.rmdir()
        return True

    @contextlib.contextmanager
    def read_only(self, folder: Path) -> Iterator[str]:
        """`folder` read-only while the block runs: a read-only bind mount onto itself (root), or its mode."""
        if self.can_mount:
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            try:
                subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
                yield "a read-only bind mount"
            finally:
                subprocess.run(["umount", str(folder)], check=True)
        else:
            modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
            for p in modes:
                p.chmod(0o555 if p.is_dir() else 0o444)
            try:
                yield "mode 555"
            finally:
                for p, mode in modes.items():
                    p.chmod(mode)

    @contextlib.contextmanager
    def small_disk(self, folder: Path) -> Iterator[Callable[[int], None]]:
        """A tmpfs at `folder`; the block gets `limit(free_bytes)`, which sets its size to what it holds plus that."""
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)], check=True)

        def limit(free: int) -> None:
            st = os.statvfs(folder)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            subprocess.run(["mount", "-o", f"remount,size={used + free}", str(folder)], check=True)

        try:
            yield limit
        finally:
            subprocess.run(["umount", str(folder)], check=True)

    # ---- shared inputs (made once) ---------------------------------------------------------------------------------
    def memo(self, name: str, make: Callable[[], object]):
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    @property
    def tiny(self) -> Path:
        """A 2-layer random Llama with the embedded tokenizer (the tests' `tiny_model_dir`), saved."""

        def make() -> Path:
            return save_tiny_llama(self.work / "tiny-llama")

        return self.memo("tiny", make)

    def tiny_copy(self, name: str) -> Path:
        path = self.work / name
        shutil.copytree(self.tiny, path)
        return path

    @property
    def rows(self) -> Path:
        return self.memo("rows", lambda: write_jsonl(self.work / "rows.jsonl", ROWS))

    @property
    def gsm8k4(self) -> Path:
        """The first 4 GSM8K training rows, `save_to_disk` (an `sft --dataset_name` folder)."""

        def make() -> Path:
            from trl_pplmask.data import load_task

            path = self.work / "gsm8k4"
            load_task("gsm8k", "train", limit=4).save_to_disk(str(path))
            return path

        return self.memo("gsm8k4", make)

    @property
    def built(self) -> Path:
        """A folder built by `trl-pplmask build` (config `a`, the tiny model), kept as made: copy it to change it."""

        def make() -> Path:
            out = self.work / "built"
            run = self.cli(*self.build_argv(out, "a"))
            check(run.code == 0, "build failed", run)
            return out

        return self.memo("built", make)

    def build_argv(self, out: Path, *configs: str, models: int | None = None) -> list:
        tiny = [self.tiny] * (models or len(configs))
        return ["build", "--dataset", self.rows, "--output-dir", out, "--unmasked-splits", "--no-cache",
                "--models", *tiny, "--config-names", *configs]  # fmt: skip

    def built_copy(self, name: str) -> Path:
        path = self.work / name
        shutil.copytree(self.built, path)
        return path

    def sft(self, out: Path, data: Path, *extra, model: Path | None = None, **kwargs) -> Run:
        argv = sft_args(self.work, model or self.tiny, data, *extra)
        argv[argv.index(str(self.work / "out"))] = str(out)
        return self.cli("sft", *argv, **kwargs)


def save_tiny_llama(path: Path) -> Path:
    """A 2-layer random Llama (vocabulary 49152: the embedded tokenizer's) saved with the embedded tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_pplmask.models import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return path


def study_yaml(s: Survey, path: Path, output_dir: Path, **changes) -> Path:
    """A two-arm study (base, gt) of the tiny model on 4 GSM8K rows, evaluated on gsm8k_nll (2 items)."""
    config = {
        "model": str(s.tiny),
        "output_dir": str(output_dir),
        "data": {"task": "gsm8k", "limit": 4},
        "training": {
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": "all-linear",
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 256,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
        },
        "arms": ["base", "gt"],
        "eval": {
            "tasks": ["gsm8k_nll"],
            "target": "gsm8k_nll",
            "limit": 2,
            "n_resamples": 20,
            "cache_dir": str(s.work / "study-eval-cache"),
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section] = {**config[section], name: value}
        else:
            config[section] = value
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


# --------------------------------------------------------------------------------------------------------------------
# 1. Secrets written to files that get published
# --------------------------------------------------------------------------------------------------------------------
def sft_with_token(s: Survey) -> tuple[Run, Path, dict, dict, str]:
    """`sft --hub_token` on a read-only `save_to_disk` folder (2 steps, a checkpoint per step)."""

    def make():
        data = s.gsm8k4
        before = snapshot(data)
        out = s.work / "sft-token"
        with s.read_only(data) as how:
            run = s.sft(out, data, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                        "--pplmask_threshold", TINY_THRESHOLD,
                        "--hub_token", TOKEN, "--run_name", f"run-{TOKEN}")  # fmt: skip
        return run, out, before, snapshot(data), how

    return s.memo("sft_with_token", make)


@case("1", "1.1", "`sft --hub_token hf_...` recorded the token in pplmask_config.json (the command line)")
def _(s: Survey) -> str:
    run, out, _, _, _ = sft_with_token(s)
    check(run.code == 0, "the sft run failed", run)
    check((out / "pplmask_config.json").is_file(), "no pplmask_config.json", run)
    holding = files_holding(out)
    check(holding == [], f"files holding the token: {holding}", run)
    record = json.loads((out / "pplmask_config.json").read_text())
    check("<redacted>" in record["command"], "the recorded command line is not redacted", run)
    n = sum(1 for p in out.rglob("*") if p.is_file())
    return f"exit 0; none of the {n} files written holds the token (command recorded with <redacted>)"


def two_studies(s: Survey):
    """Two `trl-pplmask study` runs of one YAML (training.hub_token planted) started at the same moment."""

    def make():
        root = s.work / "study"
        config = study_yaml(
            s, s.work / "study.yaml", root, training__hub_token=TOKEN, training__run_name=f"study-{TOKEN}"
        )
        runs = s.together(["study", "--config", config], ["study", "--config", config])
        return root, config, runs

    return s.memo("two_studies", make)


@case("1", "1.2", "a study with `training: {hub_token: ...}` copied it into study.json, arm.json and config.yaml")
def _(s: Survey) -> str:
    root, _, runs = two_studies(s)
    winners = [r for r in runs if r.code == 0]
    check(len(winners) == 1, "not exactly one of the two concurrent studies finished", *runs)
    for name in ("study.json", "arms/gt/arm.json", "arms/gt/config.yaml", "arms/gt/pplmask_config.json"):
        check((root / name).is_file(), f"{name} missing", *runs)
    holding = files_holding(root) + files_holding(s.work / "study-eval-cache")
    check(holding == [], f"files holding the token: {holding}", *runs)
    n = sum(1 for p in root.rglob("*") if p.is_file())
    return (
        f"study complete; none of its {n} files (study.json, arm.json, config.yaml, ...) nor the eval cache holds it"
    )


# --------------------------------------------------------------------------------------------------------------------
# 2. Caches that serve stale or wrong results
# --------------------------------------------------------------------------------------------------------------------
def nlls(folder: Path) -> list[list[float]]:
    return load_dataset_folder(folder)["token_nll"]


@case("2", "2.1", "the score cache sampled 256 values per tensor: edited embedding rows reused the old NLLs")
def _(s: Survey) -> str:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    model = s.tiny_copy("tiny-embedding-edit")
    first = s.cli("score", "--dataset", s.rows, "--model", model, "--output-dir", s.work / "emb-1")
    check(first.code == 0, "score failed", first)
    tokens = sorted({t for row in load_dataset_folder(s.work / "emb-1")["input_ids"] for t in row})
    weights = load_file(model / "model.safetensors")
    name = "model.embed_tokens.weight"
    # the embedding rows of the tokens the rows hold; rows off any stride of sampled values (none is a multiple of 8)
    edited = [t for t in tokens if t % 8]
    weights[name] = weights[name].copy()
    weights[name][edited] += np.float32(0.5)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    cached = s.cli("score", "--dataset", s.rows, "--model", model, "--output-dir", s.work / "emb-2")
    fresh = s.cli("score", "--dataset", s.rows, "--model", model, "--output-dir", s.work / "emb-3", "--no-cache")
    check(cached.code == 0 and fresh.code == 0, "a rescore failed", cached, fresh)
    a, b, c = nlls(s.work / "emb-1"), nlls(s.work / "emb-2"), nlls(s.work / "emb-3")
    check(b == c, "the cached rescore differs from a --no-cache one", cached, fresh)
    check(b != a, "the edit did not change the NLLs (the case shows nothing)", cached, fresh)
    moved = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return (
        f"{len(edited)} embedding rows edited: the cached rescore equals --no-cache (NLLs moved up to {moved:.2f}), "
        "not the old entry"
    )


def middle_region(path: Path) -> tuple[str, int, int]:
    """The bytes of the float32 tensor that holds the middle of a safetensors file, clipped to lie wholly between the
    file's first and last MiB: (tensor name, start, end), `end - start` a multiple of 4 from the tensor's start."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    size, base = path.stat().st_size, 8 + n
    middle = size // 2
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = (base + offset for offset in info["data_offsets"])
        if a <= middle < b:
            start = a + max(0, -(-(MiB - a) // 4) * 4)
            end = b - max(0, -(-(b - (size - MiB)) // 4) * 4)
            if end > start:
                return name, start, end
    raise Fail(f"no float32 tensor of {path} holds its middle")


@case("2", "2.2", "the eval cache keyed weights on size + first and last MiB: a mid-file edit reported +0.000")
def _(s: Survey) -> str:
    import numpy as np

    model = s.tiny_copy("tiny-middle-edit")
    cache = s.work / "eval-cache-middle"
    argv = ["eval", "--base", model, "--tasks", "gsm8k_nll", "--limit", "2", "--bootstrap", "20", "--cache-dir", cache]
    first = s.cli(*argv, "--output-dir", s.work / "mid-1")
    check(first.code == 0, "eval failed", first)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    name, a, b = middle_region(weights)
    values = np.frombuffer(bytes(data[a:b]), dtype=np.float32) * np.float32(8.0)
    data[a:b] = values.tobytes()
    before = weights.read_bytes()
    weights.write_bytes(bytes(data))
    check(
        len(data) == len(before) and data[:MiB] == before[:MiB] and data[-MiB:] == before[-MiB:],
        "the edit touched the first or last MiB or the size",
    )
    cached = s.cli(*argv, "--output-dir", s.work / "mid-2")
    fresh = s.cli(*argv, "--output-dir", s.work / "mid-3", "--no-cache")
    check(cached.code == 0 and fresh.code == 0, "an eval after the edit failed", cached, fresh)
    m1, m2, m3 = (report_metrics(s.work / f"mid-{i}", "gsm8k_nll")["metrics"] for i in (1, 2, 3))
    check(m2 == m3, f"cached {m2} differs from --no-cache {m3}", cached, fresh)
    check(m2 != m1, "the edit did not change the metrics (the case shows nothing)", cached, fresh)
    key = next(k for k in m1 if isinstance(m1[k], float))
    return (
        f"{name}: bytes {a}-{b} of {len(data)} x8 (first/last MiB and size unchanged): cached "
        f"{key} {m2[key]:.4f} = --no-cache {m3[key]:.4f} (before the edit {m1[key]:.4f})"
    )


def damaged_cache_rerun(s: Survey, damage: str) -> str:
    import numpy as np

    def first_score() -> Path:
        cache = s.work / "cache-first"
        run = s.cli("score", "--dataset", s.rows, "--model", s.tiny, "--output-dir", s.work / "first",
                    env={"TRL_PPLMASK_CACHE": str(cache)})  # fmt: skip
        check(run.code == 0, "score failed", run)
        return cache

    cache = s.work / f"cache-{damage}"
    shutil.copytree(s.memo("first_score", first_score), cache)  # the cache of a first score of the rows
    env = {"TRL_PPLMASK_CACHE": str(cache)}
    (entry,) = (cache / "scores").glob("*.npz")
    good = entry.read_bytes()
    if damage == "short":
        with np.load(entry) as npz:
            arrays = dict(npz)
        lengths = arrays["lengths"].copy()
        cut = int(lengths[0]) // 3
        arrays["lengths"] = np.concatenate([[lengths[0] - cut], lengths[1:]]).astype(lengths.dtype)
        arrays["values"] = np.concatenate([arrays["values"][: lengths[0] - cut], arrays["values"][lengths[0] :]])
        with open(entry, "wb") as f:
            np.savez(f, **arrays)
        what = f"row 0 given {cut} NLLs fewer than its tokens"
    elif damage == "empty":
        entry.write_bytes(b"")
        what = "an empty entry"
    else:
        entry.write_bytes(good[: len(good) // 2])
        what = "an entry cut in half"
    again = s.cli("score", "--dataset", s.rows, "--model", s.tiny, "--output-dir", s.work / f"{damage}-2", env=env)
    check(again.code == 0, "the rerun on the damaged entry failed", again)
    scored = load_dataset_folder(s.work / f"{damage}-2")
    aligned = all(len(n) == len(i) for n, i in zip(scored["token_nll"], scored["input_ids"]))
    check(aligned, "token_nll and input_ids differ in length", again)
    check(scored["token_nll"] == nlls(s.work / "first"), "the rerun's NLLs differ from the first run's", again)
    check(entry.read_bytes() == good, "the damaged entry was not replaced by a sound one", again)
    return (
        f"{what}: a miss; the rerun exits 0, each row's NLLs as long as its tokens, = the first run's; entry replaced"
    )


@case(
    "2", "2.3", "a cache entry shorter than its rows saved a misaligned dataset (314 tokens, 214 NLLs), then crashed"
)
def _(s: Survey) -> str:
    return damaged_cache_rerun(s, "short")


@case("2", "2.4", "an empty cache entry broke every rerun (BadZipFile)")
def _(s: Survey) -> str:
    return damaged_cache_rerun(s, "empty")


@case("2", "2.5", "a truncated cache entry broke every rerun (EOFError)")
def _(s: Survey) -> str:
    return damaged_cache_rerun(s, "truncated")


@case("2", "2.6", "`score` had no --no-cache")
def _(s: Survey) -> str:
    cache = s.work / "cache-none"
    run = s.cli("score", "--dataset", s.rows, "--model", s.tiny, "--output-dir", s.work / "nocache", "--no-cache",
                env={"TRL_PPLMASK_CACHE": str(cache)})  # fmt: skip
    check(run.code == 0, "score --no-cache failed", run)
    entries = list(cache.rglob("*.npz"))
    check(entries == [], f"--no-cache wrote {entries}", run)
    return "score --no-cache exits 0 and neither reads nor writes a cache entry"


# --------------------------------------------------------------------------------------------------------------------
# 3. Silent wrong training
# --------------------------------------------------------------------------------------------------------------------
def eval_split_runs(s: Survey):
    def make():
        from datasets import DatasetDict

        from trl_pplmask.data import load_task

        data = s.work / "gsm8k-splits"
        DatasetDict(
            {"train": load_task("gsm8k", "train", limit=4), "test": load_task("gsm8k", "test", limit=3)}
        ).save_to_disk(str(data))
        # learning rate 0: both runs evaluate the same weights after their step; only the eval labels could differ
        common = ["--max_steps", "1", "--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps", "1",
                  "--per_device_eval_batch_size", "2"]  # fmt: skip
        plain = s.sft(s.work / "eval-plain", data, *common, "--pplmask_strategy", "none")
        masked = s.sft(s.work / "eval-masked", data, *common, "--pplmask_threshold", TINY_THRESHOLD)
        return plain, masked

    return s.memo("eval_split", make)


def eval_loss(out: Path) -> float:
    state = json.loads((out / "trainer_state.json").read_text())
    return next(e["eval_loss"] for e in state["log_history"] if "eval_loss" in e)


@case("3", "3.1", "with an eval split, `sft` masked the eval labels too (eval_loss 0)")
def _(s: Survey) -> str:
    plain, masked = eval_split_runs(s)
    check(plain.code == 0 and masked.code == 0, "an sft run failed", plain, masked)
    ours, stock = eval_loss(s.work / "eval-masked"), eval_loss(s.work / "eval-plain")
    check(ours > 0 and abs(ours - stock) <= 1e-6 * stock, f"eval_loss {ours} vs unmasked {stock}", plain, masked)
    masked_fraction = json.loads((s.work / "eval-masked" / "pplmask_config.json").read_text())["mask_stats"]
    return (
        f"eval_loss {ours:.4f} with {masked_fraction['masked_fraction']:.0%} of training tokens masked = "
        f"{stock:.4f} unmasked (pplmask_strategy none)"
    )


@case("3", "3.2", "eval rows were counted in the mask statistics")
def _(s: Survey) -> str:
    _, masked = eval_split_runs(s)
    check(masked.code == 0, "the sft run failed", masked)
    stats = json.loads((s.work / "eval-masked" / "pplmask_config.json").read_text())["mask_stats"]
    check(stats["examples"] == 2, f"mask_stats counts {stats['examples']} examples, not the 2 trained", masked)
    return "mask_stats counts the 2 training rows of the one step, none of the 3 eval rows"


@case("3", "3.3", "on-the-fly masking of every token trained nothing and exited 0 with a 'finished' model")
def _(s: Survey) -> str:
    out = s.work / "all-masked"
    run = s.sft(out, s.gsm8k4, "--max_steps", "-1", "--num_train_epochs", "1")  # threshold 2.5: masks every token
    line = error_line(run, "masked every one of the", "nothing was trained")
    saved = [p.name for p in out.glob("*") if p.name in ("pplmask_config.json", "adapter_model.safetensors")]
    check(saved == [], f"written anyway: {saved}", run)
    return f"exit {run.code} after the first epoch, no model or pplmask_config.json: {short(line)}"


def bert_folder(s: Survey) -> Path:
    def make() -> Path:
        path = s.work / "bert"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
        return path

    return s.memo("bert", make)


@case("3", "3.4", "a non-causal model (BertForMaskedLM) was accepted as `sft --model_name_or_path`")
def _(s: Survey) -> str:
    run = s.sft(s.work / "bert-out", s.gsm8k4, model=bert_folder(s))
    line = error_line(run, "BertForMaskedLM", "not a causal language model")
    check(not (s.work / "bert-out").exists(), "an output folder was made", run)
    return f"exit {run.code}: {short(line)}"


@case("3", "3.5", "a non-causal model was accepted as `pplmask_reference`")
def _(s: Survey) -> str:
    run = s.sft(s.work / "bert-ref", s.gsm8k4, "--pplmask_reference", bert_folder(s))
    line = error_line(run, "pplmask_reference", "BertForMaskedLM")
    check(not (s.work / "bert-ref").exists(), "an output folder was made", run)
    return f"exit {run.code}: {short(line)}"


@case("3", "3.6", "a non-causal model was accepted as `score --model` (its NLLs see later tokens)")
def _(s: Survey) -> str:
    run = s.cli("score", "--dataset", s.rows, "--model", bert_folder(s), "--output-dir", s.work / "bert-score")
    line = error_line(run, "BertForMaskedLM", "not a causal language model")
    check(not (s.work / "bert-score").exists(), "an output folder was made", run)
    return f"exit {run.code}: {short(line)}"


# --------------------------------------------------------------------------------------------------------------------
# 4. No single writer
# --------------------------------------------------------------------------------------------------------------------
def one_writer(runs: list[Run], out: Path, rows: int) -> str:
    winners, losers = [r for r in runs if r.code == 0], [r for r in runs if r.code != 0]
    check(len(winners) == 1, f"{len(winners)} of the 2 runs exited 0", *runs)
    line = error_line(losers[0], str(out))
    check("PID" in line or "--overwrite" in line, "the refusal names neither the holder's PID nor --overwrite", *runs)
    check(len(load_dataset_folder(out)) == rows, "the output is not the winner's complete dataset", *runs)
    how = "held by the other (its PID named)" if "PID" in line else "not empty (--overwrite named)"
    return f"one run wrote {rows} rows; the other exited {losers[0].code}, the output {how}: {short(line, 110)}"


@case("4", "4.1", "two `score` runs into one --output both exited 0 and one silently won")
def _(s: Survey) -> str:
    out = s.work / "shared-score"
    argv = ["score", "--dataset", "gsm8k", "--limit", "48", "--model", s.tiny, "--output-dir", out, "--no-cache"]
    return one_writer(s.together(argv, argv), out, 48)


@case("4", "4.2", "two `mask` runs into one --output both exited 0 and one silently won")
def _(s: Survey) -> str:
    scored = s.work / "shared-score"
    if not scored.is_dir():
        raise Fail("needs case 4.1's scored output")
    out = s.work / "shared-mask"
    argv = ["mask", "--input", scored, "--output-dir", out, "--threshold", TINY_THRESHOLD]
    return one_writer(s.together(argv, argv), out, 48)


@case("4", "4.3", "two studies into one output_dir trained the same arm folder at the same time")
def _(s: Survey) -> str:
    root, _, runs = two_studies(s)
    losers = [r for r in runs if r.code != 0]
    check(len(losers) == 1, "not exactly one of the two concurrent studies was refused", *runs)
    line = error_line(losers[0], "PID", str(root))
    return f"one study ran, the other exited {losers[0].code} at once ({losers[0].seconds:.0f} s): {short(line, 110)}"


# --------------------------------------------------------------------------------------------------------------------
# 5. Data loss
# --------------------------------------------------------------------------------------------------------------------
@case("5", "5.1", "a failed `sft` rerun into a finished run's folder deleted its pplmask_config.json first")
def _(s: Survey) -> str:
    first, out, _, _, _ = sft_with_token(s)
    check(first.code == 0, "needs case 1.1's finished run", first)
    before = snapshot(out)
    qa = write_jsonl(s.work / "qa.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    run = s.sft(out, qa, "--max_steps", "2")
    line = error_line(run, "qa.jsonl")
    check(snapshot(out) == before, "the finished run's folder changed", run)
    return f"exit {run.code}, the finished run's {len(before)} files (pplmask_config.json too) kept: {short(line, 90)}"


@case("5", "5.2", "`eval --output` replaced an existing report.json without --overwrite")
def _(s: Survey) -> str:
    folder = s.work / "mid-1"  # case 2.2's first report
    if not (folder / "report.json").is_file():
        raise Fail("needs case 2.2's report")
    before = snapshot(folder)
    argv = ["eval", "--base", s.tiny, "--tasks", "gsm8k_nll", "--limit", "2", "--bootstrap", "20"]
    argv += ["--output-dir", folder]
    refused = s.cli(*argv)
    line = error_line(refused, "already holds a report", "--overwrite")
    check(snapshot(folder) == before, "the report folder changed", refused)
    replaced = s.cli(*argv, "--overwrite")
    check(replaced.code == 0 and snapshot(folder) != before, "--overwrite did not replace the report", replaced)
    return f"refused (exit {refused.code}), report kept: {short(line, 90)}; with --overwrite replaced"


@case("5", "5.3", "`build` adding a model discarded hand edits to the card without a word")
def _(s: Survey) -> str:
    out = s.built_copy("built-hand-edits")
    readme = out / "README.md"
    own = "\n## Our notes\n\nHand-written: reviewed by the data team.\n"
    readme.write_text(readme.read_text() + own)
    add = s.cli(*s.build_argv(out, "a", "b"))
    check(add.code == 0, "adding config b failed", add)
    text = readme.read_text()
    check(text.endswith(own) and "config_name: b" in text, "the hand-written text or config b is missing", add)
    readme.write_text(text.replace("\n# ", "\n# Edited inside the generated part: ", 1))
    before = snapshot(out)
    edit = s.cli(*s.build_argv(out, "a", "b", "c"))
    line = error_line(edit, str(readme), "--overwrite")
    check(snapshot(out) == before, "the folder changed", edit)
    return f"text below the card kept when config b is added; an edit of the generated part refused: {short(line, 80)}"


@case(
    "5",
    "5.4",
    "`sft --dataset_name <save_to_disk folder>` wrote cache-*.arrow into it (and failed on a read-only one)",
)
def _(s: Survey) -> str:
    run, _, before, after, how = sft_with_token(s)
    check(run.code == 0, f"sft on the read-only folder ({how}) failed", run)
    check(after == before, f"the folder changed: {sorted(set(after) ^ set(before))}", run)
    return f"sft trained from the folder as {how} (exit 0); its {len(before)} files unchanged, no cache-*.arrow"


# --------------------------------------------------------------------------------------------------------------------
# 6. Late, raw or misleading errors
# --------------------------------------------------------------------------------------------------------------------
def refused_before_work(s: Survey, run: Run, out: Path, *phrases: str) -> str:
    line = error_line(run, *phrases)
    check(not out.exists(), f"{out} was made", run)
    return f"exit {run.code} in {run.seconds:.1f} s, nothing written: {short(line)}"


@case("6", "6.1", "`sft --pplmask_threshold inf` failed only after training (JSON dump)")
def _(s: Survey) -> str:
    out = s.work / "sft-inf"
    return refused_before_work(s, s.sft(out, s.gsm8k4, "--pplmask_threshold", "inf"), out, "pplmask_threshold=inf")


@case("6", "6.2", "`sft` on a question/answer JSONL: KeyError: 'text' traceback")
def _(s: Survey) -> str:
    qa = write_jsonl(s.work / "qa.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    out = s.work / "sft-qa"
    return refused_before_work(s, s.sft(out, qa), out, "qa.jsonl", "columns ['answer', 'question']")


@case("6", "6.3", "`sft --config` with invalid YAML: a traceback")
def _(s: Survey) -> str:
    bad = s.work / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\nlora_target_modules: [q_proj, v_proj\n")
    out = s.work / "sft-bad-yaml"
    return refused_before_work(s, s.sft(out, s.gsm8k4, "--config", bad), out, "bad.yaml, line 3", "not valid YAML")


@case("6", "6.4", "`sft --config` with a `!!python` tag: a raw ConstructorError (nothing executed)")
def _(s: Survey) -> str:
    marker = s.work / "PWNED"
    tag = s.work / "tag.yaml"
    tag.write_text(f'learning_rate: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = s.work / "sft-tag"
    detail = refused_before_work(s, s.sft(out, s.gsm8k4, "--config", tag), out, "tag.yaml, line 1", "not allowed")
    check(not marker.exists(), "the tag was executed")
    return detail + " (nothing executed)"


def missing_shard(s: Survey) -> tuple[Path, str]:
    def make():
        folder = s.built_copy("built-missing-shard")
        shard = sorted((folder / "a").glob("train-*"))[0]
        shard.unlink()
        return folder, shard.name

    return s.memo("missing_shard", make)


@case("6", "6.5", "`sft` on a built folder with a missing shard: a traceback")
def _(s: Survey) -> str:
    folder, name = missing_shard(s)
    before = snapshot(folder)
    out = s.work / "sft-missing-shard"
    detail = refused_before_work(s, s.sft(out, folder, "--dataset_config", "a"), out, "lacks 1 data file", f"a/{name}")
    check(snapshot(folder) == before, "the built folder changed")
    return detail


@case("6", "6.6", "`build --config-names '*'` exited 0 with a folder nothing can load")
def _(s: Survey) -> str:
    out = s.work / "built-glob"
    return refused_before_work(s, s.cli(*s.build_argv(out, "*")), out, "Invalid config name '*'")


@case("6", "6.7a", "a disk filling while `build` adds a config left the config committed and the card without it")
def _(s: Survey) -> str:
    if not s.can_mount:
        raise Skip("needs a tmpfs mount (root): no full disk to fill here")
    # What adding config b writes, measured on an ordinary disk
    probe = s.built_copy("built-add-probe")
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    add = s.cli(*s.build_argv(probe, "b"))
    check(add.code == 0, "adding config b failed", add)
    grown = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file()) - size
    complete = set(snapshot(probe))
    page = os.sysconf("SC_PAGE_SIZE")
    disk = s.work / "small-disk"
    outcomes: dict[int, str] = {}

    def attempt(free: int) -> bool:
        """Add config b with `free` bytes left on the disk; True when the build completed. A failed build must leave
        the folder as it was and nothing beside it but its resumable work folder, and a rerun with space completes."""
        folder = disk / f"built-{free}"
        shutil.copytree(s.built, folder)
        before = snapshot(folder)
        limit(free)
        run = s.cli(*s.build_argv(folder, "b"))
        limit(256 * MiB)
        if run.code == 0:
            check(set(snapshot(folder)) == complete, f"{free} B free: exit 0 but the folder lacks files", run)
            outcomes[free] = "complete"
        else:
            line = error_line(run, "No space left on device", str(folder), "Free space")
            check(snapshot(folder) == before, f"{free} B free: the folder changed after the failure", run)
            beside = [p.name for p in disk.iterdir() if p.name != folder.name]
            check(all(n.endswith("-pplmask-work") for n in beside), f"{free} B free: left beside it {beside}", run)
            stage = "the commit and card" if "b/train:" in run.out else "the scores and shards"
            outcomes[free] = f"ENOSPC during {stage}, folder as before"
            again = s.cli(*s.build_argv(folder, "b"))
            check(again.code == 0 and set(snapshot(folder)) == complete, f"{free} B free: the rerun failed", again)
            outcomes[free] += " (rerun completes)"
            if free == 0:
                outcomes[free] += f": {short(line, 70)}"
        shutil.rmtree(folder)
        for leftover in disk.iterdir():
            shutil.rmtree(leftover)
        return run.code == 0

    with s.small_disk(disk) as limit:
        # The last write of the build decides the largest free size that still fails: bisect for it (pages)
        low, high = 0, 4 * grown // page + 16
        check(not attempt(0) and attempt(high * page), "0 B free did not fail or ample space did not complete")
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if attempt(middle * page) else (middle, high)
    lines = [f"{free} B free: {outcome}" for free, outcome in sorted(outcomes.items())]
    return f"config b adds {grown} B; bisected on a tmpfs: " + "; ".join(lines)


# The card is written once the shards' work folder is gone, so a real disk fills earlier (6.7a): the card write itself
# fails here by injection, in a `python -c` around the command line's own entry point
CARD_WRITE_FAILS = """
import errno, os, sys
from pathlib import Path
from trl_pplmask.hub import card
write = card.atomic_write_text
def disk_full(path, text):
    if Path(path).name == "README.md":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    write(path, text)
card.atomic_write_text = disk_full
from trl_pplmask.cli import main
sys.exit(main(sys.argv[1:]))
"""


@case("6", "6.7b", "... the same at the card write: the config committed and the card without it")
def _(s: Survey) -> str:
    folder = s.built_copy("built-card-enospc")
    before, around = snapshot(folder), sorted(p.name for p in s.work.iterdir())
    run = s.python(CARD_WRITE_FAILS, *s.build_argv(folder, "b"))
    line = error_line(run, "No space left on device", str(folder), "Free space")
    check(snapshot(folder) == before, "the folder changed: config b committed without the card", run)
    beside = sorted(set(p.name for p in s.work.iterdir()) - set(around))
    check(beside in ([], [f".{folder.name}-pplmask-work"]), f"left beside the folder: {beside}", run)
    again = s.cli(*s.build_argv(folder, "b"))
    check(again.code == 0 and "config_name: b" in (folder / "README.md").read_text(), "the rerun failed", again)
    check(sorted(p.name for p in s.work.iterdir()) == around, "the rerun left its work folder", again)
    kept = " (its resumable work folder kept beside it)" if beside else ""
    return f"exit {run.code}, folder as it was{kept}: {short(line, 80)}; the rerun completes and cleans up"


@case("6", "6.8", "`push --dry-run` accepted a folder with a missing shard")
def _(s: Survey) -> str:
    folder, name = missing_shard(s)
    run = s.cli("push", folder, "--dry-run", "--repo-id", "org/data")
    line = error_line(run, "lacks 1 data file", f"a/{name}")
    return f"exit {run.code}: {short(line)}"


@case("6", "6.9", "`push --dry-run` accepted a folder whose card header is broken")
def _(s: Survey) -> str:
    folder = s.built_copy("built-broken-card")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("configs:\n", "configs: [\n", 1))
    run = s.cli("push", folder, "--dry-run", "--repo-id", "org/data")
    line = error_line(run, "README.md", "YAML header is not valid YAML")
    return f"exit {run.code}: {short(line)}"


def no_tokenizer(s: Survey) -> Path:
    def make() -> Path:
        path = s.work / "no-tokenizer"
        path.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(s.tiny / name, path / name)
        return path

    return s.memo("no_tokenizer", make)


@case("6", "6.10a", "`score`: missing tokenizer files -> 'install sentencepiece or tiktoken'")
def _(s: Survey) -> str:
    out = s.work / "score-no-tokenizer"
    run = s.cli("score", "--dataset", s.rows, "--model", no_tokenizer(s), "--output-dir", out)
    return refused_before_work(s, run, out, "has no tokenizer files", "holds config.json")


@case("6", "6.10b", "`sft`: missing tokenizer files -> 'install sentencepiece or tiktoken'")
def _(s: Survey) -> str:
    out = s.work / "sft-no-tokenizer"
    run = s.sft(out, s.gsm8k4, model=no_tokenizer(s))
    return refused_before_work(s, run, out, "has no tokenizer files")


def latin1(s: Survey) -> Path:
    def make() -> Path:
        path = s.work / "latin1.jsonl"
        path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9?", "completion": "A"}\n')
        return path

    return s.memo("latin1", make)


@case("6", "6.11a", "`score` on a non-UTF-8 file: no file or line")
def _(s: Survey) -> str:
    out = s.work / "score-latin1"
    run = s.cli("score", "--dataset", latin1(s), "--model", s.tiny, "--output-dir", out)
    return refused_before_work(s, run, out, "latin1.jsonl is not UTF-8: line 2, column 16")


@case("6", "6.11b", "`sft` on a non-UTF-8 file: no file or line")
def _(s: Survey) -> str:
    out = s.work / "sft-latin1"
    return refused_before_work(s, s.sft(out, latin1(s)), out, "latin1.jsonl is not UTF-8: line 2")


@case("6", "6.11c", "a study YAML that is not UTF-8: no file or line")
def _(s: Survey) -> str:
    path = s.work / "latin1-study.yaml"
    path.write_bytes(b"model: caf\xe9\n")
    run = s.cli("study", "--config", path, "--output-dir", s.work / "study-latin1")
    return refused_before_work(s, run, s.work / "study-latin1", "latin1-study.yaml is not UTF-8: line 1")


def mixed(s: Survey) -> Path:
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    return s.memo("mixed", lambda: write_jsonl(s.work / "mixed.jsonl", [*ROWS[:2], chat]))


@case("6", "6.12a", "`score`: a `messages` row among prompt/completion rows -> \"column 'prompt' is empty\"")
def _(s: Survey) -> str:
    out = s.work / "score-mixed"
    run = s.cli("score", "--dataset", mixed(s), "--model", s.tiny, "--output-dir", out)
    return refused_before_work(s, run, out, "Row 2 is in the 'messages' format", "row 0 is 'prompt_completion'")


@case("6", "6.12b", "`sft`: a `messages` row among prompt/completion rows -> \"column 'prompt' is empty\"")
def _(s: Survey) -> str:
    out = s.work / "sft-mixed"
    return refused_before_work(s, s.sft(out, mixed(s)), out, "Row 2 is in the 'messages'")


@case("6", "6.13", "a YAML 1.1 string threshold (`1.0e9`) in a study -> a str/float TypeError")
def _(s: Survey) -> str:
    path = s.work / "study-1e9.yaml"
    text = study_yaml(s, path, s.work / "study-1e9", arms=["base", "stm"]).read_text()
    path.write_text(text.rstrip().rstrip("}") + ', "mask": {"threshold": 1.0e9}}\n')
    check("1.0e9" in path.read_text(), "the YAML does not hold 1.0e9")
    run = s.cli("study", "--config", path, "--plan")
    check(run.code == 0, "study --plan failed", run)
    check("pplmask_threshold=1000000000.0" in run.out, "the stm arm does not get the threshold 1e9", run)
    return "study --plan exits 0; the stm arm trains with pplmask_threshold=1000000000.0"


@case("6", "6.14", "`study --plan` called an arm 'finished' that the run then refused")
def _(s: Survey) -> str:
    root, _, runs = two_studies(s)
    check(any(r.code == 0 for r in runs), "needs case 1.2's finished study", *runs)
    same = s.cli("study", "--config", s.work / "study.yaml", "--plan")
    check(same.code == 0 and "finished" in same.out, "the plan of the finished study does not say 'finished'", same)
    changed = study_yaml(s, s.work / "study-fewer.yaml", root, data={"task": "gsm8k", "limit": 2})
    before = snapshot(root / "arms")
    plan = s.cli("study", "--config", changed, "--plan")
    check(plan.code == 0, "study --plan failed", plan)
    gt = [line for line in plan.out.splitlines() if "gt" in line and ("finished" in line or "refused" in line)]
    check(
        gt and "refused" in gt[0] and "finished" not in gt[0].split("refused")[0], "the plan calls gt finished", plan
    )
    run = s.cli("study", "--config", changed)
    error_line(run, "prepared from other data")
    check(snapshot(root / "arms") == before, "the arms changed", run)
    return f"plan: {short(gt[0].strip(), 80)}; the run refuses the same (exit {run.code}), arms untouched"


@case("6", "6.15", "`build --config-names README.md` -> EISDIR after scoring")
def _(s: Survey) -> str:
    out = s.work / "built-readme"
    return refused_before_work(s, s.cli(*s.build_argv(out, "README.md")), out, "Invalid config name 'README.md'")


@case("6", "6.16", "`score --output . --overwrite` -> EBUSY plus an empty `.-old-*` folder")
def _(s: Survey) -> str:
    here = s.work / "cwd"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    rows, tiny = s.rows, s.tiny  # made before the folder is listed
    before, around = snapshot(here), sorted(p.name for p in s.work.iterdir())
    run = s.cli("score", "--dataset", rows, "--model", tiny, "--output-dir", ".", "--overwrite", cwd=here)
    line = error_line(run, "--output-dir . is the current directory")
    check(snapshot(here) == before, "the current directory changed", run)
    check(sorted(p.name for p in s.work.iterdir()) == around, "a folder was left beside it", run)
    return f"exit {run.code}, the folder and its parent unchanged: {short(line)}"


@case("6", "6.16b", "... the same class of case: `score --output <mount point>` -> EBUSY after all the scoring")
def _(s: Survey) -> str:
    if not s.can_mount:
        raise Skip("needs a tmpfs mount (root)")
    volume = s.work / "volume"
    with s.small_disk(volume):  # an empty mounted volume, as a container's `-v host:/out`
        run = s.cli("score", "--dataset", s.rows, "--model", s.tiny, "--output-dir", volume)
        line = error_line(run, f"--output-dir {volume} is a mount point")
        check(list(volume.iterdir()) == [], "the volume was written", run)
    check(sorted(p.name for p in s.work.iterdir() if p.name.startswith(".volume")) == [], "left beside it", run)
    return f"exit {run.code} in {run.seconds:.1f} s, before scoring: {short(line)}"


@case(
    "6", "6.16c", "... and `build --output-dir <mount point>` -> EBUSY (EXDEV adding a config) after all the scoring"
)
def _(s: Survey) -> str:
    if not s.can_mount:
        raise Skip("needs a tmpfs mount (root)")
    volume = s.work / "volume-build"
    argv = s.build_argv(volume, "a")  # the tiny model and rows made before the folder is listed
    volume.mkdir()
    around = sorted(p.name for p in s.work.iterdir())
    with s.small_disk(volume):
        run = s.cli(*argv)
        line = error_line(run, f"Output folder {volume} is a mount point")
        check(list(volume.iterdir()) == [], "the volume was written", run)
    check(sorted(p.name for p in s.work.iterdir()) == around, "something was left beside it", run)
    return f"exit {run.code} in {run.seconds:.1f} s, before scoring: {short(line)}"


def read_only_place(s: Survey, name: str) -> Path:
    folder = s.work / name
    folder.mkdir()
    return folder


@case("6", "6.17a", "`score` into a read-only output: reported only after all the scoring")
def _(s: Survey) -> str:
    place = read_only_place(s, "ro-output")
    with s.read_only(place) as how:
        run = s.cli("score", "--dataset", "gsm8k", "--limit", "48", "--model", s.tiny, "--output-dir", place / "out")
    line = error_line(run, "--output-dir", "cannot be written", str(place))
    check("Scored" not in run.out, "it scored first", run)
    return f"({how}) exit {run.code} in {run.seconds:.1f} s, before scoring: {short(line, 100)}"


@case("6", "6.17b", "`score` with a read-only score cache: reported only after all the scoring")
def _(s: Survey) -> str:
    place = read_only_place(s, "ro-cache")
    with s.read_only(place) as how:
        run = s.cli("score", "--dataset", "gsm8k", "--limit", "48", "--model", s.tiny, "--output-dir", s.work / "ro-c",
                    env={"TRL_PPLMASK_CACHE": str(place)})  # fmt: skip
    line = error_line(run, "score cache", "--no-cache")
    check("Scored" not in run.out and not (s.work / "ro-c").exists(), "it scored first", run)
    return f"({how}) exit {run.code} in {run.seconds:.1f} s, before scoring: {short(line, 100)}"


@case("6", "6.17c", "`build` with a read-only score cache: reported after the first shard was scored")
def _(s: Survey) -> str:
    place = read_only_place(s, "ro-build-cache")
    out = s.work / "ro-built"
    argv = [a for a in s.build_argv(out, "a") if a != "--no-cache"]
    with s.read_only(place) as how:
        run = s.cli(*argv, "--cache-dir", place)
    return f"({how}) " + refused_before_work(s, run, out, "score cache", "--no-cache")


@case("6", "6.17d", "`eval` with a read-only result cache: reported when first written")
def _(s: Survey) -> str:
    place = read_only_place(s, "ro-eval-cache")
    out = s.work / "ro-eval"
    with s.read_only(place) as how:
        run = s.cli("eval", "--base", s.tiny, "--tasks", "gsm8k_nll", "--limit", "2", "--output-dir", out,
                    "--cache-dir", place)  # fmt: skip
    return f"({how}) " + refused_before_work(s, run, out, "eval cache", "--no-cache")


@case("6", "6.18", "a resumed `sft` counted only the resumed steps in its statistics without saying so")
def _(s: Survey) -> str:
    first, out, _, _, _ = sft_with_token(s)
    check(first.code == 0 and (out / "checkpoint-1").is_dir(), "needs case 1.1's run and its checkpoint-1", first)
    resumed = s.work / "sft-resumed"
    shutil.copytree(out, resumed)
    run = s.sft(resumed, s.gsm8k4, "--max_steps", "2", "--save_strategy", "no", "--pplmask_threshold", TINY_THRESHOLD,
                "--resume_from_checkpoint", resumed / "checkpoint-1")  # fmt: skip
    check(run.code == 0, "the resumed run failed", run)
    record = json.loads((resumed / "pplmask_config.json").read_text())
    scope = record["mask_stats_scope"]
    check(scope.startswith("steps 2-2 only"), f"mask_stats_scope is {scope!r}", run)
    check("are not counted" in run.out + run.err, "the log does not say so", run)
    return f"the log and pplmask_config.json say: mask_stats_scope {short(scope, 90)!r}"


@case("6", "6.19", "`build --repo-id` accepted arbitrary text into the card's snippets")
def _(s: Survey) -> str:
    out = s.work / "built-repo-id"
    run = s.cli(*s.build_argv(out, "a"), "--repo-id", "org/data\n![x](https://example.com/x.png)")
    return refused_before_work(s, run, out, "--repo-id", "is not a valid Hub repo id")


# --------------------------------------------------------------------------------------------------------------------
# 7. The lm-eval bridge
# --------------------------------------------------------------------------------------------------------------------
N_ARC = 20


def lm_eval_runs(s: Survey):
    """`eval --backend lm-eval` and `--backend builtin` on the embedded model, first N_ARC ARC-Challenge test items and
    2 GSM8K ones, no --device, no GPU visible, offline."""

    def make():
        from trl_pplmask.models import embedded_model_path

        env = {"CUDA_VISIBLE_DEVICES": ""}  # a CPU machine, whatever this one has
        common = ["--base", embedded_model_path(), "--limit", str(N_ARC), "--max-new-tokens", "16", "--bootstrap",
                  "20", "--no-cache"]  # fmt: skip
        harnessed = s.cli("eval", *common, "--tasks", "arc_challenge_mc", "--backend", "lm-eval",
                          "--output-dir", s.work / "lm-eval", env=env)  # fmt: skip
        builtin = s.cli("eval", *common, "--tasks", "arc_challenge_mc", "--output-dir", s.work / "builtin", env=env)
        gsm8k = s.cli("eval", *common, "--tasks", "gsm8k", "--limit", "2", "--backend", "lm-eval",
                      "--output-dir", s.work / "lm-eval-gsm8k", env=env)  # fmt: skip
        return harnessed, builtin, gsm8k

    return s.memo("lm_eval", make)


@case("7", "7.1", "`eval --backend lm-eval` defaulted to device cuda and failed on a CPU machine")
def _(s: Survey) -> str:
    harnessed, _, gsm8k = lm_eval_runs(s)
    check(harnessed.code == 0 and gsm8k.code == 0, "an lm-eval run failed", harnessed, gsm8k)
    arc = report_metrics(s.work / "lm-eval", "arc_challenge_mc")
    check(arc["backend"] == "lm-eval", f"backend {arc['backend']}", harnessed)
    return "no --device, no GPU visible: arc_challenge_mc and gsm8k run through lm-eval on the CPU (exit 0)"


@case("7", "7.2", "lm-eval's tasks loaded their data from the Hub and ignored TRL_PPLMASK_DATA_DIR")
def _(s: Survey) -> str:
    harnessed, _, gsm8k = lm_eval_runs(s)
    check(harnessed.code == 0 and gsm8k.code == 0, "an lm-eval run failed", harnessed, gsm8k)
    arc = report_metrics(s.work / "lm-eval", "arc_challenge_mc")["stats"]
    math = report_metrics(s.work / "lm-eval-gsm8k", "gsm8k")["stats"]
    tasks = (arc["lm_eval_task"], math["lm_eval_task"])
    check(tasks == ("pplmask_arc_challenge", "pplmask_gsm8k"), f"lm-eval tasks {tasks}", harnessed, gsm8k)
    check(arc["data"] == math["data"] == str(s.data_dir), f"data {arc['data']}, {math['data']}", harnessed, gsm8k)
    return f"HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1: lm-eval's tasks {', '.join(tasks)} read {s.data_dir}"


@case("7", "7.3", "on any failure lm-eval fell back to the builtin evaluator under a 'Backend: lm-eval' header")
def _(s: Survey) -> str:
    mirror = s.work / "arc-test-only"
    relative = "paper/arc_challenge/test.jsonl"
    (mirror / relative).parent.mkdir(parents=True)
    lines = (s.data_dir / relative).read_text().splitlines()[:10]
    (mirror / relative).write_text("\n".join(lines) + "\n")
    out = s.work / "lm-eval-broken"
    run = s.cli("eval", "--base", s.tiny, "--tasks", "arc_challenge_mc", "--limit", "10", "--backend", "lm-eval",
                "--no-cache", "--output-dir", out, env={"TRL_PPLMASK_DATA_DIR": str(mirror)})  # fmt: skip
    line = error_line(run, "arc_challenge_mc", "--backend builtin")
    check(not (out / "report.json").exists(), "a report was written", run)
    return f"exit {run.code}, no report: {short(line, 120)}"


@case("7", "7.4", "no test had ever run lm-eval itself (builtin vs lm-eval never compared)")
def _(s: Survey) -> str:
    harnessed, builtin, gsm8k = lm_eval_runs(s)
    check(harnessed.code == 0 and builtin.code == 0, "an eval failed", harnessed, builtin)
    ours = report_metrics(s.work / "builtin", "arc_challenge_mc")
    theirs = report_metrics(s.work / "lm-eval", "arc_challenge_mc")
    same = {
        metric: sum(a["scores"][metric] == b["scores"][metric] for a, b in zip(ours["items"], theirs["items"]))
        for metric in ("acc", "acc_norm")
    }
    n = len(ours["items"])
    check(n == N_ARC and len(theirs["items"]) == n, f"{n} and {len(theirs['items'])} items", harnessed, builtin)
    check(all(v == n for v in same.values()), f"items agreeing: {same}", harnessed, builtin)
    header = (s.work / "lm-eval" / "report.md").read_text()
    check("Backend: lm-eval." in header, "report.md does not say 'Backend: lm-eval.'", harnessed)
    acc = theirs["metrics"]
    return (
        f"embedded SmolLM2-135M, first {n} ARC-Challenge test items: builtin = lm-eval {same['acc']}/{n} (acc), "
        f"{same['acc_norm']}/{n} (acc_norm); acc {acc['acc']:.2f}, acc_norm {acc['acc_norm']:.2f}; "
        f"gsm8k (2 items) through lm-eval's own 5-shot task"
    )


# --------------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="Folder for the runs (default: a temporary one, removed afterwards).")
    parser.add_argument("--only", help="Comma-separated case ids (e.g. 4.1,6.16), or item numbers (e.g. 2,7).")
    parser.add_argument("--output", help="Also write the lines printed here.")
    args = parser.parse_args()
    if not os.environ.get("TRL_PPLMASK_DATA_DIR"):
        parser.error("set TRL_PPLMASK_DATA_DIR to the local data mirror")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    wanted = set(args.only.split(",")) if args.only else None
    cases = [c for c in CASES if wanted is None or c.id in wanted or c.item in wanted or c.id.rstrip("abcd") in wanted]
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the survey's own saves: its lines are the output
    transformers.utils.logging.disable_progress_bar()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="survey-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = Survey(work.resolve())
    import torch

    from trl_pplmask import __version__

    say(f"# Rerun of issue 18's survey failing cases through the trl-pplmask command line (trl-pplmask {__version__})")
    say(
        f"# {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS=1, CUDA {'available' if torch.cuda.is_available() else 'absent'}; "
        f"read-only folders and full disks: {'mounts (root)' if s.can_mount else 'chmod, no full-disk case'}"
    )
    say(f"# {len(cases)} cases; PASS = one clear error (what, where, how to fix) or the correct result, inputs kept")
    say()
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for c in cases:
        t0 = time.perf_counter()
        try:
            detail, status, output = c.run(s), "PASS", ""
        except Fail as failure:
            detail, status, output = str(failure), "FAIL", failure.output
        except Skip as skip:
            detail, status, output = str(skip), "SKIP", ""
        except Exception:
            detail, status, output = "the survey itself raised", "FAIL", traceback.format_exc()
        counts[status] += 1
        say(f"{status}  {c.id:<6} [{time.perf_counter() - t0:5.1f} s] {c.found}")
        say(f"{'':14}-> {detail}")
        if output:
            say("\n".join(f"{'':14}| {line}" for line in output.rstrip().splitlines()))
    say()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    say(
        f"# {len(cases)} cases: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
        f"{time.perf_counter() - start:.0f} s wall, {children.ru_utime + children.ru_stime:.0f} s CPU of the "
        f"commands (load average at the end {os.getloadavg()[0]:.1f})"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    sys.exit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
