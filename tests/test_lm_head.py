"""The LM-head step (`trl_pplmask.lm_head`): the model's own output distribution, reached from its hidden states.

Scoring, the training objectives and the drift metrics all read the LM head through this module, so these tests pin
it against each model's own forward (logit scale and soft-capping included) and check that the three callers agree.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma2, tiny_llama, tiny_scaled

from trl_pplmask import lm_head
from trl_pplmask.anchor import chunked_kl, topk_entropy
from trl_pplmask.evaluation.drift import kl_and_entropy
from trl_pplmask.lm_head import (
    backbone_hidden,
    chunk_rows,
    head_log_probs,
    head_logits,
    output_logit_transform,
    selected_log_probs,
    unwrap_causal_lm,
    vocab_size,
)


def make_model(kind: str):
    if kind == "llama":
        torch.manual_seed(0)
        return tiny_llama(vocab_size=512, initializer_range=0.3)
    if kind == "gemma2":
        return tiny_gemma2(softcap=2.0)
    return tiny_scaled(kind)[0]


KINDS = ["llama", "gemma2", "granite", "cohere"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_head_log_probs_are_the_models_own_distribution(kind, ids):
    """From the backbone's hidden states, the head gives the log-softmax of the model's own logits at every position
    (Gemma-2's soft-cap, Granite's and Cohere's logit scales applied as their forward applies them)."""
    model = make_model(kind)
    expected = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    hidden = backbone_hidden(model, ids, torch.ones_like(ids))
    got = head_log_probs(model, hidden.reshape(-1, hidden.shape[-1])).reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The transform matters for these models: the bare projection gives another distribution
    if kind != "llama":
        bare = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
        assert (bare - expected).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_selected_log_probs_pick_from_the_same_distribution(kind, monkeypatch):
    """The chunked, blocked path (chunks of 5 rows, CPU blocks of 2) picks `log p(target)` and the entropy from the
    same distribution as `head_log_probs`, gradient included."""
    model = make_model(kind)
    monkeypatch.setattr(lm_head, "_CPU_SOFTMAX_BLOCK_BYTES", 4 * 512 * 2)
    torch.manual_seed(0)
    hidden = torch.randn(13, 64, requires_grad=True)
    targets = torch.randint(0, 512, (13,))
    log_probs, entropy = selected_log_probs(model, hidden, targets, 4 * 512 * 5, return_entropy=True)
    log_probs.sum().backward()
    reference = hidden.detach().clone().requires_grad_()
    full = head_log_probs(model, reference)
    picked = full.gather(-1, targets[:, None]).squeeze(-1)
    picked.sum().backward()
    torch.testing.assert_close(log_probs, picked, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden.grad, reference.grad, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_scoring_objectives_and_drift_read_one_head():
    """The three callers agree on a soft-capped model: the entropy of scoring (`selected_log_probs`), of EAFT with k =
    vocabulary (`anchor.topk_entropy`) and of drift (`kl_and_entropy`) are the same numbers, and the KL of the model
    against itself is 0 in both the objective's and drift's implementation."""
    model = make_model("gemma2")
    torch.manual_seed(0)
    hidden = torch.randn(9, 64)
    _, scoring_entropy = selected_log_probs(model, hidden, torch.zeros(9, dtype=torch.long), return_entropy=True)
    eaft_entropy = topk_entropy(model, hidden, k=512, logits_chunk_bytes=4 * 512 * 4)
    kl, base_entropy, entropy = kl_and_entropy(model, model, hidden, hidden, logits_chunk_bytes=4 * 512 * 4)
    torch.testing.assert_close(eaft_entropy, scoring_entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy, scoring_entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(base_entropy, entropy)
    assert kl.abs().max() < 1e-5
    assert chunked_kl(model, hidden, hidden, logits_chunk_bytes=4 * 512 * 4).abs() < 1e-4


def test_backbone_hidden_ignores_padding(ids):
    """Right padding (with its attention mask) leaves the real positions' hidden states as they are alone."""
    model = make_model("llama")
    padded = torch.cat([ids[:1], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, ids.shape[1]), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = backbone_hidden(model, ids[:1], torch.ones_like(ids[:1]))
        got = backbone_hidden(model, padded, mask)[:, : ids.shape[1]]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_head_logits_carry_a_gradient_through_the_soft_cap():
    """`head_logits` works out of place: a gradient reaches the hidden states through tanh (the anchored objective
    backpropagates through it)."""
    model = make_model("gemma2")
    hidden = torch.randn(4, 64, requires_grad=True)
    logits = head_logits(model, hidden)
    assert logits.dtype == torch.float32 and logits.abs().max() < 2.0  # capped at 2
    logits.logsumexp(-1).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_unwrapping_sizes_and_transforms():
    """PEFT wrappers are looked through (LoRA stays injected), chunk sizes follow the vocabulary, and a model without
    scale or cap has the identity transform."""
    from peft import LoraConfig, get_peft_model

    model = make_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_causal_lm(peft_model) is peft_model.get_base_model()
    assert vocab_size(peft_model) == 512
    assert chunk_rows(peft_model, 4 * 512 * 7 + 3) == 7
    assert chunk_rows(peft_model, 1) == 1
    assert output_logit_transform(model.config) == (1.0, None)
    assert output_logit_transform(make_model("granite").config) == (0.25, None)
