"""Self-output / rephrase generation: seeded sampling, verification, selection, resumable checkpoints, the
`<task>-self-output` folder and its card, and stock `trl sft` on it.

Selection and resume logic run on a stub backend or a tiny random model (weights do not matter there); the embedded
SmolLM2-135M-Instruct generates for a few GSM8K and MBPP rows in the slow tests.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_llama
from datasets import Dataset, load_dataset

from trl_pplmask.commands import self_output as self_output_command
from trl_pplmask.data import load_task, tokenize_dataset
from trl_pplmask.generation import (
    REPHRASE_TEMPLATE,
    GenerationCheckpoint,
    Sample,
    SeededSampler,
    SelfOutputBuildConfig,
    SelfOutputConfig,
    TransformersBackend,
    assemble_dataset,
    backends,
    build_self_output,
    generate_records,
    generate_self_outputs,
    loop,
    plan_batches,
    prompts,
    select_candidate,
    self_output_statistics,
)
from trl_pplmask.models import embedded_model_path, load_tokenizer
from trl_pplmask.scoring import score_dataset


CONFIG = "smollm2-135m-instruct"
RECIPE = REPO / "recipes" / "gsm8k-self-output-cpu.yaml"
TRL = Path(sys.executable).parent / "trl"
OUTPUT_COLUMNS = [
    "prompt", "completion", "messages", "chosen_response", "source", "candidates", "num_correct", "chosen_ppl",
    "ground_truth_ppl", "chosen_token_nll", "ground_truth_token_nll", "row_id",
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CONFIG)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def gsm8k(data_dir) -> Dataset:
    return load_task("gsm8k", "train", limit=4)


class StubBackend:
    """Returns fixed responses per row id and records what it was asked."""

    name = "stub"

    def __init__(self, responses: dict, truncated: dict | None = None):
        self.responses = responses
        self.truncated = truncated or {}
        self.requests = []

    def generate(self, requests, config):
        self.requests.extend(requests)
        out = []
        for request in requests:
            texts = self.responses[request.row_id]
            flags = self.truncated.get(request.row_id, [False] * len(texts))
            out.append([Sample(t, f, 1) for t, f in zip(texts, flags)])
        return out


def template_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def gsm8k_answer(row) -> str:
    return row["answer"].rsplit("####", 1)[1].strip()


# --------------------------------------------------------------------------------------------------------------------
# Selection rules
# --------------------------------------------------------------------------------------------------------------------


def cand(correct, ppl, truncated=False):
    return {"correct": correct, "ppl": ppl, "truncated": truncated}


def test_select_candidate_rules():
    cands = [cand(False, 1.1), cand(True, 3.0), cand(True, 2.0), cand(True, 2.0), cand(False, 1.0)]
    # lowest perplexity among the correct ones only (the incorrect 1.0 and 1.1 do not count), ties to the first
    assert select_candidate(cands, "lowest_ppl") == 2
    assert select_candidate(cands, "first") == 1
    picks = {select_candidate(cands, "random", rng=random.Random(s)) for s in range(50)}
    assert picks == {1, 2, 3}
    assert select_candidate(cands, "random", rng=random.Random(7)) == select_candidate(
        cands, "random", rng=random.Random(7)
    )
    assert select_candidate([cand(False, 1.0), cand(False, 2.0)], "lowest_ppl") is None
    assert select_candidate([], "first") is None
    # a truncated response is kept only when allowed
    truncated = [cand(True, 1.5, truncated=True), cand(True, 4.0)]
    assert select_candidate(truncated, "lowest_ppl") == 1
    assert select_candidate(truncated, "lowest_ppl", select_truncated=True) == 0
    assert select_candidate([cand(True, 1.5, truncated=True)], "first") is None
    assert select_candidate([cand(True, math.nan), cand(True, 9.0)], "lowest_ppl") == 1
    with pytest.raises(ValueError, match="selection"):
        select_candidate(cands, "best")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "paraphrase"}, "mode"),
        ({"selection": "max"}, "selection"),
        ({"fallback": "drop"}, "fallback"),
        ({"backend": "tgi"}, "backend"),
        ({"num_samples": 0}, "num_samples"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfOutputConfig(**kwargs)


def test_plan_batches_sorts_by_length_and_respects_budgets():
    lengths = [50, 10, 30, 20, 40]
    assert plan_batches(lengths, 2, 4, 10, None) == [[1, 3], [2, 4], [0]]
    # token budget: 2 prompts * 4 samples * (longest + 10 new tokens) must fit
    assert plan_batches(lengths, 8, 4, 10, 2 * 4 * (30 + 10)) == [[1, 3], [2], [4], [0]]
    assert plan_batches([1000], 8, 4, 10, 16) == [[0]]  # over the budget alone: still generated


# --------------------------------------------------------------------------------------------------------------------
# Verification, scoring, fallback and the output format (stub backend, tiny scoring model)
# --------------------------------------------------------------------------------------------------------------------


def test_lowest_ppl_pick_fallback_and_output_format(gsm8k, tiny, tok):
    rows = list(gsm8k)
    ans = [gsm8k_answer(r) for r in rows]
    responses = {
        0: [f"So the total is #### {ans[0]}", "#### 999999", f"The answer is {ans[0]}.", f"x y z #### {ans[0]}"],
        1: ["no idea", "#### 123456789", "#### -1", "I cannot say"],  # none correct -> ground truth
        2: [f"#### {ans[2]}", "wrong #### 0", "wrong #### 1", "wrong #### 2"],
        3: ["#### 0", "#### 0", f"truncated but right #### {ans[3]}", "#### 0"],
    }
    backend = StubBackend(responses, truncated={3: [False, False, True, False]})
    out = generate_self_outputs(gsm8k, tiny, tok, "gsm8k", backend=backend, num_samples=4, show_progress=False)

    assert out.column_names == OUTPUT_COLUMNS
    assert out["row_id"] == [0, 1, 2, 3]
    assert out["num_correct"] == [3, 0, 1, 1]
    assert out["source"] == ["self", "ground_truth", "self", "ground_truth"]
    for row, src in zip(out, rows):
        candidates = row["candidates"]
        assert [c["text"] for c in candidates] == responses[row["row_id"]]
        correct = [c for c in candidates if c["correct"] and not c["truncated"]]
        if correct:  # the paper's rule: the correct response with the lowest perplexity
            best = min(correct, key=lambda c: c["ppl"])
            assert row["chosen_response"] == best["text"] and row["chosen_ppl"] == best["ppl"]
        else:
            assert row["chosen_response"] == src["completion"][0]["content"]
            assert row["chosen_ppl"] == row["ground_truth_ppl"]
        # conversation columns ready for SFTTrainer
        assert row["prompt"] == src["prompt"]
        assert row["completion"] == [{"role": "assistant", "content": row["chosen_response"]}]
        assert row["messages"] == src["prompt"] + row["completion"]
        # sequence perplexity = exp(mean NLL of the stored completion tokens)
        assert row["chosen_ppl"] == pytest.approx(math.exp(np.mean(row["chosen_token_nll"])), rel=1e-5)
        assert row["ground_truth_ppl"] == pytest.approx(math.exp(np.mean(row["ground_truth_token_nll"])), rel=1e-5)
    assert out[3]["candidates"][2]["correct"] and out[3]["candidates"][2]["truncated"]

    # The ground-truth perplexity is that of the SFT tokens of the reference, conditioned on the prompt
    pairs = gsm8k.select_columns(["prompt", "completion", "row_id"])
    scored = score_dataset(tokenize_dataset(pairs, tok, max_length=None), tiny, tok, use_cache=False)
    for row, labels, nll in zip(out, scored["labels"], scored["token_nll"]):
        reference = np.asarray(nll)[np.asarray(labels) != -100]
        assert np.allclose(row["ground_truth_token_nll"], reference, atol=1e-5)

    # skip: the rows without a usable correct response are left out, and counted
    rows_, records = generate_records(gsm8k, tiny, tok, "gsm8k", SelfOutputConfig(num_samples=4), backend=backend)
    skipped_out, skipped = assemble_dataset(rows_, records, SelfOutputConfig(fallback="skip"), gsm8k.features)
    assert skipped_out["row_id"] == [0, 2] and set(skipped_out["source"]) == {"self"}
    assert skipped == {"rows": 2, "candidates": 8, "correct": 1, "truncated": 1, "rows_with_correct": 1}
    stats = self_output_statistics(skipped_out, 2.5, skipped)
    assert stats["sample_accuracy"] == 5 / 16 and stats["rows_skipped"] == 2 and stats["rows_with_correct"] == 3
    # first / random read the same records
    first, _ = assemble_dataset(rows_, records, SelfOutputConfig(selection="first"), gsm8k.features)
    assert first[0]["chosen_response"] == responses[0][0]
    rand_a, _ = assemble_dataset(rows_, records, SelfOutputConfig(selection="random", seed=3), gsm8k.features)
    rand_b, _ = assemble_dataset(rows_, records, SelfOutputConfig(selection="random", seed=3), gsm8k.features)
    assert rand_a["chosen_response"] == rand_b["chosen_response"]
    assert rand_a[0]["chosen_response"] in [responses[0][i] for i in (0, 2, 3)]


def test_rephrase_shows_instruction_and_reference_but_keeps_the_task_prompt(gsm8k, tiny, tok):
    rows = list(gsm8k.select(range(2)))
    backend = StubBackend({0: [f"#### {gsm8k_answer(rows[0])}"], 1: ["#### 0"]})
    out = generate_self_outputs(
        gsm8k.select(range(2)), tiny, tok, "gsm8k", backend=backend, mode="rephrase", num_samples=1,
        show_progress=False,
    )  # fmt: skip
    request = backend.requests[0]
    shown = request.messages[-1]["content"]
    assert shown == REPHRASE_TEMPLATE.format(instruction=rows[0]["prompt"][0]["content"], reference=rows[0]["answer"])
    assert shown.startswith("Below are an instruction that describes a task along with a reference answer.")
    assert request.prompt_ids == template_ids(tok, request.messages)
    # trained as an answer to the task prompt, not to the rephrase prompt
    assert out[0]["prompt"] == rows[0]["prompt"] and out["source"] == ["self", "ground_truth"]


def test_a_callable_verifier_and_a_crashing_one(gsm8k, tiny, tok):
    small = gsm8k.select(range(2))
    backend = StubBackend({0: ["short", "a longer response"], 1: ["boom", "fine"]})
    out = generate_self_outputs(
        small, tiny, tok, lambda row, text: len(text) > 5, backend=backend, num_samples=2, show_progress=False
    )
    assert [[c["correct"] for c in row] for row in out["candidates"]] == [[False, True], [False, False]]

    def crashing(row, text):
        if text == "boom":
            raise RuntimeError("checker bug")
        return True

    out = generate_self_outputs(small, tiny, tok, crashing, backend=backend, num_samples=2, show_progress=False)
    assert [c["correct"] for c in out[1]["candidates"]] == [False, True]  # a crash counts as incorrect


def test_bad_input_fails_before_generating(tiny, tok):
    backend = StubBackend({})
    no_completion = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]], "row_id": [0]})
    with pytest.raises(ValueError, match="completion"):
        generate_self_outputs(no_completion, tiny, tok, "gsm8k", backend=backend)
    duplicated = Dataset.from_dict(
        {"prompt": ["a", "b"], "completion": ["#### 1", "#### 2"], "answer": ["#### 1", "#### 2"], "row_id": [5, 5]}
    )
    with pytest.raises(ValueError, match="repeated"):
        generate_self_outputs(duplicated, tiny, tok, "gsm8k", backend=backend)
    with pytest.raises(ValueError, match="No verifier"):
        generate_self_outputs(duplicated.select([0]), tiny, tok, "gsm9k", backend=backend)
    assert backend.requests == []


# --------------------------------------------------------------------------------------------------------------------
# Seeded sampling (real transformers generation on a tiny random model)
# --------------------------------------------------------------------------------------------------------------------


def test_seeded_sampler_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    draws = []
    for seed in range(3000):
        sampler = SeededSampler([torch.Generator().manual_seed(seed)], temperature=1.0, top_p=1.0)
        draws.append(int(sampler(None, logits.clone()).argmax()))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.allclose(freq, [0.6, 0.3, 0.1, 0.0], atol=0.03)
    # top_p=0.5 keeps the most likely token only; top_p=0.8 the two most likely
    nucleus = [SeededSampler([torch.Generator().manual_seed(s)], 1.0, 0.8)(None, logits.clone()) for s in range(300)]
    assert {int(x.argmax()) for x in nucleus} == {0, 1}
    assert int(SeededSampler([torch.Generator().manual_seed(0)], 1.0, 0.5)(None, logits.clone()).argmax()) == 0
    out = SeededSampler([torch.Generator()], temperature=0.0, top_p=1.0)(None, logits.clone())
    assert int(out.argmax()) == 0 and torch.isinf(out).sum() == 3  # one-hot: generate can only pick this token


def test_each_sequence_draws_from_its_own_generator():
    """Exact, without model numerics: a row's draws depend on its generator only, not on its batch neighbours."""
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)

    def draws(rows, seeds):
        sampler = SeededSampler([torch.Generator().manual_seed(s) for s in seeds], temperature=0.7, top_p=0.95)
        return [int(t) for t in sampler(None, logits[rows].clone()).argmax(-1)]

    together = [draws([0, 1, 2, 3, 4], [10, 11, 12, 13, 14]) for _ in range(3)]
    assert together[0] == together[1] == together[2]
    alone = [draws([i], [10 + i])[0] for i in range(5)]
    reordered = draws([4, 2, 0], [14, 12, 10])
    assert together[0] == alone and reordered == [alone[4], alone[2], alone[0]]


