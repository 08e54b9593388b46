"""`recipes/*.yaml`: valid `trl sft --config` files, and a stock `trl sft` run trains on a built pplmasked folder.

The labels SFTTrainer trains on are checked in-process through its prepared dataset: the STM recipe trains on
exactly the masked labels of the parquet, the ground-truth baseline on every completion token of the same rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_llama
from datasets import load_dataset
from testing_utils import CONFIG, LIMIT, build_gsm8k_folder

from trl_pplmask.masking import IGNORE_INDEX
from trl_pplmask.models import embedded_model_path, model_slug


RECIPES = REPO / "recipes"
CPU_STM = RECIPES / "gsm8k-stm-smollm2-135m-cpu.yaml"
CPU_BASELINE = RECIPES / "gsm8k-baseline-smollm2-135m-cpu.yaml"
# The recipes of this module (STM and its ground-truth baseline); other pipelines keep their own recipes here too
GPU_RECIPES = sorted(p for p in RECIPES.glob("gsm8k-*.yaml") if p.stem.split("-")[1] in ("stm", "baseline"))
GPU_RECIPES = [p for p in GPU_RECIPES if not p.stem.endswith("-cpu")]
TRL = Path(sys.executable).parent / "trl"


def parse_recipe(path: Path, *overrides: str):
    """Parse a recipe exactly as `trl sft --config` does, refusing any field it does not know."""
    from trl.scripts.sft import make_parser

    return make_parser().parse_args_and_config(["--config", str(path), *overrides], fail_with_unknown_args=True)


def recipe_dataset_config(raw: dict) -> str:
    return raw["dataset_config"] if "dataset_config" in raw else raw["datasets"][0]["name"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir) -> Path:
    # Same build as test_hub.py; the session's score cache makes it cheap when both modules run
    return build_gsm8k_folder(tmp_path_factory)


def test_recipes_exist_for_both_models_and_the_cpu():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    for kind in ("stm", "baseline"):
        for model in ("smollm2-135m-cpu", "llama-3.1-8b-instruct", "gemma-2-2b-it"):
            assert f"gsm8k-{kind}-{model}.yaml" in names


@pytest.mark.parametrize("path", [CPU_STM, CPU_BASELINE], ids=lambda p: p.stem)
def test_cpu_recipes_parse_and_are_cpu_sized(path):
    script_args, training_args, model_args, dataset_args = parse_recipe(path)
    assert training_args.use_cpu and not training_args.bf16 and not training_args.activation_checkpointing
    assert 0 < training_args.max_steps <= 50 and training_args.max_length == 1024
    assert model_args.use_peft and model_args.lora_r == 16 and model_args.lora_alpha == 32
    from trl import get_peft_config

    assert get_peft_config(model_args).target_modules == "all-linear"  # a string: PEFT expands it
    assert recipe_dataset_config(yaml.safe_load(path.read_text())) == CONFIG


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipes_parse_and_follow_the_paper(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["bf16"] is True and raw["activation_checkpointing"] is True
    # bf16 needs a GPU at parse time: check every field with it switched off on this machine
    script_args, training_args, model_args, dataset_args = parse_recipe(path, "--bf16", "false", "--use_cpu", "true")
    assert model_args.model_name_or_path in ("meta-llama/Llama-3.1-8B-Instruct", "google/gemma-2-2b-it")
    assert model_args.use_peft and model_args.lora_r == 16 and model_args.lora_alpha == 32
    assert training_args.learning_rate == 2e-5 and training_args.num_train_epochs == 3
    assert training_args.lr_scheduler_type == "cosine" and training_args.max_length == 1024
    assert recipe_dataset_config(raw) == model_slug(model_args.model_name_or_path)
    if "baseline" in path.stem:
        assert dataset_args.datasets[0].columns == ["prompt", "completion"]
    else:
        assert script_args.dataset_name.endswith("gsm8k-pplmasked")


@pytest.mark.slow
def test_stock_trl_sft_trains_on_the_built_folder(built, tmp_path):
    """The CPU STM recipe, unmodified, through the `trl sft` command (2 steps)."""
    output = tmp_path / "out"
    command = [str(TRL), "sft", "--config", str(CPU_STM), "--model_name_or_path", str(embedded_model_path())]
    command += ["--dataset_name", str(built), "--dataset_config", CONFIG, "--max_steps", "2"]
    command += ["--output_dir", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Training completed" in result.stdout + result.stderr
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()


def _prepared_trainer(args_tuple, train_dataset, tokenizer, output_dir: Path):
    from trl import SFTTrainer

    _, training_args, _, _ = args_tuple
    training_args.output_dir = str(output_dir)
    # The model does not matter for the prepared data; a tiny one keeps the embedded fixture untouched
    return SFTTrainer(model=tiny_llama(), args=training_args, train_dataset=train_dataset, processing_class=tokenizer)


def test_stm_recipe_trains_exactly_the_masked_labels(built, tokenizer, tmp_path):
    args = parse_recipe(CPU_STM, "--dataset_name", str(built))
    script_args = args[0]
    # What `trl sft` does with these arguments (trl/scripts/sft.py)
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    trainer = _prepared_trainer(args, dataset[script_args.dataset_train_split], tokenizer, tmp_path)

    parquet = load_dataset(str(built), CONFIG, split="train")
    assert len(parquet) == LIMIT
    kept = [row for row in parquet if any(label != IGNORE_INDEX for label in row["labels"])]
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == [row["input_ids"] for row in kept]
    assert prepared["labels"] == [row["labels"] for row in kept]

    # And the batches the trainer builds carry those labels (padding with -100 aside)
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    for i, row in enumerate(kept):
        n = len(row["labels"])
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_baseline_recipe_trains_every_completion_token_of_the_same_rows(built, tokenizer, tmp_path):
    args = parse_recipe(CPU_BASELINE)
    dataset_args = args[3]
    dataset_args.datasets[0].path = str(built)  # the recipe names the folder relative to the working directory
    from trl import get_dataset

    train = get_dataset(dataset_args)["train"]
    assert train.column_names == ["prompt", "completion"]
    trainer = _prepared_trainer(args, train, tokenizer, tmp_path)

    parquet = load_dataset(str(built), CONFIG, split="train")
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == parquet["input_ids"]
    for labels, row in zip(prepared["labels"], parquet):
        trainable = np.asarray(row["trainable_mask"], dtype=bool)
        assert labels == np.where(trainable, row["input_ids"], IGNORE_INDEX).tolist()


def test_collator_snippet_of_the_card_retrains_at_another_threshold(built, tokenizer, tmp_path):
    """The card's third way in: SFTTrainer + PplMaskCollator(threshold=5.0), remove_unused_columns=False."""
    from trl import SFTConfig, SFTTrainer

    from trl_pplmask.collator import PplMaskCollator

    dataset = load_dataset(str(built), CONFIG, split="train")
    collator = PplMaskCollator(tokenizer, threshold=5.0)
    args = SFTConfig(
        output_dir=str(tmp_path), max_length=1024, remove_unused_columns=False, max_steps=1,
        per_device_train_batch_size=LIMIT, use_cpu=True, bf16=False, activation_checkpointing=False,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator
    )
    trainer.train()

    # One batch of every row: the collator masked exactly the tokens above 5.0, fewer than the stored labels
    trainable = [np.asarray(row["trainable_mask"], dtype=bool) for row in dataset]
    ppl = [np.exp(np.asarray(row["token_nll"], dtype=np.float64)) for row in dataset]
    assert collator.stats["completion_tokens"] == sum(int(t.sum()) for t in trainable)
    assert collator.stats["masked_tokens"] == sum(int((t & (p > 5.0)).sum()) for t, p in zip(trainable, ppl))
    assert collator.stats["masked_tokens"] < sum(dataset["num_masked"])
