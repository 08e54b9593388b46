"""Write the weightless model folders that `gpu_bench.sh` benchmarks with random weights.

`<out>/smollm2`: the embedded SmolLM2-135M-Instruct's config, tokenizer and chat template (no weights).
`<out>/llama1b`: the same tokenizer with a Llama-3.2-1B-shaped config (128,256-token vocabulary); the tokenizer's
ids all fall inside the larger vocabulary.

Usage: python benchmarks/make_bench_configs.py OUT_DIR   (then MODELS_DIR=OUT_DIR bash benchmarks/gpu_bench.sh)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from trl_pplmask.models import embedded_model_path


LLAMA_1B_SHAPE = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


def main(out_dir: str) -> None:
    source = embedded_model_path()
    for name in ("smollm2", "llama1b"):
        target = Path(out_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.suffix != ".safetensors":
                shutil.copy(path, target / path.name)
    config_path = Path(out_dir) / "llama1b" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(LLAMA_1B_SHAPE)
    config_path.write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
