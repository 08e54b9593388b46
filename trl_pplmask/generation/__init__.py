"""Self-output and rephrase training data: sample answers from the model, keep a verified one, resumably.

The paper's alternative to training on human ground truth (Wu et al., arXiv 2501.14315): fine-tuning on the model's
**own** correct answers (*self-output*) or on its rewording of the reference answers (*rephrase*) forgets far less.
For every task row, [`generate_self_outputs`] samples `num_samples` responses, checks each with a verifier
([`~trl_pplmask.verifiers.get_verifier`]), scores each (and the ground truth) with the model, and keeps the correct
response with the lowest sequence perplexity; with none correct it keeps the ground truth (marked) or skips the row.

Repeatable and resumable:

- Each response is sampled from its own random generator, seeded from `(seed, row_id, sample index)`, so it does not
  depend on which rows share its batch, up to the last-bit effects of padding on the logits, which flip a draw that
  lands on a near-tie (an H100, a tiny peaked model, batch size 1 against 8: no sample of 32 changed in float32, 16
  did in bfloat16).
- Every finished row is appended to a JSONL checkpoint (flushed and fsynced), keyed by `row_id`; a rerun skips the
  finished rows. Batches are planned over all rows, so a resumed run batches exactly like an uninterrupted one, and
  the final dataset is always assembled from the checkpoint records: an interrupted-and-resumed run and an
  uninterrupted one give the same dataset, bit for bit.

[`~trl_pplmask.hub.self_output.build_self_output`] (`trl-pplmask self-output`) writes an `org/<task>-self-output`
Hub-layout folder: one config per generating model, parquet shards, a dataset card with the generation settings,
sample accuracy, fallbacks and the perplexity comparison of the chosen responses with the ground truth (the paper's
central observation), and a figure.

Modules: `config` ([`SelfOutputConfig`]), `prompts` (rows, prompts, seeds), `backends` (transformers, vLLM),
`scoring` (response perplexities), `checkpoint`, `loop` (batch planning, [`generate_records`],
[`generate_self_outputs`]) and `selection` (the rule and the output dataset); the command is
`trl_pplmask.commands.self_output`. The names below are imported on first use (PEP 562), so that
`trl-pplmask self-output --help` and `trl_pplmask.SelfOutputConfig` do not import torch.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports


# Public names and their modules, imported on first use (PEP 562)
_EXPORTS = {
    "BACKENDS": "config",
    "FALLBACKS": "config",
    "MODES": "config",
    "SELECTIONS": "config",
    "SOURCE_GROUND_TRUTH": "config",
    "SOURCE_SELF": "config",
    "SelfOutputConfig": "config",
    "REPHRASE_TEMPLATE": "prompts",
    "GenerationRequest": "prompts",
    "derive_seed": "prompts",
    "rephrase_messages": "prompts",
    "row_messages": "prompts",
    "GenerationBackend": "backends",
    "Sample": "backends",
    "SeededSampler": "backends",
    "TransformersBackend": "backends",
    "VLLMBackend": "backends",
    "check_vllm_available": "backends",
    "make_backend": "backends",
    "completion_token_nll": "scoring",
    "sequence_ppl": "scoring",
    "GenerationCheckpoint": "checkpoint",
    "generate_records": "loop",
    "generate_self_outputs": "loop",
    "plan_batches": "loop",
    "assemble_dataset": "selection",
    "output_features": "selection",
    "select_candidate": "selection",
    # The `<task>-self-output` folder, built on this package by `trl_pplmask.hub` (`.hub...`: a sibling package)
    "SelfOutputBuildConfig": ".hub.self_output_config",
    "build_self_output": ".hub.self_output",
    "render_self_output_card": ".hub.self_output",
    "plot_ppl_comparison": ".hub.self_output_stats",
    "self_output_statistics": ".hub.self_output_stats",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see; test_layers checks that it equals _EXPORTS
    from ..hub.self_output import (
        build_self_output as build_self_output,
        render_self_output_card as render_self_output_card,
    )
    from ..hub.self_output_config import SelfOutputBuildConfig as SelfOutputBuildConfig
    from ..hub.self_output_stats import (
        plot_ppl_comparison as plot_ppl_comparison,
        self_output_statistics as self_output_statistics,
    )
    from .backends import (
        GenerationBackend as GenerationBackend,
        Sample as Sample,
        SeededSampler as SeededSampler,
        TransformersBackend as TransformersBackend,
        VLLMBackend as VLLMBackend,
        check_vllm_available as check_vllm_available,
        make_backend as make_backend,
    )
    from .checkpoint import GenerationCheckpoint as GenerationCheckpoint
    from .config import (
        BACKENDS as BACKENDS,
        FALLBACKS as FALLBACKS,
        MODES as MODES,
        SELECTIONS as SELECTIONS,
        SOURCE_GROUND_TRUTH as SOURCE_GROUND_TRUTH,
        SOURCE_SELF as SOURCE_SELF,
        SelfOutputConfig as SelfOutputConfig,
    )
    from .loop import (
        generate_records as generate_records,
        generate_self_outputs as generate_self_outputs,
        plan_batches as plan_batches,
    )
    from .prompts import (
        REPHRASE_TEMPLATE as REPHRASE_TEMPLATE,
        GenerationRequest as GenerationRequest,
        derive_seed as derive_seed,
        rephrase_messages as rephrase_messages,
        row_messages as row_messages,
    )
    from .scoring import completion_token_nll as completion_token_nll, sequence_ppl as sequence_ppl
    from .selection import (
        assemble_dataset as assemble_dataset,
        output_features as output_features,
        select_candidate as select_candidate,
    )


__all__ = sorted(_EXPORTS)
