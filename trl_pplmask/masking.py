"""Mask strategies on per-token NLL arrays: the single home of every mask rule.

Pure functions (NumPy, no model, no I/O) shared by the collator, the dataset builder and the CLI. A token's
perplexity is `exp(token_nll)`; `stm_entropy` also reads `token_entropy`, the entropy (nats) of the reference model's
predictive distribution at the position that predicts the token. Only *trainable* tokens (label != -100, or
`trainable_mask == 1` when the labels were already masked) are candidates; a mask never un-masks anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import DEFAULT_THRESHOLD, DPF_NLL_COLUMN, ENTROPY_COLUMN, IGNORE_INDEX, NLL_COLUMN, TRAINABLE_COLUMN


STRATEGIES = ("threshold", "fraction", "random", "lowest", "lowest_count", "dpf", "stm_dpf", "stm_entropy", "none")
# Strategies that mask per example as many tokens as "threshold" would, chosen by another rule
_COUNT_MATCHED = ("random", "lowest_count")


@dataclass
class PplMaskConfig:
    """How to choose the tokens dropped from the SFT loss.

    Args:
        strategy (`str`, *optional*, defaults to `"threshold"`):
            - `"threshold"`: Selective Token Masking (STM), mask a token when `exp(nll) > threshold`.
            - `"fraction"`: mask the `fraction` of trainable tokens with the highest perplexity, through one
              dataset-level threshold (see [`resolve_fraction_threshold`]).
            - `"random"`: in each example, mask as many tokens as `"threshold"` would, chosen uniformly at random
              without replacement (the paper's random-masking ablation); deterministic for a `seed`.
            - `"lowest"`: mask `exp(nll) < threshold` (the paper's lowest-perplexity ablation).
            - `"lowest_count"`: in each example, mask as many tokens as `"threshold"` would, choosing the ones with
              the *lowest* perplexity (ties broken by position, first token first): the lowest-perplexity control
              at the same masked count as STM.
            - `"dpf"`: mask tokens whose perplexity under a first fine-tuned model (`dpf_nll_column`) exceeds their
              perplexity under the reference model by a factor larger than `dpf_ratio`.
            - `"stm_dpf"`: the union of `"threshold"` and `"dpf"`.
            - `"stm_entropy"`: mask a token when `exp(nll) > threshold` *and* the reference model's predictive
              entropy there (`entropy_column`) is below `entropy_threshold`: a confident conflict, where the model
              is sure of another token than the reference's.
            - `"none"`: mask nothing (ground-truth baseline with the same pipeline).
        threshold (`float`, *optional*, defaults to `2.5`):
            Perplexity threshold of `"threshold"`, `"random"`, `"lowest"`, `"lowest_count"`, `"stm_dpf"` and
            `"stm_entropy"`. The paper uses 2.5.
        fraction (`float`, *optional*):
            Target fraction of trainable tokens to mask with `"fraction"`, in `[0, 1]`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of `"random"`. Each example's draw depends only on the seed and its row id.
        dpf_ratio (`float`, *optional*, defaults to `1.0`):
            Perplexity-increase factor of `"dpf"`: mask when `exp(nll_dpf - nll) > dpf_ratio`.
        nll_column (`str`, *optional*, defaults to `"token_nll"`):
            Column holding the per-token NLL under the reference model.
        dpf_nll_column (`str`, *optional*, defaults to `"token_nll_dpf"`):
            Column holding the per-token NLL under the first fine-tuned model, for `"dpf"` and `"stm_dpf"`.
        entropy_threshold (`float`, *optional*, defaults to `1.0`):
            Entropy bound of `"stm_entropy"`, in nats: a token is masked only where the entropy is strictly below it.
            For scale, a uniform choice between `k` tokens has entropy `log(k)` (`log(2.7) = 1.0`).
        entropy_column (`str`, *optional*, defaults to `"token_entropy"`):
            Column holding the per-token predictive entropy under the reference model, for `"stm_entropy"`
            (written by `trl-pplmask score` next to `token_nll`).
    """

    # The help strings are the options' help wherever these settings appear under other names (see `mask_field`)
    strategy: str = field(
        default="threshold",
        metadata={
            "help": "How tokens are chosen for masking: threshold (the paper's STM: perplexity above the threshold), "
            "fraction (that fraction of highest-perplexity tokens), and the baselines and variants listed "
            "(default: threshold).",
            "choices": STRATEGIES,
        },
    )
    threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": f"Perplexity threshold: mask a token when exp(nll) > it (paper: {DEFAULT_THRESHOLD})."},
    )
    fraction: float | None = field(
        default=None, metadata={"help": "Fraction of trainable tokens to mask, in [0, 1] (strategy fraction)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of strategy random."})
    dpf_ratio: float = field(default=1.0, metadata={"help": "Perplexity-increase factor of strategies dpf, stm_dpf."})
    nll_column: str = field(default=NLL_COLUMN, metadata={"help": "Column of per-token NLLs (reference model)."})
    dpf_nll_column: str = field(
        default=DPF_NLL_COLUMN, metadata={"help": "Column of per-token NLLs under a first fine-tuned model (dpf)."}
    )
    entropy_threshold: float = field(
        default=1.0, metadata={"help": "Entropy bound in nats of strategy stm_entropy (mask only below it)."}
    )
    entropy_column: str = field(
        default=ENTROPY_COLUMN, metadata={"help": "Column of per-token predictive entropies (stm_entropy)."}
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown mask strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if self.strategy in ("threshold", "random", "lowest_count", "stm_dpf", "stm_entropy") and not (
            self.threshold > 1.0
        ):
            raise ValueError(
                f"threshold={self.threshold} masks every token (a perplexity is always >= 1). Use a value above 1; "
                "the paper uses 2.5."
            )
        if self.strategy == "lowest" and not self.threshold > 1.0:
            raise ValueError(f"threshold={self.threshold} masks nothing with strategy 'lowest'; use a value above 1.")
        if self.strategy == "fraction" and (self.fraction is None or not 0.0 <= self.fraction <= 1.0):
            raise ValueError(f"Strategy 'fraction' needs `fraction` in [0, 1], got {self.fraction!r}.")
        if self.dpf_ratio <= 0:
            raise ValueError(f"dpf_ratio must be positive, got {self.dpf_ratio}.")
        if not (self.entropy_threshold > 0 and math.isfinite(self.entropy_threshold)):
            raise ValueError(
                f"entropy_threshold must be a positive, finite number of nats, got {self.entropy_threshold}."
            )

    @classmethod
    def from_settings(cls, settings: Any, prefix: str = "") -> PplMaskConfig:
        """The mask settings that another settings object carries under its own names (`prefix` + field name), the
        others at their defaults (e.g. `from_settings(sft_arguments, "pplmask_")`)."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(settings, prefix + f.name)]
        return cls(**{name: getattr(settings, prefix + name) for name in names})

    @property
    def needs_dpf(self) -> bool:
        return self.strategy in ("dpf", "stm_dpf")

    @property
    def needs_entropy(self) -> bool:
        return self.strategy == "stm_entropy"


def mask_field(name: str, **changes: Any) -> Any:
    """A dataclass field with the default and help of [`PplMaskConfig`]'s field `name`, for the settings classes that
    carry mask settings under their own names (the `mask` command's options, `trl-pplmask sft`'s `pplmask_*`, a
    study's `mask:` section): the default and the help are written once, here.

    Args:
        name (`str`): A field of [`PplMaskConfig`].
        changes: `default=` to differ from it (say why where you do), or metadata entries to add or replace.
    """
    source = next(f for f in dataclasses.fields(PplMaskConfig) if f.name == name)
    default = changes.pop("default", source.default)
    return field(default=default, metadata={**source.metadata, **changes})


def trainable_positions(labels: Sequence[int], trainable_mask: Sequence[int] | None = None) -> np.ndarray:
    """Boolean array of the tokens SFT would train on before any perplexity masking."""
    if trainable_mask is not None:
        return np.asarray(trainable_mask, dtype=bool)
    return np.asarray(labels) != IGNORE_INDEX


def check_nll(
    token_nll: Sequence[float], input_ids: Sequence[int], where: str = "", column: str = NLL_COLUMN
) -> np.ndarray:
    """Validate one example's NLLs (from `column`) against its `input_ids` and return them as a float64 array."""
    nll = np.asarray(token_nll, dtype=np.float64)
    if nll.shape != (len(input_ids),):
        relation = "shorter" if nll.size < len(input_ids) else "longer"
        raise ValueError(
            f"{where}`{column}` has {nll.size} values but `input_ids` has {len(input_ids)} tokens ({relation}). "
            "The NLLs must come from scoring exactly these input_ids: rescore the dataset with the tokenizer and "
            "`max_length` used for training (SFTTrainer truncates `input_ids` but not extra columns)."
        )
    bad = ~np.isfinite(nll)
    if bad.any():
        position = int(np.argmax(bad))
        raise ValueError(
            f"{where}`{column}` holds a non-finite value ({nll[position]}) at token {position}. Rescore the "
            "example; non-finite NLLs usually come from fp16 overflow, so score in float32 or bfloat16."
        )
    return nll


def _threshold_mask(nll: np.ndarray, trainable: np.ndarray, threshold: float) -> np.ndarray:
    # exp(nll) > t  <=>  nll > log(t): compare in log space to avoid overflow. A threshold of 0 (what
    # `resolve_fraction_threshold` returns for fraction 1) masks every trainable token.
    log_threshold = math.log(threshold) if threshold > 0 else -math.inf
    return trainable & (nll > log_threshold)


def _entropy_missing_message(config: PplMaskConfig) -> str:
    return (
        f"Strategy {config.strategy!r} needs the per-token entropies of the reference model in column "
        f"{config.entropy_column!r}: rescore the dataset with `trl-pplmask score` (or `score_dataset`), which writes "
        f"`token_entropy` next to `token_nll`."
    )


def compute_mask(
    token_nll: Sequence[float],
    labels: Sequence[int],
    config: PplMaskConfig,
    *,
    trainable_mask: Sequence[int] | None = None,
    dpf_nll: Sequence[float] | None = None,
    token_entropy: Sequence[float] | None = None,
    row_id: int = 0,
    threshold: float | None = None,
) -> np.ndarray:
    """Boolean array, `True` where a trainable token is dropped from the loss.

    Args:
        token_nll (`Sequence[float]`): Per-token NLL under the reference model, aligned with `labels`.
        labels (`Sequence[int]`): Labels, -100 on tokens that are not trained.
        config (`PplMaskConfig`): The strategy.
        trainable_mask (`Sequence[int]`, *optional*): 1 on tokens trainable before masking; defaults to
            `labels != -100`. Lets already-masked labels be re-thresholded.
        dpf_nll (`Sequence[float]`, *optional*): NLL under the first fine-tuned model, for `"dpf"`/`"stm_dpf"`.
        token_entropy (`Sequence[float]`, *optional*): Predictive entropy (nats) of the reference model at the
            position that predicts each token, aligned with `labels`, for `"stm_entropy"`.
        row_id (`int`, *optional*): Identifies the example in the `"random"` draw.
        threshold (`float`, *optional*): Overrides `config.threshold`; `"fraction"` passes its resolved value here.
    """
    nll = np.asarray(token_nll, dtype=np.float64)
    trainable = trainable_positions(labels, trainable_mask)
    t = config.threshold if threshold is None else threshold
    strategy = config.strategy
    if strategy == "none":
        return np.zeros_like(trainable)
    if strategy == "fraction":
        if threshold is None:
            raise ValueError("Strategy 'fraction' needs a dataset-level threshold: see `resolve_fraction_threshold`.")
        return _threshold_mask(nll, trainable, t)
    if strategy == "threshold":
        return _threshold_mask(nll, trainable, t)
    if strategy == "lowest":
        return trainable & (nll < math.log(t))
    if strategy in _COUNT_MATCHED:
        count = int(_threshold_mask(nll, trainable, t).sum())
        candidates = np.flatnonzero(trainable)
        if strategy == "random":
            chosen = np.random.default_rng([config.seed, row_id]).choice(candidates, size=count, replace=False)
        else:
            # `candidates` is in position order and the sort is stable: equal perplexities go first token first
            chosen = candidates[np.argsort(nll[candidates], kind="stable")[:count]]
        mask = np.zeros_like(trainable)
        mask[chosen] = True
        return mask
    if strategy == "stm_entropy":
        if token_entropy is None:
            raise ValueError(_entropy_missing_message(config))
        entropy = np.asarray(token_entropy, dtype=np.float64)
        if entropy.shape != nll.shape:
            raise ValueError(
                f"`{config.entropy_column}` has {entropy.size} values but `{config.nll_column}` has {nll.size}: both "
                "must come from scoring the same input_ids."
            )
        return _threshold_mask(nll, trainable, t) & (entropy < config.entropy_threshold)
    if dpf_nll is None:
        raise ValueError(
            f"Strategy {strategy!r} needs the NLLs under a first fine-tuned model in column "
            f"{config.dpf_nll_column!r}: score the dataset with that model into this column."
        )
    rise = trainable & (np.asarray(dpf_nll, dtype=np.float64) - nll > math.log(config.dpf_ratio))
    if strategy == "dpf":
        return rise
    return rise | _threshold_mask(nll, trainable, t)


DEFAULT_SOFT_WIDTH = 0.75  # the paper repository's soft variant (appier-research/robust-llm-finetunes)


def soft_token_weights(
    token_nll: Sequence[float], trainable: np.ndarray, width: float = DEFAULT_SOFT_WIDTH
) -> np.ndarray:
    """Soft STM: the weight of each token in the loss, `exp(-((ppl - 1) / width) ** 2)` with `ppl = exp(token_nll)`.

    The soft counterpart of `"threshold"` (the paper's soft variant): a token the reference model predicts with
    certainty (`ppl = 1`) keeps weight 1, and the weight falls smoothly with its perplexity (width 0.75: `ppl = 1.75`
    weighs `exp(-1) = 0.37`, the paper's hard threshold `ppl = 2.5` weighs `exp(-4) = 0.018`). Weights are 0 on tokens
    that are not trainable. A very large width gives every trainable token weight 1 (plain SFT).

    Args:
        token_nll (`Sequence[float]`): Per-token NLL under the reference model.
        trainable (`np.ndarray`): Boolean array, `True` on the trainable tokens (see [`trainable_positions`]).
        width (`float`, *optional*, defaults to `0.75`): Width of the bell, in perplexity units; must be positive.

    Returns:
        `np.ndarray` of float64 weights in `[0, 1]`, aligned with `token_nll`.
    """
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"The soft STM width must be a positive, finite number, got {width}; the paper uses 0.75.")
    # Perplexities above ~e^700 overflow to inf and weigh exp(-inf) = 0, which is their limit anyway
    with np.errstate(over="ignore"):
        ppl = np.exp(np.asarray(token_nll, dtype=np.float64))
    return np.where(trainable, np.exp(-np.square((ppl - 1.0) / width)), 0.0)


def resolve_fraction_threshold(
    token_nlls: Sequence[Sequence[float]],
    labels: Sequence[Sequence[int]],
    fraction: float,
    trainable_masks: Sequence[Sequence[int]] | None = None,
) -> float:
    """Perplexity threshold that masks `fraction` of all trainable tokens with strategy `"threshold"` semantics.

    The threshold is the perplexity of the first token *kept*, so `exp(nll) > threshold` masks exactly
    `round(fraction * n)` tokens when perplexities are distinct (ties at the boundary are all kept).
    """
    values = []
    for i, (nll, lab) in enumerate(zip(token_nlls, labels)):
        trainable = trainable_positions(lab, None if trainable_masks is None else trainable_masks[i])
        values.append(np.asarray(nll, dtype=np.float64)[trainable])
    pool = np.sort(np.concatenate(values) if values else np.array([]))[::-1]
    if pool.size == 0:
        raise ValueError("No trainable token to compute a fraction threshold from.")
    k = int(round(fraction * pool.size))
    if k >= pool.size:
        return 0.0
    threshold = math.exp(pool[k])
    # `log(exp(x))` can round below `x`, which would mask the first kept token too: step up to the next float
    while math.log(threshold) < pool[k]:
        threshold = math.nextafter(threshold, math.inf)
    return float(threshold)


def apply_mask(labels: Sequence[int], mask: np.ndarray) -> list[int]:
    """Labels with every masked position set to -100."""
    out = np.asarray(labels, dtype=np.int64).copy()
    out[mask] = IGNORE_INDEX
    return out.tolist()


def masked_fraction(masked: int, total: int) -> float:
    """`masked / total`, 0.0 for no tokens: the masked fraction every statistic reports."""
    return masked / total if total else 0.0


def relabel(labels: Sequence[int], input_ids: Sequence[int], trainable: np.ndarray, mask: np.ndarray) -> list[int]:
    """The labels of an example after `mask`: every trainable token's label restored from `input_ids` first (a
    pre-masked dataset carries -100 on the tokens an earlier pass masked, which a new mask may keep), the others -100,
    then every masked position -100.

    Args:
        labels (`Sequence[int]`): The example's labels (-100 where not trained on or masked earlier).
        input_ids (`Sequence[int]`): Its token ids.
        trainable (`np.ndarray`): Boolean, the tokens SFT trains on before any masking ([`trainable_positions`]).
        mask (`np.ndarray`): Boolean, the tokens to drop from the loss now.
    """
    labels = np.asarray(labels)
    restored = np.where(trainable, np.where(labels != IGNORE_INDEX, labels, np.asarray(input_ids)), IGNORE_INDEX)
    return apply_mask(restored, mask)


def example_stats(trainable: np.ndarray, mask: np.ndarray) -> dict[str, float | int]:
    """Per-example statistics over trainable (completion) tokens."""
    n = int(trainable.sum())
    k = int((mask & trainable).sum())
    return {"num_completion_tokens": n, "num_masked": k, "masked_fraction": masked_fraction(k, n)}


def overall_stats(num_completion_tokens: Sequence[int], num_masked: Sequence[int]) -> dict[str, float | int]:
    """Dataset-level statistics from per-example counts (the fraction is token-weighted)."""
    n = int(np.sum(num_completion_tokens))
    k = int(np.sum(num_masked))
    left_empty = int(np.sum((np.asarray(num_completion_tokens) - np.asarray(num_masked)) == 0))
    return {
        "examples": len(num_completion_tokens),
        "completion_tokens": n,
        "masked_tokens": k,
        "masked_fraction": masked_fraction(k, n),
        "examples_without_trainable_token": left_empty,
    }


def mask_dataset(dataset, config: PplMaskConfig, *, drop_empty: bool = False, num_proc: int | None = None):
    """Mask the `labels` of a scored dataset and add per-example statistics.

    Adds `trainable_mask` (kept from a previous masking if present, so masking twice never loses the ability to
    re-threshold), `num_completion_tokens`, `num_masked` and `masked_fraction`.

    Args:
        dataset (`datasets.Dataset`): Columns `input_ids`, `labels` and `config.nll_column` (and
            `config.dpf_nll_column` for DPF strategies, `config.entropy_column` for `"stm_entropy"`).
        config (`PplMaskConfig`): The strategy.
        drop_empty (`bool`, *optional*, defaults to `False`): Drop examples left with no trainable token. They are
            counted in the statistics either way.
        num_proc (`int`, *optional*): Worker processes for `Dataset.map`.

    Returns:
        `tuple[datasets.Dataset, dict]`: the masked dataset and the overall statistics (with the threshold used).
    """
    required = ["input_ids", "labels", config.nll_column] + ([config.dpf_nll_column] if config.needs_dpf else [])
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Cannot mask: missing column(s) {missing}. Score the dataset first (`trl-pplmask score`).")
    if config.needs_entropy and config.entropy_column not in dataset.column_names:
        raise ValueError(f"Cannot mask: missing column {config.entropy_column!r}. {_entropy_missing_message(config)}")
    has_trainable = TRAINABLE_COLUMN in dataset.column_names
    threshold = config.threshold
    if config.strategy == "fraction":
        threshold = resolve_fraction_threshold(
            dataset[config.nll_column],
            dataset["labels"],
            config.fraction,
            dataset[TRAINABLE_COLUMN] if has_trainable else None,
        )
    has_row_id = "row_id" in dataset.column_names

    def mask_one(example: dict[str, Any], idx: int) -> dict[str, Any]:
        where = f"Row {example['row_id'] if has_row_id else idx}: "
        check_nll(example[config.nll_column], example["input_ids"], where, config.nll_column)
        if config.needs_dpf:
            check_nll(example[config.dpf_nll_column], example["input_ids"], where, config.dpf_nll_column)
        entropy = None
        if config.needs_entropy:
            entropy = check_nll(example[config.entropy_column], example["input_ids"], where, config.entropy_column)
        trainable_mask = example[TRAINABLE_COLUMN] if has_trainable else None
        trainable = trainable_positions(example["labels"], trainable_mask)
        mask = compute_mask(
            example[config.nll_column],
            example["labels"],
            config,
            trainable_mask=trainable_mask,
            dpf_nll=example.get(config.dpf_nll_column) if config.needs_dpf else None,
            token_entropy=entropy,
            row_id=example["row_id"] if has_row_id else idx,
            threshold=threshold,
        )
        return {
            "labels": relabel(example["labels"], example["input_ids"], trainable, mask),
            TRAINABLE_COLUMN: trainable.astype(np.int8).tolist(),
            **example_stats(trainable, mask),
        }

    masked = dataset.map(mask_one, with_indices=True, num_proc=num_proc, desc=f"Masking ({config.strategy})")
    stats = overall_stats(masked["num_completion_tokens"], masked["num_masked"])
    stats.update(strategy=config.strategy, threshold=threshold)
    if drop_empty:
        masked = masked.filter(lambda ex: ex["num_completion_tokens"] > ex["num_masked"], num_proc=num_proc)
        stats["examples_dropped"] = stats["examples"] - len(masked)
    return masked, stats


# --------------------------------------------------------------------------------------------------------------------
# Perplexities of a scored dataset, for the summaries of `score` and the demo
# --------------------------------------------------------------------------------------------------------------------
PPL_BINS = (1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 100.0, math.inf)


def completion_ppl(dataset, nll_column: str = NLL_COLUMN) -> np.ndarray:
    """Perplexities of all completion (trainable) tokens of a scored dataset."""
    values = []
    masks = dataset[TRAINABLE_COLUMN] if TRAINABLE_COLUMN in dataset.column_names else dataset["labels"]
    for nll, mask in zip(dataset[nll_column], masks):
        trainable = trainable_positions(mask, mask if TRAINABLE_COLUMN in dataset.column_names else None)
        values.append(np.exp(np.asarray(nll, dtype=np.float64)[trainable]))
    return np.concatenate(values) if values else np.zeros(0)


def text_histogram(ppl: np.ndarray, threshold: float, width: int = 40) -> str:
    """A small text histogram of token perplexities, bins marked above the threshold."""
    counts, _ = np.histogram(ppl, bins=np.array(PPL_BINS))
    return histogram_text(counts, threshold, width)


def histogram_text(counts: np.ndarray, threshold: float, width: int = 40) -> str:
    """[`text_histogram`] from the token counts of its bins (`PPL_BINS`), e.g. summed over the shards of a run."""
    total = max(int(counts.sum()), 1)
    lines = []
    for lo, hi, n in zip(PPL_BINS[:-1], PPL_BINS[1:], counts):
        label = f"[{lo:g}, {hi:g})" if math.isfinite(hi) else f"[{lo:g}, inf)"
        bar = "#" * int(round(width * n / total))
        flag = "  masked" if lo >= threshold else ""
        lines.append(f"  {label:>12} {n:7d} {100 * n / total:5.1f}% {bar}{flag}")
    return "\n".join(lines)
