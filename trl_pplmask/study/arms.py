"""The arms of a forgetting study and the `trl-pplmask sft` settings each one trains with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .config import MaskSettings


@dataclass(frozen=True)
class ArmSpec:
    """What an arm is.

    Args:
        kind (`str`): The arm's name in the YAML.
        description (`str`): One line for the plan and the report.
        trains (`bool`): Whether the arm trains (every arm but `base`).
        settings (`Callable`): `MaskSettings -> dict` of the arm's own `trl-pplmask sft` settings.
        strategy (`str`, *optional*): The mask strategy it needs in [`trl_pplmask.masking.STRATEGIES`].
        data (`str`, *optional*, defaults to `"train"`): Which prepared data it trains on (`train` or
            `self_output`).
    """

    kind: str
    description: str
    trains: bool
    settings: Callable[[MaskSettings], dict[str, Any]]
    strategy: str | None = None
    data: str = "train"


def _stm(mask: MaskSettings) -> dict[str, Any]:
    return {"pplmask_strategy": "threshold", "pplmask_threshold": mask.threshold}


def _entropy(mask: MaskSettings) -> dict[str, Any]:
    settings = {"pplmask_strategy": "stm_entropy", "pplmask_threshold": mask.threshold}
    if mask.entropy_threshold is not None:
        settings["pplmask_entropy_threshold"] = mask.entropy_threshold
    return settings


def _objective(loss: str, **settings: Any) -> Callable[[MaskSettings], dict[str, Any]]:
    """A token-weighted objective of `trl-pplmask sft --pplmask_loss` without a mask, its settings spelled out (the
    reference implementations' defaults), so that a finished arm never changes meaning with a changed default."""
    return lambda mask: {"pplmask_strategy": "none", "pplmask_loss": loss, **settings}


_ARMS = (
    ArmSpec("base", "the model before fine-tuning (reference of every comparison)", False, lambda m: {}),
    ArmSpec("gt", "plain SFT on the ground truth, completion-only loss", True, lambda m: {"pplmask_strategy": "none"}),
    ArmSpec("stm", "Selective Token Masking: drop tokens with perplexity > threshold", True, _stm, "threshold"),
    ArmSpec(
        "random",
        "as many tokens per example as STM, drawn at random (the paper's control)",
        True,
        lambda m: {"pplmask_strategy": "random", "pplmask_threshold": m.threshold, "pplmask_seed": m.seed},
        "random",
    ),
    ArmSpec(
        "lowest",
        "as many tokens per example as STM, the lowest-perplexity ones (the paper's other control)",
        True,
        lambda m: {"pplmask_strategy": "lowest_count", "pplmask_threshold": m.threshold},
        "lowest_count",
    ),
    ArmSpec(
        "dft",
        "TRL's Dynamic Fine-Tuning loss (loss_type=dft), no mask",
        True,
        lambda m: {"pplmask_strategy": "none", "loss_type": "dft"},
    ),
    ArmSpec(
        "stm_entropy",
        "STM only where the model is confident (entropy < entropy_threshold): confident conflicts",
        True,
        _entropy,
        "stm_entropy",
    ),
    ArmSpec(
        "stm_anchor",
        "STM whose masked tokens keep the base prediction: anchor_weight x KL(p_base || p_model)",
        True,
        lambda m: {**_stm(m), "pplmask_anchor": True, "pplmask_anchor_weight": m.anchor_weight},
        "threshold",
    ),
    ArmSpec(
        "eaft",
        "EAFT: NLL x (top-20 entropy / log 20)^1, the flag of LLaMA-Factory and axolotl, no mask",
        True,
        _objective("eaft", pplmask_eaft_alpha=1.0, pplmask_eaft_k=20),
    ),
    ArmSpec(
        "asft",
        "ASFT: DFT + 0.1 x KL(p_base || p_model) on every token (LLaMA-Factory's use_asft_loss), no mask",
        True,
        _objective("asft", pplmask_asft_alpha=0.1),
    ),
    ArmSpec(
        "soft_stm",
        "the paper's soft STM: each token weighted exp(-((ppl - 1) / 0.75)^2) from the base model's perplexity",
        True,
        _objective("soft_stm", pplmask_soft_width=0.75),
    ),
    ArmSpec(
        "self_output",
        "plain SFT on the model's own verified answers (only if its acceptance rate is high enough)",
        True,
        lambda m: {"pplmask_strategy": "none"},
        data="self_output",
    ),
)
ARM_KINDS: dict[str, ArmSpec] = {arm.kind: arm for arm in _ARMS}

# `trl sft` settings the study sets itself, with why.
TRAINER_OWNED_KEYS = {
    "model_name_or_path": "the study sets it from the top-level `model`; set it there.",
    "output_dir": "each arm trains into <output_dir>/arms/<arm>; set the study's top-level `output_dir`.",
    "dataset_name": "the study trains on its prepared data; set `data.task` or `data.path`.",
    "datasets": "the study trains on its prepared data; set `data.task` or `data.path`.",
    "dataset_config": "the study trains on its prepared data; set `data.task` or `data.path`.",
    "dataset_train_split": "the study trains on its prepared data; set `data.split`.",
}


def arm_spec(kind: str) -> ArmSpec:
    if kind not in ARM_KINDS:
        raise ValueError(f"Unknown arm {kind!r}; arms are {list(ARM_KINDS)}.")
    return ARM_KINDS[kind]


def arm_settings(
    kind: str, mask: MaskSettings, training: dict[str, Any], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The arm's `trl-pplmask sft` settings without model, data and output: shared `training`, then the arm's own
    settings, the shared mask settings every arm records, and the arm line's overrides (last wins)."""
    spec = arm_spec(kind)
    if not spec.trains:
        return {}
    return {
        **training,
        "pplmask_reference": mask.reference,
        "pplmask_prescore": True,  # the data is scored once, cached by content, and shared by every arm
        **spec.settings(mask),
        **(overrides or {}),
    }