def peaked_tiny_llama():
    # A random model's next-token distribution is nearly uniform over 49k tokens, where the last-bit differences that
    # padding makes in the logits flip many draws; sharpen it to something like a trained model's
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


def test_generation_is_seeded_per_row_not_per_batch(gsm8k, tok):
    model = peaked_tiny_llama()
    backend = TransformersBackend(model, tok)

    def texts(**kwargs):
        config = SelfOutputConfig(num_samples=2, max_new_tokens=8, show_progress=False, **kwargs)
        rows, records = generate_records(gsm8k, model, tok, lambda r, t: True, config, backend=backend)
        return [[c["text"] for c in record["candidates"]] for record in records]

    alone = texts(batch_size=1)
    together = texts(batch_size=4)
    assert alone == together  # a response does not depend on its batch neighbours
    assert sum(a != b for a, b in alone) >= 3  # the samples of a row differ
    assert texts(batch_size=4, seed=1) != together
    # every sequence is exactly the prompt the chat template builds (left padding: the prompt ends where output starts)
    config = SelfOutputConfig(num_samples=1, max_new_tokens=3)
    requests = prompts.make_requests(list(gsm8k), config, tok)
    assert requests[0].prompt_ids == template_ids(tok, gsm8k[0]["prompt"])


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# --------------------------------------------------------------------------------------------------------------------


