"""Per-token NLL and entropy scoring: exactness against a plain reference, batch independence, soft-capping, PEFT,
memory bound, cache, errors and batching."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gemma2, tiny_llama, tiny_scaled
from datasets import Dataset, concatenate_datasets
from hypothesis import given, settings, strategies as st

import trl_pplmask.scoring as scoring
from trl_pplmask import lm_head
from trl_pplmask.data import load_task, tokenize_dataset
from trl_pplmask.lm_head import output_logit_transform, selected_log_probs
from trl_pplmask.masking import IGNORE_INDEX
from trl_pplmask.scoring import (
    ScoringConfig,
    batch_token_nll,
    make_batches,
    score_dataset,
)


@torch.no_grad()
def reference_nll(model, input_ids) -> np.ndarray:
    """The plain computation, one example at a time: full forward logits -> float32 cross-entropy."""
    ids = torch.tensor([input_ids])
    logits = model(input_ids=ids).logits[0].float()
    out = np.zeros(len(input_ids), dtype=np.float32)
    out[1:] = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
    return out


def expected(model, example, all_tokens=False) -> np.ndarray:
    ref = reference_nll(model, example["input_ids"])
    if not all_tokens and "labels" in example:
        ref[np.asarray(example["labels"]) == IGNORE_INDEX] = 0.0
    ref[0] = 0.0
    return ref


@torch.no_grad()
def expected_entropy(model, example, all_tokens=False) -> np.ndarray:
    """Entropy of the full softmax of the model's own forward logits (float32) at the position predicting each token;
    0.0 at position 0 and, unless `all_tokens`, on unlabeled tokens."""
    ids = torch.tensor([example["input_ids"]])
    log_p = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    out = np.zeros(len(example["input_ids"]), dtype=np.float32)
    out[1:] = -(log_p.exp() * log_p).sum(-1)[:-1].numpy()
    if not all_tokens and "labels" in example:
        out[np.asarray(example["labels"]) == IGNORE_INDEX] = 0.0
    out[0] = 0.0
    return out


def random_dataset(lengths, vocab_size, seed=0, prompt_fraction=0.3):
    """Random token ids; the first ~30% of each example is an untrained prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(0, vocab_size, n).tolist()
        prompt = int(n * prompt_fraction)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return Dataset.from_list(rows)


def score(dataset, model, **kwargs):
    kwargs.setdefault("use_cache", False)
    kwargs.setdefault("show_progress", False)
    return score_dataset(dataset, model, **kwargs)


@pytest.fixture(scope="module")
def gsm8k_tokens(data_dir, tokenizer):
    return tokenize_dataset(load_task("gsm8k", "test", limit=3), tokenizer)


@pytest.fixture(scope="module")
def embedded_reference(embedded_model, gsm8k_tokens):
    """Plain reference NLLs of the 3 GSM8K examples, label tokens only."""
    return [expected(embedded_model, example) for example in gsm8k_tokens]


