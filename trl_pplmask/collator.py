"""`PplMaskCollator`: Selective Token Masking as a drop-in `SFTTrainer` data collator.

```python
trainer = SFTTrainer(model, args=SFTConfig(..., remove_unused_columns=False), train_dataset=scored,
                     data_collator=PplMaskCollator(tokenizer, threshold=2.5))
```
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from . import _compat
from .masking import (
    IGNORE_INDEX,
    TRAINABLE_COLUMN,
    PplMaskConfig,
    check_nll,
    compute_mask,
    masked_fraction,
    relabel,
    resolve_fraction_threshold,
    soft_token_weights,
    trainable_positions,
)
from .scoring import adapter_context, batch_token_nll


# Per-token soft STM weights of the batch (`soft_width`), read by the token-weighted objective of `trl_pplmask.anchor`
WEIGHT_KEY = "pplmask_weight"


def _mask_config(config: PplMaskConfig | None, **settings) -> PplMaskConfig:
    """`config`, or the [`PplMaskConfig`] of the settings given (the others at its defaults, written there once)."""
    given = {name: value for name, value in settings.items() if value is not None}
    if config is None:
        return PplMaskConfig(**given)
    if given:
        raise ValueError(
            f"PplMaskCollator got both `config` and {', '.join(sorted(given))}; give the mask settings in one place "
            "(e.g. PplMaskConfig(strategy=..., threshold=...) as `config`)."
        )
    return config


# How many of the last batches `PplMaskCollator.stats_after` remembers (a data loader runs at most a few ahead)
RECENT_BATCHES = 64


class PplMaskCollator:
    """Pads like TRL's `DataCollatorForLanguageModeling` and drops high-perplexity tokens from the labels.

    With a `token_nll` column in the examples (a dataset scored by `trl-pplmask score` or a published
    `*-pplmasked` dataset), masks from it, so a published dataset can be re-thresholded at train time. Without one,
    and with a `reference_model`, scores each batch on the fly under `torch.no_grad()`. A `PeftModel` passed as
    reference (typically the very model being trained) is scored with its adapter disabled, so the frozen base serves
    as the reference without a second copy in memory. Strategy `"stm_entropy"` also reads `token_entropy`, from the
    examples or from the same on-the-fly pass.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            Tokenizer of the model being trained; supplies the pad token (its EOS token when it has none).
        threshold (`float`, *optional*, defaults to [`PplMaskConfig`]'s `2.5`):
            Perplexity threshold (the paper's value).
        strategy (`str`, *optional*, defaults to `"threshold"`):
            Mask strategy, see [`PplMaskConfig`]. With `"fraction"`, the threshold is resolved per batch.
        config (`PplMaskConfig`, *optional*):
            Full mask configuration, instead of `threshold`, `strategy`, `fraction` and `seed` (giving both is an
            error: one would be ignored).
        reference_model (`torch.nn.Module`, *optional*):
            Model that scores batches lacking NLLs.
        fraction (`float`, *optional*):
            Fraction of tokens to mask with `strategy="fraction"`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of `strategy="random"`.
        padding_free (`bool`, *optional*, defaults to `False`):
            Forwarded to `DataCollatorForLanguageModeling`.
        pad_to_multiple_of (`int`, *optional*):
            Forwarded to `DataCollatorForLanguageModeling`.
        return_dropped (`bool`, *optional*, defaults to `False`):
            Add a `pplmask_dropped` bool tensor to the batch, `True` on the trainable tokens this collator dropped from
            the loss. Only for trainers that consume it (the anchored objective of [`AnchoredSFTTrainer`]); a model's
            forward would reject the extra key.
        soft_width (`float`, *optional*):
            Soft STM: add a `pplmask_weight` float tensor to the batch, each kept token's weight
            `exp(-((ppl - 1) / soft_width) ** 2)` from its reference NLL (see [`soft_token_weights`]), 0 elsewhere.
            The batch is scored even with strategy `"none"`. Only for [`TokenWeightedSFTTrainer`] with
            `objective="soft_stm"`, which consumes the key.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        threshold: float | None = None,
        strategy: str | None = None,
        config: PplMaskConfig | None = None,
        reference_model: torch.nn.Module | None = None,
        fraction: float | None = None,
        seed: int | None = None,
        padding_free: bool = False,
        pad_to_multiple_of: int | None = None,
        return_dropped: bool = False,
        soft_width: float | None = None,
    ):
        self.config = _mask_config(config, strategy=strategy, threshold=threshold, fraction=fraction, seed=seed)
        self.reference_model = reference_model
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_dropped = return_dropped
        if soft_width is not None:
            soft_token_weights([0.0], np.ones(1, dtype=bool), soft_width)  # validates the width before any batch
        self.soft_width = soft_width
        # Counts of what logging already popped, so that `cumulative_stats` adds up every batch without a second tally
        self._popped = {"completion_tokens": 0, "masked_tokens": 0, "completion_nll_sum": 0.0}
        self.totals = {"examples": 0, "examples_fully_masked": 0}
        self.padder = _compat.DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of
        )
        self.reset_stats()
        self._start_batch_count()

    def unmasked(self) -> PplMaskCollator:
        """A collator that pads like this one and masks nothing: every trainable token keeps its label (tokens a
        pre-masked dataset carries as -100 are restored), no NLL is read or scored, no extra key is added, and its
        statistics are its own. `trl-pplmask sft` collates evaluation batches with it, so that `eval_loss` is the
        ordinary loss on the full completion and eval rows are not counted as training rows."""
        clone = copy.copy(self)
        clone.config = PplMaskConfig(strategy="none")
        clone.reference_model = None
        clone.return_dropped = False
        clone.soft_width = None
        clone._popped = dict.fromkeys(self._popped, 0)
        clone._popped["completion_nll_sum"] = 0.0
        clone.totals = dict.fromkeys(self.totals, 0)
        clone.reset_stats()
        clone._start_batch_count()
        return clone

    def _start_batch_count(self) -> None:
        # `stats_after`: the cumulative statistics after each of the last batches collated
        self.batches = 0
        self._after = deque([(0, self.cumulative_stats())], maxlen=RECENT_BATCHES)

    # Statistics, read and reset by PplMaskCallback at each logging step
    def reset_stats(self) -> None:
        self.stats = {"completion_tokens": 0, "masked_tokens": 0, "completion_nll_sum": 0.0}

    def pop_stats(self) -> dict[str, float]:
        """Masked fraction and mean completion perplexity since the last call, then reset."""
        s = self.stats
        self.reset_stats()
        for key in self._popped:
            self._popped[key] += s[key]
        if s["completion_tokens"] == 0:
            return {}
        stats = {"pplmask/masked_fraction": s["masked_tokens"] / s["completion_tokens"]}
        if self.config.strategy != "none":  # strategy none scores nothing
            stats["pplmask/completion_ppl"] = float(np.exp(s["completion_nll_sum"] / s["completion_tokens"]))
        return stats

    def __call__(self, examples: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        if not examples:
            raise ValueError("PplMaskCollator received an empty batch.")
        if self.config.strategy == "none" and self.soft_width is None:
            # Nothing to mask: no scores needed (plain SFT through the same pipeline)
            nlls, entropies = [np.zeros(len(ex["input_ids"])) for ex in examples], None
        else:
            nlls, entropies = self._batch_nlls(examples)
        threshold = None
        if self.config.strategy == "fraction":
            threshold = resolve_fraction_threshold(
                nlls, [ex.get("labels", ex["input_ids"]) for ex in examples], self.config.fraction,
                [ex[TRAINABLE_COLUMN] for ex in examples] if TRAINABLE_COLUMN in examples[0] else None,
            )  # fmt: skip
        features = []
        for i, (example, nll) in enumerate(zip(examples, nlls)):
            entropy = None if entropies is None else entropies[i]
            features.append(self._mask_example(example, nll, threshold, i, entropy))
        dropped = [self._count_example(ex, feature) for ex, feature in zip(examples, features)]
        batch = self.padder(features, return_tensors)
        if self.return_dropped:
            batch["pplmask_dropped"] = self._pad_like_labels(dropped, batch["labels"])
        if self.soft_width is not None:
            weights = [
                soft_token_weights(nll, np.asarray(feature["labels"]) != IGNORE_INDEX, self.soft_width)
                for nll, feature in zip(nlls, features)
            ]
            batch[WEIGHT_KEY] = self._pad_like_labels(weights, batch["labels"], dtype=torch.float32)
        self.batches += 1
        self._after.append((self.batches, self.cumulative_stats()))
        return batch

    def _count_example(self, example: dict[str, Any], feature: dict[str, Any]) -> np.ndarray:
        # Example counts (never reset) for the per-epoch statistics of `trl-pplmask sft`; the token counts come from
        # `self.stats`. The dropped positions feed the anchored objective
        labels = np.asarray(example.get("labels", example["input_ids"]))
        trainable = trainable_positions(labels, example.get(TRAINABLE_COLUMN))
        dropped = trainable & (np.asarray(feature["labels"]) == IGNORE_INDEX)
        self.totals["examples"] += 1
        self.totals["examples_fully_masked"] += int(trainable.any() and dropped.sum() == trainable.sum())
        return dropped

    def _pad_like_labels(
        self, rows: list[np.ndarray], labels: torch.Tensor, dtype: torch.dtype = torch.bool
    ) -> torch.Tensor:
        """Right-pad (or, padding-free, concatenate) per-example rows with zeros to the shape of the padded labels."""
        out = torch.zeros(labels.shape, dtype=dtype)
        if self.padding_free:
            flat = np.concatenate(rows) if rows else np.zeros(0)
            out[0, : flat.size] = torch.from_numpy(flat).to(dtype)
        else:
            for i, row in enumerate(rows):
                out[i, : row.size] = torch.from_numpy(row).to(dtype)
        return out

    def cumulative_stats(self) -> dict[str, float | int]:
        """Totals over every batch collated so far (not reset by logging), with the masked fraction."""
        totals = {**{key: self._popped[key] + self.stats[key] for key in self._popped}, **self.totals}
        n = totals["completion_tokens"]
        totals["masked_fraction"] = masked_fraction(totals["masked_tokens"], n)
        return totals

    def stats_after(self, batches: int) -> dict[str, float | int]:
        """[`cumulative_stats`] as they were once the first `batches` batches were collated: the statistics of the
        batches a trainer trained. Its data loader collates ahead of training (accelerate's loader fetches the next
        batch before yielding the current one), so a run that stops before the end of an epoch (`max_steps`) collated
        a batch it never trained. The last `RECENT_BATCHES` counts are remembered."""
        for count, totals in reversed(self._after):
            if count == batches:
                return dict(totals)
        raise ValueError(
            f"No statistics after batch {batches}: the collator collated {self.batches} batches and remembers the "
            f"last {RECENT_BATCHES}."
        )

    def _mask_example(
        self, example: dict[str, Any], nll: np.ndarray, threshold: float | None, i: int, entropy: np.ndarray | None
    ) -> dict:
        input_ids = np.asarray(example["input_ids"])
        labels = np.asarray(example.get("labels", example["input_ids"]))
        trainable = trainable_positions(labels, example.get(TRAINABLE_COLUMN))
        if trainable.shape != input_ids.shape:
            raise ValueError(f"Example {i}: `{TRAINABLE_COLUMN}` and `input_ids` differ in length.")
        dpf_nll = None
        if self.config.needs_dpf:
            if self.config.dpf_nll_column not in example:
                raise ValueError(f"Strategy {self.config.strategy!r} needs the column {self.config.dpf_nll_column!r}.")
            dpf_nll = check_nll(example[self.config.dpf_nll_column], example["input_ids"], f"Example {i}: ")
        mask = compute_mask(
            nll, labels, self.config, trainable_mask=trainable.astype(np.int8), dpf_nll=dpf_nll,
            token_entropy=entropy, row_id=int(example.get("row_id", i)), threshold=threshold,
        )  # fmt: skip
        self.stats["completion_tokens"] += int(trainable.sum())
        self.stats["masked_tokens"] += int(mask.sum())
        self.stats["completion_nll_sum"] += float(nll[trainable].sum())
        feature = {"input_ids": example["input_ids"], "labels": relabel(labels, input_ids, trainable, mask)}
        if "seq_lengths" in example:
            feature["seq_lengths"] = example["seq_lengths"]
        return feature

    def _batch_nlls(self, examples: list[dict[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """`(nlls, entropies)` of the batch: from the examples' columns, else scored on the fly in one pass.

        Entropies are `None` unless the strategy needs them.
        """
        column = self.config.nll_column
        present = [column in ex and ex[column] is not None for ex in examples]
        if all(present):
            nlls = [check_nll(ex[column], ex["input_ids"], f"Example {i}: ", column) for i, ex in enumerate(examples)]
            return nlls, self._column_entropies(examples) if self.config.needs_entropy else None
        if any(present):
            raise ValueError(f"Some examples of the batch have `{column}` and others do not; score the whole dataset.")
        if self.reference_model is None:
            raise ValueError(
                f"The batch has no `{column}` column and PplMaskCollator has no `reference_model` to score it. Either "
                f"the dataset was not scored (run `trl-pplmask score` or `score_dataset`), or the trainer dropped the "
                f"column: set `remove_unused_columns=False` in SFTConfig. Alternatively pass `reference_model=`."
            )
        return self._score_on_the_fly(examples)

    def _column_entropies(self, examples: list[dict[str, Any]]) -> list[np.ndarray]:
        column = self.config.entropy_column
        if not all(column in ex and ex[column] is not None for ex in examples):
            raise ValueError(
                f"Strategy {self.config.strategy!r} needs the per-token entropies in column {column!r}, which the "
                f"batch lacks: rescore the dataset with `trl-pplmask score` (it writes `token_entropy` next to "
                f"`token_nll`) and keep the column (`remove_unused_columns=False` in SFTConfig), or drop "
                f"`{self.config.nll_column}` and pass `reference_model=` to score NLLs and entropies on the fly."
            )
        return [check_nll(ex[column], ex["input_ids"], f"Example {i}: ", column) for i, ex in enumerate(examples)]

    def _score_on_the_fly(self, examples: list[dict[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        model = self.reference_model
        device = next(model.parameters()).device
        padded = self.padder(
            [{"input_ids": ex["input_ids"], "labels": ex.get("labels", ex["input_ids"])} for ex in examples]
        )
        score_mask = padded["labels"] != IGNORE_INDEX
        with_entropy = self.config.needs_entropy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), adapter_context(model, disable_adapter=True):
                # The entropy comes from the same LM-head pass as the NLL, only when the strategy reads it
                out = batch_token_nll(
                    model, padded["input_ids"].to(device), padded["attention_mask"].to(device), score_mask.to(device),
                    return_entropy=with_entropy,
                )  # fmt: skip
        finally:
            model.train(was_training)
        nll, entropy = (t.cpu().numpy() for t in out) if with_entropy else (out.cpu().numpy(), None)

        def rows(values: np.ndarray) -> list[np.ndarray]:
            return [values[i, : len(ex["input_ids"])].astype(np.float64) for i, ex in enumerate(examples)]

        return rows(nll), None if entropy is None else rows(entropy)


class PplMaskCallback(TrainerCallback):
    """Adds `pplmask/masked_fraction` and `pplmask/completion_ppl` (exp of the mean completion-token NLL) to the logs.

    Register it with [`add_pplmask_callback`] so that it runs before the console printer and the reporting
    integrations (W&B, TensorBoard, ...) and they all see the values.

    Args:
        collator (`PplMaskCollator`): The trainer's data collator. With `dataloader_num_workers > 0` the collator runs
            in worker processes and its statistics do not reach this callback.
    """

    def __init__(self, collator: PplMaskCollator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs and "train_loss" not in logs:
            return
        stats = self.collator.pop_stats()
        logs.update(stats)
        if state.log_history and stats:
            state.log_history[-1].update(stats)


def add_pplmask_callback(trainer) -> PplMaskCallback:
    """Register a [`PplMaskCallback`] for `trainer.data_collator` ahead of the trainer's other callbacks."""
    if not isinstance(trainer.data_collator, PplMaskCollator):
        raise TypeError("add_pplmask_callback needs a trainer whose data_collator is a PplMaskCollator.")
    callback = PplMaskCallback(trainer.data_collator)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
