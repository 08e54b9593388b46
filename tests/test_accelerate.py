"""`score_dataset` under a 2-process CPU launch (gloo): the work is split, every process gets the full result, equal
to the single-process one, and the cache never lets the processes take different paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_llama

from trl_pplmask.scoring import make_batches, score_dataset


HELPER = Path(__file__).resolve().parent / "_accelerate_score.py"


@pytest.mark.slow
def test_two_process_scoring_matches_single_process(tmp_path):
    from _accelerate_score import build_dataset

    dataset = build_dataset()
    model = tiny_llama(vocab_size=512, initializer_range=0.3)
    single = score_dataset(dataset, model, max_tokens_per_batch=64, use_cache=False, show_progress=False)
    assert len(make_batches([len(x) for x in dataset["input_ids"]], 64)) >= 3  # enough batches to share

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    # `accelerate launch --cpu` runs multi-CPU jobs through mpirun only; `--multi_gpu` on a CPU-only machine starts the
    # processes with torchrun, and score_dataset forms their gloo process group (scoring.distributed_state)
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(HELPER),
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
    ]
    # A new session, so that on a timeout (processes stuck in mismatched collectives) the workers go too
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-process run did not finish in 120 s (a process waiting for the others?)\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    results = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = [np.asarray(x) for x in single["token_nll"]]
    for rank, result in enumerate(results):
        assert result["process_index"] == rank
        assert result["num_processes"] == 2
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["row_id"] == list(range(len(dataset)))
        for key in ("plain", "cached_first", "cached_second"):
            got = result[key]
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=0, err_msg=f"rank {rank}, {key}")
        # The second cached call is answered from the cache on both processes
        assert result["examples_scored_second"] == 0
    # Each process scored a share of the examples, together all of them, once
    shares = [r["examples_scored"] for r in results]
    assert all(s > 0 for s in shares) and sum(shares) == len(dataset)
    assert sum(r["examples_scored_first"] for r in results) == len(dataset)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
