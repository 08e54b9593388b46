"""Private names of other packages that trl-pplmask borrows, in one place, with the versions they were checked against.

A TRL release that moves or changes one of these breaks only this file; the rest of the package imports from here.
"""

from __future__ import annotations

# trl 1.16: how `SFTTrainer.__init__` (and so `trl sft`) loads a model from a path, with `SFTConfig.model_init_kwargs`
# (dtype strings, CPU-aware `device_map`). Not exported from `trl`'s top level.
from trl.trainer.utils import create_model_from_path  # noqa: E402


def prepare_sft_dataset(host, dataset, tokenizer, args, dataset_name: str = "train"):
    """TRL's own SFT dataset preparation (trl 1.16 `SFTTrainer._prepare_dataset`), without building a trainer.

    `host` stands in for the trainer: the method reads only `_tokenizer`, `chat_template` and `completion_only_loss`
    from it (see `trl_pplmask.data._PreparationHost`). Packing is always off: masks are per example.
    """
    from trl import SFTTrainer

    return SFTTrainer._prepare_dataset(
        host, dataset, tokenizer, args, packing=False, formatting_func=None, dataset_name=dataset_name
    )


__all__ = ["create_model_from_path", "prepare_sft_dataset"]
