"""Anchored STM: the tokens the mask drops keep the base model's prediction instead of leaving the loss.

Plain STM removes a high-perplexity ground-truth token from the loss, which leaves the model free to move its
prediction there in any direction; measured on the embedded model, it moves toward over-confidence (see the
forgetting-study issue). The anchored objective asks the model to keep the frozen base model's distribution at those
positions, in the spirit of anchored fine-tuning (ASFT, arXiv 2509.23753), which adds a KL anchor to DFT:

    loss = ( sum_kept NLL  +  anchor_weight * sum_dropped KL(p_base || p_model)
                           +  anchor_all_weight * sum_kept KL(p_base || p_model) ) / N

with `N` the normaliser TRL's SFT loss uses (the kept completion tokens of the whole accumulated batch, across
processes), so the anchor scales exactly like the NLL under gradient accumulation and `accelerate launch`.

Memory stays bounded: the model's last hidden states are captured from the training forward by a hook (no second
forward with gradients), the base runs its backbone once under `torch.no_grad()` (with PEFT: the same model with its
adapter disabled, no second copy of the weights), and both LM heads run only on the anchored positions, in row
chunks that are recomputed in the backward pass, so at most one `[chunk, vocab]` float32 block of each model lives at
a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from .scoring import _causal_lm, adapter_context, output_logit_transform


DROPPED_KEY = "pplmask_dropped"


def _head_log_probs(causal_lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax of the LM head on `hidden` rows, with the model's logit scale and soft-capping."""
    logits = causal_lm.get_output_embeddings()(hidden).float()
    scale, softcap = output_logit_transform(causal_lm.config)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def chunked_kl(
    causal_lm: torch.nn.Module,
    hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    base_lm: torch.nn.Module | None = None,
    weights: torch.Tensor | None = None,
    logits_chunk_bytes: int = 2**27,
) -> torch.Tensor:
    """`sum_i w_i KL(p_base(. | row i) || p_model(. | row i))` over the rows of `hidden` (`[N, H]`).

    Args:
        causal_lm (`torch.nn.Module`): The model being trained (its LM head maps `hidden`).
        hidden (`torch.Tensor`): Last hidden states of the model at the anchored positions, with gradient.
        base_hidden (`torch.Tensor`): Last hidden states of the base at the same positions, without gradient.
        base_lm (`torch.nn.Module`, *optional*): The base causal LM whose head maps `base_hidden`; defaults to
            `causal_lm` (PEFT: LoRA on the LM head is disabled by the caller around the base pass only, so the base
            head is applied inside the adapter-disabled context).
        weights (`torch.Tensor`, *optional*): Per-row weights; 1 by default.
        logits_chunk_bytes (`int`, *optional*): Float32 logits budget of one chunk.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    base_lm = causal_lm if base_lm is None else base_lm
    vocab = causal_lm.get_output_embeddings().weight.shape[0]
    rows = max(1, logits_chunk_bytes // (4 * vocab))
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device)

    def chunk_kl(h: torch.Tensor, base_log_p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        log_q = _head_log_probs(causal_lm, h)
        return (w * (base_log_p.exp() * (base_log_p - log_q)).sum(-1)).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, bh, w in zip(hidden.split(rows), base_hidden.split(rows), weights.split(rows)):
        with torch.no_grad():
            base_log_p = _base_log_probs(base_lm, bh)
        # Recompute the chunk's logits in backward instead of keeping every chunk's [rows, vocab] block alive
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(chunk_kl, h, base_log_p, w, use_reentrant=False)
        else:
            total = total + chunk_kl(h, base_log_p, w)
    return total


def _base_log_probs(base_lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    with adapter_context(base_lm, disable_adapter=True):
        return _head_log_probs(_causal_lm(base_lm), hidden)


@contextmanager
def capture_last_hidden(causal_lm: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the backbone's `last_hidden_state` of the next forward (the training forward, with its graph)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class AnchoredSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose masked tokens are anchored to the base model by a KL term.

    Use it with a [`PplMaskCollator`] built with `return_dropped=True` (the collator says which trainable tokens it
    dropped). Everything else (data preparation, PEFT, checkpointing, gradient accumulation, `accelerate launch`) is
    stock `SFTTrainer`: the NLL part of the loss is TRL's own, so `anchor_weight=0` and `anchor_all_weight=0` give
    exactly STM's loss and gradients.

    Args:
        *args: Positional arguments of `SFTTrainer`.
        anchor_weight (`float`, *optional*, defaults to `1.0`):
            Weight of `KL(p_base || p_model)` on the dropped tokens, per token, relative to the NLL of a kept token.
        anchor_all_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the same KL on the kept completion tokens.
        reference_model (`torch.nn.Module`, *optional*):
            The frozen base. Defaults to the trained model itself with its PEFT adapter disabled; a model without
            PEFT needs one (a frozen copy).
        **kwargs: Keyword arguments of `SFTTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        anchor_weight: float = 1.0,
        anchor_all_weight: float = 0.0,
        reference_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ):
        if anchor_weight < 0 or anchor_all_weight < 0:
            raise ValueError(
                f"Anchor weights must be >= 0, got anchor_weight={anchor_weight}, "
                f"anchor_all_weight={anchor_all_weight}."
            )
        super().__init__(*args, **kwargs)
        self.anchor_weight = float(anchor_weight)
        self.anchor_all_weight = float(anchor_all_weight)
        self.reference_model = reference_model
        if reference_model is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError(
                "The anchored objective needs the base model's predictions: train with PEFT (`use_peft: true`), whose "
                "disabled adapter is the base, or pass a frozen `reference_model` (what `trl-pplmask sft` loads "
                "without PEFT)."
            )
        if not getattr(self.data_collator, "return_dropped", False):
            raise ValueError(
                "AnchoredSFTTrainer needs a PplMaskCollator built with `return_dropped=True`, which tells it the "
                "tokens the mask dropped."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dropped = inputs.pop(DROPPED_KEY, None)
        if dropped is None or (self.anchor_weight == 0 and self.anchor_all_weight == 0):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal_lm = _causal_lm(model)
        with capture_last_hidden(causal_lm) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        anchor_sum, anchored = self._anchor_sum(model, inputs, dropped, captured["hidden"])
        denominator = inputs["labels"][:, 1:].ne(-100).sum() if num_items_in_batch is None else num_items_in_batch
        anchor = anchor_sum / torch.as_tensor(denominator, device=anchor_sum.device).clamp(min=1)
        # Same scaling as TRL's NLL: with `num_items_in_batch` counting every rank's tokens, DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            anchor = anchor * self.accelerator.num_processes
        loss = loss + anchor.to(loss.dtype)
        mode = "train" if self.model.training else "eval"
        mean_kl = self.accelerator.gather_for_metrics(anchor_sum.detach()[None]).sum() / max(
            int(self.accelerator.gather_for_metrics(torch.tensor([anchored], device=loss.device)).sum()), 1
        )
        self._metrics[mode]["pplmask/anchor_kl"].append(float(mean_kl))
        return (loss, result[1]) if return_outputs else loss

    def _anchor_sum(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], dropped: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Weighted KL sum over the anchored positions of the batch, and how many dropped tokens it covers."""
        labels = inputs["labels"]
        dropped = dropped.to(labels.device).bool()
        # Position t of the hidden states predicts token t + 1
        drop_next = dropped[:, 1:]
        kept_next = labels[:, 1:].ne(-100)
        weights = torch.zeros(drop_next.shape, dtype=torch.float32, device=labels.device)
        weights[drop_next] = self.anchor_weight
        if self.anchor_all_weight:
            weights[kept_next] = self.anchor_all_weight
        selected = weights > 0
        if not bool(selected.any()):
            return hidden.new_zeros((), dtype=torch.float32), 0
        base_hidden = self._base_hidden(model, inputs)[:, :-1][selected.to(hidden.device)]
        causal_lm = _causal_lm(model)
        lm_device = causal_lm.get_output_embeddings().weight.device
        total = chunked_kl(
            causal_lm,
            hidden[:, :-1][selected.to(hidden.device)].to(lm_device),
            base_hidden.to(lm_device),
            base_lm=self.reference_model if self.reference_model is not None else model,
            weights=weights[selected].to(lm_device),
        )
        return total, int(drop_next.sum())

    @torch.no_grad()
    def _base_hidden(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        base = self.reference_model if self.reference_model is not None else model
        forward_inputs = {
            k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids") and v is not None
        }
        # The base is the frozen model as it predicts at inference: no dropout
        was_training = base.training
        base.eval()
        try:
            with adapter_context(base, disable_adapter=True):
                return _causal_lm(base).base_model(**forward_inputs, use_cache=False).last_hidden_state
        finally:
            base.train(was_training)
