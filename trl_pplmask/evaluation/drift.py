"""Drift: how far a fine-tuned model moved away from its base where it was not trained.

`<dataset>_drift` (e.g. `arc_challenge_drift`, `mbpp_drift`) measures, on the base model's **own** greedy answers to
the data set's prompts (the paper's prompts under the chat template), the mean per-token

    KL(base || tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v))

at every answer position (the positions that predict the answer's tokens, its EOS included), and the mean predictive
entropy of the evaluated model there. The base row of a report has KL 0 and the base model's entropy; a fine-tuned
row has its KL from the base and its own entropy (each item also records the base's entropy at the same positions).
Per item, `kl` and `entropy` are token means and the item's weight is its number of answer tokens, so the task's
value is the token-weighted mean and its paired bootstrap intervals work as for `<task>_nll`.

The base answers are generated once per base model (greedy, `EvalConfig.drift_max_new_tokens`, 96 by default) and
cached on disk, keyed by the base model's identity, the rendered prompts and the generation settings. With a PEFT
adapter trained on the report's base, the base distribution comes from the same model with its adapter disabled (no
second copy in memory); a full fine-tuned model is compared with a separately loaded base. The LM heads run only on
answer positions, in row chunks: no float32 `[batch, seq, vocab]` tensor larger than one chunk is built.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..lm_head import backbone_hidden, chunk_rows, head_log_probs, unwrap_causal_lm, vocab_size
from ..models import load_model, load_tokenizer
from ..scoring import adapter_context
from ..utils import atomic_write_text, make_batches
from .cache import eval_cache_root, model_identity
from .config import EvalConfig, ModelSpec
from .generate import generate_greedy, render_prompts
from .tasks import EvalTask


logger = logging.getLogger(__name__)

_ANSWERS_VERSION = "1"
DRIFT_METRICS = ("kl", "entropy")


# --------------------------------------------------------------------------------------------------------------------
# KL and entropy per position
# --------------------------------------------------------------------------------------------------------------------
def kl_and_entropy(
    base_lm,
    tuned_lm,
    base_hidden: torch.Tensor,
    tuned_hidden: torch.Tensor,
    base_context=None,
    tuned_context=None,
    logits_chunk_bytes: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row `KL(base || tuned)`, base entropy and tuned entropy (nats, float32 `[N]`) from final hidden states.

    The LM heads run on row chunks of at most `logits_chunk_bytes` of float32 logits per model. KL is clamped at 0
    (it is non-negative; rounding can make a near-zero value slightly negative).

    Args:
        base_lm, tuned_lm: The causal LMs whose LM heads map the hidden states (the same object for a PEFT model).
        base_hidden, tuned_hidden (`torch.Tensor`): `[N, H]` hidden states at the same N positions.
        base_context, tuned_context: Callables returning a context manager under which each head runs (e.g. the
            PEFT adapter disabled for the base); `None` for none.
        logits_chunk_bytes (`int`, *optional*, defaults to `2**26`): Budget of one chunk's float32 logits.
    """
    base_context = base_context or nullcontext
    tuned_context = tuned_context or nullcontext
    n = base_hidden.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    rows = chunk_rows(base_lm, logits_chunk_bytes)
    kls, base_entropies, tuned_entropies = [], [], []
    for start in range(0, n, rows):
        with base_context():
            log_p = head_log_probs(base_lm, base_hidden[start : start + rows])
        with tuned_context():
            log_q = head_log_probs(tuned_lm, tuned_hidden[start : start + rows]).to(log_p.device)
        p = log_p.exp()
        kls.append((p * (log_p - log_q)).sum(-1).clamp_(min=0.0).cpu())
        base_entropies.append(-(p * log_p).sum(-1).cpu())
        del p
        tuned_entropies.append(-(log_q.exp() * log_q).sum(-1).cpu())
        del log_p, log_q
    return torch.cat(kls), torch.cat(base_entropies), torch.cat(tuned_entropies)


