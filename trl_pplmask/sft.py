"""`trl-pplmask sft`: `trl sft` with Selective Token Masking, on any dataset, scored on the fly or beforehand.

```bash
trl-pplmask sft --config recipes/gsm8k-stm-online-smollm2-135m-cpu.yaml          # any `trl sft` recipe works too
accelerate launch -m trl_pplmask.cli sft --config recipe.yaml --pplmask_strategy threshold --pplmask_threshold 2.5
```

It parses exactly what `trl sft` parses (TRL's own `TrlParser` with `ScriptArguments`, `SFTConfig`, `ModelConfig` and
`DatasetMixtureConfig`, from a YAML `--config` and flags) plus [`PplMaskArguments`], and follows the flow of TRL's
`scripts/sft.py`; the differences are the collator ([`PplMaskCollator`] + [`PplMaskCallback`]), the reference model,
optional pre-scoring of the prepared training set, and `pplmask_config.json` written next to the saved model.

Evaluation (`eval_strategy` with a test split) is never masked: `eval_loss` is TRL's NLL on every completion token,
whatever the mask strategy or `pplmask_loss`, so that arms trained with different masks are compared on the same
quantity, and the eval rows are not counted in the mask statistics. A run whose on-the-fly mask drops every completion
token fails (after its first epoch) instead of saving a model that trained nothing, as a pre-scored run fails before
training. The `output_dir` is locked ([`~trl_pplmask.utils.OutputLock`], `.<name>.lock` beside it) against a second
run, and a `Dataset.save_to_disk` folder given as `dataset_name` is only read (no `cache-*.arrow` files are written
into it, so a read-only folder works).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import PPLMASK_CONFIG_FILE
from .masking import DEFAULT_SOFT_WIDTH, STRATEGIES, PplMaskConfig, mask_field, masked_fraction
from .utils import OutputLock, atomic_write_text, json_safe, package_version, read_yaml, redact, redact_text


CONFIG_FILE = PPLMASK_CONFIG_FILE
# The objectives of `trl_pplmask.anchor.TokenWeightedSFTTrainer` (`anchor.OBJECTIVES`, spelled out here so that parsing
# arguments imports no torch; tests/test_objectives.py checks that the two agree, and the defaults below)
LOSSES = ("nll", "eaft", "asft", "soft_stm")


@dataclass
class PplMaskArguments:
    """Mask settings of `trl-pplmask sft`, next to the `trl sft` arguments (the `pplmask_` prefix keeps them apart).

    Args:
        pplmask_strategy (`str`, *optional*, defaults to `"threshold"`):
            Mask strategy of `masking.py` (`threshold` is STM), or `none` to train exactly what `trl sft` trains.
        pplmask_threshold (`float`, *optional*, defaults to `2.5`):
            Perplexity threshold (the paper's 2.5).
        pplmask_fraction (`float`, *optional*):
            Fraction of completion tokens to mask, for strategy `fraction`.
        pplmask_seed (`int`, *optional*, defaults to `0`):
            Seed of strategy `random`.
        pplmask_entropy_threshold (`float`, *optional*, defaults to `1.0`):
            Entropy threshold (nats) of strategy `stm_entropy`.
        pplmask_reference (`str`, *optional*, defaults to `"base"`):
            Model whose per-token NLLs decide the mask. `base`: the model before training (with PEFT, the trained
            model with its adapter disabled, no second copy; without PEFT, a frozen copy). Or a Hub id / local path
            of another model with the same tokenizer.
        pplmask_prescore (`bool`, *optional*, defaults to `False`):
            Score the whole prepared training set once before training (cached on disk by content), instead of each
            batch on the fly. Reports the rows the mask empties before any training step.
        pplmask_max_tokens_per_batch (`int`, *optional*):
            Token budget of a pre-scoring batch (default: by device).
        pplmask_anchor (`bool`, *optional*, defaults to `False`):
            Anchored STM: masked tokens are trained toward the base model's prediction by a KL term instead of
            leaving the loss (see `trl_pplmask.anchor`).
        pplmask_anchor_weight (`float`, *optional*, defaults to `1.0`):
            Weight of `KL(p_base || p_model)` on each masked token, relative to a kept token's NLL.
        pplmask_anchor_all_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the same KL on each kept completion token.
        pplmask_loss (`str`, *optional*, defaults to `"nll"`):
            Token-weighted objective (see `trl_pplmask.anchor`): `nll` (TRL's loss, today's default), `eaft`
            (Entropy-Adaptive Fine-Tuning: NLL x (top-k entropy / log k) ** alpha), `asft` (Anchored SFT: DFT +
            alpha x KL(p_base || p_model) on every trainable token) or `soft_stm` (the STM paper's soft weights
            exp(-((ppl - 1) / width) ** 2) from the reference NLLs; needs pplmask_strategy=none). `eaft` and `asft`
            combine with any mask strategy (they weigh the kept tokens) and with pplmask_anchor; all need
            loss_type=nll and no label smoothing.
        pplmask_eaft_alpha (`float`, *optional*, defaults to `1.0`):
            EAFT's exponent of the normalised entropy (LLaMA-Factory's and axolotl's `eaft_alpha` default, 1.0); 0
            gives plain NLL.
        pplmask_eaft_k (`int`, *optional*, defaults to `20`):
            EAFT's top-k entropy approximation (axolotl's `eaft_k`, LLaMA-Factory's fixed 20). The vocabulary size
            gives the exact entropy (read from TRL's fused LM head, no extra pass).
        pplmask_asft_alpha (`float`, *optional*, defaults to `0.1`):
            ASFT's weight of the KL anchor (LLaMA-Factory's `asft_alpha` default, 0.1); 0 gives TRL's DFT loss.
        pplmask_soft_width (`float`, *optional*, defaults to `0.75`):
            Width of soft STM's bell in perplexity units (the paper repository's 0.75).
    """

    pplmask_strategy: str = mask_field("strategy")
    pplmask_threshold: float = mask_field("threshold")
    pplmask_fraction: float | None = mask_field("fraction")
    pplmask_seed: int = mask_field("seed")
    pplmask_entropy_threshold: float = mask_field("entropy_threshold")
    pplmask_reference: str = field(
        default="base",
        metadata={"help": "`base` (the model before training) or a Hub id / path of a reference model."},
    )
    pplmask_prescore: bool = field(
        default=False, metadata={"help": "Score the training set once before training instead of per batch."}
    )
    pplmask_max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget of a pre-scoring batch."}
    )
    pplmask_anchor: bool = field(
        default=False, metadata={"help": "Anchored STM: KL to the base model on masked tokens."}
    )
    pplmask_anchor_weight: float = field(default=1.0, metadata={"help": "Anchor KL weight on masked tokens."})
    pplmask_anchor_all_weight: float = field(default=0.0, metadata={"help": "Anchor KL weight on kept tokens."})
    pplmask_loss: str = field(
        default="nll",
        metadata={"help": "Token-weighted objective: nll, eaft, asft or soft_stm.", "choices": list(LOSSES)},
    )
    pplmask_eaft_alpha: float = field(default=1.0, metadata={"help": "EAFT: exponent of the normalised entropy."})
    pplmask_eaft_k: int = field(default=20, metadata={"help": "EAFT: top-k entropy approximation (vocab: exact)."})
    pplmask_asft_alpha: float = field(default=0.1, metadata={"help": "ASFT: weight of KL(p_base || p_model)."})
    pplmask_soft_width: float = field(
        default=DEFAULT_SOFT_WIDTH, metadata={"help": "soft_stm: width w of exp(-((ppl - 1) / w) ** 2)."}
    )

    def __post_init__(self):
        if self.pplmask_strategy not in STRATEGIES:
            raise ValueError(
                f"pplmask_strategy={self.pplmask_strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}."
            )
        if self.pplmask_anchor_weight < 0 or self.pplmask_anchor_all_weight < 0:
            raise ValueError(
                f"pplmask_anchor_weight ({self.pplmask_anchor_weight}) and pplmask_anchor_all_weight "
                f"({self.pplmask_anchor_all_weight}) must be >= 0."
            )
        if self.pplmask_anchor and self.pplmask_strategy == "none":
            raise ValueError(
                "pplmask_anchor=true with pplmask_strategy=none anchors nothing (no token is masked). Choose a mask "
                "strategy (e.g. threshold) or drop pplmask_anchor."
            )
        self._check_loss()
        self.mask_config()  # validates threshold, fraction, ... before any work

    def _check_loss(self) -> None:
        if self.pplmask_loss not in LOSSES:
            raise ValueError(f"pplmask_loss={self.pplmask_loss!r} is unknown; choose one of {', '.join(LOSSES)}.")
        for name in ("pplmask_eaft_alpha", "pplmask_asft_alpha"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.pplmask_eaft_k < 1:
            raise ValueError(
                f"pplmask_eaft_k must be >= 1 (the reference implementations use 20), got {self.pplmask_eaft_k}."
            )
        if not (self.pplmask_soft_width > 0 and self.pplmask_soft_width < float("inf")):
            raise ValueError(
                f"pplmask_soft_width must be a positive, finite width, got {self.pplmask_soft_width}; the paper uses "
                "0.75."
            )
        if self.pplmask_loss == "soft_stm" and self.pplmask_strategy != "none":
            raise ValueError(
                "pplmask_loss=soft_stm weighs every token softly instead of dropping some; it does not combine "
                f"with pplmask_strategy={self.pplmask_strategy}. Set pplmask_strategy=none (eaft, asft and nll "
                "combine with any strategy)."
            )
        if self.pplmask_loss == "asft" and self.pplmask_reference != "base":
            raise ValueError(
                "pplmask_loss=asft anchors to the model before training, which is also the mask's reference: it needs "
                f"pplmask_reference=base (got {self.pplmask_reference!r})."
            )

    def mask_config(self) -> PplMaskConfig:
        """The [`PplMaskConfig`] these settings describe."""
        try:
            return PplMaskConfig.from_settings(self, "pplmask_")
        except ValueError as err:
            raise ValueError(f"Invalid pplmask_* setting: {err}") from None

    @property
    def needs_scores(self) -> bool:
        """Whether training needs the reference NLLs (a mask, or soft STM's weights)."""
        return self.pplmask_strategy != "none" or self.pplmask_loss == "soft_stm"


def make_parser(prog: str | None = "trl-pplmask sft"):
    """TRL's `trl sft` parser with [`PplMaskArguments`] added."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, PplMaskArguments), prog=prog)


def check_settings(training_args, model_args, pplmask_args: PplMaskArguments) -> None:
    """Refuse combinations that cannot train correctly, before anything is loaded."""
    for name in ("pplmask_threshold", "pplmask_fraction", "pplmask_entropy_threshold", "pplmask_soft_width"):
        value = getattr(pplmask_args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            # Refused here, not when the record is written after training (JSON has no inf)
            raise ValueError(
                f"{name}={value} is not a finite number. Give a finite value (e.g. pplmask_threshold=2.5, the paper's "
                "value); to mask nothing, set pplmask_strategy=none."
            )
    if training_args.packing:
        raise ValueError(
            "packing=true is not supported by trl-pplmask sft: a packed row mixes several examples, and scoring it as "
            "one sequence would let them attend to each other, unlike training. Set packing=false (with "
            "padding_free=true and pplmask_prescore=true for padding-free batches)."
        )
    on_the_fly = pplmask_args.needs_scores and not pplmask_args.pplmask_prescore
    if training_args.padding_free and (on_the_fly or pplmask_args.pplmask_anchor):
        raise ValueError(
            "padding_free=true needs pplmask_prescore=true (on-the-fly scoring pads each batch itself) and no "
            "pplmask_anchor. Set pplmask_prescore=true, or padding_free=false."
        )
    if training_args.dataloader_num_workers and on_the_fly:
        raise ValueError(
            f"dataloader_num_workers={training_args.dataloader_num_workers} with on-the-fly scoring would run the "
            "reference model in worker processes. Set dataloader_num_workers=0 or pplmask_prescore=true."
        )
    _check_loss_settings(training_args, pplmask_args)
    if pplmask_args.pplmask_anchor and pplmask_args.pplmask_reference != "base":
        raise ValueError(
            "pplmask_anchor keeps the prediction of the model before training, so it needs pplmask_reference=base "
            f"(got {pplmask_args.pplmask_reference!r})."
        )


def _check_loss_settings(training_args, pplmask_args: PplMaskArguments) -> None:
    loss = pplmask_args.pplmask_loss
    if loss == "nll":
        return
    if training_args.loss_type != "nll" or training_args.label_smoothing_factor:
        raise ValueError(
            f"pplmask_loss={loss} weighs TRL's per-token NLL itself: it needs loss_type=nll (got "
            f"{training_args.loss_type!r}; asft already includes DFT's weighting) and label_smoothing_factor=0 (got "
            f"{training_args.label_smoothing_factor})."
        )
    if training_args.padding_free:
        raise ValueError(f"pplmask_loss={loss} does not support padding_free=true yet; set padding_free=false.")
    if loss == "soft_stm" and training_args.dataloader_num_workers and not pplmask_args.pplmask_prescore:
        raise ValueError(
            "pplmask_loss=soft_stm reads reference NLLs: scoring them on the fly in dataloader worker processes is "
            "not supported. Set pplmask_prescore=true, or dataloader_num_workers=0."
        )


def load_datasets(script_args, dataset_args):
    """The training data as `trl sft` loads it, plus local folders written by `Dataset.save_to_disk` and files."""
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError("Either `datasets` or `dataset_name` must be provided (as for `trl sft`).")
    path = Path(script_args.dataset_name).expanduser()
    if is_saved_dataset(path):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({script_args.dataset_train_split: loaded})
    if path.is_file():
        from .data import load_data_file  # the CLI's own file loader: same formats, same errors for malformed files

        return DatasetDict({script_args.dataset_train_split: load_data_file(path)})
    if path.is_dir():  # a Hub-layout folder: a shard its records list may be missing
        from .data import check_data_files

        check_data_files(path, script_args.dataset_config)
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


@contextlib.contextmanager
def maps_outside(script_args):
    """While TRL prepares (tokenizes, truncates) a `save_to_disk` folder's data, and while it is pre-scored, the
    `datasets` maps write their results to a temporary folder instead of `cache-*.arrow` files beside the folder's
    Arrow files: the input is never written to (a read-only folder works). Other inputs keep `datasets`' caching."""
    import datasets

    saved = bool(script_args.dataset_name) and is_saved_dataset(Path(script_args.dataset_name).expanduser())
    enabled = datasets.is_caching_enabled()
    if saved:
        datasets.disable_caching()
    try:
        yield
    finally:
        if saved and enabled:
            datasets.enable_caching()


def check_dataset_rows(dataset, script_args, training_args, tokenizer) -> None:
    """Every row of the training (and evaluation) split follows one TRL format, checked before any model loads: TRL
    would fail inside the trainer, e.g. `KeyError: 'text'` for question/answer rows (see
    [`~trl_pplmask.data.check_rows`])."""
    from datasets import Dataset

    from .data import check_rows

    splits = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset:
        splits.append(script_args.dataset_test_split)
    for split in splits:
        if not isinstance(dataset[split], Dataset):  # streamed: its rows are not at hand
            continue
        try:
            check_rows(dataset[split], tokenizer, training_args.dataset_text_field)
        except ValueError as err:
            name = script_args.dataset_name or "datasets"
            raise ValueError(f"dataset_name {name} (split {split!r}): {err}") from None


def _model_init_kwargs(training_args, model_args) -> dict[str, Any]:
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


def load_reference(name_or_path: str, tokenizer, init_kwargs: dict[str, Any]):
    """A frozen reference model; refuses one whose vocabulary differs from the trained model's tokenizer."""
    from ._compat import create_model_from_path
    from .models import resolve_model_path, tokenizer_from_pretrained

    path = resolve_model_path(name_or_path)
    ref_tokenizer = tokenizer_from_pretrained(path, trust_remote_code=init_kwargs.get("trust_remote_code", False))
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The reference model {name_or_path!r} has another tokenizer/vocabulary than the model being trained "
            f"({len(ref_tokenizer)} vs {len(tokenizer)} tokens or different ids): its per-token NLLs would not refer "
            "to the trained tokens. Use a reference of the same model family (same tokenizer), or "
            "pplmask_reference=base."
        )
    kwargs = {k: v for k, v in init_kwargs.items() if k not in ("revision",)}
    model = create_model_from_path(path, **kwargs)
    model.requires_grad_(False)
    model.eval()
    return model


