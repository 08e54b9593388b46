"""Corpus scale on CPU: peak memory and wall time of `trl-pplmask score` and `build` as the row count grows, a kill -9
at ~90% of a run then its rerun, and 2 processes against 1, each as a real CLI subprocess.

Model: a 2-layer random Llama (hidden 64, the embedded tokenizer's 49,152-token vocabulary, as `tests/conftest.py`'s
`tiny_llama`) saved with the embedded SmolLM2 tokenizer; rows: synthetic prompt/completion pairs of about 170 tokens
(random English words, seeded). Every run uses one torch thread (OMP_NUM_THREADS=1) and the sharded layout
(`--layout shards`, `--shard-rows` rows per shard).

1. Scale: `score` and `build` at each of `--sizes` rows; peak RSS (the process tree's resident set, sampled every
   0.1 s; also split into its anonymous part, what the process allocated, and its file-backed part, shared libraries
   and memory-mapped files such as the Arrow copy of the input; and the kernel's exact high-water mark of the largest
   process) and wall time, with tokens per second and the RSS ratios to the smallest size above 1,000 rows.
2. Kill and rerun (`--kill-size` rows, score): an uninterrupted run, then a run into a fresh folder killed with SIGKILL
   at `--kill-at` (0.9) of the uninterrupted run's time, then its rerun: the rerun's time against the full run's, and
   whether every output file is byte-identical to the uninterrupted run's.
3. Processes (`--procs-size` rows, score): `accelerate launch --num_processes 2` (gloo on CPU) against the
   one-process run of section 1 at that size: wall time, speed-up and byte identity of the output.

4. Input modes (`--input-modes download stream`, `--input-size` rows, score): the rows as a folder of 4 parquet files
   (row groups of 256 rows, a Hub dataset's layout), scored with `--input-mode download` (`load_dataset`: an Arrow
   copy in the datasets cache, memory-mapped) and `--input-mode stream` (each shard reads its row groups from the
   parquet files) side by side: peak RSS, wall time, the disk the datasets cache took (`HF_DATASETS_CACHE` is a fresh
   folder per run), and whether the outputs are byte-identical.

Results are written to `--json` after every run, so that a long benchmark killed midway keeps what it measured.

Usage: python benchmarks/bench_corpus.py [--sizes 1000 4000 16000] [--shard-rows 1024] [--kill-size 16000]
       [--procs-size 4000] [--commands score build] [--skip-kill] [--skip-procs] [--input-modes download stream]
       [--input-size 16000] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of to and in is it that for on with as was at by an be this which or from have not are but had they his "
    "her she he we you all were when there can been one would will more if no out so said what up its about into "
    "than them only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against "
    "go came right used take three number answer total apples price each costs sum equals therefore step"
).split()


def make_model(work: Path) -> Path:
    """The tiny random Llama with the embedded tokenizer, saved once under `work`."""
    path = work / "tiny-llama"
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_llama

    from trl_pplmask.models import load_tokenizer

    tiny_llama().save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return path


def make_rows(work: Path, n: int) -> Path:
    """`n` prompt/completion rows of about 170 tokens (72-word prompt, 84-word completion), seeded by row index."""
    path = work / f"rows-{n}.jsonl"
    if path.is_file():
        return path
    with open(path, "w") as f:
        for i in range(n):
            rng = random.Random(i)
            prompt = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(72)) + "?"
            completion = " ".join(rng.choice(WORDS) for _ in range(84)) + f". The answer is {i % 97}."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def make_parquet(work: Path, n: int, files: int = 4, row_group_rows: int = 256) -> Path:
    """The rows of [`make_rows`] as a folder of `files` parquet files of row groups of `row_group_rows` rows, named
    as on the Hub (`train-0000k-of-0000n.parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / f"parquet-{n}"
    if folder.is_dir():
        return folder
    rows = [json.loads(line) for line in make_rows(work, n).read_text().splitlines()]
    staging = work / f".parquet-{n}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    per_file = -(-n // files)
    for k in range(files):
        table = pa.Table.from_pylist(rows[k * per_file : (k + 1) * per_file])
        pq.write_table(table, staging / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=row_group_rows)
    staging.rename(folder)
    return folder


def disk_mib(folder: Path) -> float:
    """The bytes of the files under `folder`, in MiB (0 when it does not exist)."""
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1) if folder.exists() else 0


def run(argv: list[str], cwd: Path, kill_after: float | None = None, env: dict | None = None) -> dict:
    """Run `argv`: wall time, exit status and peak memory.

    Peak memory: the resident set of the process tree sampled every 0.1 s, in total and split into anonymous memory
    (heap, tensors: what the process allocated) and file-backed pages (shared libraries and memory-mapped files, such
    as the Arrow copy of the input, which the kernel can drop and read again), plus the kernel's exact high-water mark
    of the largest process (`ru_maxrss` of `wait4`: VmHWM, file-backed pages included).
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    env["TRL_PPLMASK_CACHE"] = str(cwd / "cache")
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(process.pid)
    peak = peak_single = peak_anon = peak_file = 0
    output = []
    os.set_blocking(process.stdout.fileno(), False)
    waited = (0, 0, None)
    while waited[0] == 0:
        try:
            tree = [p.memory_info() for p in [root, *root.children(recursive=True)]]
            rss = [m.rss for m in tree]
            shared = sum(m.shared for m in tree)  # resident file-backed and shared pages
            peak, peak_single = max(peak, sum(rss)), max(peak_single, max(rss))
            peak_anon, peak_file = max(peak_anon, sum(rss) - shared), max(peak_file, shared)
        except psutil.Error:
            pass
        chunk = process.stdout.read()
        if chunk:
            output.append(chunk)
        if kill_after is not None and time.perf_counter() - start > kill_after:
            for p in [*root.children(recursive=True), root]:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            waited = os.wait4(process.pid, 0)
            break
        time.sleep(0.1)
        waited = os.wait4(process.pid, os.WNOHANG)  # reaped here, for its rusage (Popen.poll would discard it)
    process.returncode = os.waitstatus_to_exitcode(waited[1])
    rest = process.stdout.read()
    if rest:
        output.append(rest)
    text = b"".join(output).decode(errors="replace")
    took = time.perf_counter() - start
    if kill_after is None and process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{text[-3000:]}")
    return {
        "seconds": round(took, 1),
        "peak_rss_mib": round(peak / 2**20),
        "peak_rss_anon_mib": round(peak_anon / 2**20),
        "peak_rss_file_mib": round(peak_file / 2**20),
        "peak_rss_largest_process_mib": round(peak_single / 2**20),
        "max_rss_kernel_largest_process_mib": round(waited[2].ru_maxrss / 2**10),
        "returncode": process.returncode,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trl_pplmask.cli", *args]


def score_argv(model: Path, rows: Path, out: str, shard_rows: int) -> list[str]:
    argv = ["score", "--dataset", str(rows), "--model", str(model), "--output-dir", out]
    return argv + ["--layout", "shards", "--shard-rows", str(shard_rows)]


def build_argv(model: Path, rows: Path, out: str, shard_rows: int) -> list[str]:
    argv = ["build", "--dataset", str(rows), "--models", str(model), "--output-dir", out]
    return argv + ["--shard-rows", str(shard_rows), "--no-cache"]


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (build times blanked in the build's records and card)."""
    import re

    built_at = re.compile(rb"(\"built_at\": \"|- Built: )[0-9T:Z-]+")
    return {
        str(p.relative_to(folder)): hashlib.sha256(built_at.sub(rb"\1<time>", p.read_bytes())).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tokens_of(folder: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for path in folder.rglob("*.parquet"):
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids")
        total += int(pc.sum(pc.list_value_length(column)).as_py() or 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 4000, 16000])
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--kill-size", type=int, default=16000)
    parser.add_argument("--kill-at", type=float, default=0.9)
    parser.add_argument("--procs-size", type=int, default=4000)
    parser.add_argument("--commands", nargs="+", default=["score", "build"], choices=["score", "build"])
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--skip-procs", action="store_true")
    parser.add_argument("--input-modes", nargs="*", default=[], choices=["download", "stream"])
    parser.add_argument("--input-size", type=int, default=16000)
    parser.add_argument("--work", default="/tmp/bench_corpus")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "shard_rows": args.shard_rows,
        "scale": [],
    }

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    full_runs = {}
    commands = [(name, {"score": score_argv, "build": build_argv}[name]) for name in args.commands]
    for n in args.sizes:
        rows = make_rows(work, n)
        for name, make_argv in commands:
            where = work / f"{name}-{n}"
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            measured = run(cli(*make_argv(model, rows, "out", args.shard_rows)), where)
            tokens = tokens_of(where / "out")
            entry = {"command": name, "rows": n, "tokens": tokens, **measured}
            entry["tokens_per_second"] = round(tokens / measured["seconds"])
            results["scale"].append(entry)
            full_runs[(name, n)] = (where, measured)
            print(json.dumps(entry), flush=True)
            save()
    for name, _ in commands:
        entries = [e for e in results["scale"] if e["command"] == name and e["rows"] >= 4000]
        if len(entries) > 1:
            base = entries[0]
            for figure in ("peak_rss_mib", "peak_rss_anon_mib", "max_rss_kernel_largest_process_mib"):
                key = f"{name}_{figure.removesuffix('_mib').removeprefix('peak_')}_ratio_to_{base['rows']}_rows"
                results[key] = {e["rows"]: round(e[figure] / base[figure], 3) for e in entries}
    save()

    if not args.skip_kill:
        n = args.kill_size
        rows = make_rows(work, n)
        if ("score", n) not in full_runs:
            where = work / f"score-{n}"
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            full_runs[("score", n)] = (where, run(cli(*score_argv(model, rows, "out", args.shard_rows)), where))
        reference, full = full_runs[("score", n)]
        where = work / f"kill-{n}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
        argv = cli(*score_argv(model, rows, "out", args.shard_rows))
        killed = run(argv, where, kill_after=args.kill_at * full["seconds"])
        shards_at_kill = len(list((where / "out").glob("*.parquet")))
        rerun = run(argv, where)
        results["kill_rerun"] = {
            "rows": n,
            "full_seconds": full["seconds"],
            "killed_after_seconds": killed["seconds"],
            "killed_returncode": killed["returncode"],
            "shards_written_at_kill": shards_at_kill,
            "rerun_seconds": rerun["seconds"],
            "rerun_share_of_full": round(rerun["seconds"] / full["seconds"], 3),
            "identical_to_uninterrupted": digest(where / "out") == digest(reference / "out"),
        }
        print(json.dumps(results["kill_rerun"]), flush=True)
        save()

    if not args.skip_procs:
        n = args.procs_size
        rows = make_rows(work, n)
        if ("score", n) not in full_runs:
            where = work / f"score-{n}"
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            full_runs[("score", n)] = (where, run(cli(*score_argv(model, rows, "out", args.shard_rows)), where))
        reference, single = full_runs[("score", n)]
        where = work / f"procs2-{n}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
        launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--main_process_port", "0", "-m", "trl_pplmask.cli"]
        two = run(launch + score_argv(model, rows, "out", args.shard_rows), where)
        results["processes"] = {
            "rows": n,
            "one_process_seconds": single["seconds"],
            "two_processes_seconds": two["seconds"],
            "speedup": round(single["seconds"] / two["seconds"], 2),
            "two_processes_peak_rss_largest_process_mib": two["peak_rss_largest_process_mib"],
            "identical_output": digest(where / "out") == digest(reference / "out"),
        }
        print(json.dumps(results["processes"]), flush=True)
        save()

    if args.input_modes:
        measure_input_modes(args, work, model, results)
        save()


def measure_input_modes(args: argparse.Namespace, work: Path, model: Path, results: dict) -> None:
    """Section 4: `score` of a parquet folder with each of `args.input_modes`, side by side."""
    n = args.input_size
    folder = make_parquet(work, n)
    entries, outputs = [], {}
    for mode in args.input_modes:
        where = work / f"input-{mode}-{n}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
        argv = cli(*score_argv(model, folder, "out", args.shard_rows), "--input-mode", mode)
        measured = run(argv, where, env={"HF_DATASETS_CACHE": str(where / "hf-datasets")})
        entry = {"input_mode": mode, "rows": n, "input_parquet_mib": disk_mib(folder), **measured}
        entry["datasets_cache_mib"] = disk_mib(where / "hf-datasets")
        entry["output_mib"] = disk_mib(where / "out")
        entries.append(entry)
        outputs[mode] = digest(where / "out")
        print(json.dumps(entry), flush=True)
    results["input_modes"] = {"entries": entries}
    if len(outputs) > 1:
        first, *others = outputs.values()
        results["input_modes"]["identical_output"] = all(other == first for other in others)
        base = entries[0]
        for entry in entries[1:]:
            for figure in ("peak_rss_mib", "peak_rss_anon_mib", "peak_rss_file_mib", "seconds"):
                key = f"{entry['input_mode']}_to_{base['input_mode']}_{figure.removesuffix('_mib')}_ratio"
                results["input_modes"][key] = round(entry[figure] / base[figure], 3) if base[figure] else None
    print(json.dumps({k: v for k, v in results["input_modes"].items() if k != "entries"}), flush=True)


if __name__ == "__main__":
    main()