@torch.no_grad()
def token_drift(
    model: torch.nn.Module,
    base_model: torch.nn.Module | None,
    sequences: list[list[int]],
    n_prompt: list[int],
    max_tokens_per_batch: int | None = None,
    pad_token_id: int = 0,
    logits_chunk_bytes: int = 2**26,
    show_progress: bool = False,
    desc: str = "Drift",
) -> list[dict[str, np.ndarray]]:
    """KL(base || model) and both entropies at every position that predicts a token after the prompt.

    Args:
        model (`torch.nn.Module`): The evaluated model (transformers or PEFT).
        base_model (`torch.nn.Module`, *optional*): The reference. `None` compares `model` with itself (KL 0, one
            forward pass); `model` itself, when it is a PEFT model, means "`model` with its adapter disabled".
        sequences (`list[list[int]]`): Token ids, prompt then answer.
        n_prompt (`list[int]`): Prompt length of each sequence (`>= 1`); its answer is `sequences[i][n_prompt[i]:]`.
        max_tokens_per_batch (`int`, *optional*): Padded tokens per forward batch; 2048 on CPU, 32768 otherwise.
        pad_token_id (`int`, *optional*): Any id; padded positions are never read.
        logits_chunk_bytes (`int`, *optional*): Budget of one chunk of float32 logits per model.
        show_progress (`bool`, *optional*): Show a progress bar.
        desc (`str`, *optional*): Its label.

    Returns:
        `list[dict]`: per sequence, float32 arrays `kl`, `base_entropy`, `entropy` with one value per answer token.
    """
    if any(k < 1 for k in n_prompt):
        raise ValueError("Every sequence needs at least one prompt token before its answer.")
    same_object = base_model is model
    if base_model is not None and not same_object:
        vocab, base_vocab = vocab_size(model), vocab_size(base_model)
        if vocab != base_vocab:
            raise ValueError(
                f"The model's vocabulary ({vocab}) differs from the base model's ({base_vocab}); drift needs both to "
                "score the same tokens. Compare models that share the base's tokenizer."
            )
    if same_object and not hasattr(model, "disable_adapter"):
        base_model = None  # a plain model against itself
    device = next(model.parameters()).device
    budget = max_tokens_per_batch or (2048 if device.type == "cpu" else 32768)
    results: list[dict[str, np.ndarray] | None] = [None] * len(sequences)
    models = [m for m in (model, base_model) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    bar = tqdm(total=sum(map(len, sequences)), desc=desc, unit="tok", disable=not show_progress)
    try:
        for batch in make_batches([len(s) for s in sequences], budget):
            longest = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), longest), dtype=torch.long)
            predicts = torch.zeros((len(batch), longest - 1), dtype=torch.bool)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
                attention[row, : len(sequences[i])] = 1
                predicts[row, n_prompt[i] - 1 : len(sequences[i]) - 1] = True  # position t predicts token t + 1
            ids, attention = ids.to(device), attention.to(device)
            tuned_hidden = backbone_hidden(model, ids, attention)[:, :-1][predicts.to(device)]
            tuned_lm = unwrap_causal_lm(model)
            if base_model is None:
                base_hidden, base_lm, base_context = tuned_hidden, tuned_lm, None
            else:
                base_context = (lambda: adapter_context(model, True)) if same_object else None
                with base_context() if base_context else nullcontext():
                    base_device = next(base_model.parameters()).device
                    hidden = backbone_hidden(base_model, ids.to(base_device), attention.to(base_device))
                    base_hidden = hidden[:, :-1][predicts.to(base_device)]
                base_lm = unwrap_causal_lm(base_model)
            kl, base_entropy, entropy = kl_and_entropy(
                base_lm, tuned_lm, base_hidden, tuned_hidden, base_context, None, logits_chunk_bytes
            )
            if base_model is None:
                kl = torch.zeros_like(kl)  # the same distribution: exactly 0
            counts = predicts.sum(dim=1).tolist()
            offsets = np.cumsum([0, *counts])
            for row, i in enumerate(batch):
                span = slice(int(offsets[row]), int(offsets[row + 1]))
                results[i] = {
                    "kl": kl[span].numpy(),
                    "base_entropy": base_entropy[span].numpy(),
                    "entropy": entropy[span].numpy(),
                }
            bar.update(sum(len(sequences[i]) for i in batch))
    finally:
        bar.close()
        for m, training in zip(models, was_training):
            m.train(training)
    return results


# --------------------------------------------------------------------------------------------------------------------
# The base model's answers, generated once and cached
# --------------------------------------------------------------------------------------------------------------------
def answers_cache_key(base_identity: str, prompts: list[str], settings: dict[str, Any]) -> str:
    """Key of the cached base answers: the base model's identity, the rendered prompts and the generation settings."""
    payload = [_ANSWERS_VERSION, base_identity, hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), settings]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def read_cached_answers(cache_path: Path | None, n: int) -> list[dict[str, Any]] | None:
    """The cached answers at `cache_path` when it holds `n` of them; `None` otherwise (a corrupt file is a miss)."""
    if cache_path is None or not cache_path.is_file():
        return None
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, list) and len(cached) == n else None


