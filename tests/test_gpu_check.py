"""`benchmarks/gpu_check.sh --dry-run`: the prepared GPU script keeps working on CPU (it measures nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path, data_dir):  # GSM8K rows from the data mirror (the script runs offline)
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           "TRL_PPLMASK_DATA_DIR": str(data_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--steps", "1",
           "--arms", "stm_prescored,soft_stm", "--scoring-examples", "2", "--agreement-rows", "2",
           "--study"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    scoring = json.loads((out / "scoring.json").read_text())
    assert {(r["shape"], r["dtype"]) for r in scoring["rows"]} == {
        (shape, dtype) for shape in ("smollm2", "llama1b") for dtype in ("float32", "bfloat16")
    }
    assert all(r["ours_tok_per_s"] > 0 and r["gflops_per_token"] > 0 for r in scoring["rows"])
    sft = json.loads((out / "sft.json").read_text())
    assert set(sft["arms"]) == {"sft", "stm_prescored", "soft_stm"}  # soft_stm: an objective, run without a mask
    assert sft["arms"]["sft"]["vs_sft"] == 1.0
    assert sft["arms"]["stm_prescored"]["masked_fraction"] > 0  # the mask reached training
    agreement = json.loads((out / "mask_agreement.json").read_text())
    assert agreement["label_tokens"] > 0 and 0 <= agreement["flips"] <= agreement["label_tokens"]
    assert json.loads((out / "study.json").read_text())["status"] == "planned"


def test_gpu_check_refuses_without_cuda(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--dry-run" in result.stderr and "no CUDA device" in result.stderr
