"""Anchored STM: the KL term against a full-softmax reference, and its loss and gradients against plain STM."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from testing_utils import TINY_THRESHOLD, sft_args

from trl_pplmask.anchor import DROPPED_KEY, chunked_kl
from trl_pplmask.sft import build_trainer, parse_args


def test_chunked_kl_matches_full_softmax():
    model, base = tiny_llama(vocab_size=512, initializer_range=0.5), tiny_llama(vocab_size=512)
    torch.manual_seed(1)
    base.lm_head.weight.data.normal_(0, 0.5)
    hidden, base_hidden = torch.randn(37, 64), torch.randn(37, 64)
    weights = torch.rand(37)
    log_q = torch.log_softmax(model.lm_head(hidden).float(), -1)
    log_p = torch.log_softmax(base.lm_head(base_hidden).float(), -1)
    expected = (weights * (log_p.exp() * (log_p - log_q)).sum(-1)).sum()
    # A budget of 4 rows per chunk exercises the chunking and the per-chunk recomputation
    got = chunked_kl(model, hidden, base_hidden, base_lm=base, weights=weights, logits_chunk_bytes=4 * 4 * 512)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert chunked_kl(model, hidden, hidden, base_lm=model).item() == pytest.approx(0.0, abs=1e-5)


def _loss_and_grads(tmp_path, tiny_dir, train_dir, *extra, perturb: bool = False):
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_threshold", str(TINY_THRESHOLD), *extra)
    trainer, collator, _, _ = build_trainer(*parse_args(argv))
    model = trainer.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if perturb:
        # Move the adapter away from its zero initialisation: the model then differs from the base
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in params.items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    batch = collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return batch, loss.detach(), {n: p.grad.detach().clone() for n, p in params.items()}


def test_zero_weight_is_exactly_stm(tmp_path, tiny_dir, train_dir):
    batch, loss_anchor, grads_anchor = _loss_and_grads(
        tmp_path / "a", tiny_dir, train_dir, "--pplmask_anchor", "--pplmask_anchor_weight", "0"
    )
    assert batch[DROPPED_KEY].any()
    _, loss_stm, grads_stm = _loss_and_grads(tmp_path / "b", tiny_dir, train_dir)
    assert torch.equal(loss_anchor, loss_stm)
    for name in grads_stm:
        assert torch.equal(grads_anchor[name], grads_stm[name]), name


def test_anchor_is_zero_at_step_zero_of_a_lora_run(tmp_path, tiny_dir, train_dir):
    # A fresh LoRA adapter leaves the model equal to the base: KL 0, and a KL at its minimum has zero gradient
    _, loss_anchor, grads_anchor = _loss_and_grads(tmp_path / "a", tiny_dir, train_dir, "--pplmask_anchor")
    _, loss_stm, grads_stm = _loss_and_grads(tmp_path / "b", tiny_dir, train_dir)
    torch.testing.assert_close(loss_anchor, loss_stm, atol=1e-6, rtol=0)
    for name in grads_stm:
        torch.testing.assert_close(grads_anchor[name], grads_stm[name], atol=1e-6, rtol=0)


def test_masked_positions_receive_gradient(tmp_path, tiny_dir, train_dir):
    _, loss_anchor, grads_anchor = _loss_and_grads(
        tmp_path / "a", tiny_dir, train_dir, "--pplmask_anchor", "--pplmask_anchor_weight", "2", perturb=True
    )
    _, loss_stm, grads_stm = _loss_and_grads(tmp_path / "b", tiny_dir, train_dir, perturb=True)
    assert loss_anchor > loss_stm  # a positive KL on the dropped tokens
    differs = [n for n in grads_stm if not torch.allclose(grads_anchor[n], grads_stm[n], atol=1e-7)]
    assert differs, "the anchor term sent no gradient to the adapter"


def test_anchor_trains_and_logs_its_kl(tmp_path, tiny_dir, train_dir):
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_threshold", str(TINY_THRESHOLD), "--pplmask_anchor")
    trainer, _, _, _ = build_trainer(*parse_args(argv + ["--max_steps", "2"]))
    trainer.train()
    logged = [log["pplmask/anchor_kl"] for log in trainer.state.log_history if "pplmask/anchor_kl" in log]
    assert len(logged) == 2 and logged[0] == pytest.approx(0.0, abs=1e-6)  # step 0: the model is the base


def test_anchor_without_a_base_is_refused(tmp_path, tiny_dir, train_dir):
    from trl_pplmask.anchor import AnchoredSFTTrainer

    with pytest.raises(ValueError, match="needs the base model's predictions"):
        AnchoredSFTTrainer(
            model=str(tiny_dir),
            args=parse_args(sft_args(tmp_path, tiny_dir, train_dir))[1],
            train_dataset=__import__("datasets").load_from_disk(str(train_dir)),
        )
