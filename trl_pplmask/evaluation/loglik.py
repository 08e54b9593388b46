"""Log-likelihood tasks: multiple choice (`arc_challenge_mc`) and the reference completions' NLL (`<task>_nll`)."""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX
from ..data import tokenize_dataset
from ..lm_head import selected_log_probs, unwrap_causal_lm
from ..scoring import ScoringConfig, batch_token_nll, score_dataset
from ..utils import make_batches
from .config import EvalConfig
from .tasks import MC_CONTEXT_TEMPLATE, EvalTask


logger = logging.getLogger(__name__)


def _encode(tokenizer, text: str) -> list[int]:
    """Tokens of `text` with the BOS token when the tokenizer adds one by default (Llama, Gemma), never an EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos]:
        ids = [bos, *ids]
    return ids


def choice_requests(tokenizer, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One scoring request per (question, choice): the context's and continuation's tokens.

    The continuation's tokens are those of `context + continuation` after the context's own tokens, as in
    lm-evaluation-harness, so that the boundary is tokenized as in running text.
    """
    requests = []
    for item, row in enumerate(rows):
        context = MC_CONTEXT_TEMPLATE.format(question=row["question"])
        context_ids = _encode(tokenizer, context)
        for choice, text in enumerate(row["choices"]["text"]):
            whole = _encode(tokenizer, f"{context} {text}")
            if whole[: len(context_ids)] != context_ids:  # the boundary merged: tokenize the parts separately
                whole = context_ids + tokenizer(f" {text}", add_special_tokens=False)["input_ids"]
            requests.append({"item": item, "choice": choice, "ids": whole, "n_context": len(context_ids)})
    return requests


def _pad_rows(
    rows: Sequence[Sequence[int]], pad_token_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(longest - len(r), longest) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _full_sequence_nll(model, requests: list[dict[str, Any]], batch: list[int], pad_token_id: int) -> list[float]:
    """Each request scored as one sequence with [`~trl_pplmask.scoring.batch_token_nll`] (right padding)."""
    device = next(model.parameters()).device
    ids, attention = _pad_rows([requests[i]["ids"] for i in batch], pad_token_id)
    score = torch.zeros_like(ids)
    for row, i in enumerate(batch):
        score[row, requests[i]["n_context"] : len(requests[i]["ids"])] = 1
    nll = batch_token_nll(model, ids.to(device), attention.to(device), score.to(device)).sum(dim=1)
    return nll.tolist()


def _shared_context_nll(model, requests: list[dict[str, Any]], groups: list[list[int]], pad_token_id: int):
    """Requests grouped by context: each context runs once, its KV cache is copied to its continuations.

    Contexts are left-padded (with explicit position ids) so that every continuation starts right after its
    context; the first continuation token is predicted by the context's last hidden state. The LM head runs only on
    continuation positions, through [`~trl_pplmask.lm_head.selected_log_probs`].
    """
    device = next(model.parameters()).device
    causal_lm = unwrap_causal_lm(model)
    contexts = [requests[g[0]]["ids"][: requests[g[0]]["n_context"]] for g in groups]
    ctx, ctx_mask = (t.to(device) for t in _pad_rows(contexts, pad_token_id, left=True))
    positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = causal_lm.base_model(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True)
    flat = [i for g in groups for i in g]
    owner = torch.tensor([b for b, g in enumerate(groups) for _ in g], device=device)
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before the rename of `past_key_values` to `cache`
        cache = out.past_key_values
    cache.reorder_cache(owner)  # one copy of its context's cache per continuation (beam search's reordering)
    cont, cont_mask = (
        t.to(device) for t in _pad_rows([requests[i]["ids"][requests[i]["n_context"] :] for i in flat], pad_token_id)
    )
    mask = torch.cat([ctx_mask[owner], cont_mask], dim=1)
    positions = ctx_mask.sum(-1)[owner][:, None] + torch.arange(cont.shape[1], device=device)[None]
    cache_kwarg = (
        "cache" if "cache" in inspect.signature(causal_lm.base_model.forward).parameters else "past_key_values"
    )
    hidden = causal_lm.base_model(
        input_ids=cont, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kwarg: cache}
    ).last_hidden_state
    predictors = torch.cat([out.last_hidden_state[:, -1][owner][:, None], hidden[:, :-1]], dim=1)
    valid = cont_mask.bool().to(predictors.device)
    lm_device = causal_lm.get_output_embeddings().weight.device  # differs from the input's with a device map
    log_probs = selected_log_probs(
        causal_lm, predictors[valid].to(lm_device), cont.to(valid.device)[valid].to(lm_device)
    )
    rows = torch.arange(len(flat), device=valid.device)[:, None].expand_as(valid)[valid].to(lm_device)
    nll = torch.zeros(len(flat), dtype=torch.float32, device=lm_device).index_add_(0, rows, -log_probs)
    return dict(zip(flat, nll.tolist()))


