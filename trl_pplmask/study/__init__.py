"""Forgetting study in one command: `trl-pplmask study --config studies/<name>.yaml`.

One YAML names the model, the target task and its training rows, the `trl sft` settings shared by every arm, the
arms (one line each) and the evaluation. The study

1. prepares the training rows once (`<output_dir>/data/train`),
2. for `self_output`, measures the base model's verified acceptance rate on the target and builds self-output data
   only where it reaches `self_output.min_acceptance` (otherwise the arm is left out and the rate reported),
3. trains every arm with `trl-pplmask sft --config <output_dir>/arms/<arm>/config.yaml` in a subprocess (the data is
   scored once and cached; an arm whose `pplmask_config.json` exists is finished and skipped, so a killed study
   resumes; a finished arm whose settings differ from the YAML is refused),
4. evaluates the base model and every arm with [`~trl_pplmask.evaluation.run_evaluation`] on the same items (results
   cached per model), and
5. writes `report.json`, `report.md`, `report.png` and `study.json` (settings, versions, machine, wall time per stage,
   masked fraction per arm) into `output_dir`.

Arms: `base`, `gt`, `stm`, `random`, `lowest`, `dft`, `stm_entropy`, `stm_anchor`, `eaft`, `asft`, `soft_stm`,
`self_output` (see [`ARM_KINDS`]). `trl-pplmask study --config X.yaml --plan` validates the YAML and prints the
stages without running.
"""

from __future__ import annotations

from .arms import ARM_KINDS, ArmSpec, arm_settings
from .config import (
    ArmConfig,
    DataSettings,
    EvalSettings,
    MaskSettings,
    SelfOutputSettings,
    StudyConfig,
    config_from_dict,
    load_study_config,
)
from .layout import StudyPaths
from .plan import Stage, arm_trainer_settings, plan_stages, render_plan
from .runner import run_study


__all__ = [
    "ARM_KINDS",
    "ArmConfig",
    "ArmSpec",
    "DataSettings",
    "EvalSettings",
    "MaskSettings",
    "SelfOutputSettings",
    "Stage",
    "StudyConfig",
    "StudyPaths",
    "arm_settings",
    "arm_trainer_settings",
    "config_from_dict",
    "load_study_config",
    "plan_stages",
    "render_plan",
    "run_study",
]
