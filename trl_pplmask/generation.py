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
import datetime
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from .data import ROW_ID_COLUMN
from .masking import IGNORE_INDEX, NLL_COLUMN
from .models import EMBEDDED_MODEL_ALIAS, model_slug
from .self_output_cli import BACKENDS, FALLBACKS, MODES, SELECTIONS, add_self_output_args
from .utils import make_staging_dir
from .verifiers import Verifier, get_verifier, verify_batch


logger = logging.getLogger(__name__)

SOURCE_SELF = "self"
SOURCE_GROUND_TRUTH = "ground_truth"
CHECKPOINT_FORMAT = "trl-pplmask-self-output-checkpoint"
CHECKPOINT_VERSION = 1
DATASET_KIND = "self-output"
CARD_TEMPLATE = "self_output.md.jinja"

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
# Statistics (what the card reports, computed from the stored columns)
# --------------------------------------------------------------------------------------------------------------------


def _token_stats(nlls: Sequence[Sequence[float]], threshold: float) -> dict[str, Any]:
    flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in nlls]) if len(nlls) else np.zeros(0)
    ppl = np.exp(flat)
    return {
        "sequences": len(nlls),
        "tokens": int(flat.size),
        "high_ppl_tokens": int(np.sum(ppl > threshold)),
        "high_ppl_share": float(np.mean(ppl > threshold)) if flat.size else float("nan"),
        "median_token_ppl": float(np.median(ppl)) if flat.size else float("nan"),
        "mean_token_nll": float(np.mean(flat)) if flat.size else float("nan"),
    }


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def self_output_statistics(
    dataset: Dataset, threshold: float = 2.5, skipped: dict[str, int] | None = None
) -> dict[str, Any]:
    """Statistics of a self-output dataset, as its card shows them.

    Computed from the stored columns, so the card always agrees with the files; `skipped` adds the rows a `skip`
    fallback left out (their candidates count towards the sample accuracy).

    Args:
        dataset (`Dataset`): Output of [`generate_self_outputs`].
        threshold (`float`, *optional*, defaults to `2.5`): Token perplexity counted as high (the paper's STM value).
        skipped (`dict`, *optional*): Counts `rows`, `candidates`, `correct`, `truncated`, `rows_with_correct` of
            skipped rows.
    """
    skipped = {"rows": 0, "candidates": 0, "correct": 0, "truncated": 0, "rows_with_correct": 0, **(skipped or {})}
    candidates = dataset["candidates"]
    sources = dataset["source"]
    num_correct = dataset["num_correct"]
    samples = sum(len(c) for c in candidates) + skipped["candidates"]
    correct = sum(num_correct) + skipped["correct"]
    self_rows = [i for i, s in enumerate(sources) if s == SOURCE_SELF]
    chosen_nll, gt_nll = dataset["chosen_token_nll"], dataset["ground_truth_token_nll"]
    chosen_ppl, gt_ppl = dataset["chosen_ppl"], dataset["ground_truth_ppl"]
    return {
        "rows_generated": len(dataset) + skipped["rows"],
        "rows": len(dataset),
        "samples": samples,
        "correct_samples": correct,
        "sample_accuracy": correct / samples if samples else float("nan"),
        "truncated_samples": sum(c["truncated"] for row in candidates for c in row) + skipped["truncated"],
        "rows_with_correct": sum(n > 0 for n in num_correct) + skipped["rows_with_correct"],
        "rows_self": len(self_rows),
        "rows_ground_truth": sum(s == SOURCE_GROUND_TRUTH for s in sources),
        "rows_skipped": skipped["rows"],
        "threshold": threshold,
        "chosen": {**_token_stats(chosen_nll, threshold), "median_seq_ppl": _median(chosen_ppl)},
        "self_only": {
            **_token_stats([chosen_nll[i] for i in self_rows], threshold),
            "median_seq_ppl": _median([chosen_ppl[i] for i in self_rows]),
        },
        "ground_truth_same_rows": {
            **_token_stats([gt_nll[i] for i in self_rows], threshold),
            "median_seq_ppl": _median([gt_ppl[i] for i in self_rows]),
        },
        "ground_truth": {**_token_stats(gt_nll, threshold), "median_seq_ppl": _median(gt_ppl)},
        # Every sample, correct or not (sequence perplexities only: per-token NLLs are kept for the chosen response)
        "all_samples": {
            "sequences": sum(len(c) for c in candidates),
            "median_seq_ppl": _median([c["ppl"] for row in candidates for c in row if math.isfinite(c["ppl"])]),
        },
    }