def _config_vocab_check(reference, model) -> None:
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    vocab = model.get_output_embeddings().weight.shape[0]
    if ref_vocab != vocab:
        raise ValueError(
            f"The reference model's vocabulary ({ref_vocab}) differs from the trained model's ({vocab}); use a "
            "reference of the same model family or pplmask_reference=base."
        )


def prescore(trainer, reference, pplmask_args: PplMaskArguments) -> dict[str, Any]:
    """Score the trainer's own prepared (tokenized, truncated) training set and mask it once for the statistics.

    Replaces `trainer.train_dataset` by the scored dataset. Raises before training when the mask empties every row.
    """
    from .hub.shards import score_in_shards
    from .masking import mask_dataset
    from .models import cache_dir
    from .scoring import ScoringConfig
    from .sharding import on_device

    config = pplmask_args.mask_config()
    dataset = trainer.train_dataset
    scoring = ScoringConfig(
        max_tokens_per_batch=pplmask_args.pplmask_max_tokens_per_batch,
        disable_adapter=True,
        show_progress=trainer.accelerator.is_main_process,
    )
    if "entropy_column" in {f.name for f in dataclasses.fields(ScoringConfig)}:
        needs_entropy = config.strategy == "stm_entropy"
        scoring.entropy_column = "token_entropy" if needs_entropy else None
    # Shard by shard into a folder named by content (the cache: a rerun or another arm reads it back, a killed run
    # resumes), each process of the launch its own shards; under FSDP the model is not on the accelerator yet
    with on_device(reference, trainer.accelerator.device):
        scored = score_in_shards(dataset, reference, trainer.processing_class, scoring, cache_dir() / "prescore")
    _, stats = mask_dataset(scored, config)
    stats["examples_fully_masked"] = stats.pop("examples_without_trainable_token")
    if stats["examples"] and stats["examples_fully_masked"] == stats["examples"]:
        raise ValueError(
            f"pplmask_strategy={config.strategy} masks every completion token of all {stats['examples']} training "
            f"rows (threshold {stats['threshold']}): nothing would be trained. Raise pplmask_threshold or check that "
            "the reference model is the one the data was meant for."
        )
    trainer.train_dataset = scored
    return stats


