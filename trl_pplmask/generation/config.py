"""Settings of self-output generation ([`SelfOutputConfig`]) and the values they and the output take.

Imports nothing heavy, so that `trl-pplmask self-output --help` and `trl_pplmask.SelfOutputConfig` stay fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any


logger = logging.getLogger(__name__)

MODES = ("self-output", "rephrase")
SELECTIONS = ("lowest_ppl", "first", "random")
FALLBACKS = ("ground_truth", "skip")
BACKENDS = ("transformers", "vllm")
# The `source` of an output row: the model's own response, or the ground truth (no correct response)
SOURCE_SELF = "self"
SOURCE_GROUND_TRUTH = "ground_truth"


@dataclass
class SelfOutputConfig:
    """Settings of [`~trl_pplmask.generation.generate_self_outputs`].

    Args:
        mode (`str`, *optional*, defaults to `"self-output"`):
            `"self-output"`: the model answers the task prompt. `"rephrase"`: the model is shown the instruction and
            the reference answer ([`~trl_pplmask.generation.REPHRASE_TEMPLATE`], the paper's) and writes its own
            response. Either way the response is verified and scored as an answer to the task prompt, which is what
            SFT trains on.
        num_samples (`int`, *optional*, defaults to `4`):
            Responses sampled per row (the paper uses 32).
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature; `0` is greedy decoding (all samples of a row are then the same).
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p`.
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Longest response, in tokens. A response cut at this length is marked `truncated`.
        selection (`str`, *optional*, defaults to `"lowest_ppl"`):
            Which correct response a row keeps: `"lowest_ppl"` (the paper's rule: lowest sequence perplexity under
            the scoring model), `"first"` (first correct sample) or `"random"` (seeded by `seed` and the row id).
        fallback (`str`, *optional*, defaults to `"ground_truth"`):
            A row without a selectable correct response keeps the ground truth (`source="ground_truth"`) or, with
            `"skip"`, is left out.
        select_truncated (`bool`, *optional*, defaults to `False`):
            Whether a correct but truncated response may be chosen. Off by default: SFT would teach the model to stop
            mid-answer (the chat template closes the turn after the cut).
        backend (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` (batched `generate`, any device) or `"vllm"` (needs the `vllm` extra and a CUDA GPU).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampling and of `selection="random"`.
        batch_size (`int`, *optional*):
            Prompts per generation batch (each expanded to `num_samples` sequences). Defaults to 8 with transformers
            and 256 with vLLM, which schedules its own batches.
        max_tokens_per_batch (`int`, *optional*):
            transformers backend: cap on `prompts * num_samples * (prompt length + max_new_tokens)` per batch, to
            bound memory. A prompt over the budget runs alone.
        tensor_parallel_size (`int`, *optional*, defaults to `1`):
            vLLM tensor parallelism (GPUs per model).
        vllm_model (`str`, *optional*):
            Model path or Hub id that vLLM loads. Defaults to the path of the `model` passed in.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.6`):
            Share of GPU memory vLLM reserves; the rest holds the transformers copy that scores the responses.
        checkpoint_path (`str`, *optional*):
            JSONL file that finished rows are appended to. Rerunning with the same file resumes. Without it results
            are kept in memory only.
        verify_workers (`int`, *optional*):
            Parallel verifier checks (code tasks run sandboxed subprocesses); see
            [`~trl_pplmask.verifiers.verify_batch`].
        score_max_tokens_per_batch (`int`, *optional*):
            Token budget of a scoring batch, see [`~trl_pplmask.scoring.ScoringConfig`].
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over rows.
    """

    # The help strings are `trl-pplmask self-output`'s (its options are these fields, see `commands._args`)
    mode: str = field(
        default="self-output",
        metadata={
            "help": "self-output: the model answers the task prompt. rephrase: it rewrites the reference answer in "
            "its own words. Either way the response is verified against the task (default: self-output).",
            "choices": MODES,
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Responses sampled per row (paper: 32)."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; 0 is greedy decoding (default: 0.7)."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling probability (default: 0.95)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest response in tokens (default: 512)."})
    selection: str = field(
        default="lowest_ppl",
        metadata={
            "help": "Correct response a row keeps: lowest_ppl (the paper's: lowest sequence perplexity), first, or "
            "random (seeded) (default: lowest_ppl).",
            "choices": SELECTIONS,
        },
    )
    fallback: str = field(
        default="ground_truth",
        metadata={
            "help": "Row with no correct response: keep its ground truth (marked) or skip it (default: ground_truth).",
            "choices": FALLBACKS,
        },
    )
    select_truncated: bool = field(default=False, metadata={"help": "Allow choosing responses cut at the limit."})
    backend: str = field(
        default="transformers",
        metadata={
            "help": "transformers (any device) or vllm (needs the vllm extra and a CUDA GPU) (default: transformers).",
            "choices": BACKENDS,
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling and of --selection random."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generation batch (default: 8, vLLM 256)."}
    )
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "transformers: token budget of a generation batch."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model."})
    # Not options of the command: set per model by the build, or left at their defaults
    vllm_model: str | None = field(default=None, metadata={"option": None})
    vllm_gpu_memory_utilization: float = field(default=0.6, metadata={"option": None})
    checkpoint_path: str | None = field(default=None, metadata={"option": None})
    verify_workers: int | None = field(default=None, metadata={"option": None})
    score_max_tokens_per_batch: int | None = field(default=None, metadata={"option": None})
    show_progress: bool = field(default=True, metadata={"option": None})

    def __post_init__(self):
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("selection", self.selection, SELECTIONS),
            ("fallback", self.fallback, FALLBACKS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy decoding), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        for name in ("batch_size", "max_tokens_per_batch", "score_max_tokens_per_batch", "verify_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}.")
        if self.temperature == 0 and self.num_samples > 1:
            logger.warning(
                "temperature=0 is greedy decoding: the %d samples of a row will be identical.", self.num_samples
            )

    def resolved_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 256 if self.backend == "vllm" else 8

    def sampling_settings(self) -> dict[str, Any]:
        """The settings a generated response depends on: a checkpoint only resumes under the same ones."""
        keys = ("mode", "num_samples", "temperature", "top_p", "max_new_tokens", "backend", "seed")
        return {key: getattr(self, key) for key in keys}
