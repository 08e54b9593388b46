"""`trl-pplmask study`: YAML schema and validation, the plan, arm settings, resume checks, and a micro study."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from trl_pplmask.study import (
    ARM_KINDS,
    StudyPaths,
    arm_trainer_settings,
    config_from_dict,
    load_study_config,
    plan_stages,
    render_plan,
)
from trl_pplmask.study.plan import estimate_remaining
from trl_pplmask.study.prepare import prepare_data
from trl_pplmask.study.train import finished_arm, missing_features


REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))
CPU_STUDY = REPO / "studies" / "gsm8k-smollm2-135m-cpu.yaml"


def minimal(tmp_path, **changes) -> dict:
    raw = {
        "model": "smollm2-135m-instruct",
        "output_dir": str(tmp_path / "study"),
        "data": {"task": "gsm8k", "limit": 4},
        "training": {"use_peft": True, "max_steps": 1, "learning_rate": 2e-4},
        "arms": ["base", "gt", "stm"],
        "eval": {"tasks": ["gsm8k", "arc_challenge_mc"], "limit": 4},
    }
    raw.update(changes)
    return raw


# --------------------------------------------------------------------------------------------------------------------
# Configs and plan
# --------------------------------------------------------------------------------------------------------------------
def test_study_configs_parse_and_plan_the_same_stages():
    assert {p.name for p in STUDIES} >= {
        "gsm8k-smollm2-135m-cpu.yaml",
        "mbpp-gemma-2-2b-it.yaml",
        "gsm8k-llama-3.1-8b-instruct.yaml",
    }
    plans = {}
    for path in STUDIES:
        config = load_study_config(path)
        plans[path.name] = [(s.kind, s.arm) for s in plan_stages(config)]
        assert config.eval.target == config.data.task
        assert "Stages" in render_plan(config)
    reference = plans.pop(CPU_STUDY.name)
    for name, plan in plans.items():
        assert plan == reference, name
    kinds = [kind for kind, _ in reference]
    assert kinds[0] == "prepare" and kinds[-1] == "report"
    trained = [arm for kind, arm in reference if kind == "train"]
    assert trained == [
        "gt", "stm", "random", "lowest", "dft", "stm_entropy", "stm_anchor", "eaft", "asft", "soft_stm", "self_output"
    ]  # fmt: skip
    assert [arm for kind, arm in reference if kind == "eval"] == ["base", *trained]


def test_gpu_studies_use_paper_settings():
    for name in ("mbpp-gemma-2-2b-it.yaml", "gsm8k-llama-3.1-8b-instruct.yaml"):
        training = load_study_config(REPO / "studies" / name).training
        assert training["learning_rate"] == 2e-5 and training["num_train_epochs"] == 3
        assert (training["lora_r"], training["lora_alpha"], training["lr_scheduler_type"]) == (16, 32, "cosine")
        assert training["bf16"] is True


def test_installed_library_has_every_arm_feature():
    for path in STUDIES:
        assert missing_features(load_study_config(path)) == []


def test_cli_plan(capsys):
    from trl_pplmask.cli import main

    assert main(["study", "--config", str(CPU_STUDY), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "train:stm_anchor" in out and "eval:base" in out and "pplmask_strategy=lowest_count" in out


def test_arm_settings(tmp_path):
    raw = minimal(
        tmp_path,
        arms=["gt", "lowest", "dft", "random", "stm_anchor", {"stm": {"label": "stm3", "pplmask_threshold": 3.0}}],
    )
    raw["mask"] = {"threshold": 2.0, "seed": 7, "anchor_weight": 0.5}
    config = config_from_dict(raw)
    assert [a.label for a in config.arms] == ["base", "gt", "lowest", "dft", "random", "stm_anchor", "stm3"]
    settings = {a.label: arm_trainer_settings(config, a) for a in config.training_arms}
    for s in settings.values():
        assert s["max_steps"] == 1 and s["pplmask_prescore"] is True and s["output_dir"] == "."
        assert s["model_name_or_path"] == "smollm2-135m-instruct" and s["dataset_name"] == "../../data/train"
    assert settings["gt"]["pplmask_strategy"] == "none" and "loss_type" not in settings["gt"]
    assert settings["lowest"]["pplmask_strategy"] == "lowest_count" and settings["lowest"]["pplmask_threshold"] == 2.0
    assert settings["dft"]["loss_type"] == "dft" and settings["dft"]["pplmask_strategy"] == "none"
    assert settings["random"]["pplmask_seed"] == 7
    assert settings["stm_anchor"]["pplmask_anchor"] is True and settings["stm_anchor"]["pplmask_anchor_weight"] == 0.5
    assert settings["stm3"]["pplmask_strategy"] == "threshold" and settings["stm3"]["pplmask_threshold"] == 3.0
    assert set(ARM_KINDS) == {
        "base",
        "gt",
        "stm",
        "random",
        "lowest",
        "dft",
        "stm_entropy",
        "stm_anchor",
        "eaft",
        "asft",
        "soft_stm",
        "self_output",
    }


# --------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the setting, before any work
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": ["base", "gtt"]}, r"unknown arm 'gtt' \(did you mean 'gt'\?\)"),
        ({"arms": ["gt", "gt"]}, "listed twice"),
        ({"arms": [{"base": {"pplmask_threshold": 3}}]}, "does not train"),
        ({"eval": {"tasks": ["gsm8k", "arc_challange_mc"]}}, "eval: Unknown task 'arc_challange_mc'"),
        ({"eval": {"tasks": ["arc_challenge_mc"]}}, "eval.target"),
        ({"eval": {"tasks": ["gsm8k"], "limt": 3}}, "eval.limt: unknown setting"),
        ({"data": {"task": "gsm8kk"}}, "data.task: unknown task 'gsm8kk'"),
        ({"data": {}}, "The study YAML needs `data`"),
        ({"training": {"use_peft": True, "learning_rat": 1e-4}}, r"training.learning_rat: not a `trl sft` setting"),
        ({"training": {"use_peft": True, "output_dir": "x"}}, "training.output_dir: each arm trains into"),
        ({"training": {"use_peft": True, "dataset_name": "x"}}, "training.dataset_name"),
        ({"training": {"use_peft": True, "pplmask_threshold": 3}}, "training.pplmask_threshold: mask settings"),
        ({"training": {"use_peft": True, "loss_type": "dft"}}, "the `dft` arm"),
        ({"training": {"max_steps": 1}}, "training.use_peft"),
        ({"mask": {"threshold": 1.0}}, "mask.threshold must be above 1"),
        ({"mask": {"treshold": 2.0}}, r"mask.treshold: unknown setting \(did you mean 'threshold'\?\)"),
        ({"modle": "x"}, r"Unknown study setting 'modle' \(did you mean 'model'\?\)"),
        (
            {
                "data": {"path": "rows.jsonl"},
                "arms": ["gt", "self_output"],
                "eval": {"tasks": ["gsm8k"], "target": "gsm8k"},
            },
            "self_output` verifies",
        ),
    ],
)
def test_bad_config_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(minimal(tmp_path, **change))


def test_missing_strategy_is_reported(tmp_path, monkeypatch):
    import trl_pplmask.masking as masking

    monkeypatch.setattr(masking, "STRATEGIES", tuple(s for s in masking.STRATEGIES if s != "stm_entropy"))
    config = config_from_dict(minimal(tmp_path, arms=["gt", "stm_entropy"]))
    problems = missing_features(config, flags={"pplmask_strategy", "pplmask_threshold", "pplmask_prescore"})
    assert any("'stm_entropy' needs mask strategy 'stm_entropy'" in p for p in problems)
    assert any("needs the setting 'pplmask_reference'" in p for p in problems)

    from trl_pplmask.study.runner import check_before_work

    with pytest.raises(ValueError, match="cannot run with this installation"):
        check_before_work(config, flags=set())


def test_scored_data_without_entropy_is_refused(tmp_path):
    rows = tmp_path / "scored.jsonl"
    row = {"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}]}
    rows.write_text(json.dumps({**row, "token_nll": [0.0, 1.0]}) + "\n")
    config = config_from_dict(minimal(tmp_path, data={"task": "gsm8k", "path": str(rows)}, arms=["gt", "stm_entropy"]))
    with pytest.raises(ValueError, match="needs the column `token_entropy`"):
        prepare_data(config, StudyPaths(config.output_dir))


# --------------------------------------------------------------------------------------------------------------------
# Resume: data, finished arms, ETA
# --------------------------------------------------------------------------------------------------------------------
def test_prepare_data_once_and_refuse_other_data(tmp_path, data_dir):
    config = config_from_dict(minimal(tmp_path))
    paths = StudyPaths(config.output_dir)
    info, reused = prepare_data(config, paths)
    assert not reused and info["rows"] == 4 and info["columns"] == ["prompt", "completion", "row_id"]
    from datasets import load_from_disk

    assert "answer" in load_from_disk(str(paths.rows)).column_names  # raw fields, for the self-output verifier
    again, reused = prepare_data(config, paths)
    assert reused and again == info
    other = config_from_dict(minimal(tmp_path, data={"task": "gsm8k", "limit": 5}))
    with pytest.raises(ValueError, match="prepared from other data"):
        prepare_data(other, paths)


def _finish(arm_dir: Path, identity: dict, recorded: dict) -> None:
    arm_dir.mkdir(parents=True)
    (arm_dir / "arm.json").write_text(json.dumps(identity))
    (arm_dir / "pplmask_config.json").write_text(json.dumps({"settings": recorded, "mask_stats": {}}))


def test_finished_arm_with_other_settings_is_refused(tmp_path):
    config = config_from_dict(minimal(tmp_path))
    arm = config.arms[2]
    settings = arm_trainer_settings(config, arm)
    identity = {"arm": "stm", "settings": settings, "data": "abc"}
    recorded = {k: v for k, v in settings.items() if k.startswith("pplmask_")}
    arm_dir = tmp_path / "stm"
    _finish(arm_dir, identity, {**recorded, "output_dir": "/elsewhere"})
    assert finished_arm(arm_dir, identity, "stm")["settings"]["pplmask_threshold"] == 2.5
    assert finished_arm(tmp_path / "missing", identity, "stm") is None
    changed = copy.deepcopy(identity)
    changed["settings"]["pplmask_threshold"] = 3.0
    with pytest.raises(ValueError, match=r"pplmask_threshold: finished run 2.5, YAML 3.0"):
        finished_arm(arm_dir, changed, "stm")
    changed = copy.deepcopy(identity)
    changed["settings"]["learning_rate"] = 1e-5
    with pytest.raises(ValueError, match="learning_rate"):
        finished_arm(arm_dir, changed, "stm")
    with pytest.raises(ValueError, match="training data"):
        finished_arm(arm_dir, {**identity, "data": "other"}, "stm")
    # No arm.json (an arm finished by hand): compared with what the trainer recorded
    (arm_dir / "arm.json").unlink()
    with pytest.raises(ValueError, match="delete"):
        finished_arm(arm_dir, {**identity, "settings": {**settings, "pplmask_threshold": 2.0}}, "stm")
    record = json.loads((arm_dir / "pplmask_config.json").read_text())
    record["training"] = {"learning_rate": 2e-4, "max_steps": 1}
    (arm_dir / "pplmask_config.json").write_text(json.dumps(record))
    assert finished_arm(arm_dir, identity, "stm") is not None
    with pytest.raises(ValueError, match="max_steps: finished run 1, YAML 2"):
        finished_arm(arm_dir, {**identity, "settings": {**settings, "max_steps": 2}}, "stm")


# The `trl-pplmask sft` settings added with the token-weighted objectives (issue 19)
OBJECTIVE_FIELDS = ("pplmask_loss", "pplmask_eaft_alpha", "pplmask_eaft_k", "pplmask_asft_alpha", "pplmask_soft_width")


def test_arm_finished_before_the_objectives_existed_is_reused(tmp_path):
    """A CPU-study arm recorded by the code before `pplmask_loss` (no such fields in arm.json or pplmask_config.json)
    is reused by a resume; the new arms set the new fields explicitly."""
    import dataclasses

    from trl_pplmask.sft import PplMaskArguments

    config = load_study_config(CPU_STUDY)
    new_arms = {"eaft": "eaft", "asft": "asft", "soft_stm": "soft_stm"}
    for arm in config.training_arms:
        settings = arm_trainer_settings(config, arm)
        if arm.kind in new_arms:
            assert settings["pplmask_loss"] == new_arms[arm.kind] and settings["pplmask_strategy"] == "none"
            continue
        assert not set(OBJECTIVE_FIELDS) & set(settings), arm.label  # an old arm's identity is unchanged
        # What the old trainer wrote: every PplMaskArguments field of its time, i.e. without the new ones
        mine = {k: v for k, v in settings.items() if k.startswith("pplmask_")}
        old = {k: v for k, v in dataclasses.asdict(PplMaskArguments(**mine)).items() if k not in OBJECTIVE_FIELDS}
        identity = {"arm": arm.kind, "settings": settings, "data": "abc"}
        _finish(tmp_path / arm.label, identity, old)
        assert finished_arm(tmp_path / arm.label, identity, arm.label) is not None, arm.label
    assert {a.kind for a in config.training_arms} >= set(new_arms)


def test_eta_from_finished_stages(tmp_path):
    config = config_from_dict(minimal(tmp_path))
    stages = plan_stages(config)  # prepare, train gt, train stm, eval base, eval gt, eval stm, report
    state = {"stages": {"prepare": {"status": "done", "seconds": 2.0}}}
    assert estimate_remaining(stages, state, 1) == (5.0, ["train", "eval"])
    state["stages"]["train:gt"] = {"status": "done", "seconds": 100.0}
    assert estimate_remaining(stages, state, 2) == (100 + 5, ["eval"])
    state["stages"]["eval:base"] = {"status": "done", "seconds": 30.0}
    assert estimate_remaining(stages, state, 2) == (pytest.approx(100 + 30 + 30 + 5), [])


# --------------------------------------------------------------------------------------------------------------------
# Micro study end to end (tiny random model, every arm, 1 step) and resume after a kill
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_model(tiny_model_factory) -> tuple[Path, float]:
    """A tiny random Llama with the embedded tokenizer, and a perplexity threshold at the median token perplexity it
    gives GSM8K answers (a random model's perplexities all lie near the vocabulary size, so the paper's 2.5 would mask
    everything)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_pplmask.data import load_task

    path = tiny_model_factory(tie_word_embeddings=True)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tokenizer(load_task("gsm8k", "train", 1)[0]["answer"])["input_ids"]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    return path, float(np.exp(np.median(nll.numpy())))


