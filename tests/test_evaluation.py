"""Forgetting report: answer extraction, log-likelihood scoring, the bootstrap, the `evaluate` module loaded offline,
the report files, bad input, and an end-to-end `trl-pplmask eval` of the embedded model against a LoRA adapter."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from trl_pplmask.evaluation import (
    REPORT_FILES,
    EvalConfig,
    EvalTask,
    ModelSpec,
    TaskResult,
    aggregate,
    build_model_specs,
    build_report,
    choice_requests,
    continuation_nll,
    extract_answer,
    generate_greedy,
    lm_eval_samples_to_items,
    load_eval_rows,
    parse_model_arg,
    resolve_task,
    write_report,
)
from trl_pplmask.evaluation.harness import backend_for
from trl_pplmask.metrics import FORGETTING_METRIC
from trl_pplmask.metrics.forgetting.forgetting import bootstrap_ci, forgetting_summary
from trl_pplmask.models import load_tokenizer
from trl_pplmask.verifiers import verify_batch


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction on hand-written outputs, and unparseable answers counted as wrong
# --------------------------------------------------------------------------------------------------------------------
ROWS = {
    "gsm8k": {"question": "?", "answer": "3 + 15 = 18\n#### 18"},
    "math": {"problem": "?", "solution": "So it is $\\boxed{\\frac{1}{2}}$."},
    "arc_challenge": {
        "question": "?",
        "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]},
        "answerKey": "C",
    },
    "mbpp": {"text": "?", "test_list": ["assert double(2) == 4", "assert double(0) == 0"]},
    "humaneval": {
        "source_prompt": "def double(x):\n    '''Twice x.'''\n",
        "test": "def check(candidate):\n    assert candidate(2) == 4\n",
        "entry_point": "double",
    },
}
CODE = "```python\ndef double(x):\n    return 2 * x\n```"


@pytest.mark.parametrize(
    "task, output, expected, correct",
    [
        ("gsm8k", "She has 3 + 15 = 18 apples.\n#### 18", "18", True),
        ("gsm8k", "The total is $1,080.50.", "2161/2", False),
        ("gsm8k", "#### 17", "17", False),
        ("math", "Half of it: $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True),
        ("math", "Therefore \\boxed{0.5}.", "0.5", True),
        ("math", "\\boxed{3}", "3", False),
        ("arc_challenge", "Planets that spin faster have shorter days.\nAnswer: C", "C", True),
        ("arc_challenge", "**Answer:** (B)", "B", False),
        ("mbpp", f"Here it is:\n{CODE}", "def double(x):\n    return 2 * x\n", True),
        ("mbpp", "```python\ndef double(x):\n    return x + 1\n```", "def double(x):\n    return x + 1\n", False),
        ("humaneval", CODE, "def double(x):\n    return 2 * x\n", True),
        ("humaneval", "    return x * 2\n", "    return x * 2\n", True),
    ],
)
def test_extract_answer_and_verify(task, output, expected, correct):
    assert extract_answer(task, output) == expected
    assert verify_batch(task, [ROWS[task]], [output]) == [correct]


@pytest.mark.parametrize(
    "task, output",
    [
        ("gsm8k", "I am not sure how to solve this."),
        ("math", ""),
        ("arc_challenge", "The answer is probably the third one."),
        ("mbpp", "Sorry, I cannot write this function: it's hard."),
        ("humaneval", "```python\ndef double(x)\n    return\n```"),
    ],
)
def test_unparseable_output_is_none_and_wrong(task, output):
    assert extract_answer(task, output) is None
    assert verify_batch(task, [ROWS[task]], [output]) == [False]


def test_extract_answer_unknown_task():
    with pytest.raises(ValueError, match="No answer extraction"):
        extract_answer("arc_challenge_mc", "Answer: A")


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap and forgetting metrics on known cases
# --------------------------------------------------------------------------------------------------------------------
def test_bootstrap_ci_known_cases():
    assert bootstrap_ci([1.0] * 20) == [1.0, 1.0]
    # 100 coin flips with mean 0.5: the normal approximation gives 0.5 +- 1.96 * 0.05 = [0.402, 0.598]
    values = [0.0, 1.0] * 50
    low, high = bootstrap_ci(values, n_resamples=4000, seed=1)
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)  # seeded: reproducible
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    # Weighted (ratio of sums): every resample's mean lies within the values' range
    low, high = bootstrap_ci([1.0, 2.0, 3.0], weights=[10, 1, 1])
    assert 1.0 <= low <= 1.25 <= high <= 3.0
    assert all(np.isnan(bootstrap_ci([])))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=95)


def test_forgetting_summary_known_case():
    # target gsm8k: base 1/4 -> 3/4; arc: 1.0 -> 0.5 (relative -50%); nll: 2.0 -> 2.5 (worse by 25%, lower is better)
    out = forgetting_summary(
        predictions=[1, 1, 1, 0, 1, 0, 2.0, 3.0],
        references=[0, 1, 0, 0, 1, 1, 2.0, 2.0],
        tasks=["gsm8k"] * 4 + ["arc"] * 2 + ["nll"] * 2,
        target="gsm8k",
        lower_is_better=["nll"],
        n_resamples=500,
    )
    assert out["target_gain"] == pytest.approx(0.5)
    assert out["relative_target_gain"] == pytest.approx(2.0)
    assert out["tasks"]["arc"]["delta"] == pytest.approx(-0.5)
    assert out["tasks"]["nll"]["relative_delta"] == pytest.approx(0.25)
    assert out["mean_relative_change"] == pytest.approx((-0.5 - 0.25) / 2)
    assert out["non_target_tasks"] == ["arc", "nll"]
    # Paired bootstrap: the arc delta is -1 or 0 per item, so its interval lies in [-1, 0]
    low, high = out["tasks"]["arc"]["delta_ci"]
    assert -1.0 <= low <= high <= 0.0
    # A base score of 0 has no relative change; that task is left out of the mean
    zero = forgetting_summary([1, 0], [0, 0], ["a", "b"], target="b", n_resamples=10)
    assert zero["tasks"]["a"]["relative_delta"] is None and zero["mean_relative_change"] is None


def test_gain_is_signed_positive_is_better():
    """A lower-is-better target that got worse has a negative gain (the raw delta stays positive), and one that
    improved a positive gain; intervals are signed the same way."""
    worse = forgetting_summary(
        predictions=[1.5, 2.5, 3.5, 1.0, 1.0],
        references=[1.0, 2.0, 3.0, 1.0, 0.0],
        tasks=["nll"] * 3 + ["acc"] * 2,
        target="nll",
        lower_is_better=["nll"],
        n_resamples=200,
    )
    row = worse["tasks"]["nll"]
    assert row["delta"] == pytest.approx(0.5) and row["gain"] == pytest.approx(-0.5)
    assert row["relative_delta"] == pytest.approx(0.25) and row["relative_gain"] == pytest.approx(-0.25)
    assert worse["target_gain"] == pytest.approx(-0.5) and worse["relative_target_gain"] == pytest.approx(-0.25)
    assert worse["target_gain_ci"] == row["gain_ci"] == pytest.approx([-0.5, -0.5])
    assert worse["tasks"]["acc"]["gain"] == worse["tasks"]["acc"]["delta"] == pytest.approx(0.5)
    better = forgetting_summary([0.5, 1.5], [1.0, 2.0], ["nll", "nll"], target="nll", lower_is_better=["nll"])
    assert better["target_gain"] == pytest.approx(0.5) and better["relative_target_gain"] == pytest.approx(1 / 3)


def test_evaluate_module_loads_offline_by_path(tmp_path):
    """`evaluate.load(<folder>)` in a fresh interpreter with the Hub offline and sockets disabled."""
    script = f"""