VERIFIER_CALLS: list = []


def odd_length(row, text):
    """A deterministic stand-in verifier (the tiny model's text is noise). One function for every run of a checkpoint:
    the checkpoint records which verifier labelled it. The killed subprocess stalls in it (see `_KILLED_RUN`)."""
    VERIFIER_CALLS.append(row["row_id"])
    stall = os.environ.get("TRL_PPLMASK_TEST_STALL_AFTER_ROWS")
    if stall is not None and len(set(VERIFIER_CALLS)) > int(stall):
        print("READY", flush=True)
        time.sleep(600)  # killed here
    return len(text) % 2 == 1


def test_interrupted_run_resumes_to_the_same_dataset(gsm8k, tiny, tok, tmp_path, monkeypatch):
    data = load_task("gsm8k", "train", limit=5)
    kwargs = dict(num_samples=2, max_new_tokens=5, batch_size=2, select_truncated=True, show_progress=False)
    reference = generate_self_outputs(
        data, tiny, tok, odd_length, checkpoint_path=str(tmp_path / "full.jsonl"), **kwargs
    )

    # Ctrl-C in the middle of the second batch, after its first row was stored
    stored = []
    original_add = GenerationCheckpoint.add

    def add_then_interrupt(self, record):
        if len(stored) == 3:
            raise KeyboardInterrupt
        original_add(self, record)
        stored.append(record["row_id"])

    monkeypatch.setattr(GenerationCheckpoint, "add", add_then_interrupt)
    checkpoint = tmp_path / "run.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_self_outputs(data, tiny, tok, odd_length, checkpoint_path=str(checkpoint), **kwargs)
    monkeypatch.setattr(GenerationCheckpoint, "add", original_add)
    lines = checkpoint.read_text().splitlines()
    assert len(lines) == 1 + 3  # header + the rows finished before the interruption: nothing lost

    # A crash while a record was being written leaves a partial line: it is cut off and that row redone
    with open(checkpoint, "a") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])
    VERIFIER_CALLS.clear()
    resumed = generate_self_outputs(data, tiny, tok, odd_length, checkpoint_path=str(checkpoint), **kwargs)
    assert resumed.to_list() == reference.to_list()
    # only the batches holding unfinished rows were generated again (finished batches were skipped)
    assert 2 <= len(set(VERIFIER_CALLS)) < len(data)
    assert len(checkpoint.read_text().splitlines()) == 1 + len(data)

    # A complete checkpoint generates nothing
    VERIFIER_CALLS.clear()
    again = generate_self_outputs(data, tiny, tok, odd_length, checkpoint_path=str(checkpoint), **kwargs)
    assert again.to_list() == reference.to_list() and VERIFIER_CALLS == []