def micro_config(tmp_path, tiny: tuple[Path, float], arms: list) -> dict:
    model, threshold = tiny
    return {
        "model": str(model),
        "output_dir": str(tmp_path / "study"),
        "data": {"task": "gsm8k", "limit": 4},
        "training": {
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": "all-linear",
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 256,
            "learning_rate": 1e-3,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
        },
        "mask": {"threshold": threshold, "entropy_threshold": 20.0},
        "arms": arms,
        "self_output": {"probe_rows": 2, "num_samples": 1, "max_new_tokens": 8, "min_acceptance": 0.0},
        "eval": {
            "tasks": ["gsm8k", "gsm8k_nll", "arc_challenge_mc", "arc_challenge_drift"],
            "limit": 4,
            "max_new_tokens": 8,
            "drift_max_new_tokens": 8,
            "n_resamples": 50,
            "cache_dir": str(tmp_path / "eval-cache"),
        },
    }


@pytest.mark.slow
def test_micro_study_every_arm_and_resume(tmp_path, micro_model, data_dir, capsys):
    from trl_pplmask.study import run_study

    # 1. A study "killed" after its first arm: only gt ran
    first = config_from_dict(micro_config(tmp_path, micro_model, ["base", "gt"]))
    run_study(first)
    adapter = tmp_path / "study" / "arms" / "gt" / "adapter_model.safetensors"

    assert adapter.is_file() and (adapter.parent / "pplmask_config.json").is_file()
    mtime = adapter.stat().st_mtime_ns

    # 2. The whole study: gt is not retrained, every other arm trains, everything is evaluated and reported
    arms = ["base", "gt", "stm", "random", "lowest", "dft", "stm_entropy", "stm_anchor", "self_output"]
    config = config_from_dict(micro_config(tmp_path, micro_model, arms))
    study = run_study(config, "test")
    assert adapter.stat().st_mtime_ns == mtime
    out = capsys.readouterr().out
    assert "[study] train:gt done" in out and "(reused)" in out and "ETA" in out
    root = tmp_path / "study"
    for name in ("report.json", "report.md", "report.png", "study.json"):
        assert (root / name).is_file(), name
    assert study["status"] == "complete" and study["stages"]["train:gt"].get("reused") is True
    for arm in arms[1:]:
        assert study["arms"][arm]["status"] == "trained", arm
        assert 0.0 <= study["arms"][arm]["masked_fraction"] <= 1.0
        assert (root / "arms" / arm / "config.yaml").is_file()
    assert study["arms"]["gt"]["masked_fraction"] == 0.0
    assert study["self_output"]["status"] == "ready" and "acceptance_rate" in study["self_output"]
    assert study["versions"]["trl"] and study["wall_time_seconds"]["total"] > 0
    report = json.loads((root / "report.json").read_text())
    assert list(report["results"]) == arms
    assert study["relative_to_gt"] == report["reference_comparison"] and study["relative_to_gt"]
    assert json.loads((root / "study.json").read_text())["status"] == "complete"

    # 3. Changed settings for a finished arm: refused, nothing retrained
    changed = micro_config(tmp_path, micro_model, ["base", "gt"])
    changed["training"]["learning_rate"] = 5e-4
    with pytest.raises(ValueError, match="Arm 'gt' .* finished with other settings"):
        run_study(config_from_dict(changed))
    assert adapter.stat().st_mtime_ns == mtime
    assert yaml.safe_load((root / "arms" / "gt" / "config.yaml").read_text())["learning_rate"] == 1e-3
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