def _group_batches(requests: list[dict[str, Any]], groups: list[list[int]], budget: int) -> list[list[int]]:
    """Batches of request groups whose padded size (contexts once, continuations padded to the longest) fits the
    budget. Groups are taken by decreasing longest continuation, which is padded once per choice, so that groups
    with similar continuation lengths share a batch."""
    n_context = [requests[g[0]]["n_context"] for g in groups]
    longest = [max(len(requests[i]["ids"]) - requests[i]["n_context"] for i in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-longest[k], -n_context[k], k))
    batches: list[list[int]] = []
    current: list[int] = []
    max_context = max_continuation = pairs = 0
    for k in order:
        new_context, new_continuation = max(max_context, n_context[k]), max(max_continuation, longest[k])
        new_pairs = pairs + len(groups[k])
        if current and (len(current) + 1) * new_context + new_pairs * new_continuation > budget:
            batches.append(current)
            current, max_context, max_continuation, pairs = [], 0, 0, 0
            new_context, new_continuation, new_pairs = n_context[k], longest[k], len(groups[k])
        current.append(k)
        max_context, max_continuation, pairs = new_context, new_continuation, new_pairs
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def continuation_nll(
    model: torch.nn.Module,
    requests: list[dict[str, Any]],
    pad_token_id: int,
    max_tokens_per_batch: int | None = None,
    show_progress: bool = True,
    desc: str = "Scoring choices",
    share_context: bool = True,
) -> list[float]:
    """Summed NLL of each request's continuation tokens (`ids[n_context:]`) given its context (`ids[:n_context]`).

    With `share_context`, the requests of one `item` (the choices of a question) share one run of their context
    (about 2.5x fewer tokens on ARC-Challenge); models whose cache cannot be reordered fall back to scoring every
    request as a whole sequence with [`~trl_pplmask.scoring.batch_token_nll`]. Both are batched by length under a
    token budget.

    Args:
        model (`torch.nn.Module`): Causal LM (PEFT models too).
        requests (`list[dict]`): From [`choice_requests`]: `item`, `ids`, `n_context`.
        pad_token_id (`int`): Any token id; padded positions are never read.
        max_tokens_per_batch (`int`, *optional*): Budget of a batch; defaults to 2048 on CPU and 32768 on GPU.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar (tokens of the whole sequences).
        desc (`str`, *optional*): Progress bar label.
        share_context (`bool`, *optional*, defaults to `True`): Run each context once for all its continuations.

    Returns:
        `list[float]`: one summed NLL per request, in order.
    """
    device = next(model.parameters()).device
    budget = max_tokens_per_batch or (2048 if device.type == "cpu" else 32768)
    groups: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request["item"] if share_context else i, []).append(i)
    group_list = list(groups.values())
    sums: dict[int, float] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(r["ids"]) for r in requests), desc=desc, unit="tok", disable=not show_progress)
    try:
        for batch in _group_batches(requests, group_list, budget):
            groups_in_batch = [group_list[b] for b in batch]
            flat = [i for g in groups_in_batch for i in g]
            if share_context:
                try:
                    sums.update(_shared_context_nll(model, requests, groups_in_batch, pad_token_id))
                except (AttributeError, TypeError, NotImplementedError, ValueError) as exc:
                    logger.warning("Cannot share contexts (%s: %s); scoring whole sequences.", type(exc).__name__, exc)
                    share_context = False
            if not share_context:
                for sub in make_batches([len(requests[i]["ids"]) for i in flat], budget):
                    chosen = [flat[k] for k in sub]
                    sums.update(zip(chosen, _full_sequence_nll(model, requests, chosen, pad_token_id)))
            bar.update(sum(len(requests[i]["ids"]) for i in flat))
    finally:
        bar.close()
        model.train(was_training)
    return [sums[i] for i in range(len(requests))]


