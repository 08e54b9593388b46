"""`trl-pplmask sft`: TRL's parser and flow, the collator's labels against `compute_mask`, errors before training.

A tiny random Llama with the embedded tokenizer keeps each run to seconds: weights do not matter for label equality.
Its perplexities sit near the vocabulary size, so thresholds are set from the NLLs it gives (about 1e4..2e5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_llama
from testing_utils import TINY_THRESHOLD, launch, sft_args

from trl_pplmask.masking import IGNORE_INDEX, PplMaskConfig, compute_mask
from trl_pplmask.scoring import batch_token_nll
from trl_pplmask.sft import CONFIG_FILE, build_trainer, main, parse_args


def reference_labels(model, rows: list[dict], config: PplMaskConfig, threshold: float | None = None) -> list[list]:
    """The mask recomputed independently: per-example NLLs of the base model, then `compute_mask`."""
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        score = torch.from_numpy(np.asarray(row["labels"]) != IGNORE_INDEX)[None]
        nll, entropy = batch_token_nll(model, ids, torch.ones_like(ids), score, return_entropy=True)
        mask = compute_mask(
            nll[0].numpy(), row["labels"], config, token_entropy=entropy[0].numpy(), row_id=row["row_id"],
            threshold=threshold,
        )  # fmt: skip
        labels = np.asarray(row["labels"]).copy()
        labels[mask] = IGNORE_INDEX
        out.append(labels.tolist())
    return out


def collated_rows(batch: dict, n: int) -> list[list[int]]:
    lengths = batch["attention_mask"].sum(1).tolist()
    return [batch["labels"][i, : lengths[i]].tolist() for i in range(n)]


STRATEGY_FLAGS = {
    "threshold": [],
    "random": ["--pplmask_seed", "3"],
    "lowest": [],
    "lowest_count": [],
    "fraction": ["--pplmask_fraction", "0.3"],
    # The random model is unsure everywhere (entropy near log(vocab) = 10.8 nats): a threshold inside its range
    "stm_entropy": ["--pplmask_entropy_threshold", "10.75"],
}


@pytest.mark.parametrize("prescore", [False, True], ids=["on_the_fly", "prescored"])
@pytest.mark.parametrize("strategy", list(STRATEGY_FLAGS))
def test_every_strategy_trains_with_the_labels_of_compute_mask(tmp_path, tiny_dir, train_dir, strategy, prescore):
    from transformers import AutoModelForCausalLM

    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_strategy", strategy, *STRATEGY_FLAGS[strategy])
    argv += ["--pplmask_threshold", str(TINY_THRESHOLD), "--pplmask_prescore", str(prescore).lower()]
    script_args, training_args, model_args, dataset_args, pplmask_args = parse_args(argv)
    trainer, collator, _, _ = build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args)
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert all(len(r["input_ids"]) <= 256 for r in rows)  # scored on the trainer's truncated sequences
    batch = collator(rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    config = pplmask_args.mask_config()
    threshold = None
    if strategy == "fraction":
        from trl_pplmask.masking import resolve_fraction_threshold

        nlls = [np.asarray(r["token_nll"]) for r in rows] if prescore else collator._batch_nlls(rows)[0]
        threshold = resolve_fraction_threshold(nlls, [r["labels"] for r in rows], 0.3)
    expected = reference_labels(base, rows, config, threshold)
    got = collated_rows(batch, len(rows))
    assert got == expected
    masked = sum(np.sum(np.asarray(g) == IGNORE_INDEX) for g in got)
    prompt = sum(np.sum(np.asarray(r["labels"]) == IGNORE_INDEX) for r in rows)
    assert masked > prompt  # the strategy masked something beyond the prompt
    trainer.train()
    assert any("pplmask/masked_fraction" in log for log in trainer.state.log_history)


def test_strategy_none_trains_what_trl_sft_trains(tmp_path, tiny_dir, train_dir):
    from trl import SFTTrainer

    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_strategy", "none")
    script_args, training_args, model_args, dataset_args, pplmask_args = parse_args(argv)
    trainer, collator, _, _ = build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args)
    assert collator.reference_model is None  # nothing is scored
    stock_args = parse_args(sft_args(tmp_path / "stock", tiny_dir, train_dir))[1]
    from datasets import load_from_disk

    stock = SFTTrainer(str(tiny_dir), args=stock_args, train_dataset=load_from_disk(str(train_dir)))
    rows = [trainer.train_dataset[i] for i in range(4)]
    stock_rows = [stock.train_dataset[i] for i in range(4)]
    ours, theirs = collator(rows), stock.data_collator(stock_rows)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["labels"], theirs["labels"])


def test_peft_reference_is_the_trained_model_itself(tmp_path, tiny_dir, train_dir):
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_threshold", str(TINY_THRESHOLD))
    trainer, collator, _, _ = build_trainer(*parse_args(argv))
    # The adapter-disabled PEFT model is the base: no second copy of the weights
    assert collator.reference_model is trainer.model


def test_cli_run_writes_pplmask_config(tmp_path, tiny_dir, train_dir):
    from trl_pplmask.cli import main as cli_main

    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_threshold", str(TINY_THRESHOLD), "--pplmask_prescore")
    argv += ["--num_train_epochs", "1", "--max_steps", "-1"]
    assert cli_main(["sft", *argv]) == 0
    record = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert record["settings"]["pplmask_threshold"] == TINY_THRESHOLD
    stats = record["mask_stats"]
    assert stats["examples"] == 6 and 0 < stats["masked_fraction"] < 1
    assert record["prescore_stats"]["examples"] == 6
    assert record["prescore_stats"]["masked_tokens"] == stats["masked_tokens"]  # one full epoch: same tokens
    assert len(record["mask_stats_per_epoch"]) == 1


def test_stock_trl_sft_recipe_runs_unchanged(tmp_path, tiny_dir, train_dir):
    """The CPU baseline recipe, only its model and data paths pointed at local copies, trains through sft."""
    recipe = yaml.safe_load((REPO / "recipes" / "gsm8k-baseline-smollm2-135m-cpu.yaml").read_text())
    recipe["model_name_or_path"] = str(tiny_dir)
    recipe["datasets"] = [{"path": "parquet", "data_files": str(tmp_path / "train.parquet"), "split": "train"}]
    from datasets import load_from_disk

    load_from_disk(str(train_dir)).select_columns(["prompt", "completion"]).to_parquet(str(tmp_path / "train.parquet"))
    recipe.update(max_steps=1, output_dir=str(tmp_path / "out"), max_length=256)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from trl.scripts.sft import make_parser as trl_parser

    theirs = trl_parser().parse_args_and_config(["--config", str(path)], fail_with_unknown_args=True)
    ours = parse_args(["--config", str(path)])
    for a, b in zip(theirs, ours[:4]):
        assert a == b  # the same trl sft arguments, field by field
    assert ours[4].pplmask_strategy == "threshold"
    ours[4].pplmask_threshold = TINY_THRESHOLD
    record = main(*ours)
    assert record["mask_stats"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pplmask_threshold", "1.0"], "above 1"),
        (["--pplmask_threshold", "0.5"], "above 1"),
        (["--pplmask_strategy", "fraction"], "fraction"),
        (["--packing"], "packing=true is not supported"),
        (["--padding_free", "true"], "padding_free=true needs pplmask_prescore"),
        (["--pplmask_anchor", "--pplmask_strategy", "none"], "anchors nothing"),
        (["--pplmask_anchor_weight", "-1"], "must be >= 0"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, tiny_dir, train_dir, extra, message):
    with pytest.raises(ValueError, match=message):
        script_args, training_args, model_args, dataset_args, pplmask_args = parse_args(
            sft_args(tmp_path, tiny_dir, train_dir, *extra)
        )
        build_trainer(script_args, training_args, model_args, dataset_args, pplmask_args)
    assert not (tmp_path / "out" / CONFIG_FILE).exists()


def test_unknown_strategy_is_a_usage_error(tmp_path, tiny_dir, train_dir, capsys):
    from trl_pplmask.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", *sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_strategy", "stm2")])
    assert exit_info.value.code == 2
    assert "stm2" in capsys.readouterr().err


def test_reference_with_another_vocabulary_is_refused(tmp_path, tiny_dir, train_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tiny_llama(vocab_size=49153).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_tokens(["<extra_token_for_test>"])
    tokenizer.save_pretrained(other)
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_reference", str(other))
    with pytest.raises(ValueError, match="another tokenizer/vocabulary"):
        build_trainer(*parse_args(argv))


def test_every_row_fully_masked_is_refused_before_training(tmp_path, tiny_dir, train_dir):
    # The random model's perplexities are all far above 2.5: STM at the paper's threshold would train nothing
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_prescore")
    with pytest.raises(ValueError, match="masks every completion token of all 6 training rows"):
        build_trainer(*parse_args(argv))


# Issue 18 items 3 and 5: eval batches unmasked and uncounted, an on-the-fly mask of every token fails, the input
# folder is only read
@pytest.fixture(scope="module")
def split_dir(tmp_path_factory, data_dir) -> Path:
    from datasets import DatasetDict

    from trl_pplmask.data import load_task

    path = tmp_path_factory.mktemp("data") / "gsm8k-splits"
    splits = {"train": load_task("gsm8k", "train", limit=4), "test": load_task("gsm8k", "test", limit=3)}
    DatasetDict(splits).save_to_disk(str(path))
    return path


def _eval_loss(tmp_path: Path, tiny_dir: Path, data: Path, *extra: str):
    argv = sft_args(tmp_path, tiny_dir, data, "--eval_strategy", "steps", "--per_device_eval_batch_size", "2", *extra)
    trainer, collator, _, _ = build_trainer(*parse_args(argv))
    return trainer.evaluate()["eval_loss"], collator


@pytest.mark.parametrize(
    "extra",
    [
        ["--pplmask_threshold", str(TINY_THRESHOLD)],
        ["--pplmask_threshold", str(TINY_THRESHOLD), "--pplmask_prescore"],
        ["--pplmask_threshold", str(TINY_THRESHOLD), "--pplmask_loss", "eaft"],
        ["--pplmask_strategy", "none", "--pplmask_loss", "soft_stm"],
    ],
    ids=["on_the_fly", "prescored", "eaft", "soft_stm"],
)
def test_eval_loss_is_the_unmasked_nll_and_eval_rows_are_not_counted(tmp_path, tiny_dir, split_dir, extra):
    # The LoRA adapter starts at zero: every trainer evaluates the same weights, so only the labels and the loss differ
    plain, _ = _eval_loss(tmp_path / "plain", tiny_dir, split_dir, "--pplmask_strategy", "none")
    loss, collator = _eval_loss(tmp_path, tiny_dir, split_dir, *extra)
    assert loss == pytest.approx(plain, rel=1e-6)
    assert collator.cumulative_stats()["examples"] == 0  # the 3 eval rows are not training rows


def test_on_the_fly_mask_of_every_token_fails_without_saving_a_model(tmp_path, tiny_dir, train_dir):
    # The random model's perplexities are all far above 2.5: STM at the paper's threshold masks every token
    argv = sft_args(tmp_path, tiny_dir, train_dir, "--max_steps", "-1", "--num_train_epochs", "3")
    expected = r"masked every one of the \d+ completion tokens of all 6 training rows .* first epoch \(step 3\)"
    with pytest.raises(ValueError, match=expected):
        main(*parse_args(argv))
    out = tmp_path / "out"
    assert not (out / CONFIG_FILE).exists() and not (out / "adapter_model.safetensors").exists()


def test_mask_statistics_count_the_batches_trained_not_one_collated_ahead(tmp_path, tiny_dir, train_dir):
    # 6 rows, batches of 2, max_steps 1: the data loader collates batch 2 before step 1 trains (accelerate looks
    # ahead), and the run stops before training it
    record = main(*parse_args(sft_args(tmp_path, tiny_dir, train_dir, "--pplmask_threshold", str(TINY_THRESHOLD))))
    assert record["mask_stats"]["examples"] == 2
    assert [epoch["examples"] for epoch in record["mask_stats_per_epoch"]] == [2]
    assert 0 < record["mask_stats"]["masked_tokens"] < record["mask_stats"]["completion_tokens"]


def test_saved_dataset_folder_is_only_read(tmp_path, tiny_dir, data_dir):
    from trl_pplmask.data import load_task

    data = tmp_path / "gsm8k-saved"
    load_task("gsm8k", "train", limit=4).save_to_disk(str(data))
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    for path in (data, *data.iterdir()):
        path.chmod(0o555 if path.is_dir() else 0o444)  # read-only (root writes anyway: the files are compared too)
    try:
        argv = sft_args(tmp_path, tiny_dir, data, "--pplmask_prescore", "--pplmask_threshold", str(TINY_THRESHOLD))
        trainer, _, _, _ = build_trainer(*parse_args(argv))  # TRL's tokenizing maps and the pre-scoring maps
        trainer.train()
    finally:
        data.chmod(0o755)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


@pytest.mark.parametrize("anchor", [False, True], ids=["stm", "stm_anchor"])
def test_two_processes_mask_like_one(tmp_path, tiny_dir, train_dir, anchor):
    """`accelerate launch` with 2 CPU processes: the same rows, the same masked tokens, the same loss as 1 process."""
    common = ["--pplmask_threshold", str(TINY_THRESHOLD), "--num_train_epochs", "1", "--max_steps", "-1"]
    common += ["--learning_rate", "1e-2", "--seed", "0", "--data_seed", "0"]
    common += ["--pplmask_anchor", "--pplmask_prescore"] if anchor else []
    single = sft_args(tmp_path / "one", tiny_dir, train_dir, *common, "--per_device_train_batch_size", "2")
    record_one = main(*parse_args(single))
    double = sft_args(tmp_path / "two", tiny_dir, train_dir, *common, "--per_device_train_batch_size", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "trl_pplmask.cli", "sft", *double,
    ]  # fmt: skip
    returncode, output = launch(command, env, tmp_path, timeout=300)
    assert returncode == 0, output[-6000:]
    record_two = json.loads((tmp_path / "two" / "out" / CONFIG_FILE).read_text())
    assert record_two["num_processes"] == 2
    for key in ("examples", "completion_tokens", "masked_tokens", "examples_fully_masked"):
        assert record_two["mask_stats"][key] == record_one["mask_stats"][key], key
    if anchor:
        history = json.loads((tmp_path / "two" / "out" / "trainer_state.json").read_text())["log_history"]
        assert any(log.get("pplmask/anchor_kl", 0) > 0 for log in history)


def test_two_processes_give_the_anchored_loss_of_one(tmp_path, tiny_dir, train_dir):
    """The anchored loss of one batch split over 2 processes, averaged as DDP averages gradients, equals 1 process."""
    helper = Path(__file__).with_name("_accelerate_anchor.py")
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(helper), str(single), str(tiny_dir), str(train_dir)], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(helper), str(tmp_path / "double"), str(tiny_dir), str(train_dir),
    ]  # fmt: skip
    returncode, output = launch(command, env, tmp_path, timeout=300)
    assert returncode == 0, output[-6000:]
    one = json.loads((single / "rank0.json").read_text())["loss"]
    two = [json.loads((tmp_path / "double" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(t["num_processes"] == 2 for t in two)
    assert np.mean([t["loss"] for t in two]) == pytest.approx(one, rel=1e-5)


ONLINE_RECIPES = sorted((REPO / "recipes").glob("*-online-stm-*.yaml"))


@pytest.mark.parametrize("path", ONLINE_RECIPES, ids=lambda p: p.stem)
def test_online_recipes_parse_with_mask_settings(path):
    raw = yaml.safe_load(path.read_text())
    # bf16 needs a GPU at parse time: check every field with it switched off on a CPU-only machine
    cpu = ["--bf16", "false", "--use_cpu", "true"] if raw.get("bf16") and not torch.cuda.is_available() else []
    script_args, training_args, model_args, dataset_args, pplmask_args = parse_args(["--config", str(path), *cpu])
    assert pplmask_args.pplmask_strategy == "threshold" and pplmask_args.pplmask_threshold == 2.5
    assert pplmask_args.pplmask_prescore and model_args.use_peft
    assert dataset_args.datasets[0].columns == ["prompt", "completion"]


def test_online_recipes_exist_for_the_cpu_and_gpus():
    names = {p.stem for p in ONLINE_RECIPES}
    for model in ("smollm2-135m-cpu", "llama-3.1-8b-instruct", "gemma-2-2b-it"):
        assert f"gsm8k-online-stm-{model}" in names
