"""Generation backends: batched `transformers` generation with per-sequence seeded sampling, and vLLM."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..models import resolve_model_path
from .config import SelfOutputConfig
from .prompts import GenerationRequest


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
