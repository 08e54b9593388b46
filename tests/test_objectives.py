"""The token-weighted objectives (`--pplmask_loss eaft|asft|soft_stm`) against direct full-softmax computations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import launch, sft_args

from trl_pplmask import anchor
from trl_pplmask.collator import WEIGHT_KEY
from trl_pplmask.masking import soft_token_weights
from trl_pplmask.sft import CONFIG_FILE, LOSSES, PplMaskArguments, build_trainer, parse_args


# About the median perplexity of the tiny random model (13k-2.3M, 5th-95th percentile): weights spread over (0, 1)
SOFT_WIDTH = "2e5"
ROWS = 3


def _trainer(tmp_path: Path, model_dir: Path, data_dir: Path, *extra: str):
    argv = sft_args(tmp_path, model_dir, data_dir, "--pplmask_strategy", "none", "--lora_dropout", "0.0", *extra)
    trainer, collator, _, _ = build_trainer(*parse_args(argv))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter away from zero: the model then differs from the base (KL > 0)
        for name, p in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return trainer, collator


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(trainer, batch: dict, num_items: int | None = None):
    model = trainer.model
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in _params(model).items()}


def _reference(trainer, batch: dict, objective: str, alpha: float = 1.0, k: int | None = 20, width: float = 1.0):
    """The objective from the full `[batch, seq, vocab]` softmax of the model's own forward, and its gradients."""
    model = trainer.model
    model.zero_grad()
    model.train()
    ids, attention = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_p = torch.log_softmax(logits, -1)
    nll = -log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    with torch.no_grad(), model.disable_adapter():
        base_log_p = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1], -1)
    with torch.no_grad():
        if objective == "eaft":
            if k is None:
                entropy, norm = -(log_p.exp() * log_p).sum(-1), math.log(logits.shape[-1])
            else:
                top = torch.log_softmax(logits.topk(k, -1).values, -1)
                entropy, norm = -(top.exp() * top).sum(-1), math.log(k)
            weight = (entropy / norm) ** alpha
        elif objective == "asft":
            weight = (-nll).exp()
        else:
            base_nll = -base_log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            weight = torch.exp(-(((base_nll.double().exp() - 1) / width) ** 2)).float()
    n = mask.sum()
    loss = (weight * nll)[mask].sum() / n
    if objective == "asft":
        kl = (base_log_p.exp() * (base_log_p - log_p)).sum(-1)
        loss = loss + alpha * kl[mask].sum() / n
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in _params(model).items()}


def _assert_close(got, expected, tol: float = 1e-5):
    loss, grads = got
    ref_loss, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize(
    "objective, extra, params",
    [
        ("eaft", ["--pplmask_eaft_alpha", "1.0"], {"alpha": 1.0, "k": 20}),
        ("eaft", ["--pplmask_eaft_alpha", "0.5", "--pplmask_eaft_k", "7"], {"alpha": 0.5, "k": 7}),
        ("eaft", ["--pplmask_eaft_k", "49152"], {"alpha": 1.0, "k": None}),  # the vocabulary: the exact entropy
        ("asft", ["--pplmask_asft_alpha", "0.3"], {"alpha": 0.3}),
        ("soft_stm", ["--pplmask_soft_width", SOFT_WIDTH], {"width": float(SOFT_WIDTH)}),
    ],
    ids=["eaft", "eaft_k7_alpha0.5", "eaft_exact", "asft", "soft_stm"],
)
def test_objective_matches_full_softmax(tmp_path, tiny_dir, train_dir, objective, extra, params):
    trainer, collator = _trainer(tmp_path, tiny_dir, train_dir, "--pplmask_loss", objective, *extra)
    batch = collator([trainer.train_dataset[i] for i in range(ROWS)])
    if objective == "soft_stm":
        weights = batch[WEIGHT_KEY][batch["labels"] != -100]
        assert 0.05 < float(weights.mean()) < 0.95, "the test width should spread the weights"
    got = _loss_and_grads(trainer, batch)
    reference_batch = {k: v for k, v in batch.items() if k != WEIGHT_KEY}
    _assert_close(got, _reference(trainer, reference_batch, objective, **params))


def test_chunked_topk_entropy_matches_full_softmax():
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=512, initializer_range=0.5)
    hidden = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    top = torch.log_softmax(model.lm_head(hidden).float().topk(20, -1).values, -1)
    expected = -(top.exp() * top).sum(-1)
    # A budget of 4 rows per chunk exercises the chunking
    torch.testing.assert_close(anchor.topk_entropy(model, hidden, 20, logits_chunk_bytes=4 * 4 * 512), expected)


def _plain(tmp_path, tiny_dir, train_dir, *extra):
    trainer, collator = _trainer(tmp_path, tiny_dir, train_dir, *extra)
    return trainer, collator([trainer.train_dataset[i] for i in range(ROWS)])


@pytest.mark.parametrize(
    "extra, baseline",
    [
        (["--pplmask_loss", "eaft", "--pplmask_eaft_alpha", "0"], []),
        (["--pplmask_loss", "soft_stm", "--pplmask_soft_width", "1e12"], []),
        (["--pplmask_loss", "asft", "--pplmask_asft_alpha", "0"], ["--loss_type", "dft"]),
    ],
    ids=["eaft_alpha0_is_nll", "soft_stm_wide_is_nll", "asft_alpha0_is_dft"],
)
def test_limits_are_the_stock_losses(tmp_path, tiny_dir, train_dir, extra, baseline):
    trainer, batch = _plain(tmp_path / "a", tiny_dir, train_dir, *extra)
    stock, stock_batch = _plain(tmp_path / "b", tiny_dir, train_dir, *baseline)
    assert type(stock).__name__ == "SFTTrainer"  # TRL's own loss
    num_items = int(batch["labels"][:, 1:].ne(-100).sum())
    _assert_close(_loss_and_grads(trainer, batch, num_items), _loss_and_grads(stock, stock_batch, num_items), 1e-6)