def evaluate_multiple_choice(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label):
    """`acc` and `acc_norm` of log-likelihood multiple choice (ARC-Challenge)."""
    requests = choice_requests(tokenizer, rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nlls = continuation_nll(
        model, requests, pad, config.max_tokens_per_batch, config.show_progress, desc=f"{label} {task.name}"
    )
    per_item: dict[int, list[float]] = {}
    for request, nll in zip(requests, nlls):
        per_item.setdefault(request["item"], []).append(nll)
    items = []
    for index, row in enumerate(rows):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        loglik = -np.array(per_item[index])
        # acc_norm: log-likelihood per character of the choice text, lm-evaluation-harness's normalisation
        normed = loglik / np.array([max(len(t), 1) for t in texts], dtype=np.float64)
        pred, pred_norm = labels[int(np.argmax(loglik))], labels[int(np.argmax(normed))]
        key = str(row["answerKey"]).strip()
        items.append(
            {
                "row_id": row["row_id"],
                "scores": {"acc": float(pred == key), "acc_norm": float(pred_norm == key)},
                "prompt": MC_CONTEXT_TEMPLATE.format(question=row["question"]),
                "choices": [f"{lab}. {text}" for lab, text in zip(labels, texts)],
                "loglik": [float(v) for v in loglik],
                "extracted": pred,
                "extracted_norm": pred_norm,
                "reference": key,
            }
        )
    return items, {"choices": len(requests)}


def evaluate_reference_nll(model, tokenizer, task: EvalTask, rows: list[dict[str, Any]], config: EvalConfig, label):
    """Mean per-token NLL of the reference completions, on exactly the tokens `SFTTrainer` would train on."""
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "row_id": r["row_id"]} for r in rows]
    )
    with tempfile.TemporaryDirectory() as scratch:  # SFTConfig wants an output_dir; nothing is written there
        tokenized = tokenize_dataset(dataset, tokenizer, max_length=config.nll_max_length, output_dir=scratch)
    scoring = ScoringConfig(
        max_tokens_per_batch=config.max_tokens_per_batch,
        use_cache=config.use_cache,
        cache_dir=str(Path(config.cache_dir) / "scores") if config.cache_dir else None,
        show_progress=config.show_progress,
    )
    scored = score_dataset(tokenized, model, tokenizer, scoring)
    by_row = {r["row_id"]: r for r in rows}
    items = []
    for row_id, labels, nll in zip(scored["row_id"], scored["labels"], scored["token_nll"]):
        trained = np.asarray(labels) != IGNORE_INDEX
        n = int(trained.sum())
        total = float(np.asarray(nll, dtype=np.float64)[trained].sum())
        items.append(
            {
                "row_id": row_id,
                "scores": {"nll": total / n if n else 0.0},
                "weight": float(n),
                "prompt": by_row[row_id]["prompt"][-1]["content"],
                "reference": by_row[row_id]["completion"][-1]["content"],
                "tokens": n,
            }
        )
    # SFTTrainer's preparation drops rows left with no completion token (e.g. by truncation); say how many
    return items, {"tokens": sum(item["tokens"] for item in items), "dropped": len(rows) - len(items)}


__all__ = ["choice_requests", "continuation_nll", "evaluate_multiple_choice", "evaluate_reference_nll"]
