#!/bin/bash
# GPU run of bench_scoring.py on a machine where the checkpoint cannot be copied: random weights of the
# SmolLM2-135M shape and of a Llama-3.2-1B shape (128,256-token vocabulary), float32 and bfloat16.
# Usage: python benchmarks/make_bench_configs.py MODELS   (here, where the embedded model is installed)
#        OUT=results_dir MODELS_DIR=MODELS bash benchmarks/gpu_bench.sh
# The GSM8K examples come from TRL_PPLMASK_DATA_DIR (or the Hub).
set -euo pipefail
OUT=${OUT:-.}
MODELS_DIR=${MODELS_DIR:?folder holding smollm2/ and llama1b/ (config.json + tokenizer files)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 benchmarks/bench_scoring.py --device cuda --model "$MODELS_DIR/smollm2" --random-init --dtype float32 \
    --json "$OUT/gpu_smollm2_fp32.json"
python3 benchmarks/bench_scoring.py --device cuda --model "$MODELS_DIR/smollm2" --random-init --dtype bfloat16 \
    --json "$OUT/gpu_smollm2_bf16.json" --seq-len 4096
python3 benchmarks/bench_scoring.py --device cuda --model "$MODELS_DIR/llama1b" --random-init --dtype bfloat16 \
    --json "$OUT/gpu_llama1b_bf16.json" --seq-len 16384
