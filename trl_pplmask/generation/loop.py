"""The generation loop: plan the batches, then generate, verify and score every row not yet in the checkpoint
([`generate_records`]); [`generate_self_outputs`] then applies the selection rule."""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..constants import ROW_ID_COLUMN
from ..scoring import model_fingerprint
from ..utils import plan_batches
from ..verifiers import Verifier, get_verifier, verify_batch
from .backends import GenerationBackend, check_vllm_available, make_backend
from .checkpoint import GenerationCheckpoint
from .config import SelfOutputConfig
from .prompts import GenerationRequest, make_requests, prepare_rows, row_fingerprint, row_messages
from .scoring import completion_token_nll, encode_nll, sequence_ppl
from .selection import assemble_dataset


logger = logging.getLogger(__name__)


def verifier_name(task: str | Verifier) -> str:
    """How checkpoints and build infos name a verifier: the task name, or the callable's qualified name."""
    if isinstance(task, str):
        return task
    return f"{getattr(task, '__module__', '?')}.{getattr(task, '__qualname__', type(task).__name__)}"


def checkpoint_header(config: SelfOutputConfig, task: str | Verifier, model, scoring_model) -> dict[str, Any]:
    """What the responses depend on, recorded in (and checked against) the checkpoint: sampling settings, verifier,
    and the weights of the generating and scoring models."""
    header = {**config.sampling_settings(), "verifier": verifier_name(task), "model": model_fingerprint(model)[:16]}
    if scoring_model is not model:
        header["scoring_model"] = model_fingerprint(scoring_model)[:16]
    return header


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
                "token_nll": encode_nll(nlls[i * n + k]),
            }
            for k, sample in enumerate(row_samples)
        ]
        gt_nll = nlls[len(texts) + i]
        records.append(
            {
                "row_id": row[ROW_ID_COLUMN],
                "row_hash": row_fingerprint(row),
                "candidates": candidates,
                "ground_truth": {"ppl": sequence_ppl(gt_nll), "token_nll": encode_nll(gt_nll)},
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
    rows = prepare_rows(dataset)
    get_verifier(task)  # unknown task names and missing extras fail before any generation
    if backend is None and config.backend == "vllm":
        check_vllm_available()
    scoring_model = model if scoring_model is None else scoring_model
    scoring_tokenizer = tokenizer if scoring_tokenizer is None else scoring_tokenizer
    header = checkpoint_header(config, task, model, scoring_model)
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
    requests = make_requests(rows, config, tokenizer)
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