import json, socket

def no_network(*args, **kwargs):
    raise OSError("network access attempted")


class GuardedSocket(socket.socket):
    connect = connect_ex = no_network


socket.socket = GuardedSocket
socket.getaddrinfo = socket.create_connection = no_network
import evaluate

metric = evaluate.load({FORGETTING_METRIC!r}, keep_in_memory=True)
out = metric.compute(predictions=[1, 1, 0, 1], references=[0, 1, 1, 1], tasks=["a", "a", "b", "b"], target="a",
                     n_resamples=200)
print(json.dumps(out))
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = forgetting_summary([1, 1, 0, 1], [0, 1, 1, 1], ["a", "a", "b", "b"], target="a", n_resamples=200)
    assert out == json.loads(json.dumps(expected))
    assert out["target_gain"] == 0.5 and out["mean_relative_change"] == -0.5


# --------------------------------------------------------------------------------------------------------------------
# Tasks, models and bad input
# --------------------------------------------------------------------------------------------------------------------
def test_resolve_task_names():
    assert resolve_task("gsm8k") == EvalTask("gsm8k", "generate", "gsm8k", "test", ("accuracy",))
    assert resolve_task("mbpp").metrics == ("pass@1",)
    assert resolve_task("arc_challenge_mc", {"arc_challenge": "validation"}).split == "validation"
    nll = resolve_task("math_nll")
    assert (nll.kind, nll.dataset, nll.higher_is_better) == ("nll", "math", False)
    with pytest.raises(ValueError, match="Unknown task 'gsm9k'.*arc_challenge_mc"):
        resolve_task("gsm9k")
    with pytest.raises(ValueError, match="Unknown task"):
        EvalConfig(tasks=["gsm8k", "mmlu"])
    with pytest.raises(ValueError, match="target task 'mbpp' is not among"):
        EvalConfig(tasks=["gsm8k"], target="mbpp")
    assert EvalConfig(tasks=["arc_challenge_mc", "gsm8k"]).target == "arc_challenge_mc"


def test_limit_larger_than_split(data_dir):
    with pytest.raises(ValueError, match=r"--limit 300 is larger than arc_challenge/validation, which has 299 rows"):
        load_eval_rows(resolve_task("arc_challenge_mc", {"arc_challenge": "validation"}), limit=300)
    rows = load_eval_rows(resolve_task("arc_challenge_mc", {"arc_challenge": "validation"}), limit=299)
    assert len(rows) == 299 and rows[-1]["row_id"] == 298


def _adapter_folder(path: Path, base: str) -> str:
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": 2, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


