"""trl-pplmask: Selective Token Masking for TRL (Wu et al., arXiv 2501.14315).

Drop high-perplexity ground-truth tokens from the SFT loss to fine-tune without catastrophic forgetting.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # what type checkers and editors see; test_layers checks that it equals _EXPORTS
    from .anchor import AnchoredSFTTrainer as AnchoredSFTTrainer
    from .collator import (
        PplMaskCallback as PplMaskCallback,
        PplMaskCollator as PplMaskCollator,
        add_pplmask_callback as add_pplmask_callback,
    )
    from .data import (
        load_any_dataset as load_any_dataset,
        load_task as load_task,
        tokenize_dataset as tokenize_dataset,
    )
    from .generation import SelfOutputConfig as SelfOutputConfig, generate_self_outputs as generate_self_outputs
    from .masking import (
        PplMaskConfig as PplMaskConfig,
        compute_mask as compute_mask,
        mask_dataset as mask_dataset,
        resolve_fraction_threshold as resolve_fraction_threshold,
    )
    from .models import load_model as load_model, load_tokenizer as load_tokenizer, model_slug as model_slug
    from .scoring import ScoringConfig as ScoringConfig, score_dataset as score_dataset
    from .sft import PplMaskArguments as PplMaskArguments


try:
    __version__ = version("trl-pplmask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = sorted(_EXPORTS)
