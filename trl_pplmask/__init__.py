"""trl-pplmask: Selective Token Masking for TRL (Wu et al., arXiv 2501.14315).

Drop high-perplexity ground-truth tokens from the SFT loss to fine-tune without catastrophic forgetting.
"""

from importlib.metadata import PackageNotFoundError, version

from .utils import lazy_exports


# Public names and their modules. They are imported on first use (PEP 562), so that `import trl_pplmask` and the
# `trl-pplmask` command (its --help above all) do not pay for torch, transformers and datasets until they need them.
_EXPORTS = {
    "AnchoredSFTTrainer": "anchor",
    "PplMaskCallback": "collator",
    "PplMaskCollator": "collator",
    "add_pplmask_callback": "collator",
    "load_any_dataset": "data",
    "load_task": "data",
    "tokenize_dataset": "data",
    "SelfOutputConfig": "generation",
    "generate_self_outputs": "generation",
    "PplMaskConfig": "masking",
    "compute_mask": "masking",
    "mask_dataset": "masking",
    "resolve_fraction_threshold": "masking",
    "load_model": "models",
    "load_tokenizer": "models",
    "model_slug": "models",
    "ScoringConfig": "scoring",
    "score_dataset": "scoring",
    "PplMaskArguments": "sft",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


try:
    __version__ = version("trl-pplmask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AnchoredSFTTrainer",
    "PplMaskArguments",
    "PplMaskCallback",
    "PplMaskCollator",
    "PplMaskConfig",
    "ScoringConfig",
    "SelfOutputConfig",
    "add_pplmask_callback",
    "compute_mask",
    "generate_self_outputs",
    "load_any_dataset",
    "load_model",
    "load_task",
    "load_tokenizer",
    "mask_dataset",
    "model_slug",
    "resolve_fraction_threshold",
    "score_dataset",
    "tokenize_dataset",
]
