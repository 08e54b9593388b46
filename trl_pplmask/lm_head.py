"""The LM-head step, written once: from a model's final hidden states to float32 log-probabilities.

Scoring (`scoring`), the training objectives (`anchor`) and the drift metrics (`evaluation.drift`) all need the same
three things: the transformers model inside the accelerate/DDP/PEFT wrappers, its backbone's last hidden states, and
the LM head applied the way the model's own forward applies it (logit scale, final-logit soft-capping) with the
softmax in float32, on row chunks so that no `[rows, vocab]` block larger than a byte budget exists at once.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from . import _compat


# On CPU the softmax steps after the LM-head projection are memory-bound: they run on row blocks of about this many
# bytes of float32 logits, which stay in cache (measured 2.5x faster than whole chunks at a 49k vocabulary, see
# `benchmarks/bench_scoring.py`). Accelerators take each step in one kernel over the whole chunk.
_CPU_SOFTMAX_BLOCK_BYTES = 2**20


def _use_triton(device: torch.device) -> bool:
    """Whether TRL's fused Triton LM-head kernel runs on `device` (TRL's own switch)."""
    return _compat.use_triton(device)


def unwrap_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside accelerate/DDP and PEFT wrappers (LoRA layers stay injected in it).

    Args:
        model (`torch.nn.Module`): A transformers causal LM, possibly wrapped by accelerate (DDP) or PEFT.

    Raises:
        ValueError: For prompt-learning PEFT adapters, whose virtual tokens change the positions the head sees.
    """
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model"):
        peft_config = getattr(model, "peft_config", {})
        if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            raise ValueError("Prompt-learning PEFT adapters are not supported for scoring; use LoRA-style adapters.")
        return model.get_base_model()
    return model