def base_answers(
    base_model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    config: EvalConfig,
    cache_path: Path | None,
    use_adapter_disabled: bool = False,
    desc: str = "Base answers",
) -> tuple[list[dict[str, Any]], bool]:
    """The base model's greedy answers (`prompt_ids`, `answer_ids` with EOS when it stopped, `output`, `truncated`),
    read from `cache_path` when it holds them, else generated and written there. Returns `(answers, from_cache)`.

    Args:
        base_model (`torch.nn.Module`): The base model, or a PEFT model run with its adapter disabled.
        tokenizer: Its tokenizer.
        prompts (`list[str]`): Rendered prompts.
        config (`EvalConfig`): Generation settings (`drift_max_new_tokens`, batch budgets).
        cache_path (`Path`, *optional*): JSON file of the cached answers; `None` disables the cache.
        use_adapter_disabled (`bool`, *optional*): Generate with the PEFT adapter of `base_model` disabled.
        desc (`str`, *optional*): Progress bar label.
    """
    cached = read_cached_answers(cache_path, len(prompts))
    if cached is not None:
        return cached, True
    with adapter_context(base_model, use_adapter_disabled):
        generations = generate_greedy(
            base_model,
            tokenizer,
            prompts,
            config.drift_max_new_tokens,
            config.max_tokens_per_batch,
            config.max_batch_size,
            config.show_progress,
            desc=desc,
            return_tokens=True,
        )
    answers = [
        {
            "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
            "answer_ids": g["tokens"],
            "output": g["output"],
            "truncated": g["truncated"],
        }
        for prompt, g in zip(prompts, generations)
    ]
    if cache_path is not None:
        atomic_write_text(cache_path, json.dumps(answers))
    return answers, False


# --------------------------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------------------------
def _shares_base_weights(spec: ModelSpec, base_spec: ModelSpec) -> bool:
    """Whether `spec` is a PEFT adapter on the report's base model (so that disabling it gives the base)."""
    return spec.adapter is not None and base_spec.adapter is None and spec.name_or_path == base_spec.name_or_path


def drift_settings(config: EvalConfig, device: str) -> dict[str, Any]:
    """The settings the base answers depend on (part of their cache key)."""
    return {
        "max_new_tokens": config.drift_max_new_tokens,
        "dtype": config.dtype,
        "device": device,
        "max_tokens_per_batch": config.max_tokens_per_batch,
        "max_batch_size": config.max_batch_size,
    }


def evaluate_drift(
    model: torch.nn.Module,
    tokenizer,
    task: EvalTask,
    rows: list[dict[str, Any]],
    config: EvalConfig,
    spec: ModelSpec,
    base_spec: ModelSpec,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-item drift of `model` (described by `spec`) from the report's base model `base_spec` on `rows`.

    Returns the items (`scores` `kl` and `entropy`, `weight` = answer tokens, `base_entropy`, the prompt and the base
    answer) and statistics (`tokens`, `truncated` base answers, `answers_cached`, `base` = how the base was obtained).
    """
    device = str(next(model.parameters()).device)
    is_base = spec.is_base or spec == base_spec
    shares = _shares_base_weights(spec, base_spec)
    base_model, loaded = None, None
    if is_base:
        base_model, how = model, "itself"
        base_tokenizer = tokenizer
    elif shares:
        base_model, how = model, "adapter disabled"
        base_tokenizer = tokenizer
    else:
        base_tokenizer = load_tokenizer(base_spec.name_or_path)
        how = "loaded separately"
    prompts = render_prompts(base_tokenizer, rows)
    cache_path = None
    if config.use_cache:
        key = answers_cache_key(model_identity(base_spec), prompts, drift_settings(config, device))
        cache_path = eval_cache_root(config) / "drift_answers" / f"{key}.json"
    try:
        answers = read_cached_answers(cache_path, len(prompts))
        from_cache = answers is not None
        if base_model is None:
            loaded, _ = load_model(
                base_spec.name_or_path, adapter=base_spec.adapter, dtype=config.dtype, device=device
            )
            base_model = loaded
        if answers is None:
            answers, from_cache = base_answers(
                base_model,
                base_tokenizer,
                prompts,
                config,
                cache_path,
                use_adapter_disabled=shares,
                desc=f"{base_spec.label} answers for {task.name}",
            )
        sequences = [a["prompt_ids"] + a["answer_ids"] for a in answers]
        n_prompt = [len(a["prompt_ids"]) for a in answers]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        per_token = token_drift(
            model,
            None if is_base else base_model,
            sequences,
            n_prompt,
            config.max_tokens_per_batch,
            pad,
            show_progress=config.show_progress,
            desc=f"{spec.label} {task.name}",
        )
    finally:
        if loaded is not None:
            del loaded, base_model
            gc.collect()
    items = []
    for row, prompt, answer, values in zip(rows, prompts, answers, per_token):
        n = len(values["kl"])
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {
                    "kl": float(values["kl"].astype(np.float64).mean()),
                    "entropy": float(values["entropy"].astype(np.float64).mean()),
                },
                "weight": float(n),
                "base_entropy": float(values["base_entropy"].astype(np.float64).mean()),
                "tokens": n,
                "prompt": prompt,
                "base_answer": answer["output"],
                "truncated": answer["truncated"],
            }
        )
    stats = {
        "tokens": sum(item["tokens"] for item in items),
        "truncated": sum(item["truncated"] for item in items),
        "answers_cached": from_cache,
        "base": how,
    }
    return items, stats


__all__ = [
    "DRIFT_METRICS",
    "answers_cache_key",
    "base_answers",
    "evaluate_drift",
    "kl_and_entropy",
    "read_cached_answers",
    "token_drift",
]
