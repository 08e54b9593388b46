#!/usr/bin/env bash
# `trl-pplmask sft` with sharded parameters on a machine with 2 or more GPUs: what tests/test_fsdp.py checks on 2 CPU
# processes (gloo, accelerate's FSDP path forced on), run where accelerate takes that path itself (NCCL).
#
#   bash benchmarks/gpu_sharded_check.sh [--with-deepspeed]
#
# For each route that trl_pplmask/sharding.py lets through under FSDP2 (pplmask_prescore=true, with and without LoRA;
# on-the-fly scoring by a frozen copy or by a pplmask_reference model; the mask from pre-scored token_nll columns),
# two training steps of a tiny random Llama on 8 GSM8K rows: once in one process, once under
# `accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`; the test asserts that every parameter is a DTensor
# holding half the weights on each GPU during the run, that the masked labels of every row and the loss of both steps
# equal the one-process run, and that pre-scoring was split (shard i on process i % 2; on GPUs it also runs on the GPU:
# sharding.on_device moves the not-yet-sharded model there). --with-deepspeed installs DeepSpeed from PyPI and adds the
# ZeRO-3 launch of the pre-scored-columns route. The refusals (tests test_what_runs_... and test_sft_refuses_...) need no
# GPU and run too. Needs the repository's venv (`make install`) and the data mirror (TRL_PPLMASK_DATA_DIR) or the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "gpu_sharded_check: needs 2 or more GPUs (found $gpus): two ranks cannot share one GPU under NCCL." >&2
    exit 2
fi
if [ "${1:-}" = "--with-deepspeed" ]; then
    "$PY" -m pip install -q deepspeed
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
"$PY" -m pytest -q -p no:cacheprovider tests/test_fsdp.py -rs
