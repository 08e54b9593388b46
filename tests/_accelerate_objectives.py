"""Helper of `test_objectives.py`: each objective's loss of one fixed batch, in one process or over a multi-process
launch.

Each process takes its share of the same 4 rows, with the token count of all of them as `num_items_in_batch` (what
`Trainer` passes), and writes its loss per objective to `<out_dir>/rank<N>.json`; the mean over processes is the
global loss.

Usage: python _accelerate_objectives.py OUT_DIR MODEL_DIR DATA_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

OBJECTIVES = {
    "eaft": ["--pplmask_eaft_k", "7"],
    "asft": ["--pplmask_asft_alpha", "0.3"],
    "soft_stm": ["--pplmask_soft_width", "2e5"],
}


def main(out_dir: str, model_dir: str, data_dir: str) -> None:
    from _accelerate_anchor import share_loss
    from testing_utils import sft_args

    out = Path(out_dir)
    result = {}
    for objective, extra in OBJECTIVES.items():
        argv = sft_args(out / objective, Path(model_dir), Path(data_dir), "--pplmask_strategy", "none")
        argv += ["--pplmask_loss", objective, *extra, "--lora_dropout", "0.0"]  # no dropout: deterministic
        result[objective], accelerator = share_loss(argv)
        result["num_processes"] = accelerator.num_processes
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
