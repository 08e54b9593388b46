"""One token-weighted SFT objective: NLL, anchored STM, EAFT, ASFT and the paper's soft STM.

Every objective of `trl-pplmask sft --pplmask_loss` is TRL's own SFT loss with a per-token weight, plus an optional
KL anchor to the frozen base model:

    loss = ( sum_t w_t * NLL_t  +  sum_t a_t * KL_t(p_base || p_model) ) / N

with `N` the normaliser TRL's SFT loss uses (the trainable tokens of the whole accumulated batch, across processes:
`num_items_in_batch`), so every term scales exactly like the NLL under gradient accumulation and `accelerate launch`.
No weight carries a gradient. The objectives:

- `nll` (default): `w = 1`; with `pplmask_anchor`, anchored STM: `a = anchor_weight` on the tokens the mask dropped
  and `anchor_all_weight` on the kept ones.
- `eaft` (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151): `w = (H_t / log k) ** eaft_alpha`, `H_t` the entropy of
  the model's own prediction restricted to its `k = eaft_k` most likely tokens (renormalised), so that confident
  positions (low entropy, where a conflicting label would overwrite a prior) weigh little. Matches LLaMA-Factory's
  `use_eaft_loss` (top 20, divided by 3.0) and axolotl's `use_eaft` (`eaft_k`, default 20, not divided). Differences:
  the divisor is `log k` (LLaMA-Factory's 3.0 is `log 20 = 2.996` rounded, a 0.1% difference at `k = 20`; axolotl does
  not divide, which at `alpha = 1` is the same objective with a `log k` (3x) larger learning rate); axolotl's
  `+1e-10` inside the log is not needed (the log-probabilities come from a log-softmax). `eaft_k=None` uses the exact
  entropy over the whole vocabulary, divided by `log(vocab)`, at no extra cost (TRL's fused LM head computes it).
- `asft` (Anchored SFT, arXiv 2509.23753): DFT's weight `w = p_model(label).detach()` (TRL's `loss_type="dft"`) plus
  `a = asft_alpha` on every trainable token. The KL is `KL(p_base || p_model) = sum_v p_base(v) (log p_base(v) -
  log p_model(v))` over the full vocabulary, at each trainable position: LLaMA-Factory's `F.kl_div(log_softmax(policy),
  softmax(ref))`, the direction of the ASFT paper's anchor. This "forward" KL is mass-covering: it penalises the model
  for dropping tokens the base finds likely, which is what an anchor against forgetting should do (the reverse KL
  would let the model collapse onto one of the base's modes). Full-vocabulary support, not a top-k or sampled
  estimate, so it equals the exact divergence. LLaMA-Factory divides the DFT part and the KL part each by the local
  trainable-token count; here both share TRL's `N`, which is the same on one process without accumulation and, unlike
  a per-micro-batch mean, weighs every token alike under accumulation and across processes.
- `soft_stm` (the soft variant of the STM paper's repository): `w = exp(-((ppl - 1) / width) ** 2)` from the
  reference NLLs (pre-scored `token_nll` or scored on the fly by the collator, see
  [`trl_pplmask.masking.soft_token_weights`]), normalised by `N` like the NLL.

Memory stays bounded: the per-token log-probabilities and the exact entropy come from TRL's fused, chunked LM head
(`fused_lm_head=True`: no `[batch, seq, vocab]` logits); the model's last hidden states are captured from the same
training forward by a hook (no second forward with gradients); the top-k entropy and both KL heads run only on the
trainable positions, in row chunks (the KL's recomputed in the backward pass), so at most one `[chunk, vocab]` float32
block lives at a time. The base is the trained model with its PEFT adapter disabled (no second copy of the weights),
or a frozen `reference_model`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from .collator import WEIGHT_KEY
from .lm_head import chunk_rows, head_log_probs, head_logits, unwrap_causal_lm, vocab_size
from .scoring import adapter_context


DROPPED_KEY = "pplmask_dropped"
OBJECTIVES = ("nll", "eaft", "asft", "soft_stm")
# Defaults of the reference implementations: LLaMA-Factory `eaft_alpha` 1.0 and `asft_alpha` 0.1 (FinetuningArguments);
# axolotl `eaft_alpha` 1.0 and `eaft_k` 20 (LLaMA-Factory hard-codes k = 20)
DEFAULT_EAFT_ALPHA = 1.0
DEFAULT_EAFT_K = 20
DEFAULT_ASFT_ALPHA = 0.1


def chunked_kl(
    causal_lm: torch.nn.Module,
    hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    base_lm: torch.nn.Module | None = None,
    weights: torch.Tensor | None = None,
    logits_chunk_bytes: int = 2**27,
    reduction: str = "sum",
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
        reduction (`str`, *optional*, defaults to `"sum"`): `"sum"` for the weighted sum, `"none"` for the `[N]`
            weighted per-row values.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,) if reduction == "none" else (), dtype=torch.float32)
    base_lm = causal_lm if base_lm is None else base_lm
    rows = chunk_rows(causal_lm, logits_chunk_bytes)
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device)

    def chunk_kl(h: torch.Tensor, base_log_p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        log_q = head_log_probs(causal_lm, h)
        return w * (base_log_p.exp() * (base_log_p - log_q)).sum(-1)

    parts = []
    for h, bh, w in zip(hidden.split(rows), base_hidden.split(rows), weights.split(rows)):
        with torch.no_grad():
            base_log_p = _base_log_probs(base_lm, bh)
        # Recompute the chunk's logits in backward instead of keeping every chunk's [rows, vocab] block alive
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(chunk_kl, h, base_log_p, w, use_reentrant=False))
        else:
            parts.append(chunk_kl(h, base_log_p, w))
    per_row = torch.cat(parts)
    return per_row if reduction == "none" else per_row.sum()


@torch.no_grad()
def topk_entropy(
    causal_lm: torch.nn.Module, hidden: torch.Tensor, k: int, logits_chunk_bytes: int = 2**27
) -> torch.Tensor:
    """Entropy (nats) of each row's predictive distribution restricted to its `k` largest logits, renormalised.

    EAFT's approximation of the predictive entropy (axolotl's `eaft_k`, LLaMA-Factory's k = 20): `[N]` float32, no
    gradient, at most `logits_chunk_bytes` of float32 logits at a time.

    Args:
        causal_lm (`torch.nn.Module`): The model whose LM head maps `hidden`.
        hidden (`torch.Tensor`): Last hidden states, `[N, H]`.
        k (`int`): How many of the largest logits of each row to keep (at most the vocabulary size).
        logits_chunk_bytes (`int`, *optional*): Float32 logits budget of one chunk.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    out = []
    for h in hidden.split(chunk_rows(causal_lm, logits_chunk_bytes)):
        top = head_logits(causal_lm, h).topk(k, dim=-1).values
        log_p = torch.log_softmax(top, dim=-1)
        out.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(out)