def _print(trainer, message: str) -> None:
    trainer.accelerator.print(f"[trl-pplmask sft] {message}")


def build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args: PplMaskArguments):
    """Load data, model and reference as `trl sft` does; return `(trainer, collator, recorder, prescore_stats)`.

    Nothing is written into a `save_to_disk` folder given as `dataset_name` (see [`maps_outside`]).
    """
    with maps_outside(script_args):
        return _build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args)


def _build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args: PplMaskArguments):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from .anchor import TokenWeightedSFTTrainer, objective_uses_base
    from .collator import PplMaskCollator, add_pplmask_callback
    from .models import check_model_path, resolve_model_path, tokenizer_from_pretrained
    from .sharding import check_sharded_training, detect_sharding

    check_settings(training_args, model_args, pplmask_args)
    model_path = resolve_model_path(model_args.model_name_or_path)
    if pplmask_args.needs_scores and pplmask_args.pplmask_reference != "base":
        check_model_path(pplmask_args.pplmask_reference, "pplmask_reference")  # a missing or non-causal one
    init_kwargs = _model_init_kwargs(training_args, model_args)
    tokenizer = tokenizer_from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    reference = None
    if pplmask_args.needs_scores and pplmask_args.pplmask_reference != "base":
        reference = load_reference(pplmask_args.pplmask_reference, tokenizer, init_kwargs)

    dataset = load_datasets(script_args, dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"The dataset has no split {script_args.dataset_train_split!r} (dataset_train_split); it has "
            f"{sorted(dataset)}."
        )
    check_dataset_rows(dataset, script_args, training_args, tokenizer)
    check_sharded_training(
        detect_sharding(training_args), pplmask_args, bool(model_args.use_peft),
        dataset[script_args.dataset_train_split].column_names,
    )  # fmt: skip
    # The collator reads token_nll / trainable_mask columns that Trainer would otherwise drop
    training_args.remove_unused_columns = False
    training_args.model_init_kwargs = init_kwargs
    collator = PplMaskCollator(
        tokenizer,
        config=pplmask_args.mask_config(),
        padding_free=training_args.padding_free,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
        return_dropped=pplmask_args.pplmask_anchor,
        soft_width=pplmask_args.pplmask_soft_width if pplmask_args.pplmask_loss == "soft_stm" else None,
    )
    peft_config = get_peft_config(model_args)
    trainer_kwargs: dict[str, Any] = {}
    trainer_cls = SFTTrainer
    if pplmask_args.pplmask_anchor or pplmask_args.pplmask_loss != "nll":
        trainer_cls = TokenWeightedSFTTrainer
        anchor = pplmask_args.pplmask_anchor
        trainer_kwargs = {
            "objective": pplmask_args.pplmask_loss,
            "anchor_weight": pplmask_args.pplmask_anchor_weight if anchor else 0.0,
            "anchor_all_weight": pplmask_args.pplmask_anchor_all_weight if anchor else 0.0,
            "eaft_alpha": pplmask_args.pplmask_eaft_alpha,
            "eaft_k": pplmask_args.pplmask_eaft_k,
            "asft_alpha": pplmask_args.pplmask_asft_alpha,
        }
        if peft_config is None and objective_uses_base(
            pplmask_args.pplmask_loss, trainer_kwargs["anchor_weight"], trainer_kwargs["anchor_all_weight"],
            pplmask_args.pplmask_asft_alpha,
        ):  # fmt: skip
            # Without PEFT the trained weights move, so the base needs its own frozen copy
            reference = reference or load_reference(model_path, tokenizer, init_kwargs)
            trainer_kwargs["reference_model"] = reference
    if pplmask_args.needs_scores and pplmask_args.pplmask_reference == "base" and peft_config is None:
        if reference is None and not pplmask_args.pplmask_prescore:
            reference = load_reference(model_path, tokenizer, init_kwargs)

    trainer = with_unmasked_eval(trainer_cls)(
        model=model_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=collator,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config,
        **trainer_kwargs,
    )
    trainer.eval_data_collator = collator.unmasked()
    if reference is not None:
        _config_vocab_check(reference, trainer.model)
        reference.to(trainer.accelerator.device)
    # With PEFT the trained model with its adapter disabled is the base: no second copy of the weights
    scorer = reference if reference is not None else trainer.model
    prescore_stats = None
    if pplmask_args.needs_scores:
        if pplmask_args.pplmask_prescore:
            prescore_stats = prescore(trainer, scorer, pplmask_args)
            _print(
                trainer,
                f"pre-scored {prescore_stats['examples']} rows: {prescore_stats['masked_tokens']} of "
                f"{prescore_stats['completion_tokens']} completion tokens masked "
                f"({100 * prescore_stats['masked_fraction']:.1f}%, strategy {prescore_stats['strategy']}, threshold "
                f"{prescore_stats['threshold']:g}); {prescore_stats['examples_fully_masked']} rows fully masked "
                "(they train nothing).",
            )
        else:
            collator.reference_model = scorer
    add_pplmask_callback(trainer)
    recorder = PplMaskRecorder(collator, trainer)
    trainer.add_callback(recorder)
    return trainer, collator, recorder, prescore_stats


