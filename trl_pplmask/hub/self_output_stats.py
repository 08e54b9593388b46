"""Statistics of a `<task>-self-output` config, as its card shows them (computed from the stored columns, so the card
always agrees with the files), and the card's figure: chosen responses against the ground truth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import DEFAULT_THRESHOLD
from ..generation.config import SOURCE_GROUND_TRUTH, SOURCE_SELF


if TYPE_CHECKING:
    from datasets import Dataset


def _token_stats(nlls: Sequence[Sequence[float]], threshold: float) -> dict[str, Any]:
    flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in nlls]) if len(nlls) else np.zeros(0)
    ppl = np.exp(flat)
    return {
        "sequences": len(nlls),
        "tokens": int(flat.size),
        "high_ppl_tokens": int(np.sum(ppl > threshold)),
        "high_ppl_share": float(np.mean(ppl > threshold)) if flat.size else float("nan"),
        "median_token_ppl": float(np.median(ppl)) if flat.size else float("nan"),
        "mean_token_nll": float(np.mean(flat)) if flat.size else float("nan"),
    }


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def self_output_statistics(
    dataset: Dataset, threshold: float = DEFAULT_THRESHOLD, skipped: dict[str, int] | None = None
) -> dict[str, Any]:
    """Statistics of a self-output dataset, as its card shows them.

    Computed from the stored columns, so the card always agrees with the files; `skipped` adds the rows a `skip`
    fallback left out (their candidates count towards the sample accuracy).

    Args:
        dataset (`Dataset`): Output of [`~trl_pplmask.generation.generate_self_outputs`].
        threshold (`float`, *optional*, defaults to `2.5`): Token perplexity counted as high (the paper's STM value).
        skipped (`dict`, *optional*): Counts `rows`, `candidates`, `correct`, `truncated`, `rows_with_correct` of
            skipped rows.
    """
    skipped = {"rows": 0, "candidates": 0, "correct": 0, "truncated": 0, "rows_with_correct": 0, **(skipped or {})}
    candidates = dataset["candidates"]
    sources = dataset["source"]
    num_correct = dataset["num_correct"]
    samples = sum(len(c) for c in candidates) + skipped["candidates"]
    correct = sum(num_correct) + skipped["correct"]
    self_rows = [i for i, s in enumerate(sources) if s == SOURCE_SELF]
    chosen_nll, gt_nll = dataset["chosen_token_nll"], dataset["ground_truth_token_nll"]
    chosen_ppl, gt_ppl = dataset["chosen_ppl"], dataset["ground_truth_ppl"]
    return {
        "rows_generated": len(dataset) + skipped["rows"],
        "rows": len(dataset),
        "samples": samples,
        "correct_samples": correct,
        "sample_accuracy": correct / samples if samples else float("nan"),
        "truncated_samples": sum(c["truncated"] for row in candidates for c in row) + skipped["truncated"],
        "rows_with_correct": sum(n > 0 for n in num_correct) + skipped["rows_with_correct"],
        "rows_self": len(self_rows),
        "rows_ground_truth": sum(s == SOURCE_GROUND_TRUTH for s in sources),
        "rows_skipped": skipped["rows"],
        "threshold": threshold,
        "chosen": {**_token_stats(chosen_nll, threshold), "median_seq_ppl": _median(chosen_ppl)},
        "self_only": {
            **_token_stats([chosen_nll[i] for i in self_rows], threshold),
            "median_seq_ppl": _median([chosen_ppl[i] for i in self_rows]),
        },
        "ground_truth_same_rows": {
            **_token_stats([gt_nll[i] for i in self_rows], threshold),
            "median_seq_ppl": _median([gt_ppl[i] for i in self_rows]),
        },
        "ground_truth": {**_token_stats(gt_nll, threshold), "median_seq_ppl": _median(gt_ppl)},
        # Every sample, correct or not (sequence perplexities only: per-token NLLs are kept for the chosen response)
        "all_samples": {
            "sequences": sum(len(c) for c in candidates),
            "median_seq_ppl": _median([c["ppl"] for row in candidates for c in row if math.isfinite(c["ppl"])]),
        },
    }


def plot_ppl_comparison(dataset: Dataset, threshold: float, path: Path, title: str) -> None:
    """Figure of the card: token-perplexity distributions of the chosen responses and of the ground truth (left), and
    each row's chosen-response perplexity against its ground truth's (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def token_ppl(nlls):
        flat = [np.asarray(x, dtype=np.float64) for x in nlls]
        return np.exp(np.concatenate(flat)) if flat else np.zeros(0)

    chosen, truth = token_ppl(dataset["chosen_token_nll"]), token_ppl(dataset["ground_truth_token_nll"])
    fig = Figure(figsize=(10, 3.8), dpi=110)
    FigureCanvasAgg(fig)  # Figure + Agg directly: no pyplot global state, no display needed
    ax_tok, ax_row = fig.subplots(1, 2)
    both = np.concatenate([chosen, truth])
    # A few tokens reach perplexities of 1e6 and more: the last bin collects everything above the 99th percentile
    top = max(threshold * 4, float(np.percentile(both, 99)) if both.size else 1.0)
    bins = np.geomspace(1.0, top, 40)
    for values, label, color in ((truth, "ground truth", "#C44E52"), (chosen, "chosen responses", "#4C72B0")):
        if values.size:
            share = 100 * float(np.mean(values > threshold))
            ax_tok.hist(
                np.clip(values, 1.0, top), bins=bins, weights=np.full(values.size, 1 / values.size),
                histtype="stepfilled", alpha=0.45, color=color, label=f"{label}: {share:.1f}% > {threshold:g}",
            )  # fmt: skip
    ax_tok.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax_tok.set_xscale("log")
    ax_tok.set_xlim(1.0, top)
    ax_tok.set_xlabel(f"token perplexity exp(NLL), log scale (last bin: >= {top:.3g})")
    ax_tok.set_ylabel("share of completion tokens")
    ax_tok.set_title("Completion tokens", fontsize=10)
    ax_tok.legend(loc="upper right", fontsize=8)

    truth_seq = np.asarray(dataset["ground_truth_ppl"], dtype=np.float64)
    chosen_seq = np.asarray(dataset["chosen_ppl"], dtype=np.float64)
    is_self = np.asarray(dataset["source"]) == SOURCE_SELF
    ax_row.scatter(truth_seq[is_self], chosen_seq[is_self], s=14, color="#4C72B0", label="self-generated")
    ax_row.scatter(
        truth_seq[~is_self], chosen_seq[~is_self], s=14, color="#C44E52", marker="x", label="ground truth kept"
    )
    finite = np.concatenate([truth_seq, chosen_seq])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        ax_row.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1)
    ax_row.set_xlabel("ground-truth sequence perplexity")
    ax_row.set_ylabel("chosen response's sequence perplexity")
    ax_row.set_title("Rows (below the diagonal: the chosen response is less surprising)", fontsize=10)
    ax_row.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
