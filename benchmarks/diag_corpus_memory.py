"""Where the memory of a sharded `trl-pplmask score` / `build` goes, shard by shard (a diagnostic for issue 17).

Runs the command in this process (the model and rows of `bench_corpus.py`) and, after every shard, records the
process's resident memory split as the kernel counts it (`/proc/self/status`: RssAnon = heap and anonymous maps,
RssFile = pages of memory-mapped files, RssShmem), the number of live Python objects and, with `--tracemalloc`, the
Python allocations that grew most since the first shard. At the end it lists the mapped files holding the most
resident pages (`/proc/self/smaps`). A quantity that grows shard after shard is what makes peak memory depend on the
row count.

Usage: python benchmarks/diag_corpus_memory.py [--rows 8000] [--shard-rows 256] [--command score|build]
       [--tracemalloc] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_corpus import build_argv, make_model, make_rows, score_argv  # noqa: E402


def memory_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem and VmHWM of this process in KiB (`/proc/self/status`)."""
    wanted = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            status[key] = int(value.split()[0])
    return status


def mapped_files(top: int = 8) -> list[tuple[str, int]]:
    """The mapped files of this process holding the most resident KiB (`/proc/self/smaps`)."""
    sizes: dict[str, int] = {}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else "[anon]"
        elif fields and fields[0] == "Rss:" and name is not None:
            sizes[name] = sizes.get(name, 0) + int(fields[1])
    return sorted(sizes.items(), key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--command", choices=["score", "build"], default="score")
    parser.add_argument("--tracemalloc", action="store_true", help="Trace Python allocations (slower).")
    parser.add_argument("--stop-after", type=int, default=None, help="Stop after this many shards.")
    parser.add_argument("--no-datasets-cache", action="store_true", help="datasets.disable_caching() first.")
    parser.add_argument("--work", default="/tmp/diag_corpus_memory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, rows = make_model(work), make_rows(work, args.rows)
    out = work / f"{args.command}-{args.rows}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}-pplmask-work"), ignore_errors=True)  # a build's resumable work folder
    os.environ["TRL_PPLMASK_CACHE"] = str(work / "cache")

    import tracemalloc

    from trl_pplmask import cli
    from trl_pplmask.hub import shards

    if args.no_datasets_cache:
        import datasets

        datasets.disable_caching()
    if args.tracemalloc:
        tracemalloc.start(8)
    samples, first_snapshot = [], []
    start = time.perf_counter()
    update = shards.Progress.update
    window: dict[str, int] = {}  # the largest of each figure since the last shard, sampled every 20 ms
    peaks: list[dict] = []  # where the main thread was each time the resident set reached a new high (+16 MiB)
    main_thread = threading.main_thread().ident

    def sample_window():
        highest = 0
        while True:
            status = memory_status()
            for key, value in status.items():
                window[key] = max(window.get(key, 0), value)
            if status["VmRSS"] > highest + 16 * 1024:
                highest = status["VmRSS"]
                frame = sys._current_frames().get(main_thread)
                stack = [
                    f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack(frame)
                ]
                peaks.append({"seconds": round(time.perf_counter() - start, 1), **status, "stack": stack[-12:]})
            time.sleep(0.02)

    threading.Thread(target=sample_window, daemon=True).start()

    def traced_update(self, tokens):
        update(self, tokens)
        gc.collect()
        sample = {"shard": len(samples), "seconds": round(time.perf_counter() - start, 1), **memory_status()}
        sample["python_objects"] = len(gc.get_objects())
        sample["peak_since_last"] = {k: window.get(k, 0) for k in ("VmRSS", "RssAnon", "RssFile")}
        window.clear()
        if args.tracemalloc:
            snapshot = tracemalloc.take_snapshot()
            if not first_snapshot:
                first_snapshot.append(snapshot)
            else:
                growth = snapshot.compare_to(first_snapshot[0], "traceback")[:3]
                sample["top_growth"] = [
                    {"kib": round(stat.size_diff / 1024), "where": stat.traceback.format()[-4:]} for stat in growth
                ]
        samples.append(sample)
        print(json.dumps({k: v for k, v in sample.items() if k != "top_growth"}), file=sys.stderr, flush=True)
        if args.stop_after is not None and len(samples) >= args.stop_after:
            raise SystemExit(0)

    shards.Progress.update = traced_update
    make_argv = {"score": score_argv, "build": build_argv}[args.command]
    argv = make_argv(model, rows, str(out), args.shard_rows)
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    gc.collect()
    end_window = dict(window)
    result = {
        "command": " ".join(argv),
        "exit": code,
        "shards": samples,
        "end": memory_status(),
        "peak_after_last_shard": end_window,
        "new_highs": peaks,
        "mapped_files_kib": mapped_files(),
    }
    if samples:
        first, last = samples[0], samples[-1]
        result["growth_kib_first_to_last_shard"] = {
            key: last[key] - first[key] for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "python_objects")
        }
    summary = ("end", "peak_after_last_shard", "mapped_files_kib", "growth_kib_first_to_last_shard")
    print(json.dumps({key: result[key] for key in summary if key in result}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
