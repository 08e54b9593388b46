"""Helper of `test_accelerate.py`: score a few examples with a tiny random Llama, in one process or under a
multi-process launcher, and write what this process got back to `<out_dir>/rank<N>.json`.

Usage: python _accelerate_score.py OUT_DIR CACHE_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_dataset():
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    rows = []
    for n in (40, 7, 23, 64, 3, 31, 18):
        ids = rng.integers(0, 512, n).tolist()
        prompt = n // 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row_id": len(rows)})
    return Dataset.from_list(rows)


def main(out_dir: str, cache_dir: str) -> None:
    from conftest import tiny_llama

    import trl_pplmask.scoring as scoring

    # The same state score_dataset uses: a gloo process group on a CPU-only multi-process launch
    state = scoring.distributed_state()
    calls = []
    original = scoring.batch_token_nll

    def counting(model, input_ids, *args, **kwargs):
        calls.append(int(input_ids.shape[0]))
        return original(model, input_ids, *args, **kwargs)

    scoring.batch_token_nll = counting
    if state.is_main_process:
        # A slow file system: the main process writes the cache entry late, after the others moved on
        save = scoring._save_cache

        def slow_save(path, nlls):
            time.sleep(2)
            save(path, nlls)

        scoring._save_cache = slow_save

    model = tiny_llama(vocab_size=512, initializer_range=0.3).to(state.device)  # seeded: identical on every rank
    dataset = build_dataset()
    kwargs = dict(max_tokens_per_batch=64, show_progress=False)
    plain = scoring.score_dataset(dataset, model, use_cache=False, **kwargs)
    examples_scored = sum(calls)
    # With the cache: the first call fills it, the second must be answered from it on every process alike (a
    # process that scores while another returns early would wait forever for the others in the gather)
    first = scoring.score_dataset(dataset, model, use_cache=True, cache_dir=cache_dir, **kwargs)
    examples_scored_first = sum(calls) - examples_scored
    second = scoring.score_dataset(dataset, model, use_cache=True, cache_dir=cache_dir, **kwargs)
    examples_scored_second = sum(calls) - examples_scored - examples_scored_first
    state.wait_for_everyone()

    result = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "examples_scored": examples_scored,
        "examples_scored_first": examples_scored_first,
        "examples_scored_second": examples_scored_second,
        "row_id": list(plain["row_id"]),
        "plain": list(plain["token_nll"]),
        "cached_first": list(first["token_nll"]),
        "cached_second": list(second["token_nll"]),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
