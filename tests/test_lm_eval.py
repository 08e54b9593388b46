"""The lm-evaluation-harness backend, run for real: lm-eval's own `arc_challenge` and `gsm8k` tasks on a tiny random
model, offline, on the local data mirror; the builtin `arc_challenge_mc` agrees with it item for item; nothing falls
back to the builtin evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from testing_utils import require_lm_eval

from trl_pplmask.evaluation import harness
from trl_pplmask.evaluation.config import EvalConfig, ModelSpec
from trl_pplmask.evaluation.harness import (
    LM_EVAL_TASKS,
    TASK_TEMPLATES,
    LmEvalError,
    check_documents,
    lm_eval_task_name,
    render_task_dir,
)
from trl_pplmask.evaluation.runner import run_evaluation
from trl_pplmask.evaluation.tasks import load_eval_rows, resolve_task


pytestmark = require_lm_eval

N_ARC, N_GSM8K = 10, 3


def _config(tmp_path: Path, tasks: list[str], limit: int, backend: str, **kwargs) -> EvalConfig:
    return EvalConfig(
        tasks=tasks,
        limit=limit,
        backend=backend,
        max_new_tokens=16,
        n_resamples=50,
        use_cache=False,
        cache_dir=str(tmp_path / "cache"),
        show_progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def arc_reports(tiny_model_dir, data_dir, tmp_path_factory):
    """The report of each backend on the first N_ARC ARC-Challenge test items of the tiny model (lm-eval's with
    gsm8k_nll too, which lm-eval does not implement)."""
    tmp = tmp_path_factory.mktemp("arc")
    spec = [ModelSpec("base", str(tiny_model_dir), is_base=True)]
    return {
        backend: run_evaluation(spec, _config(tmp / backend, tasks, N_ARC, backend), tmp / backend / "report")
        for backend, tasks in (("builtin", ["arc_challenge_mc"]), ("lm-eval", ["arc_challenge_mc", "gsm8k_nll"]))
    }


def test_arc_challenge_builtin_equals_lm_eval_item_for_item(arc_reports, data_dir):
    builtin = arc_reports["builtin"]["results"]["base"]["arc_challenge_mc"]
    harnessed = arc_reports["lm-eval"]["results"]["base"]["arc_challenge_mc"]
    assert (builtin["backend"], harnessed["backend"]) == ("builtin", "lm-eval")
    # lm-eval's own task on the mirror's files (no Hub: conftest sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE)
    assert harnessed["stats"]["lm_eval_task"] == "pplmask_arc_challenge"
    assert harnessed["stats"]["data"] == str(data_dir)
    assert [i["row_id"] for i in harnessed["items"]] == [i["row_id"] for i in builtin["items"]] == list(range(N_ARC))
    for ours, theirs in zip(builtin["items"], harnessed["items"]):
        assert ours["scores"] == theirs["scores"], ours["row_id"]
        # the same log-likelihood of every choice, up to float32 batching noise
        assert theirs["loglik"] == pytest.approx(ours["loglik"], abs=1e-3)
    # lm-eval's own aggregates are the means of the items we report
    for metric in ("acc", "acc_norm"):
        assert harnessed["stats"]["lm_eval_results"][f"{metric},none"] == pytest.approx(harnessed["metrics"][metric])
        assert harnessed["metrics"][metric] == builtin["metrics"][metric]


def test_report_names_each_tasks_backend(arc_reports, tmp_path):
    report = arc_reports["lm-eval"]
    assert report["results"]["base"]["gsm8k_nll"]["backend"] == "builtin"
    assert any("lm-eval has no equivalent of gsm8k_nll" in note for note in report["notes"])
    assert report["versions"]["lm_eval"] is not None  # the version the numbers depend on is recorded
    from trl_pplmask.evaluation.markdown import render_markdown

    assert "Backend: lm-eval (arc_challenge_mc), builtin (gsm8k_nll)." in render_markdown(report)
    assert "Backend: builtin." in render_markdown(arc_reports["builtin"])


def test_gsm8k_runs_lm_evals_own_task_on_the_mirror(tiny_model_dir, data_dir, tmp_path):
    spec = [ModelSpec("base", str(tiny_model_dir), is_base=True)]
    report = run_evaluation(spec, _config(tmp_path, ["gsm8k"], N_GSM8K, "lm-eval"), tmp_path / "report")
    result = report["results"]["base"]["gsm8k"]
    assert result["backend"] == "lm-eval" and result["stats"]["lm_eval_task"] == "pplmask_gsm8k"
    rows = load_eval_rows(resolve_task("gsm8k"), N_GSM8K)
    for item, row in zip(result["items"], rows, strict=True):
        assert item["reference"] == row["answer"]
        # lm-eval's 5-shot prompt (its few-shot examples from the mirror's train split), then the question
        assert item["prompt"].count("Question:") == 6 and row["question"] in item["prompt"]
        assert item["generation_kwargs"]["max_gen_toks"] == 16  # --max-new-tokens reaches lm-eval
        assert item["scores"]["accuracy"] in (0.0, 1.0)
    assert result["stats"]["lm_eval_results"]["exact_match,flexible-extract"] == pytest.approx(
        result["metrics"]["accuracy"]
    )
    assert "Backend: lm-eval." in (tmp_path / "report" / "report.md").read_text()


def test_lm_eval_failure_is_an_error_not_a_fallback(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """A mirror holding only the first test rows of ARC: the builtin evaluator could run, lm-eval's task (which also
    declares train and validation) cannot; the run stops, names the task, the model and the data, writes nothing."""
    mirror = tmp_path / "mirror"
    relative = "paper/arc_challenge/test.jsonl"
    (mirror / relative).parent.mkdir(parents=True)
    lines = (data_dir / relative).read_text().splitlines()[:N_ARC]
    (mirror / relative).write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TRL_PPLMASK_DATA_DIR", str(mirror))
    spec = [ModelSpec("base", str(tiny_model_dir), is_base=True)]
    with pytest.raises(LmEvalError, match=r"arc_challenge_mc .*for model base.*--backend builtin") as failure:
        run_evaluation(spec, _config(tmp_path, ["arc_challenge_mc"], N_ARC, "lm-eval"), tmp_path / "report")
    assert str(mirror) in str(failure.value) and "train.jsonl" in str(failure.value)
    assert not (tmp_path / "report" / "report.json").exists()
    # the command line: one line on stderr, exit code 2, no report
    from trl_pplmask.commands.eval import main

    argv = ["--base", str(tiny_model_dir), "--tasks", "arc_challenge_mc", "--limit", str(N_ARC), "--backend"]
    argv += ["lm-eval", "--no-cache", "--output-dir", str(tmp_path / "cli")]
    monkeypatch.delenv("TRL_PPLMASK_DEBUG", raising=False)
    assert main(argv) == 2
    assert not (tmp_path / "cli" / "report.json").exists()


def test_missing_lm_eval_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    config = _config(tmp_path, ["gsm8k"], 2, "lm-eval")
    spec = [ModelSpec("base", str(tmp_path / "never-loaded"), is_base=True)]
    with pytest.raises(ValueError, match=r"not installed: pip install 'trl-pplmask\[lm-eval\]'"):
        run_evaluation(spec, config, tmp_path / "report")
    from trl_pplmask.commands.eval import main

    monkeypatch.delenv("TRL_PPLMASK_DEBUG", raising=False)
    assert main(["--tasks", "gsm8k", "--backend", "lm-eval", "--output-dir", str(tmp_path / "cli")]) == 2
    assert "--backend lm-eval needs lm-evaluation-harness" in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "cli").exists()


def test_task_templates_render_to_lm_eval_tasks_on_the_mirror(data_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    assert sorted(p.name for p in TASK_TEMPLATES.glob("*.yaml")) == sorted(s.template for s in LM_EVAL_TASKS.values())
    folder = render_task_dir(tmp_path, data_dir)
    for spec in LM_EVAL_TASKS.values():
        config = yaml.safe_load((folder / spec.template).read_text())
        assert config["task"] == spec.local_task and config["dataset_path"] == "json"
        assert Path(config["include"]).is_file() and Path(config["include"]).parent.name == spec.folder
        assert all(
            Path(p).is_file() and Path(p).is_relative_to(data_dir)
            for p in config["dataset_kwargs"]["data_files"].values()
        )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert {s.local_task for s in LM_EVAL_TASKS.values()} <= set(manager.all_subtasks)


def test_without_a_mirror_lm_evals_own_task_reads_the_hub(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.delenv("TRL_PPLMASK_DATA_DIR", raising=False)  # CI may have no mirror
    for name, spec in LM_EVAL_TASKS.items():
        assert lm_eval_task_name(resolve_task(name)) == spec.task
        manager = TaskManager(include_path=str(harness._stock_dir() / spec.folder), include_defaults=False)
        assert spec.task in manager.all_subtasks


def test_documents_must_be_our_rows():
    rows = [{"question": "a"}, {"question": "b"}]
    task = resolve_task("gsm8k")
    check_documents([{"doc_id": 0, "doc": {"question": "a"}}, {"doc_id": 1, "doc": {"question": "b"}}], rows, task)
    with pytest.raises(ValueError, match="different copies of the data"):
        check_documents([{"doc_id": 0, "doc": {"question": "b"}}, {"doc_id": 1, "doc": {"question": "a"}}], rows, task)
    with pytest.raises(ValueError, match="not the 2 rows"):
        check_documents([{"doc_id": 0, "doc": {"question": "a"}}], rows, task)