def test_objectives_train_from_the_cli(tmp_path, tiny_dir, train_dir):
    from trl_pplmask.cli import main as cli_main

    for objective, extra in (("eaft", []), ("asft", []), ("soft_stm", ["--pplmask_soft_width", SOFT_WIDTH])):
        out = tmp_path / objective
        argv = sft_args(out, tiny_dir, train_dir, "--pplmask_strategy", "none", "--pplmask_loss", objective, *extra)
        assert cli_main(["sft", *argv, "--max_steps", "2"]) == 0
        record = json.loads((out / "out" / CONFIG_FILE).read_text())
        assert record["settings"]["pplmask_loss"] == objective
        history = json.loads((out / "out" / "trainer_state.json").read_text())["log_history"]
        weights = [log["pplmask/mean_weight"] for log in history if "pplmask/mean_weight" in log]
        assert len(weights) == 2 and all(0 < w <= 1 for w in weights), (objective, weights)
        if objective == "asft":
            kls = [log["pplmask/asft_kl"] for log in history if "pplmask/asft_kl" in log]
            assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 0  # step 0: the base


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pplmask_loss", "eaft", "--pplmask_eaft_alpha", "-1"], "pplmask_eaft_alpha must be a finite number >= 0"),
        (["--pplmask_loss", "asft", "--pplmask_asft_alpha", "-0.1"], "pplmask_asft_alpha must be"),
        (["--pplmask_loss", "eaft", "--pplmask_eaft_k", "0"], "pplmask_eaft_k must be >= 1"),
        (["--pplmask_loss", "eaft", "--pplmask_eaft_k", "49153"], "exceeds the model's vocabulary"),
        (["--pplmask_loss", "soft_stm", "--pplmask_soft_width", "0"], "pplmask_soft_width must be a positive"),
        (["--pplmask_loss", "soft_stm", "--pplmask_strategy", "threshold"], "does not combine with"),
        (["--pplmask_loss", "eaft", "--loss_type", "dft"], "needs loss_type=nll"),
        (["--pplmask_loss", "asft", "--label_smoothing_factor", "0.1"], "label_smoothing_factor=0"),
        (["--pplmask_loss", "eaft", "--padding_free", "true", "--pplmask_prescore"], "padding_free"),
        (["--pplmask_loss", "asft", "--pplmask_reference", "some/other-model"], "needs pplmask_reference=base"),
    ],
)
def test_bad_objective_settings_fail_before_training(tmp_path, tiny_dir, train_dir, extra, message):
    with pytest.raises(ValueError, match=message):
        build_trainer(*parse_args(sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_strategy", "none", *extra)))
    assert not (tmp_path / "out" / CONFIG_FILE).exists()


def test_unknown_objective_is_a_usage_error(tmp_path, tiny_dir, train_dir, capsys):
    from trl_pplmask.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", *sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_loss", "focal")])
    assert exit_info.value.code == 2
    assert "focal" in capsys.readouterr().err


def test_trainer_refuses_bad_weights_and_missing_base(tmp_path, tiny_dir, train_dir):
    for kwargs, message in (
        ({"objective": "focal"}, "Unknown objective"),
        ({"objective": "eaft", "eaft_k": 0}, "eaft_k must be an integer >= 1"),
        ({"objective": "asft", "asft_alpha": float("nan")}, "asft_alpha must be a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            anchor.check_objective(**kwargs)
    args = parse_args(sft_args(tmp_path, tiny_dir, train_dir))[1]
    with pytest.raises(ValueError, match="asft objective needs the base model's predictions"):
        anchor.TokenWeightedSFTTrainer(
            model=str(tiny_dir),
            args=args,
            train_dataset=__import__("datasets").load_from_disk(str(train_dir)),
            objective="asft",
        )


def test_settings_agree_with_the_trainer():
    fields = {f.name: f for f in dataclasses.fields(PplMaskArguments)}
    assert tuple(fields["pplmask_loss"].metadata["choices"]) == LOSSES == anchor.OBJECTIVES
    assert fields["pplmask_eaft_alpha"].default == anchor.DEFAULT_EAFT_ALPHA
    assert fields["pplmask_eaft_k"].default == anchor.DEFAULT_EAFT_K
    assert fields["pplmask_asft_alpha"].default == anchor.DEFAULT_ASFT_ALPHA
    assert soft_token_weights([0.0, math.log(1.75), 5.0], np.array([True, True, False])).tolist() == pytest.approx(
        [1.0, math.exp(-1.0), 0.0]
    )


def test_two_processes_give_the_objectives_of_one(tmp_path, tiny_dir, train_dir):
    """Each objective's loss of one batch split over 2 processes, averaged as DDP averages gradients, equals 1."""
    helper = Path(__file__).with_name("_accelerate_objectives.py")
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(helper), str(single), str(tiny_dir), str(train_dir)], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(helper), str(tmp_path / "double"), str(tiny_dir), str(train_dir),
    ]  # fmt: skip
    returncode, output = launch(command, env, tmp_path, timeout=400)
    assert returncode == 0, output[-6000:]
    one = json.loads((single / "rank0.json").read_text())
    two = [json.loads((tmp_path / "double" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(t["num_processes"] == 2 for t in two)
    for objective in ("eaft", "asft", "soft_stm"):
        assert np.mean([t[objective] for t in two]) == pytest.approx(one[objective], rel=1e-5), objective
