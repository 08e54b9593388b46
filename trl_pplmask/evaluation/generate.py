"""Greedy generation: batched under a token budget with left padding, and the generation tasks' evaluator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..sandbox import SandboxConfig
from ..utils import make_batches
from ..verifiers import CODE_TASKS, verify_batch
from .config import EvalConfig
from .tasks import EvalTask, extract_answer, reference_answer


logger = logging.getLogger(__name__)


def _default_budget(device: torch.device) -> int:
    # CPU matmuls gain little from big padded batches; accelerators need them to be busy
    return 4096 if device.type == "cpu" else 65536


def _generation_batches(lengths: list[int], budget: int, max_batch_size: int) -> list[list[int]]:
    batches = []
    for batch in make_batches(lengths, budget):
        batches.extend(batch[i : i + max_batch_size] for i in range(0, len(batch), max_batch_size))
    return batches


def greedy_generation_config(model: torch.nn.Module, tokenizer, max_new_tokens: int):
    """A fresh greedy `GenerationConfig`: no sampling and none of the checkpoint's sampling defaults, so that every
    model is decoded the same way."""
    from transformers import GenerationConfig  # transformers stays lazy until a model runs

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    max_tokens_per_batch: int | None = None,
    max_batch_size: int = 64,
    show_progress: bool = True,
    desc: str = "Generating",
    return_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Greedy completions of already formatted prompts, batched with left padding under a token budget.

    Args:
        model (`torch.nn.Module`): Causal LM (PEFT models too).
        tokenizer: Its tokenizer; prompts are encoded without adding special tokens (the chat template has them).
        prompts (`Sequence[str]`): Prompt texts.
        max_new_tokens (`int`): Generation budget per prompt.
        max_tokens_per_batch (`int`, *optional*): Budget of a batch (prompt + new tokens, padding included).
        max_batch_size (`int`, *optional*, defaults to `64`): Most prompts per batch.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        desc (`str`, *optional*): Progress bar label.
        return_tokens (`bool`, *optional*, defaults to `False`): Also return the generated token ids (`tokens`, the
            EOS token included when generation stopped there).

    Returns:
        `list[dict]`: per prompt, `output` (text), `new_tokens` and `truncated` (stopped by the budget).
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = max_tokens_per_batch or _default_budget(device)
    batches = _generation_batches([len(e) + max_new_tokens for e in encoded], budget, max_batch_size)
    config = greedy_generation_config(model, tokenizer, max_new_tokens)
    eos = config.eos_token_id
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not show_progress)
    try:
        for batch in batches:
            longest = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), longest), config.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[row, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, longest - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=config
            )
            for row, i in enumerate(batch):
                results[i] = _decode_new(tokenizer, out[row, longest:].tolist(), stop, return_tokens)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results


def _decode_new(tokenizer, tokens: list[int], stop: set[int], return_tokens: bool = False) -> dict[str, Any]:
    end = next((k for k, t in enumerate(tokens) if t in stop), None)
    kept = tokens if end is None else tokens[:end]
    out = {
        "output": tokenizer.decode(kept, skip_special_tokens=True),
        "new_tokens": len(kept) + (end is not None),
        "truncated": end is None,
    }
    if return_tokens:
        out["tokens"] = tokens if end is None else tokens[: end + 1]
    return out


def render_prompts(tokenizer, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows' conversational prompts under the tokenizer's chat template, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no chat template, and the generation tasks use chat "
            "prompts. Use an instruct model, or the log-likelihood tasks (arc_challenge_mc, <task>_nll)."
        )
    return [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]


def evaluate_generation(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label: str):
    """Generate an answer per row and check it with the task's verifier; unparseable answers count as wrong."""
    prompts = render_prompts(tokenizer, rows)
    generations = generate_greedy(
        model,
        tokenizer,
        prompts,
        config.max_new_tokens,
        config.max_tokens_per_batch,
        config.max_batch_size,
        config.show_progress,
        desc=f"{label} {task.name}",
    )
    outputs = [g["output"] for g in generations]
    sandbox = SandboxConfig(timeout=config.code_timeout) if task.name in CODE_TASKS else None
    correct = verify_batch(task.name, rows, outputs, sandbox_config=sandbox)
    items = []
    for row, prompt, generation, ok in zip(rows, prompts, generations, correct):
        extracted = extract_answer(task.name, generation["output"])
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {task.primary: float(ok)},
                "prompt": prompt,
                "output": generation["output"],
                "extracted": extracted,
                "parsed": extracted is not None,
                "reference": reference_answer(task.name, row),
                "new_tokens": generation["new_tokens"],
                "truncated": generation["truncated"],
            }
        )
    unparsed = sum(not item["parsed"] for item in items)
    if unparsed:
        logger.warning(
            "%s: %d of %d outputs of model %r have no parseable answer; they count as wrong.",
            task.name,
            unparsed,
            len(items),
            label,
        )
    stats = {"unparsed": unparsed, "truncated": sum(item["truncated"] for item in items)}
    return items, stats


__all__ = ["evaluate_generation", "generate_greedy", "greedy_generation_config", "render_prompts"]
