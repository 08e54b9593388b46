"""A study's plan: its stages in order, each arm's `trl-pplmask sft` settings, and the progress and ETA lines."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arms import arm_settings
from .config import ArmConfig, StudyConfig


@dataclass(frozen=True)
class Stage:
    """One step of a study.

    Args:
        name (`str`): Unique name, e.g. `train:stm`.
        kind (`str`): `prepare`, `self_output`, `train`, `eval` or `report`.
        arm (`str`, *optional*): The arm label it concerns.
        description (`str`): One line for the plan.
    """

    name: str
    kind: str
    arm: str | None = None
    description: str = ""


def plan_stages(config: StudyConfig) -> list[Stage]:
    """The stages of a study in order (every stage runs, or is skipped when its result exists)."""
    stages = [Stage("prepare", "prepare", None, _prepare_description(config))]
    if any(arm.kind == "self_output" for arm in config.arms):
        so = config.self_output
        stages.append(
            Stage(
                "self_output",
                "self_output",
                None,
                f"answer {so.probe_rows} training rows with the base model ({so.num_samples} samples each); build "
                f"self-output data if >= {so.min_acceptance:.0%} of rows get a verified answer",
            )
        )
    for arm in config.training_arms:
        stages.append(Stage(f"train:{arm.label}", "train", arm.label, arm.spec.description))
    for arm in config.arms:
        stages.append(Stage(f"eval:{arm.label}", "eval", arm.label, f"{len(config.eval.tasks)} tasks"))
    stages.append(Stage("report", "report", None, "report.json, report.md, report.png, study.json"))
    return stages


def _prepare_description(config: StudyConfig) -> str:
    source = config.data.task or config.data.path
    limit = f", first {config.data.limit} rows" if config.data.limit else ""
    return f"{source} / {config.data.split}{limit} -> data/train"


def arm_trainer_settings(config: StudyConfig, arm: ArmConfig) -> dict[str, Any]:
    """The full `trl-pplmask sft` YAML of an arm, with paths relative to its folder `arms/<label>/`."""
    model = config.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    data = "../../data/self_output" if arm.spec.data == "self_output" else "../../data/train"
    settings = arm_settings(arm.kind, config.mask, config.training, arm.overrides)
    return {"model_name_or_path": model, "dataset_name": data, "output_dir": ".", **settings}


def render_plan(config: StudyConfig, stages: list[Stage] | None = None) -> str:
    """The plan as text: the stages, and every arm's own settings."""
    stages = stages if stages is not None else plan_stages(config)
    lines = [
        f"Study: {config.source or '(dict)'}",
        f"Model: {config.model}; output: {config.output_dir}",
        f"Evaluation: target {config.eval.target}; tasks {', '.join(config.eval.tasks)}; limit {config.eval.limit}",
        f"Stages ({len(stages)}):",
    ]
    for i, stage in enumerate(stages, 1):
        lines.append(f"  {i:2d}. {stage.name:<22} {stage.description}")
    lines.append("Arm settings (on top of `training`):")
    for arm in config.training_arms:
        own = {
            k: v
            for k, v in arm_trainer_settings(config, arm).items()
            if k not in config.training or config.training[k] != v
        }
        own = {k: v for k, v in own.items() if k not in ("model_name_or_path", "output_dir")}
        lines.append(f"  {arm.label}: " + ", ".join(f"{k}={v}" for k, v in own.items()))
    return "\n".join(lines)


def fmt_seconds(seconds: float) -> str:
    """`42s`, `3m07s` or `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def estimate_remaining(stages: list[Stage], state: dict[str, Any], start: int) -> tuple[float, list[str]]:
    """Seconds left for `stages[start:]`, from the measured times of finished stages of the same kind, and the kinds
    still to run that have no measurement yet (not counted)."""
    measured: dict[str, list[float]] = {}
    for stage in stages:
        entry = state.get("stages", {}).get(stage.name)
        if entry and entry.get("status") == "done" and entry.get("seconds") is not None:
            measured.setdefault(stage.kind, []).append(entry["seconds"])
    total, unknown = 0.0, []
    for stage in stages[start:]:
        entry = state.get("stages", {}).get(stage.name)
        if entry and entry.get("status") in ("done", "skipped"):
            continue
        times = measured.get(stage.kind) or ([5.0] if stage.kind in ("prepare", "report") else None)
        if times is None:
            if stage.kind not in unknown:
                unknown.append(stage.kind)
            continue
        total += sum(times) / len(times)
    return total, unknown


def print_progress(stages: list[Stage], index: int, state: dict[str, Any], started: float) -> None:
    """One line: which stage starts, the time elapsed and the ETA of the rest."""
    stage = stages[index]
    eta, unknown = estimate_remaining(stages, state, index)
    if not unknown:
        eta_text = f"ETA {fmt_seconds(eta)}"
    else:
        eta_text = f"ETA {fmt_seconds(eta)} + {', '.join(unknown)} stages (timed once the first one finishes)"
    print(
        f"[study {index + 1}/{len(stages)}] {stage.name}: {stage.description} "
        f"(elapsed {fmt_seconds(time.time() - started)}, {eta_text})",
        flush=True,
    )
