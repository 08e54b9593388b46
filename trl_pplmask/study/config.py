"""The study YAML: dataclasses with documented fields, loading, and every check that can run before any work."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..masking import mask_field
from ..tasks import TASKS
from .arms import ARM_KINDS, TRAINER_OWNED_KEYS, ArmSpec, arm_spec


@dataclass
class DataSettings:
    """The target task's training rows.

    Args:
        task (`str`, *optional*):
            A registered task of [`trl_pplmask.tasks`] (`gsm8k`, `mbpp`, `math`, `arc_challenge`, `humaneval`); rows
            loaded with [`~trl_pplmask.data.load_task`] (local mirror under `TRL_PPLMASK_DATA_DIR`, or the Hub).
        path (`str`, *optional*):
            Instead of `task`: a `.jsonl`/`.json`/`.parquet` file or a `save_to_disk` folder with TRL-format columns
            (`prompt`/`completion`, `messages`, ...). Relative paths are read from the study YAML's folder. Pass
            `task` as well to name its verifier (needed by `self_output`) and the evaluation target.
        split (`str`, *optional*, defaults to `"train"`):
            Split of `task` to train on.
        limit (`int`, *optional*):
            Only the first `limit` rows.
    """

    task: str | None = None
    path: str | None = None
    split: str = "train"
    limit: int | None = None

    def __post_init__(self):
        if self.task is None and self.path is None:
            raise ValueError("data: set `task` (one of " + ", ".join(sorted(TASKS)) + ") or `path` (a data file).")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(
                f"data.task: unknown task {self.task!r}{_did_you_mean(self.task, TASKS)}; "
                f"choose one of {sorted(TASKS)} or give `path`."
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ValueError(f"data.limit must be a positive integer, got {self.limit!r}.")


@dataclass
class MaskSettings:
    """Mask settings shared by the masking arms (an arm line may override any `pplmask_*` value).

    Args:
        threshold (`float`, *optional*, defaults to `2.5`):
            Perplexity threshold of STM (the paper's 2.5); `random` and `lowest` mask as many tokens per example.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the `random` arm's draw.
        entropy_threshold (`float`, *optional*):
            `stm_entropy`: mask a high-perplexity token only where the predictive entropy (nats) is below this.
            Unset: the trainer's default.
        anchor_weight (`float`, *optional*, defaults to `1.0`):
            `stm_anchor`: weight of KL(p_base || p_model) on the masked tokens.
        reference (`str`, *optional*, defaults to `"base"`):
            Which model scores the data (`pplmask_reference` of `trl-pplmask sft`).
    """

    threshold: float = mask_field("threshold")
    seed: int = mask_field("seed")
    entropy_threshold: float | None = mask_field("entropy_threshold", default=None)  # unset: the trainer's default
    anchor_weight: float = 1.0
    reference: str = "base"

    def __post_init__(self):
        if not self.threshold > 1.0:
            raise ValueError(f"mask.threshold must be above 1 (a perplexity is always >= 1), got {self.threshold}.")
        if self.entropy_threshold is not None and not self.entropy_threshold > 0:
            raise ValueError(f"mask.entropy_threshold must be positive, got {self.entropy_threshold}.")
        if self.anchor_weight < 0:
            raise ValueError(f"mask.anchor_weight must be >= 0, got {self.anchor_weight}.")


@dataclass
class SelfOutputSettings:
    """The `self_output` arm: train on the model's own verified answers, only where it solves enough of the target.

    The base model first answers `probe_rows` training rows; its acceptance rate (share of rows with at least one
    verified-correct sample) decides whether the arm runs. Below `min_acceptance` the arm is left out and the rate is
    reported in `study.json`. Otherwise every training row is answered (the probe's rows are reused) and the arm trains
    on the chosen answers (rows without a correct one follow `fallback`).

    Args:
        min_acceptance (`float`, *optional*, defaults to `0.2`): Smallest acceptance rate for the arm to run.
        probe_rows (`int`, *optional*, defaults to `32`): Training rows answered to measure the acceptance rate.
        num_samples (`int`, *optional*, defaults to `4`): Samples per row.
        temperature (`float`, *optional*, defaults to `0.7`): Sampling temperature.
        max_new_tokens (`int`, *optional*, defaults to `512`): Longest answer.
        fallback (`str`, *optional*, defaults to `"ground_truth"`): `ground_truth` or `skip` for rows with no
            correct sample.
        backend (`str`, *optional*, defaults to `"auto"`): `transformers`, `vllm`, or `auto` (vLLM where installed
            and a GPU is present).
        dtype (`str`, *optional*, defaults to `"auto"`): Weight dtype of the generating model.
        seed (`int`, *optional*, defaults to `0`): Sampling seed.
    """

    min_acceptance: float = 0.2
    probe_rows: int = 32
    num_samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 512
    fallback: str = "ground_truth"
    backend: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ValueError(f"self_output.min_acceptance must be in [0, 1], got {self.min_acceptance}.")
        if self.probe_rows < 1:
            raise ValueError(f"self_output.probe_rows must be positive, got {self.probe_rows}.")
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"self_output.backend: use auto, transformers or vllm, not {self.backend!r}.")
        if self.fallback not in ("ground_truth", "skip"):
            raise ValueError(f"self_output.fallback: use ground_truth or skip, not {self.fallback!r}.")


@dataclass
class EvalSettings:
    """The evaluation shared by the base model and every arm (same prompts, same items).

    Any other field of [`~trl_pplmask.evaluation.EvalConfig`] (`max_new_tokens`, `splits`, `n_resamples`, `backend`,
    `cache_dir`, ...) may be given here too and is passed through.

    Args:
        tasks (`list[str]`): Task names of the evaluation registry (`trl-pplmask eval --help` lists them).
        target (`str`, *optional*): The trained task among `tasks`; defaults to `data.task`.
        limit (`int`, *optional*): Items per task.
        confidence (`float`, *optional*, defaults to `0.95`): Level of the paired bootstrap intervals.
        seed (`int`, *optional*, defaults to `0`): Bootstrap seed.
    """

    tasks: list[str] = field(default_factory=list)
    target: str | None = None
    limit: int | None = None
    confidence: float = 0.95
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def eval_config(self):
        """The [`~trl_pplmask.evaluation.EvalConfig`]; raises for unknown task names before any work."""
        from ..evaluation import EvalConfig

        try:
            return EvalConfig(
                tasks=list(self.tasks),
                target=self.target,
                limit=self.limit,
                confidence=self.confidence,
                seed=self.seed,
                **self.extra,
            )
        except ValueError as err:
            raise ValueError(f"eval: {err}") from err


@dataclass
class ArmConfig:
    """One arm of the study: a line of the `arms:` list.

    Args:
        kind (`str`): The arm (`base`, `gt`, `stm`, ...; see [`ARM_KINDS`]).
        label (`str`): Its name in the report and its folder under `arms/` (defaults to `kind`).
        overrides (`dict`): `trl sft` / `pplmask_*` settings of this arm only, e.g. `- stm: {pplmask_threshold: 3}`.
    """

    kind: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ArmSpec:
        return arm_spec(self.kind)


@dataclass
class StudyConfig:
    """A forgetting study: one model, one target task, shared training settings, arms side by side.

    Args:
        model (`str`): Hub id, local path or the embedded alias `smollm2-135m-instruct`.
        output_dir (`str`): Study folder (data, arms, report, study.json), relative to the current directory like
            `trl sft`'s `output_dir`.
        data (`DataSettings`): Training rows of the target task.
        training (`dict`): Any `trl sft` field (TRL ScriptArguments, SFTConfig, ModelConfig) shared by every arm:
            LoRA, learning rate, steps, batch size, `max_length`, devices, precision, seed.
        arms (`list[ArmConfig]`): The arms, each one line (`- stm`, or `- stm: {pplmask_threshold: 3.0}`). `base`
            is evaluated in any case (it is every comparison's reference).
        mask (`MaskSettings`): Mask settings shared by the masking arms.
        eval (`EvalSettings`): The evaluation.
        self_output (`SelfOutputSettings`): Settings of the `self_output` arm.
        source (`str`, *optional*): The YAML file the config was read from.
    """

    model: str
    output_dir: str
    data: DataSettings
    eval: EvalSettings
    training: dict[str, Any] = field(default_factory=dict)
    arms: list[ArmConfig] = field(default_factory=list)
    mask: MaskSettings = field(default_factory=MaskSettings)
    self_output: SelfOutputSettings = field(default_factory=SelfOutputSettings)
    source: str | None = None

    @property
    def training_arms(self) -> list[ArmConfig]:
        return [arm for arm in self.arms if arm.spec.trains]

    @property
    def use_peft(self) -> bool:
        return bool(self.training.get("use_peft", False))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["arms"] = [{"kind": a.kind, "label": a.label, "overrides": a.overrides} for a in self.arms]
        return out


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
TOP_LEVEL_KEYS = ("model", "output_dir", "data", "training", "arms", "mask", "eval", "self_output")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section(raw: dict[str, Any], name: str, cls, renamed: dict[str, str] | None = None):
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a mapping of settings, got {type(value).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = sorted(set(value) - known)
    if unknown and cls is not EvalSettings:
        key = unknown[0]
        raise ValueError(f"{name}.{key}: unknown setting{_did_you_mean(key, known)}; settings are {sorted(known)}.")
    if cls is EvalSettings:
        from ..evaluation import EvalConfig

        passthrough = {f.name for f in dataclasses.fields(EvalConfig)}
        bad = sorted(k for k in unknown if k not in passthrough)
        if bad:
            raise ValueError(
                f"eval.{bad[0]}: unknown setting{_did_you_mean(bad[0], known | passthrough)}; settings are "
                f"{sorted(known | passthrough)}."
            )
        return cls(**{k: v for k, v in value.items() if k in known}, extra={k: value[k] for k in unknown})
    try:
        return cls(**_numbers_checked(name, cls, value))
    except TypeError as err:
        raise ValueError(f"{name}: {err}") from err


def _numbers_checked(name: str, cls, value: dict[str, Any]) -> dict[str, Any]:
    """`value` with the settings that `cls` types as numbers checked: a string that reads as one (quoted, or a form
    YAML 1.1 reads as a string) becomes that number; anything else is refused, naming the setting."""
    import typing

    hints = typing.get_type_hints(cls)
    checked = dict(value)
    for key, setting in value.items():
        hint = str(hints.get(key, ""))
        wants = float if "float" in hint else int if "int" in hint else None
        if wants is None or setting is None:
            continue
        if isinstance(setting, (int, float)) and not isinstance(setting, bool):
            continue
        if isinstance(setting, str):
            try:
                checked[key] = wants(setting)
                continue
            except ValueError:
                pass
        example = "2.5 or 1.0e+9" if wants is float else "32"
        raise ValueError(f"{name}.{key}: expected a number, got {setting!r} (write a number, e.g. {example}).")
    return checked


def parse_arms(value: Any) -> list[ArmConfig]:
    """The `arms:` list: names, or one-key mappings `{kind: {overrides}}` (an override `label` renames the arm)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"`arms` must be a non-empty list of arm names, choose from {list(ARM_KINDS)}.")
    arms = []
    for entry in value:
        overrides: dict[str, Any] = {}
        if isinstance(entry, str):
            kind = entry
        elif isinstance(entry, dict) and len(entry) == 1:
            kind, overrides = next(iter(entry.items()))
            overrides = dict(overrides or {})
            if not isinstance(overrides, dict):
                raise ValueError(f"arms: the settings of {kind!r} must be a mapping, got {overrides!r}.")
        else:
            raise ValueError(f"arms: each entry is an arm name or `{{name: {{settings}}}}`, got {entry!r}.")
        if kind not in ARM_KINDS:
            raise ValueError(
                f"arms: unknown arm {kind!r}{_did_you_mean(kind, ARM_KINDS)}; arms are {list(ARM_KINDS)}."
            )
        label = str(overrides.pop("label", kind))
        if not label.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"arms: label {label!r} must be letters, digits, '-', '_' or '.'.")
        arms.append(ArmConfig(kind, label, overrides))
    labels = [a.label for a in arms]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"arms: {twice} listed twice; give repeated arms distinct names with `label`.")
    if not any(a.kind == "base" for a in arms):
        arms.insert(0, ArmConfig("base", "base"))
    elif arms[0].kind != "base":
        arms.insert(0, arms.pop(next(i for i, a in enumerate(arms) if a.kind == "base")))
    return arms


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> StudyConfig:
    """Build and validate a [`StudyConfig`] from the parsed YAML (no model, no data, no training)."""
    if not isinstance(raw, dict):
        raise ValueError("A study YAML is a mapping with keys " + ", ".join(TOP_LEVEL_KEYS) + ".")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown study setting {unknown[0]!r}{_did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; top-level settings "
            f"are {list(TOP_LEVEL_KEYS)} (trl sft fields go under `training:`)."
        )
    for key in ("model", "output_dir", "data", "eval", "arms"):
        if raw.get(key) in (None, "", {}):
            raise ValueError(f"The study YAML needs `{key}`.")
    data = _section(raw, "data", DataSettings)
    if data.path is not None and source is not None and not Path(data.path).expanduser().is_absolute():
        data.path = str((Path(source).parent / data.path).resolve())
    evaluation = _section(raw, "eval", EvalSettings)
    if evaluation.target is None:
        evaluation.target = data.task if data.task in evaluation.tasks else None
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ValueError("`training` must be a mapping of trl sft settings.")
    config = StudyConfig(
        model=str(raw["model"]),
        output_dir=str(raw["output_dir"]),
        data=data,
        eval=evaluation,
        training=dict(training),
        arms=parse_arms(raw["arms"]),
        mask=_section(raw, "mask", MaskSettings),
        self_output=_section(raw, "self_output", SelfOutputSettings),
        source=source,
    )
    validate(config)
    return config


