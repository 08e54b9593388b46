"""Anonymous memory shard after shard while a parquet input is read and tokenized as `score` does, streamed or
memory-mapped (a diagnostic for `--input-mode`, issue 17).

For each shard of `--shard-rows` rows of the folder that `bench_corpus.py --input-modes` writes (`parquet-<rows>` in
`--work`): the shard's rows are selected (`ParquetSplit.select` or the memory-mapped `Dataset.select`), hashed and
tokenized as SFTTrainer does, then freed as `process_shards` frees them; this process's RssAnon is recorded after
each. No model: what grows here grows with the input, not with the scoring. Run one process per mode.

Usage: python benchmarks/diag_stream_input.py --input-mode stream|download [--rows 16000] [--shard-rows 1024]
       [--work /tmp/w17bench]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rss_anon_mib() -> int:
    """This process's anonymous resident memory (RssAnon of `/proc/self/status`), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-mode", choices=["stream", "download"], required=True)
    parser.add_argument("--rows", type=int, default=16000)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/w17bench")
    args = parser.parse_args()

    import datasets

    from trl_pplmask.data import tokenize_dataset
    from trl_pplmask.hub.shards import ShardPlan, release_free_memory, release_mapped_pages, rows_fingerprint
    from trl_pplmask.hub.stream_input import load_split, with_row_ids
    from trl_pplmask.models import load_tokenizer

    datasets.disable_caching()  # as process_shards
    datasets.disable_progress_bars()
    work = Path(args.work)
    tokenizer = load_tokenizer(str(work / "tiny-llama"))
    source = with_row_ids(load_split(str(work / f"parquet-{args.rows}"), mode=args.input_mode))
    plan = ShardPlan(len(source), args.shard_rows, "train")
    opened = rss_anon_mib()
    after = []
    for index in range(plan.num_shards):
        rows = source.select(plan.rows(index))
        rows_fingerprint(rows)
        tokenized = tokenize_dataset(rows, tokenizer, max_length=1024)
        del rows, tokenized
        if args.input_mode == "download":
            release_mapped_pages(source)
        release_free_memory()
        after.append(rss_anon_mib())
    print(
        json.dumps(
            {
                "input_mode": args.input_mode,
                "rows": args.rows,
                "rss_anon_mib_opened": opened,
                "rss_anon_mib_after_each_shard": after,
            }
        )
    )


if __name__ == "__main__":
    main()