def with_unmasked_eval(trainer_cls: type) -> type:
    """`trainer_cls` evaluating without the mask: eval batches come from its `eval_data_collator` (set after
    construction, typically [`PplMaskCollator.unmasked`]: every completion token keeps its label, no scores), and the
    eval loss is TRL's own NLL (`SFTTrainer.compute_loss`) whatever token-weighted objective trains the model.

    So `eval_loss` is the `trl sft` eval loss on the full completion for every strategy and `pplmask_loss`, and the
    eval rows stay out of the training collator's statistics. The trainer also counts the batches it trains
    (`pplmask_trained_batches`, for [`PplMaskCollator.stats_after`]: its data loader collates one ahead).
    """
    from trl import SFTTrainer

    class UnmaskedEvalTrainer(trainer_cls):
        eval_data_collator = None
        pplmask_trained_batches = 0

        def training_step(self, *args, **kwargs):
            self.pplmask_trained_batches += 1
            return super().training_step(*args, **kwargs)

        def get_eval_dataloader(self, eval_dataset=None):
            if self.eval_data_collator is None:
                return super().get_eval_dataloader(eval_dataset)
            # The DataLoader takes the collator when it is made: swap it in for that moment only
            train_collator, self.data_collator = self.data_collator, self.eval_data_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = train_collator

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    # Training is `trainer_cls`'s own: it keeps its name (logs, reprs, checks of which loss a trainer computes)
    UnmaskedEvalTrainer.__name__ = UnmaskedEvalTrainer.__qualname__ = trainer_cls.__name__
    return UnmaskedEvalTrainer


