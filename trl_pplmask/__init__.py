"""trl-pplmask: Selective Token Masking for TRL (Wu et al., arXiv 2501.14315).

Drop high-perplexity ground-truth tokens from the SFT loss to fine-tune without catastrophic forgetting.
"""

from importlib.metadata import PackageNotFoundError, version

from .collator import PplMaskCallback, PplMaskCollator, add_pplmask_callback
from .data import load_any_dataset, load_task, tokenize_dataset
from .generation import SelfOutputConfig, generate_self_outputs
from .masking import PplMaskConfig, compute_mask, mask_dataset, resolve_fraction_threshold
from .models import load_model, load_tokenizer, model_slug
from .scoring import ScoringConfig, score_dataset


try:
    __version__ = version("trl-pplmask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
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
