"""Helper of `test_sft.py`: the anchored loss of one fixed batch, in one process or split over a multi-process launch.

Each process takes its share of the same 4 rows, with the token count of all of them as `num_items_in_batch` (what
`Trainer` passes), and writes its loss to `<out_dir>/rank<N>.json`; the mean over processes is the global loss.

Usage: python _accelerate_anchor.py OUT_DIR MODEL_DIR DATA_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))


def share_loss(argv: list[str]) -> tuple[float, object]:
    """`(loss of this process's share of 4 fixed rows, the accelerator)` for the trainer `argv` builds: the adapter
    set away from its zero start (the same on every process), the token count of all 4 rows as `num_items_in_batch`."""
    import torch

    from trl_pplmask.sft import build_trainer, parse_args

    trainer, collator, _, _ = build_trainer(*parse_args(argv))
    accelerator = trainer.accelerator
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same adapter on every process, away from its zero start: the anchor / KL is active
        for name, p in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    rows = [trainer.train_dataset[i] for i in range(4)]
    every = collator(rows)
    num_items = int(every["labels"][:, 1:].ne(-100).sum())
    share = len(rows) // accelerator.num_processes
    mine = rows[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    batch = {k: v.to(accelerator.device) for k, v in collator(mine).items()}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(num_items))
    return float(loss), accelerator


def main(out_dir: str, model_dir: str, data_dir: str) -> None:
    from testing_utils import TINY_THRESHOLD, sft_args

    out = Path(out_dir)
    argv = sft_args(out, Path(model_dir), Path(data_dir), "--pplmask_threshold", str(TINY_THRESHOLD))
    argv += ["--pplmask_anchor", "--pplmask_prescore", "--lora_dropout", "0.0"]  # no dropout: deterministic
    loss, accelerator = share_loss(argv)
    out.mkdir(parents=True, exist_ok=True)
    result = {"loss": loss, "num_processes": accelerator.num_processes}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