def _make_recorder_class():
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        """Mask statistics per epoch, summed over processes (read back by `write_pplmask_config`): of the batches
        `trainer` trained when given (`trained_stats`), else of those the collator collated."""

        def __init__(self, collator, trainer=None):
            self.collator = collator
            self.trainer = trainer
            self.epochs: list[dict[str, Any]] = []
            self._start: dict[str, Any] = {}
            self.stopped_at_step: int | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._start = self._stats()

        def _stats(self) -> dict[str, Any]:
            if self.trainer is None:
                return self.collator.cumulative_stats()
            return trained_stats(self.collator, self.trainer)

        def on_epoch_end(self, args, state, control, **kwargs):
            end = self._stats()
            delta = {k: end[k] - self._start.get(k, 0) for k in end if k != "masked_fraction"}
            delta = _sum_over_processes(delta)
            n = delta["completion_tokens"]
            delta["masked_fraction"] = masked_fraction(delta["masked_tokens"], n)
            delta["epoch"] = round(state.epoch or 0.0, 4)
            self.epochs.append(delta)
            if n and delta["masked_tokens"] == n:
                # Every completion token of the epoch masked: later epochs (same rows, frozen reference) train
                # nothing either. Stop here; `main` then fails instead of saving the model
                control.should_training_stop = True
                self.stopped_at_step = state.global_step

    return _Recorder


