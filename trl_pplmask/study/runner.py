"""The stages of a study: plan, prepare data, self-output probe, train each arm, evaluate each model, report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import DPF_NLL_COLUMN
from ..utils import REDACTED, atomic_write_text, is_secret_name, redact, redact_text
from .arms import arm_settings
from .config import ArmConfig, StudyConfig


STATE_FILE = "study_state.json"
STUDY_FILE = "study.json"
FINISHED_FILE = "pplmask_config.json"  # written last by `trl-pplmask sft`: its presence means the arm finished
ARM_FILE = "arm.json"  # what the study launched the arm with (settings and data fingerprint)
# Keys compared with what `trl-pplmask sft` recorded, except paths (a moved study folder stays valid)
_PATH_KEYS = {"model_name_or_path", "output_dir", "dataset_name", "logging_dir"}


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


class StudyPaths:
    """Where a study keeps its files under `output_dir`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.data = self.root / "data"
        self.train = self.data / "train"  # what every arm trains on: TRL-format columns and row_id
        self.rows = self.data / "rows"  # the same rows with the task's raw fields (verifiers of self_output)
        self.data_info = self.data / "train_info.json"
        self.self_output_dir = self.root / "self_output"
        self.self_output_data = self.data / "self_output"
        self.self_output_info = self.self_output_dir / "self_output.json"
        self.arms = self.root / "arms"
        self.state = self.root / STATE_FILE
        self.study = self.root / STUDY_FILE

    def arm(self, label: str) -> Path:
        return self.arms / label


# --------------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Checks that need the installed trainer
# --------------------------------------------------------------------------------------------------------------------
def sft_command() -> list[str]:
    return [sys.executable, "-m", "trl_pplmask.cli", "sft"]


def sft_flags() -> set[str]:
    """The `pplmask_*` settings `trl-pplmask sft` accepts: the fields of its [`~trl_pplmask.sft.PplMaskArguments`]
    (the arms run that module, in this same installation)."""
    try:
        from ..sft import PplMaskArguments
    except ImportError as err:
        raise ValueError(
            f"`trl-pplmask sft` is not available in this installation (it trains every arm): {err}. Install "
            "trl-pplmask with its dependencies (`pip install trl-pplmask`)."
        ) from None
    return {f.name for f in dataclasses.fields(PplMaskArguments)}


def missing_features(config: StudyConfig, flags: set[str] | None = None) -> list[str]:
    """What the arms need that this installation lacks: mask strategies, and (given `flags`) sft settings."""
    from ..masking import STRATEGIES

    problems = []
    for arm in config.training_arms:
        settings = arm_settings(arm.kind, config.mask, config.training, arm.overrides)
        strategy = settings.get("pplmask_strategy")
        if strategy is not None and strategy not in STRATEGIES:
            problems.append(
                f"arm {arm.label!r} needs mask strategy {strategy!r}, which trl_pplmask.masking lacks (strategies: "
                f"{', '.join(STRATEGIES)}); update trl-pplmask or remove the arm."
            )
        if flags is not None:
            for key in settings:
                if key.startswith("pplmask_") and key not in flags:
                    problems.append(
                        f"arm {arm.label!r} needs the setting {key!r}, which `trl-pplmask sft` does not accept; "
                        "update trl-pplmask or remove the arm."
                    )
    return problems


def check_data_columns(config: StudyConfig, columns: list[str]) -> None:
    """Arms that need columns of pre-scored data: a scored file must carry what they read."""
    if "token_nll" not in columns:
        return  # plain data: `trl-pplmask sft` scores it (pplmask_prescore) with every column it needs
    for arm in config.training_arms:
        strategy = arm_settings(arm.kind, config.mask, config.training, arm.overrides).get("pplmask_strategy")
        if strategy == "stm_entropy" and "token_entropy" not in columns:
            raise ValueError(
                f"arm {arm.label!r} needs the column `token_entropy`, which data.path {config.data.path} lacks "
                f"(columns: {columns}); rescore it with `trl-pplmask score` of this version, or give unscored "
                "prompt/completion data, or remove the arm."
            )
        if strategy in ("dpf", "stm_dpf") and DPF_NLL_COLUMN not in columns:
            raise ValueError(f"arm {arm.label!r} needs the column `{DPF_NLL_COLUMN}`, which data.path lacks.")


