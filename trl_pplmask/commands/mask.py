"""`trl-pplmask mask`: set the labels of high-perplexity tokens of a scored dataset to -100."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from ..constants import DEFAULT_THRESHOLD
from ..masking import TRAINABLE_COLUMN, PplMaskConfig, mask_field
from ._args import output_dir_field
from ._command import Command
from ._io import check_aligned, check_output_folder, load_input, no_cache_beside_input, output_lock, save_atomically


HELP = "Mask the labels of a scored dataset and add mask statistics."
DESCRIPTION = (
    "Set the labels of high-perplexity tokens to -100 (Selective Token Masking) in a dataset scored by `trl-pplmask "
    "score`, add per-example statistics and print the overall ones. The input is never modified; the output folder "
    "is written atomically."
)


@dataclass(kw_only=True)
class MaskConfig:
    """Settings of `trl-pplmask mask`, one command-line option each (`drop_empty` is `--drop-empty`).

    Parameters:
        input (`str`): Scored dataset (folder from `trl-pplmask score`, or a built folder or Hub id).
        dataset_config (`str` or `None`), split (`str`): Which config and split of `input`.
        output (`str`): New or empty folder for `Dataset.save_to_disk`; `overwrite` replaces a non-empty one.
        strategy, threshold, fraction, seed, dpf_nll_column, entropy_threshold: As in
            [`~trl_pplmask.masking.PplMaskConfig`].
        drop_empty (`bool`): Drop examples left with no trainable token.
    """

    input: str = field(metadata={"help": "Scored dataset (folder from `trl-pplmask score`)."})
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "Config (scoring model) of a Hub-layout folder or Hub id with several, from `build`."},
    )
    split: str = field(default="train", metadata={"help": "Split to use when --input holds several (default train)."})
    output: str = output_dir_field("New or empty folder for Dataset.save_to_disk.")
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output-dir (only once the new data is complete)."}
    )
    strategy: str = mask_field("strategy")
    threshold: float = mask_field("threshold")
    fraction: float | None = mask_field("fraction")
    seed: int = mask_field("seed")
    dpf_nll_column: str = mask_field("dpf_nll_column")
    entropy_threshold: float = mask_field("entropy_threshold")
    drop_empty: bool = field(default=False, metadata={"help": "Drop examples left with no trainable token."})

    def mask_config(self) -> PplMaskConfig:
        return PplMaskConfig.from_settings(self)


def _check_nll_values(dataset, column: str) -> None:
    """NLLs are >= 0 (perplexity >= 1): a negative value means the column holds something else."""
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    flat = pc.list_flatten(values)
    if len(flat) == 0 or pc.min(flat).as_py() is None or pc.min(flat).as_py() >= -1e-4:
        return
    for row, nll in enumerate(dataset[column]):
        nll = np.asarray(nll, dtype=np.float64)
        if nll.size and nll.min() < -1e-4:
            token = int(np.argmin(nll))
            raise ValueError(
                f"Row {row}: `{column}` holds a negative NLL ({nll[token]:g}) at token {token}, i.e. a perplexity "
                "below 1. NLLs are never negative: this column does not hold `trl-pplmask score` output; rescore."
            )


def run(config: MaskConfig) -> int:
    """Mask `config.input` and save it to `config.output`; print the overall statistics."""
    from ..masking import mask_dataset

    if not math.isfinite(config.threshold):
        raise ValueError(
            f"--threshold must be a finite perplexity, got {config.threshold}. Use e.g. {DEFAULT_THRESHOLD} (the "
            "paper's value); to mask nothing, do not run `mask`."
        )
    if config.fraction is not None and config.strategy != "fraction":
        raise ValueError(
            f"--fraction applies only to --strategy fraction, not {config.strategy!r}; drop --fraction or pass "
            "--strategy fraction."
        )
    mask_config = config.mask_config()
    output = check_output_folder(config.output, config.overwrite, config.input)
    with no_cache_beside_input(), output_lock(output):
        dataset = load_input(config.input, config.split, config.dataset_config)
        dpf_column = mask_config.dpf_nll_column if mask_config.needs_dpf else None
        nll_columns = [c for c in (mask_config.nll_column, dpf_column) if c]
        check_aligned(dataset, [c for c in ("labels", TRAINABLE_COLUMN, *nll_columns) if c in dataset.column_names])
        for column in nll_columns:
            if column in dataset.column_names:
                _check_nll_values(dataset, column)
        masked, stats = mask_dataset(dataset, mask_config, drop_empty=config.drop_empty)
        save_atomically(masked, output)
    print(json.dumps(stats, indent=2))
    print(f"Masked dataset -> {config.output}")
    return 0


COMMAND = Command(name="mask", help=HELP, description=DESCRIPTION, config_class=MaskConfig, run=run)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