def PplMaskRecorder(collator, trainer=None):  # noqa: N802 - a factory that keeps transformers out of module import time
    """Callback recording the collator's statistics per epoch (summed over processes), of the batches `trainer`
    trained when given."""
    return _make_recorder_class()(collator, trainer)


def trained_stats(collator, trainer) -> dict[str, Any]:
    """The mask statistics of the batches `trainer` (made by [`with_unmasked_eval`]) trained so far in this process
    with `collator`: not of a batch its data loader collated ahead and the run never trained (a run stopped by
    `max_steps`)."""
    return collator.stats_after(trainer.pplmask_trained_batches)


def _sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    import torch
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=state.device)
    torch.distributed.all_reduce(tensor)
    return {k: (int(v) if isinstance(values[k], int) else float(v)) for k, v in zip(keys, tensor.tolist())}


def write_pplmask_config(path: Path, record: dict[str, Any]) -> None:
    """Write `pplmask_config.json` atomically (a finished run is one whose file exists), secrets redacted: it sits
    next to the model that `push_to_hub` uploads."""
    atomic_write_text(path, json.dumps(redact(json_safe(record)), indent=2, allow_nan=False) + "\n")


def keep_token_out_of_files(training_args) -> None:
    """Move `hub_token` into the environment (`HF_TOKEN`), where `push_to_hub` finds it, so that no file the trainer
    writes holds it (`training_args.bin` is a pickle of the arguments, written into every checkpoint and the output).
    """
    token = getattr(training_args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        training_args.hub_token = None
    # A token pasted into any other setting (`run_name`, ...) is redacted there; paths keep their value (the folder
    # is the user's choice, and changing it would write elsewhere)
    for setting in dataclasses.fields(training_args):
        value = getattr(training_args, setting.name, None)
        if isinstance(value, str) and setting.name not in _PATH_SETTINGS and redact_text(value) != value:
            setattr(training_args, setting.name, redact_text(value))


_PATH_SETTINGS = {"output_dir", "logging_dir", "resume_from_checkpoint", "hub_model_id"}


def check_trained_something(totals: dict[str, Any], pplmask_args: PplMaskArguments, recorder) -> None:
    """Refuse a run whose mask dropped every completion token it saw (the pre-scored path refuses it before training):
    it trained nothing, so its model is not saved and no `pplmask_config.json` is written.

    Args:
        totals (`dict`): The collator's cumulative statistics, summed over processes.
        pplmask_args ([`PplMaskArguments`]): The run's mask settings, for the message.
        recorder: The run's [`PplMaskRecorder`] (whether it stopped the training early).
    """
    n = totals["completion_tokens"]
    if not n or totals["masked_tokens"] != n:
        return
    strategy = pplmask_args.pplmask_strategy
    setting = f", pplmask_threshold={pplmask_args.pplmask_threshold:g}" if strategy == "threshold" else ""
    stopped = recorder.stopped_at_step
    when = f"training stopped after the first epoch (step {stopped})" if stopped is not None else "training ended"
    raise ValueError(
        f"pplmask_strategy={strategy}{setting} masked every one of the {n} completion tokens of all "
        f"{totals['examples']} training rows it saw: nothing was trained, so {when} without saving the model or "
        f"writing {CONFIG_FILE}. Mask less (raise pplmask_threshold, or another strategy), or check that the "
        "reference model is the one the data was meant for; pplmask_prescore=true reports this before training."
    )


def main(
    script_args, training_args, model_args, dataset_args, pplmask_args: PplMaskArguments, command: str | None = None
) -> dict[str, Any]:
    """Train like `trl sft`, with the mask; returns the record written to `pplmask_config.json`.

    `command` is the command line recorded there (redacted), `sys.argv` by default. The main process holds the
    advisory lock of `output_dir` ([`~trl_pplmask.utils.OutputLock`], `.<name>.lock` beside it) from before any work
    until the run has ended: a second run into the same folder is refused, naming this one's PID.
    """
    lock = OutputLock(training_args.output_dir, what="sft output_dir") if _is_main() else contextlib.nullcontext()
    with lock:
        return _train(script_args, training_args, model_args, dataset_args, pplmask_args, command)


def _train(
    script_args, training_args, model_args, dataset_args, pplmask_args: PplMaskArguments, command: str | None
) -> dict[str, Any]:
    import transformers
    from packaging.version import Version

    from . import __version__

    start = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    keep_token_out_of_files(training_args)
    trainer, collator, recorder, prescore_stats = build_trainer(
        script_args, training_args, model_args, dataset_args, pplmask_args
    )
    if _is_main():
        # Inputs checked (a failed rerun keeps the finished run's record): a rerun into the same folder is unfinished
        # until it writes its own record
        (output_dir / CONFIG_FILE).unlink(missing_ok=True)
    with maps_outside(script_args):
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    totals = _sum_over_processes({k: v for k, v in trained_stats(collator, trainer).items() if k != "masked_fraction"})
    check_trained_something(totals, pplmask_args, recorder)
    _print(trainer, "Training completed.")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        # The logs (loss, pplmask/* statistics) next to the model even when no checkpoint was saved
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    _print(trainer, f"Model saved to {training_args.output_dir}.")
    scope = mask_stats_scope(training_args, trainer.state.global_step)
    if training_args.resume_from_checkpoint:
        _print(trainer, f"Note: {scope}")
    n = totals["completion_tokens"]
    totals["masked_fraction"] = masked_fraction(totals["masked_tokens"], n)
    record = {
        "settings": dataclasses.asdict(pplmask_args),
        "mask_config": dataclasses.asdict(pplmask_args.mask_config()),
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name or [d.path for d in (dataset_args.datasets or [])],
        "training": {
            k: getattr(training_args, k)
            for k in (
                "learning_rate",
                "max_steps",
                "num_train_epochs",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_length",
                "loss_type",
                "seed",
                "lr_scheduler_type",
            )
        },  # fmt: skip
        "peft": bool(model_args.use_peft),
        "num_processes": trainer.accelerator.num_processes,
        "mask_stats": totals,
        "mask_stats_scope": scope,
        "mask_stats_per_epoch": recorder.epochs,
        "prescore_stats": prescore_stats,
        "train_runtime": result.metrics.get("train_runtime"),
        "train_loss": result.training_loss,
        "wall_time_s": time.perf_counter() - start,
        "versions": {
            "trl_pplmask": __version__,
            "trl": package_version("trl"),
            "transformers": transformers.__version__,
        },
        "command": command if command is not None else " ".join(sys.argv),
    }
    if trainer.accelerator.is_main_process:
        write_pplmask_config(output_dir / CONFIG_FILE, record)
        _print(trainer, f"Mask settings and statistics -> {output_dir / CONFIG_FILE}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # The main process wrote files the others did not: meet before the process group goes, or a process that left
    # first can leave the main one waiting on the group forever (seen with 2 CPU processes under load)
    trainer.accelerator.wait_for_everyone()
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return record


def mask_stats_scope(training_args, last_step: int) -> str:
    """Which training steps the mask statistics count: the collator counts the batches this run collated, so a run
    resumed from a checkpoint counts only the steps after it (said in `pplmask_config.json` and the log)."""
    checkpoint = training_args.resume_from_checkpoint
    if not checkpoint:
        return f"every training step (1-{last_step})"
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(training_args.output_dir)
    try:
        first = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] + 1
    except (OSError, TypeError, ValueError, KeyError):
        return f"only the steps trained after resuming from {checkpoint}; the steps before it are not counted"
    return (
        f"steps {first}-{last_step} only: the run resumed from {checkpoint} (step {first - 1}), and the statistics "
        f"of steps 1-{first - 1} are not counted"
    )


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def parse_args(argv: Sequence[str] | None = None):
    """Parse `trl sft` arguments plus [`PplMaskArguments`] (YAML `--config` and flags), like `trl sft`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv[:-1]:  # where TRL's parser looks for it; it would raise yaml's own errors
        read_yaml(argv[argv.index("--config") + 1], f"--config {argv[argv.index('--config') + 1]}")
    parser = make_parser()
    args = parser.parse_args_and_config(args=argv)
    return args[:5]


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trl-pplmask sft` (reached from `trl_pplmask.commands.sft`)."""
    script_args, training_args, model_args, dataset_args, pplmask_args = parse_args(argv)
    command = None if argv is None else shlex.join(["trl-pplmask", "sft", *argv])
    main(script_args, training_args, model_args, dataset_args, pplmask_args, command)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved and the process group is gone. Freeing the trainer's distributed objects at interpreter
        # exit sometimes never returns on CPU (gloo) launches (seen: 1 run in 3, a worker idle after its last line),
        # which leaves `accelerate launch` waiting forever; leave without running those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
