"""Shared fixtures: the embedded model, the local data mirror and tiny random models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"
if "TRL_PPLMASK_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["TRL_PPLMASK_DATA_DIR"] = str(_DEFAULT_DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    return f"TRL_PPLMASK_DATA_DIR={os.environ.get('TRL_PPLMASK_DATA_DIR')}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = os.environ.get("TRL_PPLMASK_DATA_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("local data mirror not available (set TRL_PPLMASK_DATA_DIR)")
    return Path(path)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32 on CPU, loaded once per session."""
    from trl_pplmask.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def embedded_model(embedded):
    return embedded[0]


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded[1]


def tiny_llama(vocab_size: int = 49152, **overrides):
    """A 2-layer random Llama with the embedded tokenizer's vocabulary (weights do not matter)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma2(softcap: float | None = 2.0):
    """A tiny random Gemma-2 (soft-caps its final logits at `softcap`), vocabulary 512, hidden size 64."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        max_position_embeddings=512,
        final_logit_softcapping=softcap,
        initializer_range=0.3,
    )
    return Gemma2ForCausalLM(config).eval()


def tiny_scaled(kind):
    """A tiny random Granite (divides its logits by `logits_scaling`) or Cohere (multiplies by `logit_scale`)."""
    import torch
    import transformers

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    if kind == "granite":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0, **common)).eval(), 0.25
    return transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=3.0, **common)).eval(), 3.0


@pytest.fixture(scope="module")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    """`make(**overrides)`: `tiny_llama(**overrides)` saved with the embedded tokenizer to a folder, for commands that
    take a model path; one folder per distinct `overrides` in a test module (a module may edit its copies)."""
    made: dict[tuple, Path] = {}

    def make(**overrides) -> Path:
        key = tuple(sorted(overrides.items()))
        if key not in made:
            from trl_pplmask.models import load_tokenizer

            path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
            tiny_llama(**overrides).save_pretrained(path)
            load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model_factory) -> Path:
    """`tiny_llama()` saved with the embedded tokenizer: its perplexities are high (random weights), so most tokens
    mask at the paper's threshold."""
    return tiny_model_factory()


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_factory) -> Path:
    """The tiny random Llama of the sft tests (`initializer_range=0.2`) with the embedded tokenizer, saved."""
    return tiny_model_factory(initializer_range=0.2)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, data_dir) -> Path:
    """The first 6 GSM8K training rows, saved with `save_to_disk` (a `--dataset_name` folder)."""
    from trl_pplmask.data import load_task

    path = tmp_path_factory.mktemp("data") / "gsm8k6"
    load_task("gsm8k", "train", limit=6).save_to_disk(str(path))
    return path


@pytest.fixture
def score_cache(tmp_path) -> str:
    """An isolated `ScoringConfig.cache_dir` (the embedded model's conversion cache stays shared)."""
    return str(tmp_path / "scores")
