"""`run_study`: every stage of a study in order, resumable, with progress and ETA, then `study.json`.

The stages themselves live by job in `plan`, `prepare`, `train` and `report`; the command is `commands/study`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from ..utils import OutputLock, atomic_write_text, json_safe, package_versions, redact
from .config import StudyConfig
from .layout import FINISHED_FILE, StudyPaths, read_json
from .plan import fmt_seconds, plan_stages, print_progress
from .prepare import prepare_data, prepared_data_info, run_self_output, training_rows_fingerprint
from .report import evaluate_model, machine, model_specs, relative_to_gt, write_study_report
from .train import finished_arm, missing_features, sft_flags, train_arm


def check_before_work(config: StudyConfig, flags: set[str] | None = None) -> None:
    """Checks that need the installation (mask strategies, `trl-pplmask sft` settings); raise before any work."""
    if config.training_arms and flags is None:
        flags = sft_flags()
    problems = missing_features(config, flags)
    if problems:
        raise ValueError("The study cannot run with this installation:\n  " + "\n  ".join(problems))


def _mask_summary(record: dict[str, Any] | None) -> dict[str, Any]:
    if not record:
        return {}
    stats = record.get("mask_stats") or {}
    return {
        "masked_fraction": stats.get("masked_fraction"),
        "mask_stats": stats,
        "train_runtime": record.get("train_runtime"),
        "settings": record.get("settings"),
    }


def build_study_json(
    config: StudyConfig,
    paths: StudyPaths,
    state: dict[str, Any],
    arms: dict[str, Any],
    command: str | None,
    report: dict[str, Any] | None,
) -> dict[str, Any]:
    from ..evaluation.report import VERSIONED_PACKAGES  # numpy, datasets: kept off `study --help`

    planned = [stage.name for stage in plan_stages(config)]
    stages = {name: state["stages"][name] for name in planned if name in state.get("stages", {})}
    has_self_output = any(arm.kind == "self_output" for arm in config.arms)
    return json_safe(
        {
            "format_version": 1,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "complete" if report is not None else "in progress",
            "command": command,
            "config": redact(config.to_dict()),
            "versions": package_versions(VERSIONED_PACKAGES),
            "machine": machine(),
            "wall_time_seconds": {
                "total": sum(s.get("seconds") or 0 for s in stages.values()),
                "stages": {name: s.get("seconds") for name, s in stages.items()},
            },
            "stages": stages,
            "data": state.get("data"),
            "self_output": state.get("self_output") if has_self_output else None,
            "arms": arms,
            "relative_to_gt": relative_to_gt(report) if report is not None else None,
            "report": {"files": ["report.json", "report.md", "report.png"]} if report is not None else None,
        }
    )


def run_study(config: StudyConfig, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a study: prepare data, [self-output probe], train each arm, evaluate, report.

    A stage whose result exists is skipped: the data folder, a finished arm (`pplmask_config.json`, refused when its
    settings differ from the YAML), cached evaluation results. Returns the content of `study.json`.
    """
    check_before_work(config)
    paths = StudyPaths(config.output_dir)
    with OutputLock(paths.root, inside=True, what="study output_dir"):
        return _run_study(config, paths, command)


def _run_study(config: StudyConfig, paths: StudyPaths, command: str | None) -> dict[str, Any]:
    """[`run_study`] once its `output_dir` is locked (one study at a time trains into one folder)."""
    stages = plan_stages(config)
    state = read_json(paths.state) or {}
    state.setdefault("stages", {})
    started = time.time()
    arms: dict[str, Any] = {arm.label: {"kind": arm.kind, "description": arm.spec.description} for arm in config.arms}
    arms["base"]["status"] = "reference"
    data_info: dict[str, Any] = {}
    trained: list[str] = ["base"]
    specs = None
    report = None

    def save_state() -> None:
        atomic_write_text(paths.state, json.dumps(json_safe(state), indent=1))
        atomic_write_text(
            paths.study, json.dumps(build_study_json(config, paths, state, arms, command, report), indent=1)
        )

    for index, stage in enumerate(stages):
        print_progress(stages, index, state, started)
        t0 = time.time()
        reused = False
        if stage.kind == "prepare":
            data_info, reused = prepare_data(config, paths)
            state["data"] = data_info
        elif stage.kind == "self_output":
            info, reused = run_self_output(config, paths, data_info)
            state["self_output"] = info
            if info["status"] != "ready":
                print(f"[study] self_output left out: {info['reason']}", flush=True)
        elif stage.kind == "train":
            arm = next(a for a in config.arms if a.label == stage.arm)
            if arm.kind == "self_output" and (state.get("self_output") or {}).get("status") != "ready":
                arms[arm.label].update(status="skipped", reason=state["self_output"].get("reason"))
                state["stages"][stage.name] = {"status": "skipped", "seconds": None}
                save_state()
                continue
            record, reused = train_arm(config, arm, paths, data_info["fingerprint"])
            arms[arm.label].update(status="trained", output_dir=str(paths.arm(arm.label)), **_mask_summary(record))
            trained.append(arm.label)
        elif stage.kind == "eval":
            if stage.arm not in trained:
                state["stages"][stage.name] = {"status": "skipped", "seconds": None}
                continue
            specs = model_specs(config, paths, trained)
            evaluate_model(config, specs, stage.arm)
        elif stage.kind == "report":
            specs = model_specs(config, paths, trained)
            report = write_study_report(config, paths, specs, command)
        seconds = time.time() - t0
        previous = state["stages"].get(stage.name) or {}
        if reused and previous.get("status") == "done":
            state["stages"][stage.name] = {**previous, "reused": True}
        else:
            state["stages"][stage.name] = {"status": "done", "seconds": round(seconds, 2), "reused": reused}
        print(f"[study] {stage.name} done in {fmt_seconds(seconds)}{' (reused)' if reused else ''}", flush=True)
        save_state()
    study = build_study_json(config, paths, state, arms, command, report)
    print(f"[study] finished: {paths.root / 'report.md'}, {paths.study}", flush=True)
    return study


def arm_status(config: StudyConfig) -> dict[str, str]:
    """`finished`, `to train` or `refused: ...` per training arm, without running anything (for --plan): the checks
    that the run makes before training an arm (the prepared data's source, then each finished arm's settings and
    training rows, compared with the rows the run would prepare), so that an arm the plan calls finished is reused."""
    from .plan import arm_trainer_settings

    paths = StudyPaths(config.output_dir)
    arms = config.training_arms
    try:  # the checks of the run: its data (prepared from the YAML's?), then each finished arm's settings and data
        info = prepared_data_info(config, paths)
        if info is None and any((paths.arm(arm.label) / FINISHED_FILE).is_file() for arm in arms):
            data = training_rows_fingerprint(config, paths)  # the rows the run would prepare
        else:
            data = (info or {}).get("fingerprint")
    except ValueError as err:
        return {arm.label: f"refused: {err}" for arm in arms}
    status = {}
    for arm in arms:
        identity = {"arm": arm.kind, "settings": json_safe(arm_trainer_settings(config, arm)), "data": data}
        try:
            finished = finished_arm(paths.arm(arm.label), identity, arm.label) is not None  # the run's test
            status[arm.label] = "finished" if finished else "to train"
        except ValueError as err:
            status[arm.label] = f"refused: {str(err).splitlines()[1].strip()}"
    return status