# --------------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------------
def _fmt_seconds(seconds: float) -> str:
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


def _progress(stages: list[Stage], index: int, state: dict[str, Any], started: float) -> None:
    stage = stages[index]
    eta, unknown = estimate_remaining(stages, state, index)
    if not unknown:
        eta_text = f"ETA {_fmt_seconds(eta)}"
    else:
        eta_text = f"ETA {_fmt_seconds(eta)} + {', '.join(unknown)} stages (timed once the first one finishes)"
    print(
        f"[study {index + 1}/{len(stages)}] {stage.name}: {stage.description} "
        f"(elapsed {_fmt_seconds(time.time() - started)}, {eta_text})",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------------------------------
# Stage: train an arm
# --------------------------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, (list, tuple)):  # e.g. target modules "all-linear" vs a list
        return False
    return a == b or str(a) == str(b)


def settings_differences(wanted: dict[str, Any], recorded: dict[str, Any], skip: set[str] = frozenset()) -> list[str]:
    """Keys of `wanted` whose value differs from `recorded` (keys missing from `recorded` are not compared)."""
    # Secrets are recorded redacted: they cannot be compared, and do not change what an arm trains
    return [
        f"{key}: finished run {recorded[key]!r}, YAML {redact(value)!r}"
        for key, value in wanted.items()
        if key in recorded and key not in skip and not is_secret_name(key) and not _same(recorded[key], redact(value))
    ]


def finished_arm(arm_dir: Path, identity: dict[str, Any], label: str) -> dict[str, Any] | None:
    """The arm's `pplmask_config.json` when it finished with the same settings; `None` when it has not finished; an
    error when it finished with other settings."""
    record = _read_json(arm_dir / FINISHED_FILE)
    if record is None:
        return None
    fix = (
        f"Restore the YAML's settings, or delete {arm_dir} to retrain the arm, or use a new output_dir; a finished "
        "arm is never silently reused with other settings."
    )
    # What the trainer recorded: its pplmask_* settings and a summary of the trl arguments (learning rate, steps, ...)
    recorded = {**(record.get("training") or {}), **(record.get("settings") or {})}
    differences = settings_differences(identity["settings"], recorded, _PATH_KEYS)
    launched = _read_json(arm_dir / ARM_FILE)
    if launched is not None:
        launched_differences = settings_differences(identity["settings"], launched["settings"])
        differences += [d for d in launched_differences if d not in differences]
        extra = sorted(k for k in set(launched["settings"]) - set(identity["settings"]) if not is_secret_name(k))
        differences += [f"{key}: finished run {launched['settings'][key]!r}, YAML (unset)" for key in extra]
        if launched.get("data") != identity["data"]:
            differences.append(f"training data: finished run {launched.get('data')}, now {identity['data']}")
    if differences:
        raise ValueError(
            f"Arm {label!r} in {arm_dir} finished with other settings than the study YAML:\n  "
            + "\n  ".join(differences)
            + f"\n{fix}"
        )
    return record


def split_secrets(settings: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """`(settings without secrets, flags, environment)` of an arm: no secret is written to its `config.yaml`.

    `hub_token` travels as `HF_TOKEN` in the trainer's environment (where `push_to_hub` reads it); any other secret
    setting as a command-line flag, which the log records redacted.
    """
    public, flags, env = {}, [], {}
    for key, value in settings.items():
        if not is_secret_name(key) or value in (None, "", REDACTED):
            public[key] = value
        elif key == "hub_token":
            env["HF_TOKEN"] = str(value)
        else:
            flags += [f"--{key}", str(value)]
    return public, flags, env


def train_arm(config: StudyConfig, arm: ArmConfig, paths: StudyPaths, data_fingerprint: str) -> tuple[dict, bool]:
    """Train one arm through `trl-pplmask sft` in a subprocess; returns (its pplmask_config.json, reused)."""
    import yaml

    arm_dir = paths.arm(arm.label)
    settings = _jsonable(arm_trainer_settings(config, arm))
    identity = {"arm": arm.kind, "settings": settings, "data": data_fingerprint}
    record = finished_arm(arm_dir, identity, arm.label)
    if record is not None:
        return record, True
    arm_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Arm {arm.label!r} ({arm.kind}) of the study {config.source}; written by `trl-pplmask study`.\n"
    public, secret_flags, env = split_secrets(settings)
    atomic_write_text(arm_dir / "config.yaml", header + yaml.safe_dump(public, sort_keys=False))
    atomic_write_text(arm_dir / ARM_FILE, json.dumps(redact(identity), indent=1))
    log_path = arm_dir / "train.log"
    command = [*sft_command(), "--config", "config.yaml", *secret_flags]
    with open(log_path, "ab") as log:
        log.write(redact_text(f"\n$ {' '.join(command)}  (cwd {arm_dir})\n").encode())
        log.flush()
        process = subprocess.Popen(
            command, cwd=arm_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        try:
            for chunk in iter(lambda: process.stdout.read1(4096), b""):
                chunk = redact_text(chunk.decode(errors="replace")).encode()
                log.write(chunk)
                log.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            returncode = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
    if returncode != 0:
        lines = [line for line in re.split(r"[\r\n]", log_path.read_text(errors="replace")) if line.strip()]
        tail = "\n".join(lines[-25:])  # progress bars rewrite their line with \r: keep the last state of each
        raise RuntimeError(
            f"Training arm {arm.label!r} failed (exit code {returncode}); its log is {log_path}. Last lines:\n{tail}"
        )
    record = _read_json(arm_dir / FINISHED_FILE)
    if record is None:
        raise RuntimeError(
            f"Arm {arm.label!r}: `trl-pplmask sft` exited without writing {FINISHED_FILE}; see {log_path}."
        )
    return record, False


# --------------------------------------------------------------------------------------------------------------------
# Stages: evaluation and report
# --------------------------------------------------------------------------------------------------------------------
def model_specs(config: StudyConfig, paths: StudyPaths, labels: list[str]):
    """Evaluation specs: the base model first, then one per trained arm (adapter or full model)."""
    from ..evaluation import ModelSpec

    specs = [ModelSpec("base", config.model, None, True)]
    for arm in config.arms:
        if arm.kind == "base" or arm.label not in labels:
            continue
        path = str(paths.arm(arm.label))
        specs.append(ModelSpec(arm.label, config.model, path) if config.use_peft else ModelSpec(arm.label, path))
    return specs


def evaluate_model(config: StudyConfig, specs, label: str) -> None:
    """Evaluate one model (and the base, cached) so that the final report reads every result from the cache."""
    from ..evaluation import run_evaluation

    base = specs[0]
    chosen = [base] if label == base.label else [base, next(s for s in specs if s.label == label)]
    run_evaluation(chosen, dataclasses.replace(config.eval.eval_config(), reference=None))


def write_study_report(config: StudyConfig, paths: StudyPaths, specs, command: str | None) -> dict[str, Any]:
    """The report of every model (all results from the cache), with every arm compared with `gt` when it ran: share
    of GT's target gain kept and of its non-target degradation avoided (`reference_comparison`)."""
    from ..evaluation import run_evaluation

    eval_config = config.eval.eval_config()
    labels = [spec.label for spec in specs[1:]]
    if eval_config.reference is None and "gt" in labels and len(labels) > 1:
        eval_config = dataclasses.replace(eval_config, reference="gt")
    elif eval_config.reference is not None and eval_config.reference not in labels:
        eval_config = dataclasses.replace(eval_config, reference=None)  # e.g. the reference arm was left out
    return run_evaluation(specs, eval_config, paths.root, command)


def relative_to_gt(report: dict[str, Any]) -> dict[str, Any] | None:
    """Per arm against the reference arm (`gt`): the report's `reference_comparison`, or `None`."""
    return report.get("reference_comparison")


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