def _base_log_probs(base_lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    with adapter_context(base_lm, disable_adapter=True):
        return head_log_probs(base_lm, hidden)


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


@contextmanager
def _weighted_log_probs(model: torch.nn.Module, weigh) -> Iterator[None]:
    """Multiply the per-token log-probabilities of the next fused forward of `model` by `weigh(outputs)` (detached).

    TRL's `SFTTrainer.compute_loss` turns `outputs.log_probs` of its fused LM head into `-sum(log_probs) / N`, scales
    it for the processes and logs its metrics; weighting them in place keeps all of that TRL's own. Other forwards (the
    logits that `return_outputs=True` recomputes) pass unchanged.
    """

    def hook(module, args, kwargs, output):
        if kwargs.get("fused_lm_head") and getattr(output, "log_probs", None) is not None:
            output.log_probs = output.log_probs * weigh(output).detach().to(output.log_probs.dtype)
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class TokenWeightedSFTTrainer(SFTTrainer):
    """`SFTTrainer` with a per-token loss weight and an optional KL anchor to the base model (see the module doc).

    Everything else (data preparation, PEFT, checkpointing, gradient accumulation, `accelerate launch`) is stock
    `SFTTrainer`, and so is the loss itself: the weights multiply the per-token log-probabilities of TRL's fused LM
    head before TRL reduces them, so `objective="nll"` without anchor is exactly TRL's loss, `eaft` with
    `eaft_alpha=0` is exactly it too, and `asft` with `asft_alpha=0` is exactly TRL's `loss_type="dft"`.

    Logged per step: `pplmask/mean_weight` (mean of `w` over the trainable tokens) for `eaft`, `asft` and `soft_stm`;
    `pplmask/asft_kl` (mean `KL(p_base || p_model)` per trainable token) for `asft`; `pplmask/anchor_kl` for the
    anchor.

    Args:
        *args: Positional arguments of `SFTTrainer`.
        objective (`str`, *optional*, defaults to `"nll"`): One of `nll`, `eaft`, `asft`, `soft_stm`.
        anchor_weight (`float`, *optional*, defaults to `0.0`):
            Weight of `KL(p_base || p_model)` on the tokens the mask dropped (needs a [`PplMaskCollator`] built with
            `return_dropped=True`), per token, relative to the NLL of a kept token.
        anchor_all_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the same KL on the kept trainable tokens.
        eaft_alpha (`float`, *optional*, defaults to `1.0`): Exponent of EAFT's normalised entropy.
        eaft_k (`int` or `None`, *optional*, defaults to `20`): EAFT's top-k entropy approximation; `None` for the
            exact entropy over the whole vocabulary.
        asft_alpha (`float`, *optional*, defaults to `0.1`): Weight of ASFT's KL anchor on every trainable token.
        reference_model (`torch.nn.Module`, *optional*):
            The frozen base for the KL terms. Defaults to the trained model itself with its PEFT adapter disabled; a
            model without PEFT needs one (a frozen copy).
        **kwargs: Keyword arguments of `SFTTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        objective: str = "nll",
        anchor_weight: float = 0.0,
        anchor_all_weight: float = 0.0,
        eaft_alpha: float = DEFAULT_EAFT_ALPHA,
        eaft_k: int | None = DEFAULT_EAFT_K,
        asft_alpha: float = DEFAULT_ASFT_ALPHA,
        reference_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ):
        check_objective(objective, anchor_weight, anchor_all_weight, eaft_alpha, eaft_k, asft_alpha)
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.anchor_weight = float(anchor_weight)
        self.anchor_all_weight = float(anchor_all_weight)
        self.eaft_alpha, self.eaft_k, self.asft_alpha = float(eaft_alpha), eaft_k, float(asft_alpha)
        self.reference_model = reference_model
        self._check_setup()

    def _check_setup(self) -> None:
        if objective_uses_base(self.objective, self.anchor_weight, self.anchor_all_weight, self.asft_alpha):
            if self.reference_model is None and not hasattr(self.model, "disable_adapter"):
                raise ValueError(
                    f"The {self.objective if self.objective == 'asft' else 'anchored'} objective needs the base "
                    "model's predictions: train with PEFT (`use_peft: true`), whose disabled adapter is the base, or "
                    "pass a frozen `reference_model` (what `trl-pplmask sft` loads without PEFT)."
                )
        if self.anchor_weight > 0 and not getattr(self.data_collator, "return_dropped", False):
            raise ValueError(
                "The anchor on dropped tokens needs a PplMaskCollator built with `return_dropped=True`, which tells "
                "it the tokens the mask dropped."
            )
        if self.objective == "soft_stm" and getattr(self.data_collator, "soft_width", None) is None:
            raise ValueError(
                "objective='soft_stm' needs a PplMaskCollator built with `soft_width=` (it weighs each token from the "
                "reference NLLs)."
            )
        if self.objective != "nll":
            vocab = vocab_size(self.model)
            if self.objective == "eaft" and self.eaft_k is not None and self.eaft_k > vocab:
                raise ValueError(f"eaft_k={self.eaft_k} exceeds the model's vocabulary ({vocab} tokens).")
            if self.args.loss_type != "nll" or self.args.label_smoothing_factor or self.compute_loss_func is not None:
                raise ValueError(
                    f"objective={self.objective!r} weighs TRL's NLL itself: use it with loss_type='nll' (asft already "
                    "includes DFT's weighting), no label_smoothing_factor and no compute_loss_func."
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dropped = inputs.pop(DROPPED_KEY, None)
        soft = inputs.pop(WEIGHT_KEY, None)
        anchored = (dropped is not None and self.anchor_weight > 0) or self.anchor_all_weight > 0
        asft_kl = self.objective == "asft" and self.asft_alpha > 0
        if self.objective == "nll" and not anchored:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal_lm = unwrap_causal_lm(model)
        mode = "train" if self.model.training else "eval"
        stats: dict[str, torch.Tensor] = {}

        def weigh(outputs) -> torch.Tensor:
            weight = self._token_weights(outputs, captured, soft, causal_lm)
            stats["weight_sum"] = (weight * outputs.label_mask).sum().detach()
            return weight

        # Anchored STM (`nll` with an anchor) keeps TRL's NLL untouched: no weight, no weight statistic
        weighting = _weighted_log_probs(model, weigh) if self.objective != "nll" else nullcontext()
        with capture_last_hidden(causal_lm) as captured, weighting:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        kept = inputs["labels"][:, 1:].ne(-100)
        if "weight_sum" in stats:
            mean_weight = self._gathered_sum(stats["weight_sum"]) / max(self._gathered_sum(kept.sum()), 1.0)
            self._metrics[mode]["pplmask/mean_weight"].append(mean_weight)
        if anchored or asft_kl:
            loss = loss + self._anchor_loss(model, inputs, dropped, kept, captured["hidden"], num_items_in_batch, mode)
        return (loss, result[1]) if return_outputs else loss

    def _token_weights(self, outputs, captured: dict[str, torch.Tensor], soft, causal_lm) -> torch.Tensor:
        """`[batch, seq - 1]` weights of the per-token NLL (any value where the label is ignored)."""
        log_probs = outputs.log_probs.detach()
        if self.objective == "asft":
            return log_probs.exp()  # DFT's weight: the model's probability of the label
        if self.objective == "soft_stm":
            return soft[:, 1:].to(log_probs.device)
        if self.objective == "eaft":
            vocab = vocab_size(causal_lm)
            if self.eaft_k is None or self.eaft_k >= vocab:
                # The top-vocab entropy is the exact one, which TRL's fused LM head computed in its own pass
                entropy, norm = outputs.entropy.detach().float(), math.log(vocab)
            else:
                mask = outputs.label_mask
                hidden = captured["hidden"][:, :-1].detach()
                lm_device = causal_lm.get_output_embeddings().weight.device
                entropy = torch.zeros(mask.shape, dtype=torch.float32, device=lm_device)
                entropy[mask] = topk_entropy(causal_lm, hidden[mask.to(hidden.device)].to(lm_device), self.eaft_k)
                norm = math.log(self.eaft_k) if self.eaft_k > 1 else 1.0
            # A sum of -p log p can round below 0, and a negative base to a fractional power is NaN
            return (entropy.clamp(min=0) / norm).pow(self.eaft_alpha)
        return torch.ones_like(log_probs)

    def _gathered_sum(self, value: torch.Tensor) -> float:
        return float(self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).sum())

    def _anchor_loss(self, model, inputs, dropped, kept, hidden, num_items_in_batch, mode: str) -> torch.Tensor:
        """The KL terms over the batch, normalised and scaled across processes exactly like TRL's NLL, and logged."""
        drop_next = torch.zeros_like(kept) if dropped is None else dropped.to(kept.device).bool()[:, 1:]
        # Position t of the hidden states predicts token t + 1
        anchor_weights = torch.zeros(kept.shape, dtype=torch.float32, device=kept.device)
        anchor_weights[drop_next] = self.anchor_weight
        anchor_weights[kept] = self.anchor_all_weight  # kept and dropped tokens are disjoint
        asft_weights = kept.float() * (self.asft_alpha if self.objective == "asft" else 0.0)
        weights = anchor_weights + asft_weights
        selected = weights > 0
        if bool(selected.any()):
            per_row = self._kl_rows(model, inputs, hidden, selected)
            kl_sum = (per_row * weights[selected].to(per_row.device)).sum()
        else:
            per_row, kl_sum = hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        denominator = kept.sum() if num_items_in_batch is None else num_items_in_batch
        anchor = kl_sum / torch.as_tensor(denominator, device=kl_sum.device).clamp(min=1)
        # Same scaling as TRL's NLL: with `num_items_in_batch` counting every rank's tokens, DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            anchor = anchor * self.accelerator.num_processes
        detached = per_row.detach()
        rows_kept = kept[selected].to(detached.device)
        if self.anchor_weight or self.anchor_all_weight:
            # The anchor's weighted KL per dropped token (its definition since anchored STM was added)
            anchor_sum = (detached * anchor_weights[selected].to(detached.device)).sum()
            self._metrics[mode]["pplmask/anchor_kl"].append(
                self._gathered_sum(anchor_sum) / max(self._gathered_sum(drop_next.sum()), 1.0)
            )
        if self.objective == "asft" and self.asft_alpha > 0:
            self._metrics[mode]["pplmask/asft_kl"].append(
                self._gathered_sum(detached[rows_kept].sum()) / max(self._gathered_sum(kept.sum()), 1.0)
            )
        return anchor.to(torch.float32)

    def _kl_rows(self, model, inputs, hidden: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Unweighted `KL(p_base || p_model)` at each selected position, `[selected.sum()]`, with gradient."""
        causal_lm = unwrap_causal_lm(model)
        lm_device = causal_lm.get_output_embeddings().weight.device
        base_hidden = self._base_hidden(model, inputs)[:, :-1][selected.to(hidden.device)]
        return chunked_kl(
            causal_lm,
            hidden[:, :-1][selected.to(hidden.device)].to(lm_device),
            base_hidden.to(lm_device),
            base_lm=self.reference_model if self.reference_model is not None else model,
            reduction="none",
        )

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
                return unwrap_causal_lm(base).base_model(**forward_inputs, use_cache=False).last_hidden_state
        finally:
            base.train(was_training)


class AnchoredSFTTrainer(TokenWeightedSFTTrainer):
    """Anchored STM: [`TokenWeightedSFTTrainer`] with the NLL objective and `anchor_weight` 1 by default.

    Use it with a [`PplMaskCollator`] built with `return_dropped=True`; `anchor_weight=0` and `anchor_all_weight=0`
    give exactly STM's loss and gradients.
    """

    def __init__(self, *args: Any, anchor_weight: float = 1.0, anchor_all_weight: float = 0.0, **kwargs: Any):
        kwargs.setdefault("objective", "nll")
        super().__init__(*args, anchor_weight=anchor_weight, anchor_all_weight=anchor_all_weight, **kwargs)
        if not getattr(self.data_collator, "return_dropped", False):
            raise ValueError(
                "AnchoredSFTTrainer needs a PplMaskCollator built with `return_dropped=True`, which tells it the "
                "tokens the mask dropped."
            )


def objective_uses_base(objective: str, anchor_weight: float, anchor_all_weight: float, asft_alpha: float) -> bool:
    """Whether the objective has a KL term, hence needs the base model's predictions."""
    return anchor_weight > 0 or anchor_all_weight > 0 or (objective == "asft" and asft_alpha > 0)


def check_objective(
    objective: str,
    anchor_weight: float = 0.0,
    anchor_all_weight: float = 0.0,
    eaft_alpha: float = DEFAULT_EAFT_ALPHA,
    eaft_k: int | None = DEFAULT_EAFT_K,
    asft_alpha: float = DEFAULT_ASFT_ALPHA,
) -> None:
    """Refuse an unknown objective or a bad weight (negative, not finite, `eaft_k` < 1) before any work."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}.")
    for name, value in (
        ("anchor_weight", anchor_weight), ("anchor_all_weight", anchor_all_weight), ("eaft_alpha", eaft_alpha),
        ("asft_alpha", asft_alpha),
    ):  # fmt: skip
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    if eaft_k is not None and (isinstance(eaft_k, bool) or not isinstance(eaft_k, int) or eaft_k < 1):
        raise ValueError(f"eaft_k must be an integer >= 1 (or unset for the exact entropy), got {eaft_k!r}.")
