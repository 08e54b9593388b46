"""Names of other packages that trl-pplmask borrows without them being public API, in one place, with the versions they
were checked against.

A release that moves or changes one of these breaks only this file; the rest of the package imports them from here.
Each is imported on first use (PEP 562), so that importing this module costs nothing (the `--help` path stays light).
`pyproject.toml` bounds `trl` to the range checked here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any


# name -> (module, attribute, checked against, why it is borrowed)
_BORROWED: dict[str, tuple[str, str, str, str]] = {
    "create_model_from_path": (
        "trl.trainer.utils",
        "create_model_from_path",
        "trl 1.16",
        "how SFTTrainer (and so `trl sft`) loads a model from a path with `model_init_kwargs`; not exported by trl",
    ),
    "DataCollatorForLanguageModeling": (
        "trl.trainer.sft_trainer",
        "DataCollatorForLanguageModeling",
        "trl 1.16",
        "SFTTrainer's own padding collator, which PplMaskCollator delegates to; not exported at trl's top level",
    ),
    "ChunkedLogProbFunction": (
        "trl.kernels",
        "ChunkedLogProbFunction",
        "trl 1.16",
        "TRL's fused LM-head log-prob + entropy kernel (Triton on CUDA), used by scoring",
    ),
    "use_triton": (
        "trl.kernels.chunked_logprob",
        "_use_triton",
        "trl 1.16",
        "TRL's own switch for when its Triton kernel runs (device and availability checks)",
    ),
    "SFTTrainer": ("trl", "SFTTrainer", "trl 1.16", "its private `_prepare_dataset`, see `prepare_sft_dataset`"),
    "hub_default_ignore_patterns": (
        "huggingface_hub.utils._paths",
        "DEFAULT_IGNORE_PATTERNS",
        "huggingface_hub 1.x",
        "the files `upload_folder` leaves out, so that `push --dry-run` lists exactly what would be uploaded",
    ),
    "convert_file_size_to_int": (
        "datasets.utils.py_utils",
        "convert_file_size_to_int",
        "datasets 5.2",
        'parses `max_shard_size` ("500MB") as `Dataset.push_to_hub` does',
    ),
}


def __getattr__(name: str) -> Any:
    borrowed = _BORROWED.get(name)
    if borrowed is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute, checked, _ = borrowed
    try:
        value = getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"trl-pplmask borrows `{module}.{attribute}` (checked against {checked}) and the installed version no "
            f"longer has it: install the versions of constraints.txt (`pip install -c constraints.txt ...`)."
        ) from err
    globals()[name] = value
    return value


def prepare_sft_dataset(host, dataset, tokenizer, args, dataset_name: str = "train"):
    """TRL's own SFT dataset preparation (trl 1.16 `SFTTrainer._prepare_dataset`), without building a trainer.

    `host` stands in for the trainer: the method reads only `_tokenizer`, `chat_template` and `completion_only_loss`
    from it (see `trl_pplmask.data._PreparationHost`). Packing is always off: masks are per example.
    """
    return __getattr__("SFTTrainer")._prepare_dataset(
        host, dataset, tokenizer, args, packing=False, formatting_func=None, dataset_name=dataset_name
    )


__all__ = [*_BORROWED, "prepare_sft_dataset"]
