"""`trl-pplmask sft` with sharded parameters (FSDP, DeepSpeed ZeRO-3): what works, and a refusal before training
for what does not.

Under FSDP or ZeRO-3 no process holds the trained model's weights whole once `accelerate` has prepared it: FSDP2's
parameters are `DTensor` shards that only the wrapped root module's forward gathers, and ZeRO-3 partitions them
(already at load time, with `zero.Init`). Whatever reads the model outside that forward (the backbone alone, the LM
head's weight) would see shards. So a run is allowed exactly when its mask and loss never read the sharded model:

- the mask comes from NLL columns of the dataset (`trl-pplmask score` / `build` output): no model is read at all;
- FSDP with `pplmask_prescore=true`: the training set is scored before `accelerate` shards the model, with the whole
  model each process loaded (`trl_pplmask.hub.shards.score_in_shards`, each process its own shards);
- FSDP with on-the-fly scoring by a frozen copy (no PEFT, or `pplmask_reference=<model>`): the copy is never
  sharded, each process holds it whole.

Refused before the model to train is loaded: on-the-fly scoring by the PEFT model with its adapter disabled (that
model is the sharded one), the anchored and token-weighted objectives (they apply the trained model's LM head to
captured hidden states), any model-reading route under ZeRO-3, and FSDP's `cpu_ram_efficient_loading` (processes
other than the first load no weights) with a model-reading route. The message names the supported route.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Where to go instead: the route that never reads a sharded model
SUPPORTED_ROUTE = (
    "Score first, then train on the scores: `trl-pplmask score --layout shards` (or `trl-pplmask build`) on the "
    "training data with the model before training (`accelerate launch` splits the shards across the GPUs), then train "
    "on its output with stock `trl sft` (the labels are masked) or with `trl-pplmask sft` (the mask is re-thresholded "
    "from its `token_nll` column)"
)


@dataclass(frozen=True)
class ParameterSharding:
    """How the parameters of the trained model are distributed over the processes of a launch.

    Args:
        kind (`str`): `"none"`, `"fsdp"` or `"deepspeed"`.
        level (`int` or `None`): The FSDP version (1 or 2) or the DeepSpeed ZeRO stage (0-3).
        cpu_ram_efficient_loading (`bool`): FSDP loads the weights on the first process only (the others hold
            none until `accelerate` broadcasts them when it prepares the model).
    """

    kind: str = "none"
    level: int | None = None
    cpu_ram_efficient_loading: bool = False

    @property
    def sharded(self) -> bool:
        """Whether no process holds the trained parameters whole during training (FSDP, ZeRO-3)."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.level == 3)

    @property
    def name(self) -> str:
        if self.kind == "fsdp":
            return f"FSDP{self.level or ''}"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.level if self.level is not None else '?'}"
        return "no sharding"


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _zero_stage(config: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a dict, a JSON string or a path to a JSON file), or `None`."""
    if isinstance(config, (str, Path)):
        text = str(config)
        path = Path(text).expanduser()
        try:
            config = json.loads(path.read_text()) if path.is_file() else json.loads(text)
        except (OSError, ValueError):
            return None
    if not isinstance(config, Mapping):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    try:
        return int(stage)
    except (TypeError, ValueError):
        return None  # "auto" or missing


def detect_sharding(training_args: Any = None, environ: Mapping[str, str] | None = None) -> ParameterSharding:
    """How `accelerate` will shard the trained model, read before anything is loaded: from the training arguments
    (`fsdp`/`fsdp_config`, `deepspeed`) and from what `accelerate launch` puts in the environment (`--use_fsdp
    --fsdp_version`, `--use_deepspeed --zero_stage` or `--deepspeed_config_file`, an `accelerate config` file).

    Args:
        training_args (`TrainingArguments`, *optional*): The run's `SFTConfig`.
        environ (`Mapping[str, str]`, *optional*): The environment; defaults to `os.environ`.
    """
    env = os.environ if environ is None else environ
    fsdp_config = getattr(training_args, "fsdp_config", None) or {}
    if getattr(training_args, "fsdp", None):  # transformers' own FSDP settings (fsdp_config["version"], default 2)
        efficient = fsdp_config.get("cpu_ram_efficient_loading", False)
        return ParameterSharding("fsdp", int(fsdp_config.get("version", 2)), _true(efficient))
    if _true(env.get("ACCELERATE_USE_FSDP", "false")):  # accelerate launch --use_fsdp (FSDP_VERSION, default 1)
        efficient = env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
        return ParameterSharding("fsdp", int(env.get("FSDP_VERSION") or 1), _true(efficient))
    deepspeed = getattr(training_args, "deepspeed", None)
    if deepspeed or _true(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        stage = _zero_stage(deepspeed) if deepspeed else None
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            stage = _zero_stage(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        if stage is None and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip().isdigit():
            stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        return ParameterSharding("deepspeed", stage)
    return ParameterSharding()


def _nll_columns(pplmask_args: Any) -> list[str]:
    """The dataset columns from which the collator masks without reading any model."""
    config = pplmask_args.mask_config()
    columns = [config.nll_column]
    if config.needs_entropy:
        columns.append(config.entropy_column)
    if config.needs_dpf:
        columns.append(config.dpf_nll_column)
    return columns


def check_sharded_training(
    sharding: ParameterSharding, pplmask_args: Any, uses_peft: bool, train_columns: Sequence[str] | None
) -> None:
    """Refuse, before the model to train is loaded, a `trl-pplmask sft` run whose mask or loss would read a sharded
    model.

    Args:
        sharding (`ParameterSharding`): From [`detect_sharding`].
        pplmask_args (`PplMaskArguments`): The run's `pplmask_*` settings.
        uses_peft (`bool`): Whether the model is trained with a PEFT adapter.
        train_columns (`Sequence[str]` or `None`): Columns of the training split (`None` when unknown, e.g. a
            streamed dataset).

    Raises:
        ValueError: naming what reads the sharded model, why that is wrong, and the supported route.
    """
    if not sharding.sharded:
        return
    loss = getattr(pplmask_args, "pplmask_loss", "nll")
    if pplmask_args.pplmask_anchor or loss != "nll":
        what = "pplmask_anchor=true" if pplmask_args.pplmask_anchor else f"pplmask_loss={loss}"
        _refuse(
            sharding,
            f"{what} applies the trained model's LM head (and the base model's) to hidden states outside the model's "
            "forward, where only a shard of its weight is at hand",
            "Train with pplmask_loss=nll and no pplmask_anchor under sharding, or without sharding (DDP) if the "
            "objective is needed",
        )
    if not pplmask_args.needs_scores:
        return
    columns = set(train_columns or ())
    if all(c in columns for c in _nll_columns(pplmask_args)) and not pplmask_args.pplmask_prescore:
        return  # the collator masks from the columns: no model is read
    if sharding.kind == "deepspeed":
        _refuse(
            sharding,
            "scoring the training set (pre-scored or on the fly) needs the whole reference model on a process, and "
            "ZeRO-3 partitions every model loaded for the run (zero.Init); this combination is not tested",
            "With FSDP2, pplmask_prescore=true or a frozen reference works",
        )
    route = "pre-scoring" if pplmask_args.pplmask_prescore else "on-the-fly scoring"
    if sharding.cpu_ram_efficient_loading:
        _refuse(
            sharding,
            f"{route} reads the model as loaded, and with cpu_ram_efficient_loading=true only the first process "
            "loads its weights",
            "Set cpu_ram_efficient_loading=false (fsdp_cpu_ram_efficient_loading in the accelerate config)",
        )
    on_the_fly_by_trained_model = (
        not pplmask_args.pplmask_prescore and uses_peft and pplmask_args.pplmask_reference == "base"
    )
    if on_the_fly_by_trained_model:
        _refuse(
            sharding,
            "on-the-fly scoring with PEFT uses the trained model with its adapter disabled, and that model is the "
            "sharded one",
            "Set pplmask_prescore=true (the training set is scored once, before the model is sharded), or give a "
            "frozen reference with pplmask_reference=<model>",
        )


def _refuse(sharding: ParameterSharding, why: str, alternative: str) -> None:
    raise ValueError(
        f"trl-pplmask sft under {sharding.name} (the trained model's parameters are sharded across the processes): "
        f"{why}. {alternative}. {SUPPORTED_ROUTE}. See the README's 'At scale' section."
    )


@contextmanager
def on_device(model: Any, device: Any) -> Iterator[Any]:
    """`model` on `device` for the duration (pre-scoring under FSDP, where `Trainer` leaves the model on the CPU for
    `accelerate` to shard), back where it was afterwards; a no-op when it is there already."""
    import torch

    before = next(model.parameters()).device
    target = torch.device(device)
    if before == target or before.type == "meta":
        yield model
        return
    model.to(target)
    try:
        yield model
    finally:
        model.to(before)