PARTIAL_STUDIES = sorted((REPO / "studies" / "calibration").glob("*.yaml")) + sorted(
    (REPO / "studies" / "reruns").glob("*.yaml")
)


@pytest.mark.parametrize("path", PARTIAL_STUDIES, ids=lambda p: p.stem)
def test_calibration_configs_parse_and_plan(path):
    """Calibration runs and partial reruns (a study's subset of arms): they plan, and compare with base and gt."""
    config = load_study_config(path)
    kinds = [stage.kind for stage in plan_stages(config)]
    assert kinds[0] == "prepare" and kinds[-1] == "report" and "train" in kinds
    assert {arm.kind for arm in config.arms} >= {"base", "gt"}


def test_sft_flags_come_from_the_dataclass_not_a_subprocess(monkeypatch):
    """The study learns the `pplmask_*` settings of `trl-pplmask sft` from PplMaskArguments itself (it used to start
    `trl-pplmask sft --help` in a subprocess and parse the text)."""
    import dataclasses
    import subprocess

    from trl_pplmask.sft import PplMaskArguments
    from trl_pplmask.study.train import sft_flags

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"started a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert sft_flags() == {f.name for f in dataclasses.fields(PplMaskArguments)}
    assert {"pplmask_strategy", "pplmask_loss", "pplmask_anchor_weight"} <= sft_flags()