def load_study_config(path: str | os.PathLike) -> StudyConfig:
    """Read and validate a study YAML."""
    from ..utils import read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Study config {path} not found; pass a YAML file such as studies/<name>.yaml.")
    return config_from_dict(read_yaml(path), str(path))


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def trl_sft_fields() -> set[str]:
    """Every field `trl sft` parses (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    classes = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def _check_settings(where: str, settings: dict[str, Any], fields: set[str], allow_pplmask: bool) -> None:
    for key in settings:
        if key.startswith("pplmask_"):
            if not allow_pplmask:
                raise ValueError(
                    f"{where}.{key}: mask settings are arm settings; put shared ones under `mask:` or give them on "
                    "an arm line, e.g. `- stm: {pplmask_threshold: 3.0}`."
                )
            continue
        if key in TRAINER_OWNED_KEYS:
            raise ValueError(f"{where}.{key}: {TRAINER_OWNED_KEYS[key]}")
        if key not in fields:
            raise ValueError(
                f"{where}.{key}: not a `trl sft` setting{_did_you_mean(key, fields)} (TRL ScriptArguments, SFTConfig "
                "or ModelConfig field)."
            )


def validate(config: StudyConfig) -> None:
    """Every check that needs neither the model nor the data rows nor the trainer: settings, arms, task names."""
    fields = trl_sft_fields()
    _check_settings("training", config.training, fields, allow_pplmask=False)
    if "loss_type" in config.training and config.training["loss_type"] != "nll":
        raise ValueError(
            "training.loss_type: shared training uses the plain NLL loss; TRL's DFT is the `dft` arm. Remove it."
        )
    for arm in config.arms:
        if arm.overrides and not arm.spec.trains:
            raise ValueError(f"arms: {arm.label!r} does not train, so it takes no settings; remove {arm.overrides}.")
        _check_settings(f"arms.{arm.label}", arm.overrides, fields, allow_pplmask=True)
    config.eval.eval_config()  # unknown task names, target not among tasks, bad limit
    if config.eval.target is None:
        raise ValueError(
            f"eval.target: name the trained task among eval.tasks {config.eval.tasks} (data.task "
            f"{config.data.task!r} is not among them)."
        )
    if any(a.kind == "self_output" for a in config.arms):
        from ..verifiers import VERIFIERS

        if config.data.task is None or config.data.task not in VERIFIERS:
            raise ValueError(
                "arms: `self_output` verifies the model's answers with the task's checker; set data.task to one of "
                f"{sorted(VERIFIERS)} (with data.path, the file must hold that task's raw columns), or remove the arm."
            )
    if config.training_arms and "use_peft" not in config.training:
        raise ValueError(
            "training.use_peft: say whether arms train LoRA adapters (true) or full models (false); the evaluation "
            "loads them accordingly."
        )