def test_model_specs_and_adapter_mismatch(tmp_path):
    good = _adapter_folder(tmp_path / "good", "HuggingFaceTB/SmolLM2-135M-Instruct")
    specs = build_model_specs("smollm2-135m-instruct", [f"stm={good}", good])
    assert [(s.label, s.adapter, s.is_base) for s in specs] == [
        ("base", None, True),
        ("stm", good, False),
        ("good", good, False),
    ]
    other = _adapter_folder(tmp_path / "other", "meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ValueError, match="was trained on 'meta-llama/Llama-3.1-8B-Instruct'"):
        build_model_specs("smollm2-135m-instruct", [other])
    with pytest.raises(ValueError, match="Cannot read the adapter"):
        build_model_specs("smollm2-135m-instruct", [str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="used twice"):
        build_model_specs("smollm2-135m-instruct", [f"base={good}"])
    assert parse_model_arg("a=b") == ("a", "b")
    assert parse_model_arg("/x/y=z") == (None, "/x/y=z")


def test_lm_eval_backend_per_task_and_no_fallback_when_missing(monkeypatch):
    """`backend="lm-eval"`: lm-eval's tasks run there, the others run builtin with a note saying so, and a missing
    lm-eval is an error (never a silent fallback to the builtin evaluator)."""
    from trl_pplmask.evaluation import harness

    config = EvalConfig(tasks=["gsm8k", "gsm8k_nll"], backend="lm-eval")
    monkeypatch.setattr(harness, "lm_eval_available", lambda: True)
    assert backend_for(resolve_task("gsm8k"), config) == ("lm-eval", None)
    backend, note = backend_for(resolve_task("gsm8k_nll"), config)
    assert backend == "builtin" and "lm-eval has no equivalent of gsm8k_nll" in note
    assert backend_for(resolve_task("gsm8k"), EvalConfig(tasks=["gsm8k"])) == ("builtin", None)
    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    with pytest.raises(ValueError, match="lm-evaluation-harness is not installed"):
        backend_for(resolve_task("gsm8k"), config)
    with pytest.raises(ValueError, match="Unknown backend"):
        EvalConfig(tasks=["gsm8k"], backend="vllm")


def test_lm_eval_samples_to_items():
    samples = [
        {"doc_id": 1, "filter": "strict-match", "exact_match": 0.0, "target": "7", "resps": [["x"]]},
        {"doc_id": 1, "filter": "flexible-extract", "exact_match": 1.0, "target": "7", "filtered_resps": ["7"]},
        {"doc_id": 0, "filter": "flexible-extract", "exact_match": 0.0, "target": "3", "filtered_resps": ["4"]},
        {"doc_id": 0, "filter": "strict-match", "exact_match": 0.0, "target": "3"},
    ]
    items = lm_eval_samples_to_items(samples, resolve_task("gsm8k"))
    assert [(i["row_id"], i["scores"]) for i in items] == [(0, {"accuracy": 0.0}), (1, {"accuracy": 1.0})]
    with pytest.raises(ValueError, match="lack metrics"):
        lm_eval_samples_to_items(samples[:1], resolve_task("gsm8k"))


# --------------------------------------------------------------------------------------------------------------------
# Log-likelihood scoring and generation on a tiny random model
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def test_choice_requests_split_context_and_continuation(smol_tokenizer):
    row = {"question": "Which is a planet?", "choices": {"label": ["A", "B"], "text": ["Mars", "the Moon"]}}
    requests = choice_requests(smol_tokenizer, [row])
    assert [(r["item"], r["choice"]) for r in requests] == [(0, 0), (0, 1)]
    for request, text in zip(requests, ["Mars", "the Moon"]):
        continuation = smol_tokenizer.decode(request["ids"][request["n_context"] :])
        context = smol_tokenizer.decode(request["ids"][: request["n_context"]])
        assert continuation == f" {text}" and context == "Question: Which is a planet?\nAnswer:"


@pytest.mark.parametrize("share_context", [True, False])
@pytest.mark.parametrize("budget", [40, 100000])
def test_continuation_nll_matches_full_forward(smol_tokenizer, share_context, budget):
    """Summed continuation NLL equals a plain forward of each whole sequence, whether contexts are shared through the
    KV cache (left-padded contexts of different lengths) or not, in one batch or many."""
    model = tiny_llama(initializer_range=0.3)
    rows = [
        {"question": "What melts ice?", "choices": {"label": ["A", "B"], "text": ["heat", "a very cold wind"]}},
        {"question": "Which gas do plants take in from the air?", "choices": {"label": ["1"], "text": ["CO2"]}},
        {"question": "Pick one.", "choices": {"label": ["A", "B", "C"], "text": ["x", "yy yy", "zzz zzz zzz"]}},
    ]
    requests = choice_requests(smol_tokenizer, rows)
    got = continuation_nll(
        model, requests, smol_tokenizer.pad_token_id, budget, show_progress=False, share_context=share_context
    )
    for request, value in zip(requests, got):
        ids = torch.tensor([request["ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        expected = -logp[torch.arange(len(targets)), targets][request["n_context"] - 1 :].sum().item()
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_generate_greedy_is_deterministic_and_batch_independent(smol_tokenizer):
    model = tiny_llama(initializer_range=0.3)  # peaked logits: no near-ties for padding noise to flip
    prompts = ["Hello there, how are", "A much longer prompt that needs left padding in its batch: one two three"]
    batched = generate_greedy(model, smol_tokenizer, prompts, max_new_tokens=6, show_progress=False)
    again = generate_greedy(model, smol_tokenizer, prompts, max_new_tokens=6, show_progress=False)
    alone = [generate_greedy(model, smol_tokenizer, [p], max_new_tokens=6, show_progress=False)[0] for p in prompts]
    assert batched == again == alone
    assert all(g["new_tokens"] <= 6 for g in batched)


# --------------------------------------------------------------------------------------------------------------------
# Report files from per-item results
# --------------------------------------------------------------------------------------------------------------------
def _results_table(markdown: str) -> tuple[list[str], dict[str, list[float]]]:
    """Header and rows of the results table of report.md; each cell's first number (the value, not the delta)."""
    lines = markdown[markdown.index("## Results") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(re.match(r"-?\d+\.\d+", c).group(0)) for c in cells[1:]]
    return header, rows


def _check_table_against_items(report: dict, markdown: str) -> None:
    header, rows = _results_table(markdown)
    assert header[1].startswith(report["target"] + " ")  # target column first
    assert list(rows) == [m["label"] for m in report["models"]]
    tasks = {t["name"]: t for t in report["tasks"]}
    for label, values in rows.items():
        for column, value in zip(header[1:], values):
            task, metric = column.split(" ")[:2]
            assert metric in tasks[task]["metrics"]
            items = report["results"][label][task]["items"]
            weights = np.array([item.get("weight", 1.0) for item in items])
            scores = np.array([item["scores"][metric] for item in items])
            assert value == pytest.approx((weights * scores).sum() / weights.sum(), abs=5e-4)


def _synthetic_result(model: str, task: EvalTask, scores: list[float], weights: list[float] | None = None):
    items = [
        {"row_id": i, "scores": dict.fromkeys(task.metrics, s), **({"weight": weights[i]} if weights else {})}
        for i, s in enumerate(scores)
    ]
    return TaskResult(model, task.name, aggregate(items, task.metrics), items)


def test_report_files_from_synthetic_results(tmp_path):
    tasks = [resolve_task("arc_challenge_mc"), resolve_task("gsm8k"), resolve_task("gsm8k_nll")]
    config = EvalConfig(tasks=[t.name for t in tasks], target="gsm8k", n_resamples=200)
    models = [ModelSpec("base", "smollm2-135m-instruct", None, True), ModelSpec("ft", "smollm2-135m-instruct")]
    results = {
        "base": {
            "arc_challenge_mc": _synthetic_result("base", tasks[0], [1, 0, 1, 1]),
            "gsm8k": _synthetic_result("base", tasks[1], [0, 0, 1, 0]),
            "gsm8k_nll": _synthetic_result("base", tasks[2], [1.0, 2.0, 1.5, 3.0], [10, 30, 20, 40]),
        },
        "ft": {
            "arc_challenge_mc": _synthetic_result("ft", tasks[0], [1, 0, 0, 1]),
            "gsm8k": _synthetic_result("ft", tasks[1], [1, 0, 1, 1]),
            "gsm8k_nll": _synthetic_result("ft", tasks[2], [0.5, 1.0, 1.0, 2.0], [10, 30, 20, 40]),
        },
    }
    report = build_report(models, tasks, results, config)
    paths = write_report(report, tmp_path / "out")
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["report.md"].read_text()
    saved = json.loads(paths["report.json"].read_text())
    _check_table_against_items(saved, markdown)
    header, rows = _results_table(markdown)
    assert header[1:3] == ["gsm8k accuracy ↑", "gsm8k_nll nll ↓"]  # the target, then its family, then the rest
    assert rows["ft"][:2] == [0.75, 1.35]  # token-weighted NLL: (5 + 30 + 20 + 80) / 100
    assert "0.750 (+0.500)" in markdown
    summary = saved["forgetting"]["ft"]
    assert summary["target_gain"] == pytest.approx(0.5)
    assert summary["non_target_tasks"] == ["arc_challenge_mc"]  # gsm8k_nll is the target's family
    assert summary["mean_relative_change"] == pytest.approx(-1 / 3)
    assert "-33.3%" in markdown


def test_report_signs_lower_is_better_target_gain(tmp_path):
    """An NLL target that got worse is a negative gain in report.json and report.md (and report.png is drawn)."""
    tasks = [resolve_task("gsm8k_nll"), resolve_task("arc_challenge_mc")]
    config = EvalConfig(tasks=[t.name for t in tasks], n_resamples=200)
    models = [ModelSpec("base", "smollm2-135m-instruct", None, True), ModelSpec("ft", "smollm2-135m-instruct")]
    results = {
        "base": {
            "gsm8k_nll": _synthetic_result("base", tasks[0], [1.0, 2.0], [10, 10]),
            "arc_challenge_mc": _synthetic_result("base", tasks[1], [1, 0]),
        },
        "ft": {
            "gsm8k_nll": _synthetic_result("ft", tasks[0], [1.5, 2.5], [10, 10]),
            "arc_challenge_mc": _synthetic_result("ft", tasks[1], [1, 1]),
        },
    }
    report = build_report(models, tasks, results, config)
    paths = write_report(report, tmp_path)
    summary = json.loads(paths["report.json"].read_text())["forgetting"]["ft"]
    assert summary["target_gain"] == pytest.approx(-0.5) and summary["relative_target_gain"] == pytest.approx(-1 / 3)
    markdown = paths["report.md"].read_text()
    summary_table = markdown[markdown.index("## Forgetting summary") :]
    assert "| ft | -0.500 [-0.500, -0.500] | -33.3% |" in summary_table
    assert "gain arc_challenge_mc acc_norm" in summary_table and "+0.500 [" in summary_table
    assert "2.000 (+0.500)" in markdown  # the results table keeps the raw change next to the ↓ arrow
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_comparison_known_case(tmp_path):
    """Share of gt's target gain kept and of its non-target degradation avoided, on hand-computed per-item results
    (accuracy, a lower-is-better NLL, drift, and a task gt improved, which is left out)."""
    from trl_pplmask.evaluation import run_evaluation
    from trl_pplmask.evaluation.reference_arm import compare_with_reference

    names = ["gsm8k", "gsm8k_nll", "arc_challenge_mc", "mbpp_nll", "arc_challenge_drift", "math_nll"]
    tasks = [resolve_task(name) for name in names]
    scores = {  # per task: base, gt, stm
        "gsm8k": ([0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]),  # stm keeps 0.25 / 0.5 of gt's gain
        "gsm8k_nll": ([1, 1, 1, 1], [0.5] * 4, [2] * 4),  # the target's family: not a non-target task
        "arc_challenge_mc": ([1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0]),  # gt -0.5, stm -0.25: avoided 50%
        "mbpp_nll": ([1, 1], [2, 2], [1.25, 1.25]),  # gt -1, stm -0.25 (lower is better): avoided 75%
        "arc_challenge_drift": ([0, 0], [0.1, 0.1], [0.3, 0.3]),  # gt -0.1, stm -0.3: avoided -200%
        "math_nll": ([1, 1], [0.5, 0.5], [3, 3]),  # gt improved it: no degradation to avoid
    }
    labels = ["base", "gt", "stm"]
    results = {
        label: {name: _synthetic_result(label, task, scores[name][k]) for name, task in zip(names, tasks)}
        for k, label in enumerate(labels)
    }
    models = [ModelSpec("base", "smollm2-135m-instruct", None, True)]
    models += [ModelSpec(label, "smollm2-135m-instruct") for label in labels[1:]]
    config = EvalConfig(tasks=names, n_resamples=300, reference="gt")
    report = build_report(models, tasks, results, config)
    comparison = report["reference_comparison"]
    assert comparison == compare_with_reference(report, "gt")
    assert comparison["reference_target_gain"] == pytest.approx(0.5)
    assert comparison["degraded_tasks"] == ["arc_challenge_mc", "mbpp_nll", "arc_challenge_drift"]
    assert list(comparison["arms"]) == ["stm"]
    stm = comparison["arms"]["stm"]
    assert stm["target_gain_kept"] == pytest.approx(0.5)
    shares = {name: row["degradation_avoided"] for name, row in stm["tasks"].items() if name != "math_nll"}
    assert shares == pytest.approx({"arc_challenge_mc": 0.5, "mbpp_nll": 0.75, "arc_challenge_drift": -2.0})
    assert stm["tasks"]["math_nll"]["degradation_avoided"] is None
    assert stm["degradation_avoided"] == pytest.approx((0.5 + 0.75 - 2.0) / 3) and stm["n_degraded_tasks"] == 3
    assert stm["tasks"]["mbpp_nll"]["degradation_avoided_ci"] == pytest.approx([0.75, 0.75])  # constant items
    low, high = stm["degradation_avoided_ci"]
    assert low <= stm["degradation_avoided"] <= high
    assert comparison["reference_tasks"]["mbpp_nll"]["significant"]
    assert not comparison["reference_tasks"]["arc_challenge_mc"]["significant"]  # 4 items: the CI reaches 0
    markdown = write_report(report, tmp_path)["report.md"].read_text()
    section = markdown[markdown.index("## Against gt") :]
    assert "| stm | 50% [" in section and "avoided on mbpp_nll" in section and "75% [75%, 75%]" in section
    # Bad references fail before anything runs
    with pytest.raises(ValueError, match="not in the report"):
        compare_with_reference(report, "sft")
    with pytest.raises(ValueError, match="not the base model"):
        compare_with_reference(report, "base")
    with pytest.raises(ValueError, match="reference model 'sft' is not among the fine-tuned models"):
        run_evaluation(models, EvalConfig(tasks=names, reference="sft"))
    # A reference that did not improve the target leaves the share kept undefined, with a note
    flat = compare_with_reference(report, "stm")  # stm's target gain is positive: gt keeps 200% of it
    assert flat["arms"]["gt"]["target_gain_kept"] == pytest.approx(2.0)
    results["gt"]["gsm8k"] = _synthetic_result("gt", tasks[0], [0, 0, 0, 0])
    none = compare_with_reference(build_report(models, tasks, results, EvalConfig(tasks=names)), "gt")
    assert none["arms"]["stm"]["target_gain_kept"] is None and "did not improve the target" in none["notes"][0]


# --------------------------------------------------------------------------------------------------------------------
# End to end: the embedded model against a LoRA adapter
# --------------------------------------------------------------------------------------------------------------------
@contextmanager
def _cpu_threads_for_busy_machine():
    # On a machine busier than its cores, torch's worker threads wait on each other (generation measured ~10x slower
    # with 2 threads than with 1 on a loaded 2-core machine); one thread keeps the test within minutes
    before = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _random_lora(path: Path, seed: int) -> str:
    """A LoRA adapter with random non-zero weights (an untrained adapter would leave the model unchanged)."""
    from peft import LoraConfig, get_peft_model

    from trl_pplmask.models import load_model

    torch.manual_seed(seed)
    model, _ = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_cli_eval_end_to_end(tmp_path, data_dir, capsys):
    from trl_pplmask.cli import main

    lora = _random_lora(tmp_path / "lora", seed=0)
    out, cache = tmp_path / "report", tmp_path / "cache"
    common = ["--target", "gsm8k", "--tasks", "gsm8k,arc_challenge_mc,gsm8k_nll", "--limit", "2"]
    common += ["--max-new-tokens", "24", "--cache-dir", str(cache), "--bootstrap", "200"]
    with _cpu_threads_for_busy_machine():
        assert main(["eval", "--adapter", f"lora={lora}", *common, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | gsm8k accuracy ↑ |" in printed
    report = json.loads((out / "report.json").read_text())
    _check_table_against_items(report, (out / "report.md").read_text())
    assert (out / "report.png").stat().st_size > 0
    assert [m["label"] for m in report["models"]] == ["base", "lora"]
    assert report["models"][1]["adapter_config"]["r"] == 4
    assert report["versions"]["torch"] == torch.__version__
    gsm8k = report["results"]["lora"]["gsm8k"]
    assert len(gsm8k["items"]) == 2
    for item in gsm8k["items"]:
        assert "<|im_start|>user" in item["prompt"] and isinstance(item["output"], str)
        assert item["reference"] in ("18", "3")  # the first two GSM8K test answers
        assert item["scores"]["accuracy"] == float(item["extracted"] == item["reference"])
    mc = report["results"]["base"]["arc_challenge_mc"]["items"][0]
    assert len(mc["loglik"]) == len(mc["choices"]) and mc["reference"] == "C"
    # The random adapter changes the model: its reference NLL differs from the base's
    nll = {label: report["results"][label]["gsm8k_nll"]["metrics"]["nll"] for label in ("base", "lora")}
    assert nll["base"] != pytest.approx(nll["lora"])
    assert set(report["forgetting"]["lora"]["tasks"]) == {"gsm8k", "arc_challenge_mc", "gsm8k_nll"}

    # Adding a model evaluates only that model: the others come from the cache, unchanged
    lora2 = _random_lora(tmp_path / "lora2", seed=1)
    out2 = tmp_path / "report2"
    with _cpu_threads_for_busy_machine():
        assert (
            main(
                [
                    "eval",
                    "--adapter",
                    f"lora={lora}",
                    "--adapter",
                    f"lora2={lora2}",
                    *common,
                    "--output-dir",
                    str(out2),
                ]
            )
            == 0
        )
    report2 = json.loads((out2 / "report.json").read_text())
    cached = {label: {t: r["cached"] for t, r in by_task.items()} for label, by_task in report2["results"].items()}
    assert all(cached["base"].values()) and all(cached["lora"].values()) and not any(cached["lora2"].values())
    for label in ("base", "lora"):
        for task, result in report["results"][label].items():
            assert report2["results"][label][task]["items"] == result["items"]
    _check_table_against_items(report2, (out2 / "report.md").read_text())


def test_cli_eval_bad_input(tmp_path, data_dir, capsys):
    from trl_pplmask.cli import main

    assert main(["eval", "--tasks", "gsm8k,arc_challange_mc", "--output-dir", str(tmp_path)]) == 2
    assert "Unknown task 'arc_challange_mc'" in capsys.readouterr().err
    assert main(["eval", "--tasks", "arc_challenge_mc", "--limit", "5000", "--output-dir", str(tmp_path)]) == 2
    assert "--limit 5000 is larger than arc_challenge/test, which has 1172 rows" in capsys.readouterr().err
    other = _adapter_folder(tmp_path / "other", "google/gemma-2-2b-it")
    assert main(["eval", "--adapter", other, "--tasks", "gsm8k", "--output-dir", str(tmp_path)]) == 2
    assert "was trained on 'google/gemma-2-2b-it'" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


# Issue 10, item 11: every setting is checked before any model runs
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--confidence", "1.5"], ["--confidence", "1.5"]),
        (["--confidence", "nan"], ["--confidence"]),
        (["--confidence", "0"], ["--confidence"]),
        (["--bootstrap", "0"], ["--bootstrap"]),
        (["--max-batch-size", "0"], ["--max-batch-size"]),
        (["--max-tokens-per-batch", "-1"], ["--max-tokens-per-batch"]),
        (["--nll-max-length", "0"], ["--nll-max-length"]),
        (["--code-timeout", "0"], ["--code-timeout"]),
        (["--dtype", "float8"], ["--dtype", "float8"]),
        (["--tasks", "gsm9k"], ["Unknown task 'gsm9k'"]),
        (["--reference", "gt"], ["--reference gt"]),
        (["--output-dir", "{file}"], ["--output-dir", "is a file"]),
        (["--output-dir", "{file}/report"], ["--output-dir", "is a file"]),
    ],
)
def test_cli_eval_checks_every_setting_before_any_model(extra, expected, tmp_path, data_dir, capsys, monkeypatch):
    from trl_pplmask.cli import main
    from trl_pplmask.evaluation import runner

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded or evaluated before the settings were checked")

    monkeypatch.setattr(runner, "_evaluate_model", no_work)
    monkeypatch.setattr(runner, "load_eval_rows", no_work)
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    extra = [value.replace("{file}", str(existing)) for value in extra]
    argv = ["eval", "--tasks", "gsm8k", "--limit", "1", "--no-cache", "--output-dir", str(tmp_path / "report"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-pplmask eval: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_files_are_created_with_the_umasks_mode(tmp_path, umask):
    """report.json and report.md get the mode of a normal file write (0644 under umask 022), as report.png does."""
    task = resolve_task("gsm8k")
    config = EvalConfig(tasks=["gsm8k"], n_resamples=50)
    models = [ModelSpec("base", "smollm2-135m-instruct", None, True), ModelSpec("ft", "smollm2-135m-instruct")]
    results = {label: {"gsm8k": _synthetic_result(label, task, [0, 1, 1, 0])} for label in ("base", "ft")}
    report = build_report(models, [task], results, config)
    previous = os.umask(umask)
    try:
        paths = write_report(report, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in paths.items()}
    assert modes == dict.fromkeys(REPORT_FILES, 0o666 & ~umask)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --------------------------------------------------------------------------------------------------------------------
# Drift: KL(base || tuned) on the base model's own answers
# --------------------------------------------------------------------------------------------------------------------
def _perturbed(model, seed: int = 1, scale: float = 0.05):
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return other


_SEQUENCES = [[5, 17, 300, 42, 9, 1000, 77, 3], [8, 9, 10, 11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409]]
_N_PROMPT = [3, 1, 6]


def test_drift_of_a_model_against_itself_is_zero():
    from peft import LoraConfig, get_peft_model

    from trl_pplmask.evaluation.drift import token_drift

    model = tiny_llama(initializer_range=0.3)
    alone = token_drift(model, None, _SEQUENCES, _N_PROMPT, max_tokens_per_batch=16)
    twin = token_drift(model, _perturbed(model, scale=0.0), _SEQUENCES, _N_PROMPT, max_tokens_per_batch=16)
    # An untrained LoRA adapter (B = 0) against the same model with the adapter disabled
    peft_model = get_peft_model(tiny_llama(initializer_range=0.3), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    disabled = token_drift(peft_model, peft_model, _SEQUENCES, _N_PROMPT)
    for values in (alone, twin, disabled):
        assert [len(v["kl"]) for v in values] == [len(s) - n for s, n in zip(_SEQUENCES, _N_PROMPT)]
        for v in values:
            assert np.all(v["kl"] == 0.0)
            np.testing.assert_allclose(v["entropy"], v["base_entropy"], rtol=0, atol=1e-6)
            assert np.all(v["entropy"] > 0)


def test_drift_kl_and_entropy_match_full_softmax():
    """Chunked KL (many chunks, several padded batches) equals a full-softmax reference to 1e-5, for a separate base
    model and for a PEFT model against itself with its adapter disabled."""
    from peft import LoraConfig, get_peft_model

    from trl_pplmask.evaluation.drift import token_drift

    base = tiny_llama(initializer_range=0.3)
    tuned = _perturbed(base)
    got = token_drift(tuned, base, _SEQUENCES, _N_PROMPT, max_tokens_per_batch=12, logits_chunk_bytes=4 * 49152 * 2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_llama(initializer_range=0.3), lora).eval()
    got_peft = token_drift(peft_model, peft_model, _SEQUENCES, _N_PROMPT, logits_chunk_bytes=4 * 49152 * 3)

    def reference(base_model, tuned_model, sequence, n_prompt):
        ids = torch.tensor([sequence])
        with torch.no_grad():
            log_p = torch.log_softmax(base_model(ids).logits[0, n_prompt - 1 : -1].float(), dim=-1)
            log_q = torch.log_softmax(tuned_model(ids).logits[0, n_prompt - 1 : -1].float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl, -(log_p.exp() * log_p).sum(-1), -(log_q.exp() * log_q).sum(-1)

    for sequence, n_prompt, values, values_peft in zip(_SEQUENCES, _N_PROMPT, got, got_peft):
        kl, base_entropy, entropy = reference(base, tuned, sequence, n_prompt)
        assert kl.min() > 1e-4  # the perturbation moved every position
        np.testing.assert_allclose(values["kl"], kl.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(values["base_entropy"], base_entropy.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(values["entropy"], entropy.numpy(), rtol=0, atol=1e-5)
        ids = torch.tensor([sequence])
        with torch.no_grad():
            with peft_model.disable_adapter():
                log_p = torch.log_softmax(peft_model(ids).logits[0, n_prompt - 1 : -1].float(), dim=-1)
            log_q = torch.log_softmax(peft_model(ids).logits[0, n_prompt - 1 : -1].float(), dim=-1)
        kl_peft = (log_p.exp() * (log_p - log_q)).sum(-1)
        assert kl_peft.min() > 1e-6
        np.testing.assert_allclose(values_peft["kl"], kl_peft.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(values_peft["base_entropy"], -(log_p.exp() * log_p).sum(-1).numpy(), atol=1e-5)


def _tiny_model_folder(path: Path, model) -> str:
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def test_drift_task_end_to_end(tmp_path, data_dir):
    """`<task>_drift` through `run_evaluation`: base KL 0, an adapter (adapter disabled as base) and a full model
    (separately loaded base) drift, base answers generated once and cached, results cached per model."""
    from peft import LoraConfig, get_peft_model

    from trl_pplmask.evaluation import run_evaluation

    base_model = tiny_llama(initializer_range=0.3)
    base = _tiny_model_folder(tmp_path / "base", base_model)
    full = _tiny_model_folder(tmp_path / "full", _perturbed(base_model))
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(_perturbed(base_model, scale=0.0), lora)
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(tmp_path / "lora")
    specs = build_model_specs(base, [f"lora={tmp_path / 'lora'}"], [f"full={full}"])
    config = EvalConfig(
        tasks=["arc_challenge_drift", "mbpp_drift"],
        limit=2,
        drift_max_new_tokens=6,
        cache_dir=str(tmp_path / "cache"),
        n_resamples=50,
        show_progress=False,
        device="cpu",
        dtype="float32",
    )
    report = run_evaluation(specs, config, tmp_path / "report")
    results = report["results"]
    assert results["base"]["arc_challenge_drift"]["metrics"]["kl"] == 0.0
    for label in ("lora", "full"):
        for task in ("arc_challenge_drift", "mbpp_drift"):
            assert results[label][task]["metrics"]["kl"] > 0
    assert results["lora"]["mbpp_drift"]["stats"]["base"] == "adapter disabled"
    assert results["full"]["mbpp_drift"]["stats"]["base"] == "loaded separately"
    assert results["lora"]["mbpp_drift"]["stats"]["answers_cached"]  # generated once, for the base row
    base_items = results["base"]["arc_challenge_drift"]["items"]
    for item, full_item in zip(base_items, results["full"]["arc_challenge_drift"]["items"]):
        assert 1 <= item["weight"] <= 6 and item["base_answer"] == full_item["base_answer"]
        assert full_item["base_entropy"] == pytest.approx(item["scores"]["entropy"], abs=1e-5)
    assert len(list((tmp_path / "cache" / "drift_answers").glob("*.json"))) == 2
    gains = report["forgetting"]["full"]["tasks"]["mbpp_drift"]
    assert gains["gain"] < 0 and gains["relative_gain"] is None  # drift is a loss; the base's KL is 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "arc_challenge_drift kl ↓" in markdown and "arc_challenge_drift entropy ·" in markdown
    again = run_evaluation(specs, config)
    assert all(r["cached"] for by_task in again["results"].values() for r in by_task.values())


# --------------------------------------------------------------------------------------------------------------------
# Instruction following: project prompts, IFEval checkers from if-verifiable
# --------------------------------------------------------------------------------------------------------------------
_FOLLOWS = {  # kind: (a response that follows the first row of that kind, one that does not)
    "include_word": ("My friend loves the ocean.", "The ocean is large."),
    "word_twice": ("A friend is a friend.", "A friend is nice."),
    "avoid_word": ("The sea is wide and deep.", "The sea is full of water."),
    "min_words": (" ".join(["word"] * 50), " ".join(["word"] * 49)),
    "max_words": (" ".join(["word"] * 59), " ".join(["word"] * 60)),
    "postscript": ("The ocean is wide.\nP.S. I love it.", "The ocean is wide."),
    "highlight": ("The ocean is *very* wide.", "The ocean is very wide."),
}


def test_instruction_rows_and_checkers():
    pytest.importorskip("if_verifiable")
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    from trl_pplmask.evaluation.instruction_following import CONSTRAINTS, build_rows, check_following

    rows = build_rows()
    assert len(rows) == 56 and [r["row_id"] for r in rows] == list(range(56))
    assert build_rows(7) == rows[:7] and build_rows() == rows  # deterministic, prefixes cover every kind
    assert [r["kind"] for r in rows[:7]] == [c.name for c in CONSTRAINTS]
    assert len({r["prompt"][0]["content"] for r in rows}) == 56
    assert all(r["instruction_id"] in INSTRUCTION_DICT for r in rows)
    first = {r["kind"]: r for r in reversed(rows)}  # the first row of each kind (topic: the ocean)
    assert set(first) == set(_FOLLOWS)
    for kind, (good, bad) in _FOLLOWS.items():
        assert check_following(first[kind], good) == (True, True), kind
        assert check_following(first[kind], bad)[0] is False, kind
    assert check_following(first["highlight"], "") == (False, False)
    with pytest.raises(ValueError, match="--limit 57 is larger than instruction_following, which has 56 rows"):
        build_rows(57)


def test_instruction_following_skipped_without_checker(monkeypatch):
    from trl_pplmask.evaluation import runner
    from trl_pplmask.evaluation.runner import _available

    monkeypatch.setattr(runner, "checker_available", lambda: False)
    config = EvalConfig(tasks=["gsm8k", "instruction_following"])
    notes = []
    kept = _available([resolve_task(name) for name in config.tasks], config, notes)
    assert [t.name for t in kept] == ["gsm8k"]
    assert notes and "instruction_following skipped" in notes[0] and "pip install" in notes[0]
    target = EvalConfig(tasks=["instruction_following"])
    with pytest.raises(ValueError, match="target task cannot run.*if-verifiable"):
        _available([resolve_task("instruction_following")], target, [])


def test_instruction_following_task_end_to_end(tmp_path):
    pytest.importorskip("if_verifiable")
    from trl_pplmask.evaluation import run_evaluation

    base = _tiny_model_folder(tmp_path / "base", tiny_llama(initializer_range=0.3))
    config = EvalConfig(
        tasks=["instruction_following"],
        limit=7,
        instruction_max_new_tokens=6,
        cache_dir=str(tmp_path / "cache"),
        n_resamples=50,
        show_progress=False,
        device="cpu",
    )
    report = run_evaluation(build_model_specs(base), config, tmp_path / "report")
    result = report["results"]["base"]["instruction_following"]
    assert [item["kind"] for item in result["items"]] == list(_FOLLOWS)
    assert all(item["new_tokens"] <= 6 and item["scores"]["accuracy"] in (0.0, 1.0) for item in result["items"])
    assert set(result["stats"]["accuracy_by_kind"]) == set(_FOLLOWS)
    assert "instruction_following accuracy ↑" in (tmp_path / "report" / "report.md").read_text()