def plot_ppl_comparison(dataset: Dataset, threshold: float, path: Path, title: str) -> None:
    """Figure of the card: token-perplexity distributions of the chosen responses and of the ground truth (left), and
    each row's chosen-response perplexity against its ground truth's (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def token_ppl(nlls):
        flat = [np.asarray(x, dtype=np.float64) for x in nlls]
        return np.exp(np.concatenate(flat)) if flat else np.zeros(0)

    chosen, truth = token_ppl(dataset["chosen_token_nll"]), token_ppl(dataset["ground_truth_token_nll"])
    fig = Figure(figsize=(10, 3.8), dpi=110)
    FigureCanvasAgg(fig)  # Figure + Agg directly: no pyplot global state, no display needed
    ax_tok, ax_row = fig.subplots(1, 2)
    both = np.concatenate([chosen, truth])
    # A few tokens reach perplexities of 1e6 and more: the last bin collects everything above the 99th percentile
    top = max(threshold * 4, float(np.percentile(both, 99)) if both.size else 1.0)
    bins = np.geomspace(1.0, top, 40)
    for values, label, color in ((truth, "ground truth", "#C44E52"), (chosen, "chosen responses", "#4C72B0")):
        if values.size:
            share = 100 * float(np.mean(values > threshold))
            ax_tok.hist(
                np.clip(values, 1.0, top), bins=bins, weights=np.full(values.size, 1 / values.size),
                histtype="stepfilled", alpha=0.45, color=color, label=f"{label}: {share:.1f}% > {threshold:g}",
            )  # fmt: skip
    ax_tok.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax_tok.set_xscale("log")
    ax_tok.set_xlim(1.0, top)
    ax_tok.set_xlabel(f"token perplexity exp(NLL), log scale (last bin: >= {top:.3g})")
    ax_tok.set_ylabel("share of completion tokens")
    ax_tok.set_title("Completion tokens", fontsize=10)
    ax_tok.legend(loc="upper right", fontsize=8)

    truth_seq = np.asarray(dataset["ground_truth_ppl"], dtype=np.float64)
    chosen_seq = np.asarray(dataset["chosen_ppl"], dtype=np.float64)
    is_self = np.asarray(dataset["source"]) == SOURCE_SELF
    ax_row.scatter(truth_seq[is_self], chosen_seq[is_self], s=14, color="#4C72B0", label="self-generated")
    ax_row.scatter(
        truth_seq[~is_self], chosen_seq[~is_self], s=14, color="#C44E52", marker="x", label="ground truth kept"
    )
    finite = np.concatenate([truth_seq, chosen_seq])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        ax_row.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1)
    ax_row.set_xlabel("ground-truth sequence perplexity")
    ax_row.set_ylabel("chosen response's sequence perplexity")
    ax_row.set_title("Rows (below the diagonal: the chosen response is less surprising)", fontsize=10)
    ax_row.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------------------------------
# Hub-layout folder `<task>-self-output`
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SelfOutputBuildConfig:
    """Settings of [`build_self_output`]: which data and models, how to generate, where to write.

    Args:
        dataset (`str`):
            A task name (`gsm8k`, `mbpp`, `math`, `arc_challenge`, `humaneval`), or a local file/folder or Hub id of
            TRL conversational prompt/completion data (then pass `verifier`).
        output_dir (`str`, *optional*):
            Folder to write; defaults to `<dataset name>-self-output`. An existing self-output folder of the same
            data keeps its other configs.
        models (`list[str]`, *optional*, defaults to `["smollm2-135m-instruct"]`):
            Generating models (Hub ids, local paths or the embedded alias): one config per model.
        config_names (`list[str]`, *optional*):
            Config name per model; defaults to the slug of the model name.
        split (`str`, *optional*, defaults to `"train"`):
            Source split to generate for (written as the config's split of the same name).
        dataset_config (`str`, *optional*):
            Config of a Hub dataset.
        limit (`int`, *optional*):
            Only the first `limit` rows.
        verifier (`str`, *optional*):
            Task verifier name, or `module:function` naming a callable `(row, response) -> bool`. Defaults to the
            task's own verifier.
        generation (`SelfOutputConfig`, *optional*):
            Sampling, selection and backend settings (its `checkpoint_path` is set per model).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype of the models.
        ppl_threshold (`float`, *optional*, defaults to `2.5`):
            Token perplexity the card counts as high (the paper's STM threshold).
        checkpoint_dir (`str`, *optional*):
            Where the per-model JSONL checkpoints live; defaults to `<output_dir>-checkpoints` next to the folder (not
            inside it, so that a push does not upload them). Rerunning the same command resumes from them.
        max_shard_size (`int` or `str`, *optional*, defaults to `"500MB"`):
            Largest parquet shard.
        repo_id (`str`, *optional*):
            Hub repo the folder is meant for (usage snippets, default of `trl-pplmask push`).
        pretty_name (`str`, *optional*):
            Card title.
        license (`str`, *optional*):
            License of the source data (known for the tasks).
        language (`list[str]`, *optional*, defaults to `["en"]`):
            Languages, for the card metadata.
        template_path (`str`, *optional*):
            Jinja card template; defaults to `trl_pplmask/cards/self_output.md.jinja`.
        command (`str`, *optional*):
            Command line that ran the build, recorded in the card.
    """

    dataset: str
    output_dir: str | None = None
    models: list[str] = field(default_factory=lambda: [EMBEDDED_MODEL_ALIAS])
    config_names: list[str] | None = None
    split: str = "train"
    dataset_config: str | None = None
    limit: int | None = None
    verifier: str | None = None
    generation: SelfOutputConfig = field(default_factory=SelfOutputConfig)
    dtype: str = "auto"
    ppl_threshold: float = 2.5
    checkpoint_dir: str | None = None
    max_shard_size: int | str = "500MB"
    repo_id: str | None = None
    pretty_name: str | None = None
    license: str | None = None
    language: list[str] = field(default_factory=lambda: ["en"])
    template_path: str | None = None
    command: str | None = None

    def __post_init__(self):
        from datasets.utils.py_utils import convert_file_size_to_int

        from .data import check_dataset_spec

        check_dataset_spec(self.dataset)  # a misspelt task or a missing file, before the verifier is looked up
        if not self.models:
            raise ValueError("models is empty: name at least one generating model.")
        if self.config_names is not None and len(self.config_names) != len(self.models):
            raise ValueError(f"config_names has {len(self.config_names)} entries for {len(self.models)} models.")
        names = self.resolved_config_names()
        for name in names:
            if not name or name in ("assets", ".", "..") or "/" in name or name.startswith("."):
                raise ValueError(f"Invalid config name {name!r}: use a slug such as 'smollm2-135m-instruct'.")
        if len(set(names)) != len(names):
            raise ValueError(f"Several models map to the same config name in {names}; pass distinct config_names.")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if not math.isfinite(self.ppl_threshold) or not self.ppl_threshold > 1.0:
            raise ValueError(
                f"ppl_threshold must be a finite value above 1 (perplexities are >= 1), got {self.ppl_threshold}."
            )
        if self.verifier is None:
            from .verifiers import VERIFIERS

            if self.dataset not in VERIFIERS:
                raise ValueError(
                    f"No built-in verifier for {self.dataset!r}: pass verifier='module:function' (--verifier) naming "
                    "a callable (row, response) -> bool."
                )
        self.max_shard_size_bytes = convert_file_size_to_int(self.max_shard_size)

    def resolved_config_names(self) -> list[str]:
        return list(self.config_names) if self.config_names is not None else [model_slug(m) for m in self.models]

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir).expanduser()
        from .hub import source_short_name

        return Path(f"{source_short_name(self.dataset)}-self-output")

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir).expanduser()
        output = self.resolved_output_dir()
        return output.parent / f"{output.name}-checkpoints"

    def resolved_verifier(self) -> str | Verifier:
        return resolve_verifier(self.verifier or self.dataset)


def resolve_verifier(spec: str | Verifier) -> str | Verifier:
    """A task name stays a name; `module:function` is imported (the callable must take `(row, response)`)."""
    if callable(spec) or ":" not in spec:
        return spec
    module_name, _, attribute = spec.partition(":")
    try:
        verifier = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import the verifier {spec!r}: {err}.") from err
    if not callable(verifier):
        raise ValueError(f"Verifier {spec!r} is not callable.")
    return verifier


def _load_source(config: SelfOutputBuildConfig) -> Dataset:
    from .data import TASKS, load_any_dataset, load_task

    if config.dataset in TASKS:
        return load_task(config.dataset, config.split, config.limit)
    return load_any_dataset(config.dataset, config.split, config.dataset_config, config.limit)


def _describe_source(config: SelfOutputBuildConfig) -> dict[str, Any]:
    from .hub import BuildConfig, describe_source

    described = describe_source(BuildConfig(dataset=config.dataset, license=config.license))
    return {**described, "hub_config": config.dataset_config or described.get("hub_config"), "split": config.split}


def build_self_output(config: SelfOutputBuildConfig) -> Path:
    """Generate self-output (or rephrase) data with each model and write a `<task>-self-output` Hub-layout folder.

    Layout (like the `-pplmasked` folders of [`~trl_pplmask.hub.build_pplmasked`], so `load_dataset(folder, config)`,
    `trl sft` and `trl-pplmask push` use it unchanged):

    ```
    gsm8k-self-output/
      README.md                              card: YAML configs, settings, statistics, figure, usage, citation
      assets/<config>-ppl-hist.png           token perplexity: chosen responses vs ground truth
      <config>/<split>-0000i-of-0000n.parquet
      <config>/build_info.json               what the card is rendered from
    ```

    Generation resumes from the checkpoints in `checkpoint_dir`. Results are staged and moved into the folder only
    when every model is done, so a failure leaves an existing folder as it was.

    Args:
        config (`SelfOutputBuildConfig`): What to build.

    Returns:
        `Path`: the output folder.
    """
    from .hub import (
        ASSETS_DIR,
        card_template_path,
        check_existing_folder,
        commit_staging,
        release_accelerator_memory,
    )
    from .models import load_model

    output = config.resolved_output_dir()
    source = _describe_source(config)
    check_existing_folder(output, source, DATASET_KIND, "self-output")
    dataset = _load_source(config)
    _prepare_rows(dataset)  # malformed rows fail before any model is loaded
    verifier = config.resolved_verifier()
    get_verifier(verifier)
    if config.generation.backend == "vllm":
        check_vllm_available()  # before any model is loaded
    template_path = card_template_path(config.template_path, CARD_TEMPLATE)
    names = config.resolved_config_names()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output)
    try:
        (staging / ASSETS_DIR).mkdir()
        for index, (name, config_name) in enumerate(zip(config.models, names)):
            logger.info("[%d/%d] generating with %s -> config %s", index + 1, len(names), name, config_name)
            model, tokenizer = load_model(name, dtype=config.dtype)
            _build_config(model, tokenizer, name, config_name, dataset, verifier, config, source, staging)
            del model
            release_accelerator_memory()
        commit_staging(staging, output, names)
        render_self_output_card(output, template_path=template_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _build_config(
    model,
    tokenizer,
    name: str,
    config_name: str,
    dataset: Dataset,
    verifier: str | Verifier,
    config: SelfOutputBuildConfig,
    source: dict[str, Any],
    staging: Path,
) -> dict[str, Any]:
    """Generate with one model and stage `<config>/` (parquet, build info) and its figure."""
    from .hub import (
        ASSETS_DIR,
        BUILD_INFO_FILE,
        atomic_write_text,
        build_versions,
        describe_model,
        write_parquet_shards,
    )

    checkpoint = config.resolved_checkpoint_dir() / f"{config_name}-{config.split}.jsonl"
    generation = SelfOutputConfig(**{**asdict(config.generation), "checkpoint_path": str(checkpoint)})
    if generation.backend == "vllm" and generation.vllm_model is None:
        from .models import resolve_model_path

        generation.vllm_model = resolve_model_path(name)
    logger.info("checkpoint: %s (rerun the same command to resume)", checkpoint)
    rows, records = generate_records(dataset, model, tokenizer, verifier, generation)
    built, skipped = assemble_dataset(rows, records, generation, dataset.features)
    if len(built) == 0:
        raise ValueError(
            f"Every one of the {len(rows)} rows had no correct response, so fallback='skip' left nothing. The "
            f"responses are kept in {checkpoint}: rerun with fallback ground_truth (--fallback ground_truth) to "
            "build from them without generating again."
        )
    directory = staging / config_name
    directory.mkdir()
    files = write_parquet_shards(built, directory, config.split, config.max_shard_size_bytes)
    download_size = sum((directory / f).stat().st_size for f in files)
    stats = self_output_statistics(built, config.ppl_threshold, skipped)
    histogram = f"{ASSETS_DIR}/{config_name}-ppl-hist.png"
    plot_ppl_comparison(
        built, config.ppl_threshold, staging / histogram, f"{source['dataset']}: {name} ({generation.mode})"
    )
    settings = asdict(generation)
    for key in ("checkpoint_path", "show_progress", "verify_workers", "score_max_tokens_per_batch"):
        settings.pop(key)
    if settings["backend"] != "vllm":
        for key in ("tensor_parallel_size", "vllm_model", "vllm_gpu_memory_utilization"):
            settings.pop(key)
    info = {
        "kind": DATASET_KIND,
        "config_name": config_name,
        **describe_model(name, model, tokenizer),
        "source": source,
        "verifier": _verifier_name(verifier),
        "generation": settings,
        "settings": {
            "repo_id": config.repo_id,
            "pretty_name": config.pretty_name,
            "language": config.language,
            "limit": config.limit,
            "dtype": config.dtype,
            "ppl_threshold": config.ppl_threshold,
        },
        "splits": {config.split: {"files": [f"{config_name}/{f}" for f in files], "stats": stats}},
        "dataset_info": dataset_info_yaml(built, config_name, config.split, download_size),
        "histogram": histogram,
        "versions": build_versions(),
        "command": config.command,
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    atomic_write_text(directory / BUILD_INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


def dataset_info_yaml(dataset: Dataset, config_name: str, split: str, download_size: int) -> dict[str, Any]:
    """The card's `dataset_info` entry of a config (features, split sizes), as `Dataset.push_to_hub` writes it.

    Besides documenting the schema, it keeps `load_dataset` honest: `datasets` caches a local folder under its name
    and a hash of the card's YAML, not of the files, so without sizes in the YAML a rebuilt folder of the same name
    would load the previous build's cached rows.
    """
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=dataset.data.nbytes, num_examples=len(dataset)))
    info = DatasetInfo(
        features=dataset.features,
        config_name=config_name,
        splits=splits,
        download_size=download_size,
        dataset_size=dataset.data.nbytes,
    )
    card_data = DatasetCardData()
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)
    return card_data["dataset_info"]


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _num(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def card_rows(infos: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The card's tables, formatted: generation outcome and perplexity comparison per config and split."""
    outcome, perplexity = [], []
    for name, info in sorted(infos.items()):
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            outcome.append(
                {
                    "config": name,
                    "split": split,
                    "rows": f"{s['rows']:,}",
                    "rows_generated": f"{s['rows_generated']:,}",
                    "samples": f"{s['samples']:,}",
                    "correct": f"{s['correct_samples']:,}",
                    "accuracy": _pct(s["sample_accuracy"]),
                    "truncated": f"{s['truncated_samples']:,}",
                    "self": f"{s['rows_self']:,}",
                    "ground_truth": f"{s['rows_ground_truth']:,}",
                    "skipped": f"{s['rows_skipped']:,}",
                }
            )
            for key, label in (
                ("chosen", "chosen responses (all rows)"),
                ("self_only", "self-generated responses"),
                ("ground_truth_same_rows", "ground truth, same rows"),
                ("ground_truth", "ground truth (all rows)"),
                ("all_samples", "every sampled response, correct or not"),
            ):
                t = s[key]
                perplexity.append(
                    {
                        "config": name,
                        "split": split,
                        "what": label,
                        "sequences": f"{t['sequences']:,}",
                        "tokens": f"{t['tokens']:,}" if "tokens" in t else "n/a",
                        "high_share": _pct(t.get("high_ppl_share")),
                        "median_token_ppl": _num(t.get("median_token_ppl")),
                        "median_seq_ppl": _num(t["median_seq_ppl"]),
                    }
                )
    return {"outcome": outcome, "perplexity": perplexity}


def render_self_output_card(folder: str | Path, template_path: str | Path | None = None):
    """Render `README.md` of a self-output folder from the build info of all its configs, and save it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .hub import (
        PAPER_ARXIV_ID,
        atomic_write_text,
        card_configs,
        card_template_path,
        default_config_name,
        read_build_infos,
        size_category,
        source_short_name,
    )

    folder = Path(folder)
    infos = read_build_infos(folder)
    if not infos:
        raise ValueError(f"{folder} holds no built config; run `trl-pplmask self-output` first.")
    latest = max(infos.values(), key=lambda info: info["built_at"])
    source, settings = latest["source"], latest["settings"]
    name = source_short_name(source["dataset"])
    repo_id = settings.get("repo_id") or f"your-org/{folder.resolve().name}"
    modes = sorted({info["generation"]["mode"] for info in infos.values()})
    pretty_name = settings.get("pretty_name") or f"{name} ({' / '.join(modes)} data)"
    largest = max(sum(s["stats"]["rows"] for s in info["splits"].values()) for info in infos.values())
    card_data = DatasetCardData(
        license=source["license"],
        language=settings.get("language") or ["en"],
        task_categories=["text-generation"],
        tags=list(dict.fromkeys(["trl", "sft", *modes, "self-distillation", "catastrophic-forgetting", name])),
        size_categories=[size_category(largest)],
        source_datasets=[source["hub_id"]] if source.get("hub_id") else ["original"],
        pretty_name=pretty_name,
        configs=card_configs(infos, default_config_name(folder, infos)),
        dataset_info=[infos[c]["dataset_info"] for c in sorted(infos) if "dataset_info" in infos[c]],
    )
    first = sorted(infos)[0]
    card = DatasetCard.from_template(
        card_data,
        template_path=str(card_template_path(template_path, CARD_TEMPLATE)),
        repo_id=repo_id,
        title=pretty_name,
        source=source,
        source_name=name,
        builds=[infos[c] for c in sorted(infos)],
        tables=card_rows(infos),
        example=infos[first],
        example_split=next(iter(infos[first]["splits"])),
        threshold=latest["settings"]["ppl_threshold"],
        arxiv_id=PAPER_ARXIV_ID,
    )
    atomic_write_text(folder / "README.md", str(card))
    return card


# --------------------------------------------------------------------------------------------------------------------
# Command line: `trl-pplmask self-output` and hub_scripts/build_self_output.py
# --------------------------------------------------------------------------------------------------------------------


def build_config_from_args(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> SelfOutputBuildConfig:
    """The [`SelfOutputBuildConfig`] of parsed `add_self_output_args` arguments."""
    from .hub import command_line

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
        dataset=args.dataset,
        output_dir=args.output_dir,
        models=list(args.models),
        config_names=args.config_names,
        split=args.split,
        dataset_config=args.dataset_config,
        limit=args.limit,
        verifier=args.verifier,
        generation=generation,
        dtype=args.dtype,
        ppl_threshold=args.ppl_threshold,
        checkpoint_dir=args.checkpoint_dir,
        max_shard_size=args.max_shard_size,
        repo_id=args.repo_id,
        pretty_name=args.pretty_name,
        license=args.license,
        language=list(args.language),
        template_path=args.card_template,
        command=command_line(args, prog),
    )


def cmd_self_output(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> int:
    """Run a build from parsed arguments and print a summary per config."""
    from .hub import read_build_infos

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = build_self_output(build_config_from_args(args, prog))
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            print(
                f"{name}/{split}: {s['rows']} rows ({s['rows_self']} self, {s['rows_ground_truth']} ground truth, "
                f"{s['rows_skipped']} skipped); sample accuracy {_pct(s['sample_accuracy'])}; tokens with ppl > "
                f"{s['threshold']:g}: chosen {_pct(s['chosen']['high_ppl_share'])}, ground truth "
                f"{_pct(s['ground_truth']['high_ppl_share'])}"
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