def test_checkpoint_refuses_other_settings_other_data_and_a_second_writer(gsm8k, tiny, tok, tmp_path):
    backend = StubBackend({i: ["#### 1", "#### 2"] for i in range(4)})
    path = str(tmp_path / "ck.jsonl")
    config = SelfOutputConfig(num_samples=2, checkpoint_path=path, show_progress=False)
    generate_records(gsm8k, tiny, tok, "gsm8k", config, backend=backend)
    other = SelfOutputConfig(num_samples=2, temperature=0.9, checkpoint_path=path, show_progress=False)
    with pytest.raises(ValueError, match="temperature"):
        generate_records(gsm8k, tiny, tok, "gsm8k", other, backend=backend)
    changed = gsm8k.map(lambda row: {"question": row["question"] + " (edited)"})
    with pytest.raises(ValueError, match="different data"):
        generate_records(changed, tiny, tok, "gsm8k", config, backend=backend)
    with GenerationCheckpoint(path, loop.checkpoint_header(config, "gsm8k", tiny, tiny)):
        with pytest.raises(ValueError, match="in use"):
            generate_records(gsm8k, tiny, tok, "gsm8k", config, backend=backend)
    # a checkpoint that holds no finished row yet does not pin the settings
    empty = str(tmp_path / "empty.jsonl")
    GenerationCheckpoint(empty, {"temperature": 0.1}).close()
    fresh = SelfOutputConfig(num_samples=2, checkpoint_path=empty)
    generate_records(gsm8k, tiny, tok, "gsm8k", fresh, backend=backend)
    assert len(Path(empty).read_text().splitlines()) == 1 + len(gsm8k)
    (tmp_path / "junk.jsonl").write_text('{"not": "a checkpoint"}\n')
    junk = SelfOutputConfig(num_samples=2, checkpoint_path=str(tmp_path / "junk.jsonl"))
    with pytest.raises(ValueError, match="not a trl-pplmask generation checkpoint"):
        generate_records(gsm8k, tiny, tok, "gsm8k", junk, backend=backend)


_KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from test_generation import odd_length
from trl_pplmask.data import load_task
from trl_pplmask.generation import generate_self_outputs
from trl_pplmask.models import load_tokenizer

generate_self_outputs(load_task("gsm8k", "train", limit=4), tiny_llama(), load_tokenizer({model!r}), odd_length,
                      num_samples=2, max_new_tokens=5, batch_size=1, select_truncated=True, show_progress=False,
                      checkpoint_path={checkpoint!r})
"""


@pytest.mark.slow
def test_sigkilled_process_loses_no_finished_row(tiny, tok, tmp_path, data_dir):
    checkpoint = tmp_path / "killed.jsonl"
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), model=CONFIG, checkpoint=str(checkpoint))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["TRL_PPLMASK_TEST_STALL_AFTER_ROWS"] = "2"  # the third row's verification never ends: two rows are stored
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stdout:
            if line.startswith("READY"):
                break
        process.kill()
    finally:
        process.wait(timeout=60)
    assert process.returncode != 0
    records = [json.loads(line) for line in checkpoint.read_text().splitlines()[1:]]
    assert len(records) == 2 and len({r["row_id"] for r in records}) == 2

    data = load_task("gsm8k", "train", limit=4)
    kwargs = dict(num_samples=2, max_new_tokens=5, batch_size=1, select_truncated=True, show_progress=False)
    resumed = generate_self_outputs(data, tiny, tok, odd_length, checkpoint_path=str(checkpoint), **kwargs)
    fresh = generate_self_outputs(data, tiny, tok, odd_length, **kwargs)
    assert resumed.to_list() == fresh.to_list()


# --------------------------------------------------------------------------------------------------------------------
# vLLM backend
# --------------------------------------------------------------------------------------------------------------------


def test_vllm_backend_needs_vllm_and_a_gpu(gsm8k, tiny, tok, monkeypatch):
    monkeypatch.setattr(backends, "_vllm_installed", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"trl-pplmask\[vllm\]"):
        generate_self_outputs(gsm8k, tiny, tok, "gsm8k", backend="vllm", show_progress=False)
    monkeypatch.setattr(backends, "_vllm_installed", lambda: True)
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA GPU"):
        generate_self_outputs(gsm8k, tiny, tok, "gsm8k", backend="vllm", show_progress=False)


def test_vllm_backend_output_format(gsm8k, tiny, tok, monkeypatch):
    """A stand-in `vllm` module: requests carry the prompt token ids and a per-row seed; outputs map to samples."""
    seen = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            seen["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"], seen["params"] = prompts, params
            outputs = []
            for p in params:
                n, seed = p.kwargs["n"], p.kwargs["seed"]
                samples = [
                    types.SimpleNamespace(text=f"#### {seed % 7 + k}", finish_reason="stop", token_ids=[1, 2])
                    for k in range(n)
                ]
                outputs.append(types.SimpleNamespace(outputs=samples))
            return outputs

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for module in (loop, backends):  # no GPU here; the scoring model stays on CPU
        monkeypatch.setattr(module, "check_vllm_available", lambda: None)
    out = generate_self_outputs(
        gsm8k, tiny, tok, "gsm8k", backend="vllm", num_samples=3, tensor_parallel_size=2, vllm_model="some/model",
        show_progress=False,
    )  # fmt: skip
    assert seen["llm"]["model"] == "some/model" and seen["llm"]["tensor_parallel_size"] == 2
    requests = prompts.make_requests(list(gsm8k), SelfOutputConfig(num_samples=3), tok)
    assert [p["prompt_token_ids"] for p in seen["prompts"]] == sorted(
        [r.prompt_ids for r in requests], key=len
    )  # sorted by prompt length
    assert {p.kwargs["seed"] for p in seen["params"]} == {r.seeds[0] for r in requests}
    assert all(p.kwargs["temperature"] == 0.7 and p.kwargs["top_p"] == 0.95 for p in seen["params"])
    assert out.column_names == OUTPUT_COLUMNS and all(len(c) == 3 for c in out["candidates"])


# --------------------------------------------------------------------------------------------------------------------
# The `<task>-self-output` folder on the embedded model
# --------------------------------------------------------------------------------------------------------------------


def _build(task: str, rows: int, max_new_tokens: int, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"{task}-self-output")
    argv = [
        "--dataset", task, "--limit", str(rows), "--num-samples", "2", "--max-new-tokens", str(max_new_tokens),
        "--dtype", "float32", "--output-dir", str(root / f"{task}-self-output"),
    ]  # fmt: skip
    assert self_output_command.main(argv) == 0
    return root / f"{task}-self-output"


@pytest.fixture(scope="module")
def gsm8k_folder(tmp_path_factory, data_dir) -> Path:
    return _build("gsm8k", 2, 48, tmp_path_factory)


@pytest.fixture(scope="module")
def mbpp_folder(tmp_path_factory, data_dir) -> Path:
    return _build("mbpp", 2, 64, tmp_path_factory)


def recompute(dataset: Dataset, threshold: float = 2.5) -> dict:
    """The card's numbers, recomputed from the parquet data alone."""
    samples = sum(len(c) for c in dataset["candidates"])
    correct = sum(c["correct"] for row in dataset["candidates"] for c in row)
    self_rows = [i for i, s in enumerate(dataset["source"]) if s == "self"]

    def share(nlls):
        ppl = np.exp(np.concatenate([np.asarray(x, dtype=np.float64) for x in nlls])) if nlls else np.zeros(0)
        return f"{100 * np.mean(ppl > threshold):.2f}%" if ppl.size else "n/a"

    return {
        "accuracy": f"{100 * correct / samples:.2f}%",
        "self": dataset["source"].count("self"),
        "ground_truth": dataset["source"].count("ground_truth"),
        "chosen_high": share(dataset["chosen_token_nll"]),
        "gt_high": share(dataset["ground_truth_token_nll"]),
        "self_high": share([dataset["chosen_token_nll"][i] for i in self_rows]),
        "samples": samples,
        "correct": correct,
        "all_median_seq_ppl": f"{np.median([c['ppl'] for row in dataset['candidates'] for c in row]):.3f}",
    }


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gsm8k", "mbpp"])
def test_embedded_self_output_folder_loads_and_its_card_matches_the_data(task, request):
    folder = request.getfixturevalue(f"{task}_folder")
    dataset = load_dataset(str(folder), CONFIG, split="train")
    assert dataset.column_names == OUTPUT_COLUMNS
    source = load_task(task, "train", limit=len(dataset))
    assert dataset["row_id"] == source["row_id"] and dataset["prompt"] == source["prompt"]
    assert all(len(c) == 2 for c in dataset["candidates"])
    for row, src in zip(dataset, source):
        correct = [c for c in row["candidates"] if c["correct"] and not c["truncated"]]
        if row["source"] == "self":
            assert row["chosen_ppl"] == min(c["ppl"] for c in correct)
        else:
            assert not correct and row["chosen_response"] == src["completion"][0]["content"]

    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"] == [
        {"config_name": CONFIG, "data_files": [{"split": "train", "path": f"{CONFIG}/train-*"}], "default": True}
    ]
    figure = f"assets/{CONFIG}-ppl-hist.png"
    assert f"]({figure})" in card and (folder / figure).stat().st_size > 10_000
    assert "arxiv.org/abs/2501.14315" in card and "Low-Perplexity Token Learning" in card
    assert f'load_dataset("your-org/{task}-self-output", "{CONFIG}", split="train")' in card

    numbers = recompute(dataset)
    outcome = next(line for line in card.splitlines() if line.startswith(f"| `{CONFIG}` | train | {len(dataset)} |"))
    cells = [c.strip() for c in outcome.strip("|").split("|")]
    assert cells[3:9] == [
        str(numbers["samples"]), str(numbers["correct"]), numbers["accuracy"], cells[6], str(numbers["self"]),
        str(numbers["ground_truth"]),
    ]  # fmt: skip
    assert re.search(
        rf"\| chosen responses \(all rows\) \| {len(dataset)} \| [\d,]+ \| {numbers['chosen_high']} \|", card
    )
    assert re.search(rf"\| ground truth \(all rows\) \| {len(dataset)} \| [\d,]+ \| {numbers['gt_high']} \|", card)
    all_samples = f"| every sampled response, correct or not | {numbers['samples']} | n/a | n/a | n/a |"
    assert f"{all_samples} {numbers['all_median_seq_ppl']} |" in card
    if numbers["self"]:
        assert f"| self-generated responses | {numbers['self']} |" in card and numbers["self_high"] in card
    info = json.loads((folder / CONFIG / "build_info.json").read_text())
    assert info["kind"] == "self-output" and info["verifier"] == task
    assert info["command"].startswith("trl-pplmask self-output --dataset " + task)

    # The Hub tools take the folder as it is
    from trl_pplmask.hub import push_folder

    uploaded = {path for path, _ in push_folder(folder, repo_id=f"org/{task}-self-output", dry_run=True)}
    assert {"README.md", figure, f"{CONFIG}/train-00000-of-00001.parquet"} <= uploaded
    assert not any("checkpoint" in path for path in uploaded)


