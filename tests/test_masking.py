"""Semantics of every mask strategy, `mask_dataset` statistics and errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import given, settings, strategies as st

from trl_pplmask.masking import (
    IGNORE_INDEX,
    STRATEGIES,
    TRAINABLE_COLUMN,
    PplMaskConfig,
    apply_mask,
    compute_mask,
    mask_dataset,
    mask_field,
    masked_fraction,
    overall_stats,
    relabel,
    resolve_fraction_threshold,
)


def cfg(strategy="threshold", **kwargs):
    return PplMaskConfig(strategy=strategy, **kwargs)


def labels_for(n, prompt=0):
    """Labels of an `n`-token example whose first `prompt` tokens are not trained."""
    return [IGNORE_INDEX] * prompt + list(range(100 + prompt, 100 + n))


def scored_dataset(rows):
    """`rows`: list of (nll list, number of prompt tokens)."""
    return Dataset.from_list(
        [
            {
                "input_ids": list(range(100, 100 + len(nll))),
                "labels": labels_for(len(nll), prompt),
                "token_nll": [float(x) for x in nll],
                "row_id": i,
            }
            for i, (nll, prompt) in enumerate(rows)
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# threshold


@pytest.mark.parametrize("t", [2.5, 1.5, 2.0, math.e])
def test_threshold_boundary(t):
    """`exp(nll) > t`: a token at exactly the threshold is kept, the next float above it is masked."""
    at = math.log(t)
    assert math.exp(at) == t  # these thresholds round-trip, so "exactly at the threshold" is well defined
    above, below = math.nextafter(at, math.inf), math.nextafter(at, -math.inf)
    mask = compute_mask([below, at, above, 0.0, 50.0], [1, 2, 3, 4, 5], cfg(threshold=t))
    assert mask.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("t", [10.0, 3.0, 100.0])
def test_threshold_boundary_log_space(t):
    # exp(log(t)) rounds above t for these thresholds; the comparison is done in log space, so nll == log(t) is
    # still "perplexity equal to the threshold" and kept
    at = math.log(t)
    mask = compute_mask([at, math.nextafter(at, math.inf)], [1, 2], cfg(threshold=t))
    assert mask.tolist() == [False, True]


def test_threshold_huge_nll_does_not_overflow():
    with np.errstate(over="raise"):
        mask = compute_mask([0.0, 800.0, 1e300], [1, 2, 3], cfg())
    assert mask.tolist() == [False, True, True]


def test_threshold_only_trainable_tokens():
    nll = [9.0, 9.0, 0.1, 9.0, 0.1]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]
    assert compute_mask(nll, labels, cfg()).tolist() == [False, False, False, True, False]
    # An explicit trainable mask overrides the labels (labels already masked by an earlier pass)
    mask = compute_mask(nll, [IGNORE_INDEX] * 5, cfg(), trainable_mask=[0, 1, 1, 1, 0])
    assert mask.tolist() == [False, True, False, True, False]


def test_never_unmasks():
    labels = [IGNORE_INDEX, 5, IGNORE_INDEX, 7]
    for strategy in STRATEGIES:
        config = cfg(strategy, fraction=0.5) if strategy == "fraction" else cfg(strategy, threshold=2.5)
        mask = compute_mask(
            [9.0, 9.0, 0.0, 0.0], labels, config, dpf_nll=[20.0] * 4, token_entropy=[0.1] * 4, threshold=2.5
        )
        out = apply_mask(labels, mask)
        assert all(o == IGNORE_INDEX for o, lab in zip(out, labels) if lab == IGNORE_INDEX), strategy
        assert all(o in (lab, IGNORE_INDEX) for o, lab in zip(out, labels)), strategy


def test_apply_mask():
    labels = [IGNORE_INDEX, 11, 12, 13]
    assert apply_mask(labels, np.array([False, True, False, True])) == [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX]
    assert labels == [IGNORE_INDEX, 11, 12, 13]  # the input is not modified


nll_lists = st.lists(st.floats(min_value=0.0, max_value=20.0, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(nll=nll_lists, data=st.data())
def test_threshold_properties(nll, data):
    n = len(nll)
    trainable = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    labels = [i if keep else IGNORE_INDEX for i, keep in enumerate(trainable)]
    t1 = data.draw(st.floats(min_value=1.0001, max_value=1e6))
    t2 = data.draw(st.floats(min_value=t1, max_value=1e6))
    m1 = compute_mask(nll, labels, cfg(threshold=t1))
    m2 = compute_mask(nll, labels, cfg(threshold=t2))
    assert not (m1 & ~np.asarray(trainable)).any()  # subset of trainable tokens
    assert not (m2 & ~m1).any()  # a higher threshold masks a subset
    assert m2.sum() <= m1.sum()
    # Agrees with exp(nll) > t away from the last-ulp rounding of exp/log
    reference = np.asarray(trainable) & (np.exp(np.asarray(nll)) > t1)
    clear = np.abs(np.asarray(nll) - math.log(t1)) > 1e-9
    assert (m1[clear] == reference[clear]).all()


# ---------------------------------------------------------------------------------------------------------------
# fraction


def test_fraction_masks_rounded_count_with_dataset_threshold():
    rng = np.random.default_rng(0)
    rows = [(rng.permutation(20) * 0.1 + 0.05, 3), (rng.permutation(7) * 0.13 + 0.01, 0), (rng.uniform(0, 3, 12), 5)]
    ds = scored_dataset([(nll.tolist(), p) for nll, p in rows])
    n = sum(len(nll) - p for nll, p in rows)
    for fraction in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0):
        masked, stats = mask_dataset(ds, cfg("fraction", fraction=fraction))
        assert stats["masked_tokens"] == round(fraction * n), fraction
        assert stats["completion_tokens"] == n
        # One dataset-level threshold: every masked token is above it, every kept trainable token is not
        t = stats["threshold"]
        for ex in masked:
            for nll, lab, trainable in zip(ex["token_nll"], ex["labels"], ex[TRAINABLE_COLUMN]):
                if trainable:
                    assert (lab == IGNORE_INDEX) == (nll > math.log(t) if t > 0 else True)


def test_fraction_threshold_is_first_kept_perplexity():
    nll = [3.0, 1.0, 2.0, 0.5]
    t = resolve_fraction_threshold([nll[:2], nll[2:]], [[1, 1], [1, 1]], 0.5)
    assert t == pytest.approx(math.exp(1.0))
    assert resolve_fraction_threshold([nll], [[1] * 4], 1.0) == 0.0
    # Untrainable tokens are not in the pool
    t = resolve_fraction_threshold([[9.0, 9.0, 1.0, 2.0]], [[IGNORE_INDEX, IGNORE_INDEX, 1, 1]], 0.5)
    assert t == pytest.approx(math.exp(1.0))
    with pytest.raises(ValueError, match="No trainable token"):
        resolve_fraction_threshold([[1.0]], [[IGNORE_INDEX]], 0.5)


def test_fraction_exp_log_round_trip():
    # log(exp(x)) < x for this x: the resolved threshold must still keep the token it is the perplexity of
    x = 0.013692500850740474
    assert math.log(math.exp(x)) < x
    nll, labels = [x + 1.0, x, x - 0.001], [1, 2, 3]
    t = resolve_fraction_threshold([nll], [labels], 1 / 3)
    mask = compute_mask(nll, labels, cfg("fraction", fraction=1 / 3), threshold=t)
    assert mask.tolist() == [True, False, False]
    for fraction in (0.0, 2 / 3):
        t = resolve_fraction_threshold([nll], [labels], fraction)
        assert compute_mask(nll, labels, cfg("fraction", fraction=fraction), threshold=t).sum() == round(3 * fraction)


def test_fraction_one_masks_everything():
    nll, labels = [0.0, 0.5, 3.0], [IGNORE_INDEX, 1, 2]
    t = resolve_fraction_threshold([nll], [labels], 1.0)
    assert compute_mask(nll, labels, cfg("fraction", fraction=1.0), threshold=t).tolist() == [False, True, True]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=60, unique=True),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    split=st.integers(min_value=0, max_value=60),
)
def test_fraction_property(values, fraction, split):
    """Distinct perplexities: exactly round(fraction * n) tokens masked, the highest ones."""
    nll = [v / 1000 for v in values]  # NLLs in [0, 5] with distinct values, many near the usual thresholds
    parts = [nll[:split], nll[split:]]
    labels = [[1] * len(p) for p in parts]
    t = resolve_fraction_threshold(parts, labels, fraction)
    config = cfg("fraction", fraction=fraction)
    masks = [compute_mask(p, lab, config, threshold=t) for p, lab in zip(parts, labels)]
    masked = sorted(v for p, m in zip(parts, masks) for v, flag in zip(p, m) if flag)
    assert len(masked) == round(fraction * len(nll))
    assert masked == sorted(nll)[len(nll) - len(masked) :]


def test_fraction_needs_resolved_threshold():
    with pytest.raises(ValueError, match="dataset-level threshold"):
        compute_mask([1.0], [1], cfg("fraction", fraction=0.5))


# ---------------------------------------------------------------------------------------------------------------
# random


def test_random_same_count_as_threshold_per_example():
    rng = np.random.default_rng(1)
    for row_id in range(20):
        n = int(rng.integers(5, 60))
        nll = rng.exponential(1.0, n)
        labels = labels_for(n, prompt=int(rng.integers(0, 5)))
        expected = compute_mask(nll, labels, cfg(threshold=2.5)).sum()
        mask = compute_mask(nll, labels, cfg("random", threshold=2.5, seed=3), row_id=row_id)
        assert mask.sum() == expected
        assert not (mask & (np.asarray(labels) == IGNORE_INDEX)).any()


def test_random_deterministic_per_seed_and_row():
    nll, labels = [5.0] * 10 + [0.0] * 30, labels_for(40)
    config = cfg("random", seed=7)

    def draw(row_id, seed=7):
        return compute_mask(nll, labels, cfg("random", seed=seed), row_id=row_id).tolist()

    assert sum(draw(0)) == 10
    assert draw(0) == draw(0)
    assert draw(0) != draw(0, seed=8)
    assert draw(0) != draw(1)
    # Only (seed, row_id) matter: the same row gives the same draw whatever else is in the dataset
    ds_a = scored_dataset([(nll, 0), ([0.0] * 5, 0), (nll, 0)])
    ds_b = ds_a.select([2, 0, 1])
    ma, _ = mask_dataset(ds_a, config)
    mb, _ = mask_dataset(ds_b, config)
    assert ma[2]["labels"] == mb[0]["labels"]
    assert ma[0]["labels"] != ma[2]["labels"]  # different rows, different draws


def test_random_uniform_without_replacement():
    n, k = 10, 3
    nll = [5.0] * k + [0.0] * (n - k)
    labels = labels_for(n)
    counts = np.zeros(n)
    trials = 4000
    for row_id in range(trials):
        mask = compute_mask(nll, labels, cfg("random", seed=0), row_id=row_id)
        assert mask.sum() == k  # without replacement: always k distinct positions
        counts += mask
    # Each position is picked with probability k/n = 0.3 (binomial sd ~ 0.007 over 4000 draws)
    assert np.abs(counts / trials - k / n).max() < 0.035
    # Not tied to the high-perplexity positions
    assert counts[k:].sum() > counts[:k].sum()


# ---------------------------------------------------------------------------------------------------------------
# lowest, dpf, stm_dpf, none


def test_lowest():
    t = 2.5
    at = math.log(t)
    nll = [0.0, math.nextafter(at, -math.inf), at, 5.0, 0.1]
    labels = [1, 2, 3, 4, IGNORE_INDEX]
    assert compute_mask(nll, labels, cfg("lowest", threshold=t)).tolist() == [True, True, False, False, False]


def test_lowest_count_masks_threshold_count_lowest_first():
    nll = [0.0, 3.0, 0.2, 0.05, 2.0, 0.2, 0.7, 9.0]
    labels = [IGNORE_INDEX, 1, 2, 3, 4, 5, 6, IGNORE_INDEX]
    # threshold 2.5 (log 0.916) masks 3.0 and 2.0: two tokens, so lowest_count masks the two lowest trainable ones.
    # The untrainable 0.0 and 9.0 are never candidates
    assert compute_mask(nll, labels, cfg(threshold=2.5)).sum() == 2
    # 0.05, then of the two 0.2 (a tie at the boundary) the earlier position: deterministic
    mask = compute_mask(nll, labels, cfg("lowest_count", threshold=2.5))
    assert mask.tolist() == [False, False, True, True, False, False, False, False]
    assert compute_mask(nll, labels, cfg("lowest_count", threshold=2.5)).tolist() == mask.tolist()
    # Nothing above the threshold: nothing masked
    assert not compute_mask([0.1, 0.2, 0.3], [1, 2, 3], cfg("lowest_count", threshold=2.5)).any()
    # The resolved threshold override (as for "fraction") sets the count too
    assert compute_mask(nll, labels, cfg("lowest_count"), threshold=1.5).sum() == 3  # log 1.5 = 0.405


@settings(max_examples=200, deadline=None)
@given(nll=nll_lists, data=st.data())
def test_lowest_count_property(nll, data):
    """Same count as "threshold" in every example, and no kept trainable token has a lower NLL than a masked one."""
    n = len(nll)
    trainable = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    labels = [i if keep else IGNORE_INDEX for i, keep in enumerate(trainable)]
    t = data.draw(st.floats(min_value=1.0001, max_value=1e4))
    reference = compute_mask(nll, labels, cfg(threshold=t))
    mask = compute_mask(nll, labels, cfg("lowest_count", threshold=t))
    values = np.asarray(nll)
    assert mask.sum() == reference.sum()
    assert not (mask & ~trainable).any()
    kept = trainable & ~mask
    if mask.any() and kept.any():
        assert values[mask].max() <= values[kept].min()
        # Among equal values at the boundary, the earlier positions are the masked ones
        boundary = values[mask].max()
        tied = np.flatnonzero(trainable & (values == boundary))
        assert mask[tied].tolist() == sorted(mask[tied].tolist(), reverse=True)


def test_stm_entropy_rule():
    rng = np.random.default_rng(0)
    n = 400
    nll = rng.exponential(1.0, n)
    entropy = rng.uniform(0.0, 3.0, n)
    labels = labels_for(n, prompt=37)
    for t, h in [(2.5, 1.0), (1.5, 0.3), (10.0, 2.5)]:
        mask = compute_mask(nll, labels, cfg("stm_entropy", threshold=t, entropy_threshold=h), token_entropy=entropy)
        rule = (np.asarray(labels) != IGNORE_INDEX) & (np.exp(nll) > t) & (entropy < h)
        assert mask.tolist() == rule.tolist()
        assert 0 < mask.sum() < compute_mask(nll, labels, cfg(threshold=t)).sum()  # a strict subset of STM here
    # Hand-made: high perplexity AND low entropy; entropy exactly at the bound is kept; untrainable never masked
    nll = [5.0, 5.0, 5.0, 0.1, 5.0]
    entropy = [0.0, 0.5, 1.0, 0.0, 2.0]
    labels = [IGNORE_INDEX, 1, 2, 3, 4]
    mask = compute_mask(nll, labels, cfg("stm_entropy"), token_entropy=entropy)
    assert mask.tolist() == [False, True, False, False, False]


def test_stm_entropy_needs_entropy():
    with pytest.raises(ValueError, match=r"needs the per-token entropies .* 'token_entropy'.*trl-pplmask score"):
        compute_mask([5.0, 5.0], [1, 2], cfg("stm_entropy"))
    with pytest.raises(ValueError, match=r"`token_entropy` has 1 values but `token_nll` has 2"):
        compute_mask([5.0, 5.0], [1, 2], cfg("stm_entropy"), token_entropy=[0.1])
    # mask_dataset: a clear error naming the column and how to get it
    ds = scored_dataset([([0.0, 5.0, 0.1], 1)])
    with pytest.raises(
        ValueError, match=r"missing column 'token_entropy'.*rescore the dataset with `trl-pplmask score`"
    ):
        mask_dataset(ds, cfg("stm_entropy"))
    with pytest.raises(ValueError, match=r"missing column 'ent'"):
        mask_dataset(ds.add_column("token_entropy", [[0.0] * 3]), cfg("stm_entropy", entropy_column="ent"))
    # Other strategies do not need it
    mask_dataset(ds, cfg())
    assert cfg("stm_entropy").needs_entropy and not cfg().needs_entropy


def test_mask_dataset_stm_entropy():
    rows = [([0.0, 5.0, 5.0, 0.1, 3.0], 1), ([0.0, 4.0, 4.0], 0)]
    entropy = [[0.0, 0.2, 1.5, 0.1, 0.9], [0.0, 0.99, 1.0]]
    ds = scored_dataset(rows).add_column("token_entropy", entropy)
    masked, stats = mask_dataset(ds, cfg("stm_entropy", threshold=2.5, entropy_threshold=1.0))
    assert masked[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103, IGNORE_INDEX]
    assert masked[1]["labels"] == [100, IGNORE_INDEX, 102]
    assert stats["masked_tokens"] == 3 and stats["strategy"] == "stm_entropy"
    # Re-masking a masked dataset with another entropy bound restores and re-masks from the trainable tokens
    loose, stats = mask_dataset(masked, cfg("stm_entropy", threshold=2.5, entropy_threshold=2.0))
    assert loose[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 103, IGNORE_INDEX]
    assert stats["masked_tokens"] == 5
    # A renamed column, and a bad one (length, non-finite) is an error naming it
    renamed = ds.rename_column("token_entropy", "ent")
    again, _ = mask_dataset(renamed, cfg("stm_entropy", entropy_column="ent"))
    assert again["labels"] == masked["labels"]
    for bad in ([0.0, 0.1], [0.0, float("nan"), 0.1, 0.1, 0.1]):
        broken = scored_dataset(rows[:1]).add_column("token_entropy", [bad])
        with pytest.raises(ValueError, match=r"Row 0: `token_entropy`"):
            mask_dataset(broken, cfg("stm_entropy"))


def test_dpf_and_stm_dpf():
    nll = [0.0, 0.9, 0.8, 3.0, 0.5, 0.2]
    dpf = [9.0, 0.9, 1.5, 3.0, 0.2, 4.0]
    labels = [IGNORE_INDEX, 1, 2, 3, 4, 5]
    # dpf: perplexity rose by a factor > ratio, i.e. dpf - nll > log(ratio)
    assert compute_mask(nll, labels, cfg("dpf"), dpf_nll=dpf).tolist() == [False, False, True, False, False, True]
    ratio = math.exp(1.0)
    mask = compute_mask(nll, labels, cfg("dpf", dpf_ratio=ratio), dpf_nll=dpf)
    assert mask.tolist() == [False, False, False, False, False, True]
    # stm_dpf: union with threshold (only 3.0 > log 2.5 = 0.916)
    mask = compute_mask(nll, labels, cfg("stm_dpf", threshold=2.5), dpf_nll=dpf)
    assert mask.tolist() == [False, False, True, True, False, True]
    mask = compute_mask(nll, labels, cfg("stm_dpf", threshold=2.0), dpf_nll=dpf)  # log 2 = 0.693 < 0.8, 0.9
    assert mask.tolist() == [False, True, True, True, False, True]
    with pytest.raises(ValueError, match="token_nll_dpf"):
        compute_mask(nll, labels, cfg("dpf"))


def test_none():
    mask = compute_mask([50.0, 50.0], [1, 2], cfg("none"))
    assert mask.dtype == bool and not mask.any()


# ---------------------------------------------------------------------------------------------------------------
# mask_dataset


def test_mask_dataset_stats():
    at = math.log(2.5)
    rows = [
        ([9.0, 9.0, 0.1, 5.0, 0.2], 2),  # 3 trainable, 1 masked
        ([0.0, 0.1, 0.1], 1),  # 2 trainable, 0 masked
        ([0.0, 7.0, 8.0], 1),  # 2 trainable, 2 masked -> left empty
        ([0.0, at, 1.0], 1),  # boundary kept, 1.0 masked
    ]
    masked, stats = mask_dataset(scored_dataset(rows), cfg())
    assert masked["num_completion_tokens"] == [3, 2, 2, 2]
    assert masked["num_masked"] == [1, 0, 2, 1]
    assert masked["masked_fraction"] == pytest.approx([1 / 3, 0.0, 1.0, 0.5])
    assert masked[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, IGNORE_INDEX, 104]
    assert masked[3]["labels"] == [IGNORE_INDEX, 101, IGNORE_INDEX]
    assert masked[0][TRAINABLE_COLUMN] == [0, 0, 1, 1, 1]
    assert masked["input_ids"] == scored_dataset(rows)["input_ids"]
    assert stats["examples"] == 4
    assert stats["completion_tokens"] == 9
    assert stats["masked_tokens"] == 4
    assert stats["masked_fraction"] == pytest.approx(4 / 9)
    assert stats["examples_without_trainable_token"] == 1
    assert stats["strategy"] == "threshold" and stats["threshold"] == 2.5
    assert "examples_dropped" not in stats


def test_overall_stats_empty():
    stats = overall_stats([], [])
    assert stats["examples"] == 0 and stats["masked_fraction"] == 0.0


def test_remask_restores_tokens():
    rows = [([0.0, 0.5, 1.2, 2.0, 3.0], 1)]
    ds = scored_dataset(rows)
    strict, s1 = mask_dataset(ds, cfg(threshold=1.5))  # log 1.5 = 0.405: masks 0.5, 1.2, 2.0, 3.0
    assert s1["masked_tokens"] == 4
    assert strict[0]["labels"] == [IGNORE_INDEX] * 5
    loose, s2 = mask_dataset(strict, cfg(threshold=10.0))  # log 10 = 2.30: masks 3.0 only
    assert s2["masked_tokens"] == 1 and s2["completion_tokens"] == 4
    assert loose[0]["labels"] == [IGNORE_INDEX, 101, 102, 103, IGNORE_INDEX]
    assert loose[0][TRAINABLE_COLUMN] == [0, 1, 1, 1, 1]
    # Back at the first threshold: same labels as masking the original
    again, _ = mask_dataset(loose, cfg(threshold=1.5))
    assert again[0]["labels"] == strict[0]["labels"]
    none, _ = mask_dataset(strict, cfg("none"))
    assert none[0]["labels"] == ds[0]["labels"]


def test_drop_empty():
    rows = [([0.0, 9.0, 9.0], 1), ([0.0, 0.1, 9.0], 1), ([0.0, 0.1], 2)]
    masked, stats = mask_dataset(scored_dataset(rows), cfg(), drop_empty=True)
    assert masked["row_id"] == [1]
    assert stats["examples"] == 3  # counted either way
    assert stats["examples_without_trainable_token"] == 2
    assert stats["examples_dropped"] == 2
    kept, stats = mask_dataset(scored_dataset(rows), cfg())
    assert len(kept) == 3


def test_mask_dataset_dpf_columns():
    ds = scored_dataset([([0.0, 0.5, 0.5, 3.0], 1)])
    ds = ds.add_column("token_nll_dpf", [[0.0, 2.0, 0.5, 3.0]])
    masked, stats = mask_dataset(ds, cfg("dpf"))
    assert masked[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103]
    masked, stats = mask_dataset(ds, cfg("stm_dpf"))
    assert masked[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, IGNORE_INDEX]
    assert stats["masked_tokens"] == 2
    renamed = ds.rename_columns({"token_nll": "ref", "token_nll_dpf": "ft"})
    masked, _ = mask_dataset(renamed, cfg("stm_dpf", nll_column="ref", dpf_nll_column="ft"))
    assert masked[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("strategy", ["threshold", "random", "stm_dpf", "lowest", "lowest_count", "stm_entropy"])
@pytest.mark.parametrize("t", [1.0, 0.5, 0.0, -2.0, float("nan")])
def test_threshold_must_exceed_one(strategy, t):
    with pytest.raises(ValueError, match="above 1"):
        cfg(strategy, threshold=t)


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown mask strategy 'nope'"):
        cfg("nope")
    for fraction in (None, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            cfg("fraction", fraction=fraction)
    with pytest.raises(ValueError, match="dpf_ratio"):
        cfg("dpf", dpf_ratio=0.0)
    assert cfg("dpf").needs_dpf and cfg("stm_dpf").needs_dpf and not cfg().needs_dpf
    for entropy_threshold in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="entropy_threshold must be a positive, finite"):
            cfg("stm_entropy", entropy_threshold=entropy_threshold)


@pytest.mark.parametrize("nll,relation", [([0.0, 1.0], "shorter"), ([0.0, 1.0, 2.0, 3.0], "longer")])
def test_nll_length_mismatch(nll, relation):
    ds = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "token_nll": nll, "row_id": 42}])
    with pytest.raises(ValueError, match=rf"Row 42: `token_nll` has {len(nll)} values .* 3 tokens \({relation}\)"):
        mask_dataset(ds, cfg())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_nll(bad):
    ds = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "token_nll": [0.0, bad, 1.0]}])
    with pytest.raises(ValueError, match=r"Row 0: `token_nll` holds a non-finite value .* at token 1"):
        mask_dataset(ds, cfg())


def test_missing_columns():
    ds = Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['token_nll'\]"):
        mask_dataset(ds, cfg())
    ds = ds.add_column("token_nll", [[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['token_nll_dpf'\]"):
        mask_dataset(ds, cfg("dpf"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['token_nll_dpf'\]"):
        mask_dataset(ds, cfg("stm_dpf"))


@pytest.mark.parametrize("dpf", [[0.0], [0.0, 1.0, 2.0], [0.0, float("nan")]])
def test_bad_dpf_nll(dpf):
    # A DPF column that does not match the tokens is an error, not a silent broadcast or a silent skip
    ds = Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2], "token_nll": [0.0, 1.0], "token_nll_dpf": dpf}])
    with pytest.raises(ValueError, match="`token_nll_dpf`"):
        mask_dataset(ds, cfg("dpf"))


# --------------------------------------------------------------------------------------------------------------------
# One definition of the mask settings: every settings class that carries them takes default and help from PplMaskConfig
# --------------------------------------------------------------------------------------------------------------------
def _mask_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    own = {f.name: f for f in dataclasses.fields(cls)}
    return {f.name: own[prefix + f.name] for f in dataclasses.fields(PplMaskConfig) if prefix + f.name in own}


def _derived_settings_classes():
    from trl_pplmask.commands.mask import MaskConfig
    from trl_pplmask.hub import BuildConfig
    from trl_pplmask.sft import PplMaskArguments
    from trl_pplmask.study.config import MaskSettings

    # A study leaves entropy_threshold unset unless its YAML sets it: each arm then gets the trainer's default
    return [
        (MaskConfig, "", {}),
        (BuildConfig, "", {}),  # the `build` command's options
        (PplMaskArguments, "pplmask_", {}),
        (MaskSettings, "", {"entropy_threshold": None}),
    ]


@pytest.mark.parametrize(
    "cls, prefix, different", _derived_settings_classes(), ids=lambda v: getattr(v, "__name__", "")
)
def test_mask_settings_are_defined_once(cls, prefix, different):
    """Each mask setting of the `mask` command, of `trl-pplmask sft` and of a study has PplMaskConfig's default (or a
    listed, deliberate other one) and its help, and converts back to the same PplMaskConfig."""
    source = {f.name: f for f in dataclasses.fields(PplMaskConfig)}
    fields = _mask_fields(cls, prefix)
    assert "threshold" in fields
    for name, f in fields.items():
        assert f.default == different.get(name, source[name].default), name
        assert f.metadata["help"] == source[name].metadata["help"], name


def test_from_settings_reads_prefixed_names_and_mask_field_changes():
    class Settings:
        pplmask_threshold = 7.0
        pplmask_strategy = "lowest"
        unrelated = 1

    config = PplMaskConfig.from_settings(Settings(), "pplmask_")
    assert (config.strategy, config.threshold, config.seed) == ("lowest", 7.0, 0)
    changed = mask_field("threshold", default=3.0, metavar="PPL")
    assert changed.default == 3.0 and changed.metadata["metavar"] == "PPL"
    assert changed.metadata["help"] == mask_field("threshold").metadata["help"]


def test_collator_keywords_default_to_pplmask_config_and_never_silently_lose_one():
    """The collator's convenience keywords take PplMaskConfig's defaults, and giving them beside a `config` is refused
    (it used to ignore them without a word)."""
    from trl_pplmask import PplMaskCollator
    from trl_pplmask.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert PplMaskCollator(tokenizer).config == PplMaskConfig()
    assert PplMaskCollator(tokenizer, threshold=4.0, seed=3).config == PplMaskConfig(threshold=4.0, seed=3)
    with pytest.raises(ValueError, match="both `config` and seed, threshold"):
        PplMaskCollator(tokenizer, config=PplMaskConfig(), threshold=4.0, seed=1)


def test_relabel_restores_earlier_masks_then_applies_the_new_one():
    """A token an earlier pass masked (-100 but trainable) gets its label back from input_ids unless the new mask
    drops it; prompt tokens stay -100; the fraction helper reports 0 for no tokens."""
    trainable = np.array([False, True, True, True])
    got = relabel([-100, 5, -100, 7], [1, 5, 6, 7], trainable, np.array([False, False, False, True]))
    assert got == [-100, 5, 6, -100]
    assert masked_fraction(0, 0) == 0.0 and masked_fraction(1, 4) == 0.25