def backbone_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states `[batch, seq, H]` of the model's backbone (everything before the LM head).

    Args:
        model (`torch.nn.Module`): Causal LM (transformers, PEFT or accelerate-wrapped).
        input_ids (`torch.Tensor`): Token ids, `[batch, seq]`.
        attention_mask (`torch.Tensor`): 1 on real tokens, 0 on padding, `[batch, seq]`.
    """
    # Without padding, no mask lets attention take its causal fast path instead of building a [seq, seq] mask
    backbone_mask = None if bool(attention_mask.all()) else attention_mask
    out = unwrap_causal_lm(model).base_model(input_ids=input_ids, attention_mask=backbone_mask, use_cache=False)
    return out.last_hidden_state


def output_logit_transform(config) -> tuple[float, float | None]:
    """`(logit_scale, final_logit_softcapping)` that a model's forward applies after its LM head projection.

    Reads the same config attributes as TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`): Gemma-2's
    `final_logit_softcapping`, and the multipliers of Cohere (`logit_scale`), Falcon-H1 (`lm_head_multiplier`),
    Granite/MiniCPM3 (divide by `logits_scaling`) and HyperCLOVA X (multiply by it).

    Args:
        config: The model's `PretrainedConfig` (its text config is read for multimodal models).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's LM head (its output vocabulary)."""
    return unwrap_causal_lm(model).get_output_embeddings().weight.shape[0]


def chunk_rows(model: torch.nn.Module, logits_chunk_bytes: int) -> int:
    """How many rows of float32 logits fit in `logits_chunk_bytes` (at least one).

    Args:
        model (`torch.nn.Module`): The model whose LM head sets the row width (its vocabulary).
        logits_chunk_bytes (`int`): Byte budget of one chunk of float32 logits.
    """
    return max(1, logits_chunk_bytes // (4 * vocab_size(model)))


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits `[N, vocab]` of the LM head on `hidden` rows (`[N, H]`), with the logit scale and soft-capping.

    Out of place, so that the result can carry a gradient. `hidden` is moved to the head's device first.

    Args:
        model (`torch.nn.Module`): The model whose LM head and logit transform are applied.
        hidden (`torch.Tensor`): Final hidden states, one row per position.
    """
    lm = unwrap_causal_lm(model)
    lm_head = lm.get_output_embeddings()
    logits = lm_head(hidden.to(lm_head.weight.device)).float()
    scale, softcap = output_logit_transform(lm.config)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def head_log_probs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax `[N, vocab]` of the LM head on `hidden` rows; see [`head_logits`].

    Args:
        model (`torch.nn.Module`): The model whose LM head and logit transform are applied.
        hidden (`torch.Tensor`): Final hidden states, `[N, H]`.
    """
    return torch.log_softmax(head_logits(model, hidden), dim=-1)


def selected_log_probs(
    causal_lm: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_chunk_bytes: int = 2**28,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`log p(target)` for each row of `hidden` (`[N, H]`), without materialising the `[N, vocab]` logits at once.

    The LM head runs on row chunks of at most `logits_chunk_bytes` of float32 logits; the model's logit scale and
    soft-capping are applied and the log-softmax is computed in float32. On CUDA with Triton, TRL's fused
    chunked kernel does the same in tiles. The entropy reuses the log-softmax's own passes plus one reduction.

    Args:
        causal_lm (`PreTrainedModel`): The model whose output embeddings (LM head) and logit transform are used.
        hidden (`torch.Tensor`): Final hidden states, `[N, H]`, one row per position to score.
        targets (`torch.Tensor`): Token ids, `[N]`, whose log-probability is returned.
        logits_chunk_bytes (`int`, *optional*, defaults to `2**28`): Bound on the float32 logits of one chunk.
        return_entropy (`bool`, *optional*, defaults to `False`): Also return the entropy (nats) of each row's
            predictive distribution, from the same pass over the logits.

    Returns:
        `torch.Tensor` of float32 log-probabilities `[N]`, or `(log_probs, entropy)` with `return_entropy=True`.
    """
    lm_head = causal_lm.get_output_embeddings()
    scale, softcap = output_logit_transform(causal_lm.config)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    if _use_triton(hidden.device) and type(lm_head) is torch.nn.Linear:
        # TRL's kernel folds the entropy into the same online-logsumexp pass when asked for it
        outputs = ("log_probs", "entropy") if return_entropy else ("log_probs",)
        log_probs, entropy, *_ = _compat.ChunkedLogProbFunction.apply(
            hidden, lm_head.weight, lm_head.bias, targets, 1.0, 32768, softcap, scale, outputs
        )
        return (log_probs.float(), entropy.float()) if return_entropy else log_probs.float()
    vocab = lm_head.weight.shape[0]
    rows = max(1, logits_chunk_bytes // (4 * vocab))
    block = max(1, _CPU_SOFTMAX_BLOCK_BYTES // (4 * vocab)) if hidden.device.type == "cpu" else rows
    out, entropies = [], []
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        logits = lm_head(h)  # one projection per chunk: each one streams the whole LM-head weight
        for start in range(0, len(t), block):
            # A float32 copy of the block (it stays in cache), so the in-place steps below touch no tensor that
            # autograd saved: the NLL path stays differentiable
            z = logits[start : start + block].to(torch.float32, copy=True)
            t_block = t[start : start + block]
            if scale != 1.0:
                z.mul_(scale)
            if softcap is not None:
                z = z.div_(softcap).tanh_().mul(softcap)  # out of place after tanh, whose backward reads its output
            # The steps of `logsumexp`, kept so that the entropy reuses them: with z shifted by its max and
            # e = exp(z), log p(v) = z_v - log(sum e) and entropy = log(sum e) - sum(e * z) / sum(e). The shift
            # cancels out of log p, so it is detached: the in-place shift then leaves the NLL path differentiable
            z.sub_(z.detach().amax(dim=-1, keepdim=True))
            exp = z.exp()
            sum_exp = exp.sum(dim=-1)
            log_sum_exp = sum_exp.log()
            out.append(z.gather(-1, t_block[:, None]).squeeze(-1) - log_sum_exp)
            if return_entropy:
                # In place only without a graph: exp's backward reads its output, which the NLL's gradient needs
                weighted = exp * z if exp.requires_grad else exp.mul_(z)
                entropies.append(log_sum_exp - weighted.sum(dim=-1) / sum_exp)
        del logits
    return (torch.cat(out), torch.cat(entropies)) if return_entropy else torch.cat(out)
