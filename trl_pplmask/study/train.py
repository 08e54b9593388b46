"""Training the arms: each through `trl-pplmask sft` in a subprocess, checked against this installation and against
what a finished arm recorded (a finished arm is reused only with the same settings)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..constants import DPF_NLL_COLUMN
from ..utils import REDACTED, atomic_write_text, is_secret_name, json_safe, redact, redact_text
from .arms import arm_settings
from .config import ArmConfig, StudyConfig
from .layout import ARM_FILE, FINISHED_FILE, StudyPaths, read_json
from .plan import arm_trainer_settings


# Keys compared with what `trl-pplmask sft` recorded, except paths (a moved study folder stays valid)
_PATH_KEYS = {"model_name_or_path", "output_dir", "dataset_name", "logging_dir"}


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
    record = read_json(arm_dir / FINISHED_FILE)
    if record is None:
        return None
    fix = (
        f"Restore the YAML's settings, or delete {arm_dir} to retrain the arm, or use a new output_dir; a finished "
        "arm is never silently reused with other settings."
    )
    # What the trainer recorded: its pplmask_* settings and a summary of the trl arguments (learning rate, steps, ...)
    recorded = {**(record.get("training") or {}), **(record.get("settings") or {})}
    differences = settings_differences(identity["settings"], recorded, _PATH_KEYS)
    launched = read_json(arm_dir / ARM_FILE)
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
    settings = json_safe(arm_trainer_settings(config, arm))
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
    record = read_json(arm_dir / FINISHED_FILE)
    if record is None:
        raise RuntimeError(
            f"Arm {arm.label!r}: `trl-pplmask sft` exited without writing {FINISHED_FILE}; see {log_path}."
        )
    return record, False