@pytest.fixture(scope="module")
def embedded_scored(embedded_model, tokenizer, gsm8k_tokens):
    """Scored with the default CPU batching: the two longest examples share a padded batch."""
    lengths = [len(x) for x in gsm8k_tokens["input_ids"]]
    assert any(len(b) > 1 for b in make_batches(lengths, 1024))
    return score(gsm8k_tokens, embedded_model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def peaky_llama():
    """A tiny random Llama with a large init, so that its predictions are far from uniform."""
    return tiny_llama(vocab_size=512, initializer_range=0.3)


# ---------------------------------------------------------------------------------------------------------------
# (a) exactness on the embedded model


def test_matches_reference_on_embedded_model(embedded_scored, embedded_reference):
    for example, ref in zip(embedded_scored, embedded_reference):
        got = np.asarray(example["token_nll"])
        assert got.shape == ref.shape == (len(example["input_ids"]),)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        trained = np.asarray(example["labels"]) != IGNORE_INDEX
        assert (got[trained] > 0).all() and (got[~trained] == 0).all()
        # A real model on real text: a low average NLL, and some tokens above the paper's threshold
        assert 0.05 < got[trained].mean() < 3.0
        assert (np.exp(got[trained]) > 2.5).any()


def test_entropy_on_embedded_model(embedded_model, embedded_scored):
    for example in embedded_scored:
        got = np.asarray(example["token_entropy"])
        assert got.shape == (len(example["input_ids"]),)
        np.testing.assert_allclose(got, expected_entropy(embedded_model, example), atol=1e-4, rtol=0)
        trained = np.asarray(example["labels"]) != IGNORE_INDEX
        assert (got[~trained] == 0).all() and (got[trained] > 0).all()
        # Below the uniform distribution's log(vocab), and spread out: some confident positions, some not
        assert got.max() < np.log(embedded_model.config.vocab_size)
        assert got[trained].min() < 0.5 < got[trained].max()
    assert embedded_scored.features["token_entropy"].feature.dtype == "float32"


@pytest.mark.slow
def test_embedded_model_batch_independence(embedded_model, tokenizer, gsm8k_tokens, embedded_scored):
    lengths = [len(x) for x in gsm8k_tokens["input_ids"]]
    # `embedded_scored` batched examples 2 and 0 together (0 padded to 2's length) and scored 1 alone
    assert make_batches(lengths, 1024) == [[2, 0], [1]]
    alone = score(gsm8k_tokens.select([0, 2]), embedded_model, tokenizer=tokenizer, max_tokens_per_batch=1)
    alone = {0: alone[0]["token_nll"], 1: embedded_scored[1]["token_nll"], 2: alone[1]["token_nll"]}
    # Other company and order: 1 padded to 0's length
    pair = score(gsm8k_tokens.select([1, 0]), embedded_model, tokenizer=tokenizer, max_tokens_per_batch=4096)
    # Padding changes the length of the attention reductions, so float32 rounding differs by a few ulps after 30
    # layers (measured: up to 1.5e-5 on NLLs of ~7.6, i.e. 2e-6 relative); hence a relative term on top of 1e-5.
    tolerance = dict(atol=1e-5, rtol=1e-5)
    for i in (0, 2):
        np.testing.assert_allclose(embedded_scored[i]["token_nll"], alone[i], **tolerance)
    for row, i in enumerate([1, 0]):
        np.testing.assert_allclose(pair[row]["token_nll"], alone[i], **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# (b) batch independence on a tiny model


def test_batch_independence_tiny_model(peaky_llama):
    lengths = [5, 17, 40, 64, 3, 2, 33, 33]
    ds = random_dataset(lengths, 512)
    alone = score(ds, peaky_llama, max_tokens_per_batch=1)
    assert all(len(b) == 1 for b in make_batches(lengths, 1))
    for example in alone:
        np.testing.assert_allclose(example["token_nll"], expected(peaky_llama, example), atol=1e-4, rtol=0)
    reference = [np.asarray(x) for x in alone["token_nll"]]
    assert max(np.abs(r).max() for r in reference) > 1.0  # values vary: a real check

    def check(result, order):
        for row, i in enumerate(order):
            np.testing.assert_allclose(result[row]["token_nll"], reference[i], atol=1e-5, rtol=0)

    for budget in (64, 100, 10_000):
        check(score(ds, peaky_llama, max_tokens_per_batch=budget), range(len(ds)))
    order = [6, 3, 0, 7, 1, 5, 2, 4]
    check(score(ds.select(order), peaky_llama, max_tokens_per_batch=10_000), order)
    # Different company: each example next to unrelated, longer neighbours
    others = random_dataset([70, 50, 20], 512, seed=1)
    mixed = concatenate_datasets([others, ds.select([0, 2, 4])])
    result = score(mixed, peaky_llama, max_tokens_per_batch=10_000)
    check(result.select([3, 4, 5]), [0, 2, 4])


# ---------------------------------------------------------------------------------------------------------------
# (b2) token_entropy


def test_entropy_matches_full_softmax(peaky_llama):
    lengths = [5, 17, 40, 64, 3, 2, 33]
    ds = random_dataset(lengths, 512)
    rows = ds.to_list()
    rows[2]["labels"][20] = IGNORE_INDEX  # a hole in the completion is not scored either
    ds = Dataset.from_list(rows)
    alone = score(ds, peaky_llama, max_tokens_per_batch=1)
    padded = score(ds, peaky_llama, max_tokens_per_batch=10_000)  # shorter examples padded next to longer ones
    assert alone.column_names == [*ds.column_names, "token_nll", "token_entropy"]
    spread = []
    for a, b in zip(alone, padded):
        got = np.asarray(a["token_entropy"])
        assert got.shape == (len(a["input_ids"]),) == np.shape(a["token_nll"])
        ref = expected_entropy(peaky_llama, a)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b["token_entropy"], got, atol=1e-5, rtol=0)
        scored = np.asarray(a["labels"]) != IGNORE_INDEX
        scored[0] = False
        assert (got[~scored] == 0.0).all()  # untouched positions (prompt, hole, position 0)
        assert (got[scored] > 0.0).all()
        spread.extend(got[scored])
    # A real check: the peaky model's entropies are far from uniform (log 512 = 6.24) and differ between positions
    assert np.ptp(spread) > 1.0 and max(spread) < np.log(512)
    # The NLLs are the same whether or not the entropies are computed with them
    plain = score(ds, peaky_llama, max_tokens_per_batch=10_000, entropy_column=None)
    assert plain.column_names == [*ds.column_names, "token_nll"]
    for a, b in zip(plain, padded):
        np.testing.assert_allclose(a["token_nll"], b["token_nll"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_softmax_row_blocks(peaky_llama, monkeypatch, dtype):
    """On CPU the log-softmax and entropy run on cache-sized row blocks of each LM-head chunk: blocks of 3 rows (and a
    last, shorter one) give the plain reference's values, for a float32 model and for a bfloat16 one (whose logits are
    converted to float32 block by block)."""
    model = copy.deepcopy(peaky_llama).to(dtype)
    monkeypatch.setattr(lm_head, "_CPU_SOFTMAX_BLOCK_BYTES", 4 * 512 * 3)
    hidden = torch.randn(20, 64, dtype=dtype)
    targets = torch.randint(0, 512, (20,))
    log_probs, entropy = selected_log_probs(model, hidden, targets, return_entropy=True)
    logits = model.lm_head(hidden).float()
    log_p = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(log_probs, log_p.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-4, rtol=0)
    assert log_probs.dtype == entropy.dtype == torch.float32
    # Through score_dataset too, with chunks of 7 rows split into blocks of 3, 3 and 1
    ds = random_dataset([30, 12], 512)
    scored = score(ds, peaky_llama, max_tokens_per_batch=10_000)
    calls = []
    handle = peaky_llama.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        monkeypatch.setattr(
            scoring, "batch_token_nll", functools.partial(scoring.batch_token_nll, logits_chunk_bytes=4 * 512 * 7)
        )
        blocked = score(ds, peaky_llama, max_tokens_per_batch=10_000)
    finally:
        handle.remove()
    assert max(calls) == 7
    for a, b in zip(scored, blocked):
        np.testing.assert_allclose(b["token_nll"], a["token_nll"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(b["token_entropy"], a["token_entropy"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(b["token_entropy"], expected_entropy(peaky_llama, b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_selected_log_probs_gradient(peaky_llama, monkeypatch, kind):
    """The log-probabilities stay differentiable (in-place steps only on tensors autograd did not save), over several
    row blocks, with soft-capping and logit scales."""
    model = {"llama": lambda: peaky_llama, "gemma2": tiny_gemma2, "granite": lambda: tiny_scaled("granite")[0]}[kind]()
    monkeypatch.setattr(lm_head, "_CPU_SOFTMAX_BLOCK_BYTES", 4 * 512 * 3)
    torch.manual_seed(0)
    hidden = torch.randn(10, 64, requires_grad=True)
    targets = torch.randint(0, 512, (10,))
    selected_log_probs(model, hidden, targets).sum().backward()
    reference = hidden.detach().clone().requires_grad_()
    scale, softcap = output_logit_transform(model.config)
    logits = model.lm_head(reference) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(hidden.grad, reference.grad, atol=1e-5, rtol=1e-4)


def test_batch_token_nll_return_entropy(peaky_llama):
    ds = random_dataset([30, 12], 512, prompt_fraction=0.0)
    ids = torch.zeros(2, 30, dtype=torch.long)
    attention = torch.zeros(2, 30, dtype=torch.long)
    for i, row in enumerate(ds["input_ids"]):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    nll_only = batch_token_nll(peaky_llama, ids, attention, attention)
    assert isinstance(nll_only, torch.Tensor)  # the default return is unchanged
    # A small chunk budget: several LM-head chunks, same values
    nll, entropy = batch_token_nll(peaky_llama, ids, attention, attention, 4 * 512 * 7, return_entropy=True)
    assert nll.shape == entropy.shape == ids.shape and entropy.dtype == torch.float32
    np.testing.assert_allclose(nll.numpy(), nll_only.numpy(), atol=1e-6, rtol=0)
    assert (entropy[:, 0] == 0).all() and (entropy[1, 12:] == 0).all()  # position 0 and padding
    for i, example in enumerate(ds):
        n = len(example["input_ids"])
        ref = expected_entropy(peaky_llama, example, all_tokens=True)
        np.testing.assert_allclose(entropy[i, :n].numpy(), ref, atol=1e-4, rtol=0)
    # selected_log_probs on no rows
    log_probs, ent = selected_log_probs(
        peaky_llama, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), return_entropy=True
    )
    assert log_probs.shape == ent.shape == (0,) and ent.dtype == torch.float32


def test_entropy_column_settings(peaky_llama):
    ds = random_dataset([9, 6], 512)
    out = score(ds, peaky_llama, output_column="ref_nll", entropy_column="ref_entropy")
    assert "ref_entropy" in out.column_names and "token_entropy" not in out.column_names
    assert out.features["ref_entropy"].feature.dtype == "float32"
    with pytest.raises(ValueError, match="entropy_column and output_column are both 'token_nll'"):
        ScoringConfig(entropy_column="token_nll")


def test_collator_stm_entropy_on_the_fly(peaky_llama, monkeypatch):
    """`PplMaskCollator` with `stm_entropy` and a reference model: NLLs and entropies from one on-the-fly pass, the
    same labels as masking the scored dataset; from the dataset's columns when present."""
    from types import SimpleNamespace

    import trl_pplmask.collator as collator_module
    from trl_pplmask.masking import PplMaskConfig, mask_dataset

    ds = random_dataset([30, 12, 21], 512)
    scored = score(ds, peaky_llama)
    nll = np.concatenate(scored["token_nll"])
    entropy = np.concatenate(scored["token_entropy"])
    # Thresholds in the middle of this model's values, so that both conditions matter
    config = PplMaskConfig(
        strategy="stm_entropy",
        threshold=float(np.exp(np.median(nll[nll > 0]))),
        entropy_threshold=float(np.median(entropy[entropy > 0])),
    )
    expected_labels, stats = mask_dataset(scored, config)
    _, stm_stats = mask_dataset(scored, PplMaskConfig(threshold=config.threshold))
    assert 0 < stats["masked_tokens"] < stm_stats["masked_tokens"]

    calls = []
    original = collator_module.batch_token_nll

    def counting(*args, **kwargs):
        calls.append(kwargs.get("return_entropy", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(collator_module, "batch_token_nll", counting)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # the collator reads only the pad token
    on_the_fly = collator_module.PplMaskCollator(tokenizer, config=config, reference_model=peaky_llama)(ds.to_list())
    assert calls == [True]  # one pass gives both
    from_columns = collator_module.PplMaskCollator(tokenizer, config=config)(scored.to_list())
    assert calls == [True]
    for i, example in enumerate(expected_labels):
        n = len(example["labels"])
        assert on_the_fly["labels"][i, :n].tolist() == example["labels"]
        assert from_columns["labels"][i, :n].tolist() == example["labels"]
    # NLLs present but no entropies (the on-the-fly pass is only for batches without NLLs): a clear error
    collator = collator_module.PplMaskCollator(tokenizer, config=config, reference_model=peaky_llama)
    with pytest.raises(ValueError, match=r"entropies in column 'token_entropy'.*trl-pplmask score"):
        collator(scored.remove_columns("token_entropy").to_list())


# ---------------------------------------------------------------------------------------------------------------
# (c) output logit transforms: Gemma-2 soft-capping and logit scales


@torch.no_grad()
def uncapped_nll(model, input_ids) -> np.ndarray:
    ids = torch.tensor([input_ids])
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden)[0].float()
    out = np.zeros(len(input_ids), dtype=np.float32)
    out[1:] = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
    return out


def test_gemma2_softcapping():
    model = tiny_gemma2(softcap=2.0)
    assert output_logit_transform(model.config) == (1.0, 2.0)
    ds = random_dataset([40, 25, 9], 512)
    for budget in (1, 10_000):
        scored = score(ds, model, max_tokens_per_batch=budget, score_all_tokens=True)
        for example in scored:
            got = np.asarray(example["token_nll"])
            np.testing.assert_allclose(got, expected(model, example, all_tokens=True), atol=1e-5, rtol=0)
            np.testing.assert_allclose(
                example["token_entropy"], expected_entropy(model, example, all_tokens=True), atol=1e-4, rtol=0
            )
            # The cap matters here: without it the NLLs are clearly different
            assert np.abs(got - uncapped_nll(model, example["input_ids"])).max() > 0.1
            # With a cap of 2 every logit is in (-2, 2): no NLL can exceed log(vocab) + 4
            assert got.max() < np.log(512) + 4


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_logit_scale_models(kind):
    model, scale = tiny_scaled(kind)
    assert output_logit_transform(model.config) == (scale, None)
    for example in score(random_dataset([30, 12], 512), model, score_all_tokens=True):
        got = np.asarray(example["token_nll"])
        np.testing.assert_allclose(got, expected(model, example, all_tokens=True), atol=1e-5, rtol=0)
        assert np.abs(got - uncapped_nll(model, example["input_ids"])).max() > 0.01
        entropy = expected_entropy(model, example, all_tokens=True)
        np.testing.assert_allclose(example["token_entropy"], entropy, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_fused_kernel_path(kind, monkeypatch):
    """On CUDA the LM head goes through TRL's fused `ChunkedLogProbFunction` (torch ops where Triton is missing):
    forced here on CPU, the arguments `selected_log_probs` passes it (soft-cap, scale) reproduce the model's own
    forward too, entropies included (the kernel's `"entropy"` output)."""
    model = tiny_gemma2(softcap=2.0) if kind == "gemma2" else tiny_scaled(kind)[0]
    monkeypatch.setattr(lm_head, "_use_triton", lambda device: True)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        scored = score(random_dataset([40, 9], 512), model, score_all_tokens=True, max_tokens_per_batch=10_000)
    finally:
        handle.remove()
    assert not calls  # the fused path projects with the weight itself, not through the LM head module
    for example in scored:
        np.testing.assert_allclose(example["token_nll"], expected(model, example, all_tokens=True), atol=2e-5, rtol=0)
        entropy = expected_entropy(model, example, all_tokens=True)
        np.testing.assert_allclose(example["token_entropy"], entropy, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# (d) PEFT


def test_peft_adapter(peaky_llama, score_cache):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(peaky_llama)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(peaky_llama), lora).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    ds = random_dataset([30, 18, 7], 512)

    with_adapter = score(ds, peft_model)
    without = score(ds, peft_model, disable_adapter=True)
    moved = 0.0
    for a, b in zip(with_adapter, without):
        np.testing.assert_allclose(a["token_nll"], expected(merged, a), atol=1e-4, rtol=0)
        np.testing.assert_allclose(b["token_nll"], expected(base, b), atol=1e-4, rtol=0)
        moved = max(moved, np.abs(np.subtract(a["token_nll"], b["token_nll"])).max())
    assert moved > 0.05  # the adapter really changes the predictions
    # The adapter is enabled again afterwards, and the model is still in eval mode
    np.testing.assert_allclose(score(ds, peft_model)[0]["token_nll"], with_adapter[0]["token_nll"], atol=1e-6)
    assert not peft_model.training

    # The cache tells the two apart
    first = score(ds, peft_model, cache_dir=score_cache, use_cache=True)
    second = score(ds, peft_model, cache_dir=score_cache, use_cache=True, disable_adapter=True)
    np.testing.assert_allclose(first[0]["token_nll"], with_adapter[0]["token_nll"], atol=1e-6)
    np.testing.assert_allclose(second[0]["token_nll"], without[0]["token_nll"], atol=1e-6)


def test_training_mode_restored():
    # Attention dropout would make the scores random if the model were scored in train mode
    model = tiny_llama(vocab_size=512, initializer_range=0.3, attention_dropout=0.5).train()
    ds = random_dataset([20], 512)
    a = score(ds, model)
    assert model.training
    b = score(ds, model)
    np.testing.assert_allclose(a[0]["token_nll"], b[0]["token_nll"], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (e) the LM head never sees more than `logits_chunk_bytes` of float32 logits at once


def test_lm_head_is_chunked():
    vocab = 128256
    model = tiny_llama(vocab_size=vocab)
    lm_head = model.get_output_embeddings()
    calls = []
    handles = [
        lm_head.register_forward_hook(lambda mod, inp, out: calls.append((tuple(inp[0].shape), tuple(out.shape)))),
        # The full causal-LM forward (which builds [batch, seq, vocab] logits) must never run
        model.register_forward_hook(lambda *args: pytest.fail("model.forward was called")),
    ]
    try:
        n = 1200
        ds = random_dataset([n, 300], vocab, prompt_fraction=0.0)
        budget = 2**28  # the default `logits_chunk_bytes` of `batch_token_nll`
        scored = score(ds, model, max_tokens_per_batch=10_000)
        assert sum(out[0] for _, out in calls) == (n - 1) + 299
        assert len(calls) >= 3  # the 1200-token example alone needs more than two chunks at this vocabulary
        for inp, out in calls:
            assert len(inp) == 2 and len(out) == 2, "the LM head ran on a [batch, seq, hidden] tensor"
            assert out[0] * out[1] * 4 <= budget

        # batch_token_nll with a small chunk budget: more chunks, same values
        calls.clear()
        ids = torch.tensor([ds[1]["input_ids"]])
        mask = torch.ones_like(ids)
        small = 4 * vocab * 16
        nll = batch_token_nll(model, ids, mask, mask, logits_chunk_bytes=small)
        assert len(calls) == -(-299 // 16)
        assert all(out[0] * out[1] * 4 <= small for _, out in calls)
        np.testing.assert_allclose(nll[0].numpy(), scored[1]["token_nll"], atol=1e-5, rtol=0)
    finally:
        for h in handles:
            h.remove()


def test_lm_head_only_on_scored_positions(peaky_llama):
    calls = []
    handle = peaky_llama.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: calls.append(out.shape[0])
    )
    try:
        ds = random_dataset([50, 20], 512, prompt_fraction=0.5)
        score(ds, peaky_llama, max_tokens_per_batch=10_000)
    finally:
        handle.remove()
    assert sum(calls) == 25 + 10  # the label tokens only, not the prompts


def test_selected_log_probs_empty(peaky_llama):
    out = selected_log_probs(peaky_llama, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# (f) cache


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = scoring.batch_token_nll

    def counting(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape)
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(scoring, "batch_token_nll", counting)
    return calls


def test_cache(peaky_llama, counted, score_cache):
    model = copy.deepcopy(peaky_llama)
    ds = random_dataset([20, 30, 9], 512)
    kwargs = dict(use_cache=True, cache_dir=score_cache, max_tokens_per_batch=40)

    first = score(ds, model, **kwargs)
    n_first = len(counted)
    assert n_first >= 2
    # Same tokens (even in a freshly built dataset object), same weights, same settings: no model call
    again = score(Dataset.from_list(ds.to_list()), model, **kwargs)
    assert len(counted) == n_first
    assert again["token_nll"] == first["token_nll"]
    assert again.features["token_nll"].feature.dtype == "float32"

    # Changed tokens: recomputed
    changed = ds.to_list()
    changed[1]["input_ids"][-1] = (changed[1]["input_ids"][-1] + 1) % 512
    changed[1]["labels"][-1] = changed[1]["input_ids"][-1]
    result = score(Dataset.from_list(changed), model, **kwargs)
    assert len(counted) > n_first
    assert result[1]["token_nll"][-1] != first[1]["token_nll"][-1]

    # Changed labels only (what is scored): recomputed
    n = len(counted)
    relabeled = ds.to_list()
    relabeled[0]["labels"][-1] = IGNORE_INDEX
    result = score(Dataset.from_list(relabeled), model, **kwargs)
    assert len(counted) > n and result[0]["token_nll"][-1] == 0.0

    # Changed settings: recomputed
    n = len(counted)
    score(ds, model, score_all_tokens=True, **kwargs)
    assert len(counted) > n

    # Changed weights (a fine-tuning step touches whole tensors): recomputed, with the new values
    n = len(counted)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    result = score(ds, model, **kwargs)
    assert len(counted) > n
    np.testing.assert_allclose(result[0]["token_nll"], expected(model, ds[0]), atol=1e-4, rtol=0)
    assert not np.allclose(result[0]["token_nll"], first[0]["token_nll"], atol=1e-4)

    # use_cache=False always recomputes
    n = len(counted)
    score(ds, model, use_cache=False, cache_dir=score_cache, max_tokens_per_batch=40)
    assert len(counted) > n


def test_cache_entropy(peaky_llama, counted, score_cache):
    ds = random_dataset([20, 30, 9], 512)
    kwargs = dict(use_cache=True, cache_dir=score_cache)
    # An entry written without entropies does not answer a call that wants them...
    plain = score(ds, peaky_llama, entropy_column=None, **kwargs)
    assert "token_entropy" not in plain.column_names
    n = len(counted)
    first = score(ds, peaky_llama, **kwargs)
    assert len(counted) > n
    assert first["token_nll"] == plain["token_nll"]
    # ...and the new entry holds both: restored exactly, for either kind of call, with no model call
    n = len(counted)
    again = score(Dataset.from_list(ds.to_list()), peaky_llama, **kwargs)
    nll_only = score(ds, peaky_llama, entropy_column=None, **kwargs)
    assert len(counted) == n
    assert again["token_entropy"] == first["token_entropy"] and again["token_nll"] == first["token_nll"]
    assert again.features["token_entropy"].feature.dtype == "float32"
    assert "token_entropy" not in nll_only.column_names and nll_only["token_nll"] == first["token_nll"]
    assert [len(x) for x in again["token_entropy"]] == [len(x) for x in ds["input_ids"]]
    assert len(list(Path(score_cache).glob("*.npz"))) == 1
    assert scoring._CACHE_VERSION != "1"  # entries of the NLL-only format are not read as current ones


def test_cache_ignores_corrupt_file(peaky_llama, counted, score_cache):
    ds = random_dataset([12, 8], 512)
    kwargs = dict(use_cache=True, cache_dir=score_cache)
    first = score(ds, peaky_llama, **kwargs)
    files = list(Path(score_cache).glob("*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"not a cache file")
    n = len(counted)
    again = score(ds, peaky_llama, **kwargs)
    assert len(counted) > n
    assert again["token_nll"] == first["token_nll"]


# ---------------------------------------------------------------------------------------------------------------
# (g) errors


def test_errors(peaky_llama):
    with pytest.raises(ValueError, match="needs a tokenized dataset with `input_ids`"):
        score(Dataset.from_list([{"text": "hello"}]), peaky_llama)
    with pytest.raises(ValueError, match="empty"):
        score(Dataset.from_dict({"input_ids": [], "labels": []}), peaky_llama)
    with pytest.raises(ValueError, match="max_tokens_per_batch must be positive"):
        ScoringConfig(max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="either `config` or ScoringConfig keyword"):
        score_dataset(random_dataset([4], 512), peaky_llama, config=ScoringConfig(), use_cache=False)


# ---------------------------------------------------------------------------------------------------------------
# (h) which positions are scored


def test_scored_positions(peaky_llama):
    ds = random_dataset([12, 7], 512, prompt_fraction=0.5)
    # Labels that also skip a token in the middle of the completion, and one that trains position 0
    rows = ds.to_list()
    rows[0]["labels"][9] = IGNORE_INDEX
    rows[1]["labels"] = list(rows[1]["input_ids"])
    ds = Dataset.from_list(rows)

    default = score(ds, peaky_llama)
    for example in default:
        got = np.asarray(example["token_nll"])
        ignored = np.asarray(example["labels"]) == IGNORE_INDEX
        assert got[0] == 0.0
        assert (got[ignored] == 0.0).all()
        assert (got[1:][~ignored[1:]] > 0).all()
        np.testing.assert_allclose(got, expected(peaky_llama, example), atol=1e-4, rtol=0)

    everything = score(ds, peaky_llama, score_all_tokens=True)
    no_labels = score(ds.remove_columns("labels"), peaky_llama)
    for a, b, example in zip(everything, no_labels, ds):
        got = np.asarray(a["token_nll"])
        assert got[0] == 0.0 and (got[1:] > 0).all()
        np.testing.assert_allclose(got, expected(peaky_llama, example, all_tokens=True), atol=1e-4, rtol=0)
        np.testing.assert_allclose(b["token_nll"], got, atol=1e-6, rtol=0)


def test_output_column(peaky_llama):
    ds = random_dataset([6, 4], 512)
    out = score(ds, peaky_llama, output_column="ref_nll")
    assert "ref_nll" in out.column_names and "token_nll" not in out.column_names
    assert out.features["ref_nll"].feature.dtype == "float32"
    # Rescoring replaces an existing column instead of failing
    again = score(out.rename_column("ref_nll", "token_nll"), peaky_llama)
    assert again["token_nll"] == out["ref_nll"]


# ---------------------------------------------------------------------------------------------------------------
# (i) make_batches


def test_make_batches_example():
    assert make_batches([3, 10, 4, 10, 1], 20) == [[1, 3], [2, 0, 4]]
    assert make_batches([50, 2], 10) == [[0], [1]]  # longer than the budget: alone


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=50),
    budget=st.integers(min_value=1, max_value=2000),
)
def test_make_batches_property(lengths, budget):
    batches = make_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for batch in batches:
        assert batch
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) == 1 or len(batch) * longest <= budget