@pytest.mark.slow
def test_rebuild_resumes_from_the_checkpoint_without_generating(gsm8k_folder, monkeypatch):
    before = load_dataset(str(gsm8k_folder), CONFIG, split="train").to_list()
    checkpoint = gsm8k_folder.parent / "gsm8k-self-output-checkpoints" / f"{CONFIG}-train.jsonl"
    assert len(checkpoint.read_text().splitlines()) == 1 + len(before)

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished checkpoint must not generate again")

    monkeypatch.setattr(TransformersBackend, "generate", no_generation)
    argv = ["--dataset", "gsm8k", "--limit", "2", "--num-samples", "2", "--max-new-tokens", "48", "--dtype", "float32"]
    assert self_output_command.main([*argv, "--output-dir", str(gsm8k_folder)]) == 0
    assert load_dataset(str(gsm8k_folder), CONFIG, split="train").to_list() == before
    # other settings would mix two kinds of data in one checkpoint: refused, with the way out
    assert (
        self_output_command.main(
            [*argv[:-4], "--max-new-tokens", "64", "--dtype", "float32", "--output-dir", str(gsm8k_folder)]
        )
        == 2
    )


def test_a_rebuilt_folder_of_the_same_name_loads_its_own_rows(tmp_path, tok, data_dir):
    """`datasets` caches a local folder by its name and the card's YAML: the YAML carries the sizes, so a rebuild with
    other rows is not served from the cache of the previous build."""
    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cache = str(tmp_path / "datasets-cache")
    loaded = []
    for rows in (2, 3):
        folder = tmp_path / f"build{rows}" / "gsm8k-self-output"
        generation = SelfOutputConfig(num_samples=1, max_new_tokens=4, show_progress=False)
        config = SelfOutputBuildConfig(
            dataset="gsm8k", output_dir=str(folder), models=[str(model_dir)], config_names=["tiny"], limit=rows,
            generation=generation, dtype="float32",
        )  # fmt: skip
        build_self_output(config)
        loaded.append(load_dataset(str(folder), "tiny", split="train", cache_dir=cache))
    assert [len(d) for d in loaded] == [2, 3]
    card = (tmp_path / "build3" / "gsm8k-self-output" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["dataset_info"][0]["splits"] == [{"name": "train", "num_bytes": mock_any(), "num_examples": 3}]


class mock_any:  # noqa: N801 - reads like the value it stands for
    def __eq__(self, other):
        return True


def test_output_folder_must_be_a_self_output_folder(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_self_output(SelfOutputBuildConfig(dataset="gsm8k", output_dir=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="verifier"):
        SelfOutputBuildConfig(dataset="my/data")


def test_cli_registers_self_output():
    from trl_pplmask.cli import build_parser
    from trl_pplmask.commands import self_output as self_output_cli

    args = build_parser().parse_args(["self-output", "--dataset", "mbpp", "--mode", "rephrase", "--backend", "vllm"])
    # Registered without importing torch; the command runs `commands.self_output.run`
    assert args.spec is self_output_cli.COMMAND and args.spec.run is self_output_cli.run
    assert args.func.func == self_output_cli.COMMAND.execute and args.func.keywords == {
        "prog": "trl-pplmask self-output"
    }
    assert args.mode == "rephrase" and args.num_samples == 4
    config = self_output_cli.build_config_from_args(args)
    assert config.generation.backend == "vllm" and config.resolved_output_dir() == Path("mbpp-self-output")
    assert "--mode rephrase" in config.command


# --------------------------------------------------------------------------------------------------------------------
# Training on it with stock TRL
# --------------------------------------------------------------------------------------------------------------------


def test_recipe_parses_and_points_at_the_self_output_config():
    from trl.scripts.sft import make_parser

    script_args, training_args, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(RECIPE)], fail_with_unknown_args=True
    )
    assert script_args.dataset_name == "gsm8k-self-output" and script_args.dataset_config == CONFIG
    assert training_args.use_cpu and not training_args.bf16 and training_args.max_steps <= 50
    assert model_args.use_peft


def test_sft_trainer_trains_on_the_chosen_responses_only(gsm8k, tiny, tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    backend = StubBackend({i: [f"#### {gsm8k_answer(r)}"] for i, r in enumerate(gsm8k)})
    data = generate_self_outputs(gsm8k, tiny, tok, "gsm8k", backend=backend, num_samples=1, show_progress=False)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, bf16=False, report_to="none")
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tok)
    prepared = trainer.train_dataset
    for row, ids, labels in zip(data, prepared["input_ids"], prepared["labels"]):
        trained = [t for t, label in zip(ids, labels) if label != -100]
        # the completion tokens are the chosen response (and the end of turn), with the same NLL count as stored
        assert tok.decode(trained).startswith(row["chosen_response"])
        assert len(trained) == len(row["chosen_token_nll"])
    trainer.train()


@pytest.mark.slow
def test_stock_trl_sft_recipe_trains_on_the_built_folder(gsm8k_folder, tmp_path):
    output = tmp_path / "out"
    command = [str(TRL), "sft", "--config", str(RECIPE), "--model_name_or_path", str(embedded_model_path())]
    command += ["--max_steps", "1", "--output_dir", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The recipe names the folder relative to the working directory, as a user would run it
    result = subprocess.run(command, cwd=gsm8k_folder.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Training completed" in result.stdout + result.stderr
    assert (output / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("size", [0, -5])
def test_self_output_build_refuses_a_non_positive_shard_size(size):
    """As the pplmasked builder does: a shard size of 0 or less would write no shard (the CLI's "0" is already refused
    by the size parser; the API took it)."""
    from trl_pplmask.hub.self_output import SelfOutputBuildConfig

    with pytest.raises(ValueError, match="max_shard_size must be positive"):
        SelfOutputBuildConfig(dataset="gsm8k", max_shard_size=size)
