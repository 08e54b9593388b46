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

[`build_self_output`] (`trl-pplmask self-output`) writes an `org/<task>-self-output` Hub-layout folder: one config per
generating model, parquet shards, a dataset card with the generation settings, sample accuracy, fallbacks and the
perplexity comparison of the chosen responses with the ground truth (the paper's central observation), and a figure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from .data import ROW_ID_COLUMN
from .masking import IGNORE_INDEX, NLL_COLUMN
from .self_output_cli import BACKENDS, FALLBACKS, MODES, SELECTIONS, add_self_output_args
from .verifiers import Verifier, get_verifier, verify_batch


if TYPE_CHECKING:
    from .hub.self_output import SelfOutputBuildConfig, build_self_output, render_self_output_card  # noqa: F401
    from .hub.self_output_stats import self_output_statistics  # noqa: F401


logger = logging.getLogger(__name__)

SOURCE_SELF = "self"
SOURCE_GROUND_TRUTH = "ground_truth"
CHECKPOINT_FORMAT = "trl-pplmask-self-output-checkpoint"
CHECKPOINT_VERSION = 1

# The paper's rephrase prompt (appier-research/robust-llm-finetunes, after Yang et al. 2024, "Self-Distillation
# Bridges Distribution Gap in Language Model Fine-Tuning"), kept word for word so that data matches the paper's.
REPHRASE_TEMPLATE = (
    "Below are an instruction that describes a task along with a reference answer. Using the reference answer as a "
    "guide, write your own response.\n### Instruction:\n{instruction}\n### Reference Answer:\n{reference}\n"
    "### Response:"
)

_MESSAGE = {"role": Value("string"), "content": Value("string")}
_CANDIDATE = {"text": Value("string"), "correct": Value("bool"), "truncated": Value("bool"), "ppl": Value("float64")}


@dataclass
class SelfOutputConfig:
    """Settings of [`generate_self_outputs`].

    Args:
        mode (`str`, *optional*, defaults to `"self-output"`):
            `"self-output"`: the model answers the task prompt. `"rephrase"`: the model is shown the instruction and
            the reference answer ([`REPHRASE_TEMPLATE`], the paper's) and writes its own response. Either way the
            response is verified and scored as an answer to the task prompt, which is what SFT trains on.
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

    mode: str = "self-output"
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    selection: str = "lowest_ppl"
    fallback: str = "ground_truth"
    select_truncated: bool = False
    backend: str = "transformers"
    seed: int = 0
    batch_size: int | None = None
    max_tokens_per_batch: int | None = None
    tensor_parallel_size: int = 1
    vllm_model: str | None = None
    vllm_gpu_memory_utilization: float = 0.6
    checkpoint_path: str | None = None
    verify_workers: int | None = None
    score_max_tokens_per_batch: int | None = None
    show_progress: bool = True

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


# --------------------------------------------------------------------------------------------------------------------
# Rows: prompts, references, seeds
# --------------------------------------------------------------------------------------------------------------------


def _as_messages(value: Any, role: str, where: str, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise ValueError(
        f"{where}: column {column!r} must be a string or a non-empty list of {{role, content}} messages, got "
        f"{value!r:.200}. Load the data with `trl_pplmask.data.load_task` or convert it to TRL's prompt/completion "
        "format."
    )


def row_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The prompt messages and the reference answer text of a prompt/completion row."""
    where = f"row {row.get(ROW_ID_COLUMN)!r}"
    prompt = _as_messages(row.get("prompt"), "user", where, "prompt")
    completion = _as_messages(row.get("completion"), "assistant", where, "completion")
    if len(completion) != 1 or completion[0].get("role", "assistant") != "assistant":
        raise ValueError(f"{where}: the completion must be a single assistant message, got {completion!r:.200}.")
    return prompt, completion[0]["content"]


def rephrase_messages(prompt: list[dict[str, str]], reference: str) -> list[dict[str, str]]:
    """The paper's rephrase prompt for a task prompt and its reference answer (a single user message).

    The instruction is the text of the prompt's messages (its user turns for a multi-turn prompt; system turns stay as
    they are, ahead of the rephrase request).
    """
    system = [m for m in prompt if m.get("role") == "system"]
    instruction = "\n\n".join(m["content"] for m in prompt if m.get("role") != "system")
    return [
        *system,
        {"role": "user", "content": REPHRASE_TEMPLATE.format(instruction=instruction, reference=reference)},
    ]


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from a base seed and keys (row id, sample index, purpose), stable across processes and runs."""
    digest = hashlib.sha256(json.dumps([seed, *keys], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def row_fingerprint(row: dict[str, Any]) -> str:
    """Content hash of a row: a checkpoint record only applies to the row it was generated for."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class GenerationRequest:
    """One row to sample responses for.

    Args:
        row_id: The row's id.
        messages (`list[dict]`): What the model is shown (the task prompt, or the rephrase prompt).
        prompt_ids (`list[int]`): `messages` through the chat template, with the generation prompt.
        seeds (`list[int]`): One seed per sample.
    """

    row_id: Any
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    seeds: list[int]


@dataclass
class Sample:
    """A generated response: its text, whether it was cut at `max_new_tokens`, and its length in tokens."""

    text: str
    truncated: bool
    num_tokens: int


class GenerationBackend(Protocol):
    """Turns requests into `num_samples` responses each, in request order."""

    name: str

    def generate(self, requests: list[GenerationRequest], config: SelfOutputConfig) -> list[list[Sample]]: ...


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    # Exactly the prompt tokens SFTTrainer builds for a conversational prompt (`add_generation_prompt=True`)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


class SeededSampler(LogitsProcessor):
    """Temperature + nucleus sampling where each sequence draws from its own `torch.Generator`.

    `generate`'s own sampling draws every sequence of a batch from one global random stream, so a response would
    depend on its batch neighbours and on where a resumed run restarted. Here each sequence's token is drawn by
    inverse-CDF sampling with one uniform number from its own generator, and returned as a one-hot distribution, so
    that `generate`'s sampling step (which runs after this processor) can only pick that token. (Padding and batch
    shape still change the logits in their last bits, so a draw that lands on a near-tie can differ between batchings;
    resumed runs batch exactly like uninterrupted ones and are not affected.)

    Args:
        generators (`list[torch.Generator]`): One per sequence of the (expanded) batch, in batch order.
        temperature (`float`): Softmax temperature; `0` picks the most likely token.
        top_p (`float`): Nucleus mass.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # float64: a float32 running sum over a 50k-150k vocabulary drifts by about one token's probability, which
        # would move the sampled token for tiny differences in the logits
        logits = scores.double()
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
            outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= self.top_p
            cumulative = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
            uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
            targets = uniforms.to(cumulative.device)[:, None] * cumulative[:, -1:]
            index = torch.searchsorted(cumulative, targets, right=True).clamp_(max=cumulative.shape[-1] - 1)
            tokens = order.gather(-1, index)
        one_hot = torch.full_like(scores, -math.inf)
        return one_hot.scatter_(-1, tokens, 0.0)


class TransformersBackend:
    """Batched `model.generate` across prompts: left padding, `num_return_sequences`, per-sequence seeded sampling.

    Args:
        model (`PreTrainedModel`): The generating model (any device).
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
    """

    name = "transformers"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.eos_token_ids = sorted({*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        if not self.eos_token_ids:
            raise ValueError("The model and tokenizer define no EOS token: generation would never stop.")

    def generation_config(self, config: SelfOutputConfig):
        from transformers import GenerationConfig

        # Every value that could reshape the distribution before `SeededSampler` is set to neutral explicitly:
        # otherwise `generate` fills it from the model's generation_config.json (e.g. a repetition penalty)
        return GenerationConfig(
            do_sample=True,
            num_return_sequences=config.num_samples,
            max_new_tokens=config.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
        )

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], config: SelfOutputConfig) -> list[list[Sample]]:
        device = next(self.model.parameters()).device
        longest = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, request in enumerate(requests):  # left padding: every prompt ends where generation starts
            input_ids[i, longest - len(request.prompt_ids) :] = torch.as_tensor(request.prompt_ids)
            attention_mask[i, longest - len(request.prompt_ids) :] = 1
        # `num_return_sequences` repeats each prompt consecutively: sequence k is sample k % n of prompt k // n
        generators = [torch.Generator().manual_seed(s) for request in requests for s in request.seeds]
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self.generation_config(config),
                logits_processor=LogitsProcessorList([SeededSampler(generators, config.temperature, config.top_p)]),
            )
        finally:
            self.model.train(was_training)
        new_tokens = output[:, longest:].cpu()
        samples = [self._sample(row.tolist()) for row in new_tokens]
        n = config.num_samples
        return [samples[i * n : (i + 1) * n] for i in range(len(requests))]

    def _sample(self, tokens: list[int]) -> Sample:
        eos = set(self.eos_token_ids)
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Sample(text=text, truncated=end is None, num_tokens=len(kept) + (end is not None))


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_available() -> None:
    """Raise a clear error unless the vLLM backend can run here (package installed, CUDA GPU present)."""
    if not _vllm_installed():
        raise ModuleNotFoundError(
            "backend='vllm' needs vLLM: pip install 'trl-pplmask[vllm]' (on a machine with a CUDA GPU), or use "
            "backend='transformers' (--backend transformers)."
        )
    if not torch.cuda.is_available():
        raise ValueError("backend='vllm' needs a CUDA GPU, and none is visible; use backend='transformers'.")


class VLLMBackend:
    """vLLM offline generation: `n` samples per prompt, seeded per row, from the same prompt token ids.

    Args:
        model_name_or_path (`str`): What vLLM loads (Hub id or local path; not a model object).
        tensor_parallel_size (`int`): GPUs per model.
        gpu_memory_utilization (`float`): Share of GPU memory vLLM reserves.
        dtype (`str`): Weight dtype (`auto`, `bfloat16`, ...).
        seed (`int`): vLLM's engine seed (per-request seeds decide the samples).
    """

    name = "vllm"

    def __init__(
        self,
        model_name_or_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "auto",
        seed: int = 0,
    ):
        check_vllm_available()
        from vllm import LLM

        self.llm = LLM(
            model=model_name_or_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
        )

    def generate(self, requests: list[GenerationRequest], config: SelfOutputConfig) -> list[list[Sample]]:
        from vllm import SamplingParams

        # One seed per request: vLLM derives the n samples of a request from it, independent of the batch
        params = [
            SamplingParams(
                n=config.num_samples,
                temperature=config.temperature,
                top_p=config.top_p,
                max_tokens=config.max_new_tokens,
                seed=request.seeds[0],
                skip_special_tokens=True,
            )
            for request in requests
        ]
        prompts = [{"prompt_token_ids": request.prompt_ids} for request in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Sample(text=o.text, truncated=o.finish_reason == "length", num_tokens=len(o.token_ids))
                for o in out.outputs
            ]
            for out in outputs
        ]


def _model_path(model: PreTrainedModel) -> str:
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        raise ValueError("Cannot tell which checkpoint the model was loaded from; set `vllm_model` to its path or id.")
    return str(path)


def make_backend(
    config: SelfOutputConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> GenerationBackend:
    """The backend named by `config.backend`."""
    if config.backend == "vllm":
        from .models import resolve_model_path

        check_vllm_available()  # before anything else, so the error says what is missing

        dtype = str(model.dtype).removeprefix("torch.") if getattr(model, "dtype", None) is not None else "auto"
        return VLLMBackend(
            resolve_model_path(config.vllm_model or _model_path(model)),
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            dtype=dtype,
            seed=config.seed,
        )
    return TransformersBackend(model, tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Scoring: sequence perplexity of a response under the scoring model, conditioned on the task prompt
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # Per-batch tokenization would print a `datasets` progress bar for every few rows
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def completion_token_nll(
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens_per_batch: int | None = None,
) -> list[np.ndarray]:
    """NLL of each completion token of `responses` as answers to `prompts`, tokenized exactly as SFTTrainer does.

    The tokens are the ones SFT trains on (the response and the chat template's end of turn), so the sequence
    perplexity `exp(mean(nll))` of a response is that of its training tokens.
    """
    from .data import tokenize_dataset
    from .scoring import ScoringConfig, score_dataset

    pairs = Dataset.from_dict(
        {
            "prompt": prompts,
            "completion": [[{"role": "assistant", "content": text}] for text in responses],
            ROW_ID_COLUMN: list(range(len(responses))),
        }
    )
    with _quiet_datasets():
        # max_length=None: a long response is scored whole (SFTTrainer's default of 1024 would cut it)
        tokenized = tokenize_dataset(pairs, tokenizer, max_length=None)
        scoring = ScoringConfig(max_tokens_per_batch=max_tokens_per_batch, use_cache=False, show_progress=False)
        scored = score_dataset(tokenized, model, tokenizer, scoring)
    by_id = {}
    for row_id, labels, nll in zip(scored[ROW_ID_COLUMN], scored["labels"], scored[NLL_COLUMN]):
        by_id[row_id] = np.asarray(nll, dtype=np.float32)[np.asarray(labels) != IGNORE_INDEX]
    return [by_id[i] for i in range(len(responses))]


def sequence_ppl(token_nll: np.ndarray) -> float:
    """Perplexity of a sequence: `exp` of the mean token NLL."""
    return float(math.exp(float(np.mean(token_nll, dtype=np.float64)))) if len(token_nll) else float("nan")


def _encode_nll(nll: np.ndarray) -> str:
    # float32 bytes in base64: exact and ~4x smaller than JSON floats
    return base64.b64encode(np.asarray(nll, dtype="<f4").tobytes()).decode("ascii")


def _decode_nll(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------------------------


class GenerationCheckpoint:
    """Append-only JSONL store of finished rows, keyed by row id; in memory when `path` is `None`.

    The first line is a header with the settings the responses depend on; a rerun with other settings is refused
    rather than mixing two kinds of data (a checkpoint without any finished row simply starts over). Each record is
    flushed and fsynced as soon as its row is done. A partial last line (a crash mid-write) is cut off on open; its
    row is generated again. An exclusive lock keeps two runs from writing the same file.

    Args:
        path (`str` or `None`): The JSONL file (created with its parent directories when missing).
        header (`dict`): Settings to record, or to check against an existing file.
    """

    def __init__(self, path: str | os.PathLike | None, header: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.header = json.loads(json.dumps(header, default=str))
        self.records: dict[Any, dict[str, Any]] = {}
        self._file = None
        if self.path is not None:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise ValueError(
                f"Checkpoint {self.path} is in use by another run (it is locked). Wait for that run, or use another "
                "checkpoint path."
            ) from None
        self._file.seek(0)
        data = self._file.read()
        if data and not data.endswith(b"\n"):
            complete = data[: data.rfind(b"\n") + 1]
            logger.warning(
                "Checkpoint %s ends with a partial record (interrupted write); it will be redone.", self.path
            )
            self._file.truncate(len(complete))
            data = complete
        lines = data.decode("utf-8").splitlines()
        if len(lines) <= 1 and (not lines or self._is_checkpoint_header(lines[0])):
            # New, or a run that stopped before finishing any row: nothing to keep, so other settings may start over
            self._file.truncate(0)
            self._write({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": self.header})
            return
        self._check_header(lines[0])
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"Checkpoint {self.path}, line {number} is not valid JSON ({err}). The file was modified outside "
                    "trl-pplmask; remove that line (its row is then generated again) or start a new checkpoint."
                ) from None
            self.records.setdefault(record["row_id"], record)

    @staticmethod
    def _parse_header(line: str) -> dict[str, Any] | None:
        try:
            header = json.loads(line)
        except json.JSONDecodeError:
            return None
        return header if isinstance(header, dict) and header.get("format") == CHECKPOINT_FORMAT else None

    def _is_checkpoint_header(self, line: str) -> bool:
        return self._parse_header(line) is not None

    def _check_header(self, line: str) -> None:
        header = self._parse_header(line)
        if header is None:
            raise ValueError(f"{self.path} is not a trl-pplmask generation checkpoint; choose another path.")
        stored = header.get("settings", {})
        keys = sorted(set(stored) | set(self.header))
        differ = {k: (stored.get(k), self.header.get(k)) for k in keys if stored.get(k) != self.header.get(k)}
        if differ:
            details = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in differ.items())
            raise ValueError(
                f"Checkpoint {self.path} was written with other generation settings ({details}). Rerun with the same "
                "settings to resume, or use a new checkpoint path (or delete this one) to start over."
            )

    def _write(self, payload: dict[str, Any]) -> None:
        self._file.write((json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())  # a finished row survives a crash or power loss right after

    def add(self, record: dict[str, Any]) -> None:
        """Store a finished row (written through to the file at once)."""
        self.records[record["row_id"]] = record
        if self._file is not None:
            self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # also releases the lock
            self._file = None

    def __enter__(self) -> GenerationCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------------
# Generation loop
# --------------------------------------------------------------------------------------------------------------------


def plan_batches(
    lengths: Sequence[int], batch_size: int, num_samples: int, max_new_tokens: int, max_tokens: int | None
) -> list[list[int]]:
    """Group row indices into generation batches, shortest prompts first, so that little of a batch is padding.

    A batch holds at most `batch_size` prompts and, with `max_tokens`, at most that many tokens once expanded and
    generated (`prompts * num_samples * (longest prompt + max_new_tokens)`); a prompt over the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Ascending order: the newest prompt is the longest of the batch
        size = (len(current) + 1) * num_samples * (lengths[i] + max_new_tokens)
        if current and (len(current) >= batch_size or (max_tokens is not None and size > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _verifier_name(task: str | Verifier) -> str:
    if isinstance(task, str):
        return task
    return f"{getattr(task, '__module__', '?')}.{getattr(task, '__qualname__', type(task).__name__)}"


def _checkpoint_header(config: SelfOutputConfig, task: str | Verifier, model, scoring_model) -> dict[str, Any]:
    from .scoring import model_fingerprint

    header = {**config.sampling_settings(), "verifier": _verifier_name(task), "model": model_fingerprint(model)[:16]}
    if scoring_model is not model:
        header["scoring_model"] = model_fingerprint(scoring_model)[:16]
    return header


def _prepare_rows(dataset: Dataset) -> list[dict[str, Any]]:
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to generate.")
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Self-output generation needs TRL prompt/completion data (the completion is the reference answer); "
            f"missing {missing} in columns {dataset.column_names}. Load a task with `trl_pplmask.data.load_task`."
        )
    if ROW_ID_COLUMN not in dataset.column_names:
        logger.warning("The dataset has no %r column; rows are identified by their position.", ROW_ID_COLUMN)
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    rows = list(dataset)
    seen: set = set()
    for row in rows:
        row_id = row[ROW_ID_COLUMN]
        if row_id is None or row_id in seen:
            raise ValueError(f"row_id {row_id!r} is missing or repeated; each row needs a unique id to resume safely.")
        seen.add(row_id)
        row_messages(row)  # fail on a malformed row before any generation
    return rows


def _requests(
    rows: list[dict[str, Any]], config: SelfOutputConfig, tokenizer: PreTrainedTokenizerBase
) -> list[GenerationRequest]:
    requests = []
    for row in rows:
        prompt, reference = row_messages(row)
        messages = prompt if config.mode == "self-output" else rephrase_messages(prompt, reference)
        row_id = row[ROW_ID_COLUMN]
        seeds = [derive_seed(config.seed, row_id, "sample", k) for k in range(config.num_samples)]
        requests.append(GenerationRequest(row_id, messages, _prompt_ids(tokenizer, messages), seeds))
    return requests


def _process_batch(
    rows: list[dict[str, Any]],
    requests: list[GenerationRequest],
    backend: GenerationBackend,
    verifier: str | Verifier,
    scoring_model,
    scoring_tokenizer,
    config: SelfOutputConfig,
) -> list[dict[str, Any]]:
    """Generate, verify and score the rows of one batch; return their checkpoint records."""
    samples = backend.generate(requests, config)
    if len(samples) != len(requests) or any(len(s) != config.num_samples for s in samples):
        raise RuntimeError(f"The {backend.name} backend returned the wrong number of samples.")
    flat_rows = [row for row, row_samples in zip(rows, samples) for _ in row_samples]
    texts = [s.text for row_samples in samples for s in row_samples]
    correct = verify_batch(verifier, flat_rows, texts, max_workers=config.verify_workers)
    # Every response is scored as an answer to the *task* prompt, which is what SFT will train on, and so is the
    # ground truth (the paper's comparison)
    prompts_and_refs = [row_messages(row) for row in rows]
    score_prompts = [p for (p, _), row_samples in zip(prompts_and_refs, samples) for _ in row_samples]
    score_prompts += [p for p, _ in prompts_and_refs]
    nlls = completion_token_nll(
        score_prompts,
        texts + [ref for _, ref in prompts_and_refs],
        scoring_model,
        scoring_tokenizer,
        config.score_max_tokens_per_batch,
    )
    records = []
    n = config.num_samples
    for i, (row, row_samples) in enumerate(zip(rows, samples)):
        candidates = [
            {
                "text": sample.text,
                "correct": bool(correct[i * n + k]),
                "truncated": bool(sample.truncated),
                "num_tokens": int(sample.num_tokens),
                "ppl": sequence_ppl(nlls[i * n + k]),
                "token_nll": _encode_nll(nlls[i * n + k]),
            }
            for k, sample in enumerate(row_samples)
        ]
        gt_nll = nlls[len(texts) + i]
        records.append(
            {
                "row_id": row[ROW_ID_COLUMN],
                "row_hash": row_fingerprint(row),
                "candidates": candidates,
                "ground_truth": {"ppl": sequence_ppl(gt_nll), "token_nll": _encode_nll(gt_nll)},
            }
        )
    return records


def generate_records(
    dataset: Dataset,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Verifier,
    config: SelfOutputConfig,
    scoring_model: torch.nn.Module | None = None,
    scoring_tokenizer: PreTrainedTokenizerBase | None = None,
    backend: GenerationBackend | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate, verify and score every row not yet in the checkpoint; return `(rows, records)` in dataset order.

    The lower-level half of [`generate_self_outputs`] (which then applies the selection rule); arguments as there.
    """
    rows = _prepare_rows(dataset)
    get_verifier(task)  # unknown task names and missing extras fail before any generation
    if backend is None and config.backend == "vllm":
        check_vllm_available()
    scoring_model = model if scoring_model is None else scoring_model
    scoring_tokenizer = tokenizer if scoring_tokenizer is None else scoring_tokenizer
    header = _checkpoint_header(config, task, model, scoring_model)
    with GenerationCheckpoint(config.checkpoint_path, header) as checkpoint:
        _check_records(rows, checkpoint)
        pending = [i for i, row in enumerate(rows) if row[ROW_ID_COLUMN] not in checkpoint.records]
        if pending:
            if backend is None:
                backend = make_backend(config, model, tokenizer)
            _run_pending(rows, pending, backend, task, scoring_model, scoring_tokenizer, config, tokenizer, checkpoint)
        records = [checkpoint.records[row[ROW_ID_COLUMN]] for row in rows]
    return rows, records


def _check_records(rows: list[dict[str, Any]], checkpoint: GenerationCheckpoint) -> None:
    for row in rows:
        record = checkpoint.records.get(row[ROW_ID_COLUMN])
        if record is not None and record.get("row_hash") != row_fingerprint(row):
            raise ValueError(
                f"Checkpoint {checkpoint.path} holds row_id {row[ROW_ID_COLUMN]!r} generated for different data (the "
                "row's content changed). Use a new checkpoint for new data."
            )


def _run_pending(rows, pending, backend, task, scoring_model, scoring_tokenizer, config, tokenizer, checkpoint):
    # The batch plan covers *all* rows, so a resumed run batches exactly as an uninterrupted one would; a batch that
    # a crash left half-written is regenerated whole (the same batch, hence bit-identical responses) and only its
    # missing rows are stored
    requests = _requests(rows, config, tokenizer)
    batches = plan_batches(
        [len(r.prompt_ids) for r in requests],
        config.resolved_batch_size(),
        config.num_samples,
        config.max_new_tokens,
        config.max_tokens_per_batch if backend.name == "transformers" else None,
    )
    todo = set(pending)
    bar = tqdm(total=len(pending), unit="row", desc=f"Generating ({config.mode})", disable=not config.show_progress)
    counts = {"samples": 0, "correct": 0, "rows_without_correct": 0}
    try:
        for batch in batches:
            if not todo.intersection(batch):
                continue
            records = _process_batch(
                [rows[i] for i in batch],
                [requests[i] for i in batch],
                backend,
                task,
                scoring_model,
                scoring_tokenizer,
                config,
            )
            for i, record in zip(batch, records):
                if i not in todo:
                    continue
                checkpoint.add(record)
                todo.discard(i)
                n_correct = sum(c["correct"] for c in record["candidates"])
                counts["samples"] += len(record["candidates"])
                counts["correct"] += n_correct
                counts["rows_without_correct"] += n_correct == 0
                bar.update(1)
            bar.set_postfix(
                sample_acc=f"{counts['correct'] / max(counts['samples'], 1):.1%}",
                no_correct=counts["rows_without_correct"],
            )
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------------------------
# Selection and the output dataset
# --------------------------------------------------------------------------------------------------------------------


def select_candidate(
    candidates: Sequence[dict[str, Any]],
    selection: str,
    select_truncated: bool = False,
    rng: random.Random | None = None,
) -> int | None:
    """Index of the candidate a row keeps, or `None` when none is correct (and selectable).

    Args:
        candidates (`Sequence[dict]`): Each with `correct`, `ppl` and `truncated`.
        selection (`str`): `lowest_ppl` (ties go to the earlier sample), `first` or `random`.
        select_truncated (`bool`, *optional*, defaults to `False`): Whether truncated responses may be kept.
        rng (`random.Random`, *optional*): Source of `random` selection.
    """
    eligible = [
        i
        for i, c in enumerate(candidates)
        if c["correct"] and (select_truncated or not c.get("truncated", False)) and math.isfinite(c["ppl"])
    ]
    if not eligible:
        return None
    if selection == "lowest_ppl":
        return min(eligible, key=lambda i: (candidates[i]["ppl"], i))
    if selection == "first":
        return eligible[0]
    if selection == "random":
        return (rng or random.Random(0)).choice(eligible)
    raise ValueError(f"Unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}.")


def output_features(dataset_features: Features | None = None) -> Features:
    """Schema of the self-output dataset (message columns follow the source's message schema when it has one)."""
    messages = List(_MESSAGE)
    if dataset_features is not None and isinstance(dataset_features.get("prompt"), List):
        messages = dataset_features["prompt"]
    row_id = dataset_features.get(ROW_ID_COLUMN) if dataset_features is not None else None
    return Features(
        {
            "prompt": messages,
            "completion": messages,
            "messages": messages,
            "chosen_response": Value("string"),
            "source": Value("string"),
            "candidates": List(_CANDIDATE),
            "num_correct": Value("int32"),
            "chosen_ppl": Value("float64"),
            "ground_truth_ppl": Value("float64"),
            "chosen_token_nll": List(Value("float32")),
            "ground_truth_token_nll": List(Value("float32")),
            ROW_ID_COLUMN: row_id if row_id is not None else Value("int64"),
        }
    )


def assemble_dataset(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    config: SelfOutputConfig,
    features: Features | None = None,
) -> tuple[Dataset, dict[str, int]]:
    """Apply the selection rule and fallback to checkpoint records; return the dataset and the skipped-row counts.

    A pure function of its inputs: an interrupted-and-resumed run and an uninterrupted one assemble the same rows.
    """
    out: dict[str, list] = {name: [] for name in output_features(features)}
    skipped = {"rows": 0, "candidates": 0, "correct": 0, "truncated": 0, "rows_with_correct": 0}
    for row, record in zip(rows, records):
        prompt, reference = row_messages(row)
        candidates = record["candidates"]
        rng = random.Random(derive_seed(config.seed, row[ROW_ID_COLUMN], "select"))
        index = select_candidate(candidates, config.selection, config.select_truncated, rng)
        if index is None and config.fallback == "skip":
            skipped["rows"] += 1
            skipped["candidates"] += len(candidates)
            skipped["correct"] += sum(c["correct"] for c in candidates)
            skipped["truncated"] += sum(c["truncated"] for c in candidates)
            # correct but truncated responses only (with select_truncated=False)
            skipped["rows_with_correct"] += any(c["correct"] for c in candidates)
            continue
        if index is None:
            text, source = reference, SOURCE_GROUND_TRUTH
            chosen_nll, chosen_ppl = record["ground_truth"]["token_nll"], record["ground_truth"]["ppl"]
        else:
            text, source = candidates[index]["text"], SOURCE_SELF
            chosen_nll, chosen_ppl = candidates[index]["token_nll"], candidates[index]["ppl"]
        completion = [{"role": "assistant", "content": text}]
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["messages"].append(prompt + completion)
        out["chosen_response"].append(text)
        out["source"].append(source)
        out["candidates"].append([{k: c[k] for k in ("text", "correct", "truncated", "ppl")} for c in candidates])
        out["num_correct"].append(sum(c["correct"] for c in candidates))
        out["chosen_ppl"].append(chosen_ppl)
        out["ground_truth_ppl"].append(record["ground_truth"]["ppl"])
        out["chosen_token_nll"].append(_decode_nll(chosen_nll).tolist())
        out["ground_truth_token_nll"].append(_decode_nll(record["ground_truth"]["token_nll"]).tolist())
        out[ROW_ID_COLUMN].append(row[ROW_ID_COLUMN])
    return Dataset.from_dict(out, features=output_features(features)), skipped


def generate_self_outputs(
    dataset: Dataset,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Verifier,
    config: SelfOutputConfig | None = None,
    *,
    scoring_model: torch.nn.Module | None = None,
    scoring_tokenizer: PreTrainedTokenizerBase | None = None,
    backend: str | GenerationBackend | None = None,
    **config_kwargs,
) -> Dataset:
    """Build self-output (or rephrase) SFT data: sample, verify, score, and keep the best correct response per row.

    Args:
        dataset (`Dataset`): TRL prompt/completion data (the completion is the reference answer) with the task's raw
            fields and a unique `row_id`, as [`~trl_pplmask.data.load_task`] returns it.
        model (`PreTrainedModel`): The generating model (for the paper, the model to be fine-tuned).
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer (with a chat template).
        task (`str` or `Callable`): Verifier: a task name (`gsm8k`, `math`, `arc_challenge`, `mbpp`, `humaneval`) or
            any callable `(row, response) -> bool`.
        config (`SelfOutputConfig`, *optional*): Settings; or pass them as keyword arguments
            (`mode="rephrase"`, `num_samples=8`, `checkpoint_path="run.jsonl"`, ...).
        scoring_model (`torch.nn.Module`, *optional*): Model whose perplexity ranks the responses; defaults to
            `model` (the paper scores with the model to be fine-tuned, which generated them).
        scoring_tokenizer (`PreTrainedTokenizerBase`, *optional*): Tokenizer of `scoring_model`.
        backend (`str` or `GenerationBackend`, *optional*): `"transformers"` or `"vllm"` (the config's `backend`), or
            a ready backend object (anything with `name` and `generate(requests, config)`), which then generates.

    Returns:
        `Dataset`: one row per kept source row, in source order, with `prompt`, `completion` and `messages` (the
        chosen response as a conversation, ready for `SFTTrainer`), `chosen_response`, `source` (`self` or
        `ground_truth`), `candidates` (`text`, `correct`, `truncated`, `ppl` of every sample), `num_correct`,
        `chosen_ppl`, `ground_truth_ppl`, the per-token NLLs `chosen_token_nll` and `ground_truth_token_nll`, and
        `row_id`.
    """
    if isinstance(backend, str):
        config_kwargs["backend"], backend = backend, None
    if config is None:
        config = SelfOutputConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either `config` or SelfOutputConfig keyword arguments, not both.")
    rows, records = generate_records(
        dataset, model, tokenizer, task, config, scoring_model, scoring_tokenizer, backend=backend
    )
    output, skipped = assemble_dataset(rows, records, config, dataset.features)
    if skipped["rows"]:
        logger.warning("%d of %d rows had no correct response and were skipped.", skipped["rows"], len(rows))
    return output


# --------------------------------------------------------------------------------------------------------------------
# Command line: `trl-pplmask self-output` and hub_scripts/build_self_output.py
# --------------------------------------------------------------------------------------------------------------------


def build_config_from_args(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> SelfOutputBuildConfig:
    """The [`SelfOutputBuildConfig`] of parsed `add_self_output_args` arguments."""
    from .hub.cli import folder_settings_from_args
    from .hub.self_output import SelfOutputBuildConfig

    generation = SelfOutputConfig(
        mode=args.mode,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        selection=args.selection,
        fallback=args.fallback,
        select_truncated=args.select_truncated,
        backend=args.backend,
        seed=args.seed,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    return SelfOutputBuildConfig(
        **folder_settings_from_args(args, prog),
        split=args.split,
        verifier=args.verifier,
        generation=generation,
        ppl_threshold=args.ppl_threshold,
        checkpoint_dir=args.checkpoint_dir,
    )


def cmd_self_output(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> int:
    """Run a build from parsed arguments and print a summary per config."""
    from .hub.card import fmt_percent
    from .hub.folder import read_build_infos
    from .hub.self_output import build_self_output

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = build_self_output(build_config_from_args(args, prog))
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            print(
                f"{name}/{split}: {s['rows']} rows ({s['rows_self']} self, {s['rows_ground_truth']} ground truth, "
                f"{s['rows_skipped']} skipped); sample accuracy {fmt_percent(s['sample_accuracy'])}; tokens with "
                f"ppl > {s['threshold']:g}: chosen {fmt_percent(s['chosen']['high_ppl_share'])}, ground truth "
                f"{fmt_percent(s['ground_truth']['high_ppl_share'])}"
            )
    print(f"Built {output} (load it with datasets.load_dataset({str(output)!r}, <config>))")
    return 0


def register_cli(subparsers) -> None:
    """Add `self-output` to the `trl-pplmask` command (defined in `trl_pplmask.self_output_cli`, without torch)."""
    from .self_output_cli import register_cli as register

    register(subparsers)


def main(argv: Sequence[str] | None = None, prog: str = "trl-pplmask self-output") -> int:
    """Entry point of `hub_scripts/build_self_output.py`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = add_self_output_args(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return cmd_self_output(args, prog=prog)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


# Moved to `trl_pplmask.hub.self_output` (the `<task>-self-output` folder), which imports this module: looked up on
# first use
_MOVED = {
    "SelfOutputBuildConfig": "self_output",
    "build_self_output": "self_output",
    "render_self_output_card": "self_output",
    "self_output_statistics": "self_output_stats",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__package__}.hub.{_MOVED[name]}"), name)


__all__ = [
    "GenerationBackend",
    "GenerationCheckpoint",
    "GenerationRequest",
    "REPHRASE_TEMPLATE",
    "Sample",
    "SeededSampler",
    "SelfOutputBuildConfig",
    "SelfOutputConfig",
    "TransformersBackend",
    "VLLMBackend",
    "assemble_dataset",
    "build_self_output",
    "check_vllm_available",
    "completion_token_nll",
    "generate_records",
    "generate_self_outputs",
    "plan_batches",
    "register_cli",
    "select_candidate",
    "self_output_statistics",
]
