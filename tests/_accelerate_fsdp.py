"""Helper of `test_fsdp.py`: two steps of `trl-pplmask sft` in one process, or under an `accelerate launch --use_fsdp
--fsdp_version 2` of several, recording what each process saw.

Writes `<out_dir>/<route>/rank<N>.json` for each route, one after the other in the same process(es): the rows and
masked labels the collator produced here, the loss of each step (as `Trainer` logs it: over all processes), at each
step whether the trained model was an `FSDPModule` whose parameters are all `DTensor`s (and the share of the
parameters this process held), and the pre-scoring shards it scored.

Routes (the ways the mask gets its NLLs): `prescore` (pplmask_prescore=true), `frozen` (on the fly, by the frozen
copy of the base model), `columns` (SCORED_DIR was scored beforehand: the collator reads its `token_nll`), and with
LoRA: `prescore_peft` (pre-scored by the model with its adapter disabled) and `reference_peft` (on the fly, by a
frozen reference model given by pplmask_reference).

Usage: python _accelerate_fsdp.py OUT_DIR MODEL_DIR RAW_DIR SCORED_DIR ROUTE[,ROUTE...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

GLOBAL_BATCH = 4
THRESHOLD = "49152.0"  # masks some of the tiny random model's tokens (as tests/test_sft.py's TINY_THRESHOLD)


def sft_argv(out: Path, model: str, data: str, route: str, num_processes: int) -> list[str]:
    import torch

    argv = [
        "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out / "run"),
        "--max_length", "256", "--max_steps", "2", "--per_device_train_batch_size", str(GLOBAL_BATCH // num_processes),
        "--learning_rate", "1e-3", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0", "--pplmask_threshold", THRESHOLD,
    ]  # fmt: skip
    if not torch.cuda.is_available():  # a CPU launch: gloo (benchmarks/gpu_sharded_check.sh runs this on GPUs)
        argv.append("--use_cpu")
    if route.endswith("_peft"):  # LoRA on every linear layer; the base is the model with its adapter disabled
        argv += ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]
        argv += ["--lora_dropout", "0.0"]
    if route == "reference_peft":  # a frozen reference model of its own (here: the same weights, another copy)
        argv += ["--pplmask_reference", model]
    return argv + (["--pplmask_prescore"] if route.startswith("prescore") else [])


def fsdp_on_cpu() -> None:
    """Let this CPU launch run accelerate's real FSDP path. accelerate turns `--use_fsdp` into FSDP only on
    accelerators (on CPU the launch stays MULTI_CPU, i.e. DDP over gloo), although `fully_shard` itself works on gloo;
    the state of the launch is promoted to FSDP once accelerate built it, so that `Trainer` and
    `Accelerator.prepare` take the code path they take on GPUs (`fsdp2_prepare_model`, `fully_shard` per layer)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init_with_fsdp


def train_route(out: Path, model_dir: str, data_dir: str, route: str, num_processes: int) -> dict:
    """Two steps of one route; what this process saw."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    import trl_pplmask.hub.shards as shards
    from trl_pplmask.sft import build_trainer, parse_args

    scored_here: list[int] = []
    process_shards = shards.process_shards

    def recording(*args, **kwargs):
        made = process_shards(*args, **kwargs)
        scored_here.extend(made)
        return made

    shards.process_shards = recording
    try:
        trainer, collator, _, _ = build_trainer(*parse_args(sft_argv(out, model_dir, data_dir, route, num_processes)))
    finally:
        shards.process_shards = process_shards
    batches = []
    collate = collator.__call__

    def recording_collator(examples, *args, **kwargs):
        batch = collate(examples, *args, **kwargs)
        for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(attention.sum())
            batches.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
        return batch

    trainer.data_collator = recording_collator
    sharding = []

    class Sharding(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            params = list(model.parameters())
            # DeepSpeed ZeRO-3: `ds_tensor` is this process's partition of each parameter (parameters under
            # stage3_param_persistence_threshold, all of them in a tiny model, also stay gathered between steps)
            zero3 = all(hasattr(p, "ds_tensor") for p in params)
            if zero3:
                local, whole = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
            else:
                local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
                whole = sum(p.numel() for p in params)
            sharding.append(
                {
                    "all_dtensor": all(isinstance(p, DTensor) for p in params),
                    "zero3_partitioned": zero3,
                    "local_fraction": local / whole,
                    "fsdp_module": isinstance(model, FSDPModule) and trainer.is_fsdp_enabled,
                }
            )

    trainer.add_callback(Sharding())
    trainer.train()
    trainer.accelerator.wait_for_everyone()
    return {
        "num_processes": trainer.accelerator.num_processes,
        "process_index": trainer.accelerator.process_index,
        "rows": batches,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "sharding": sharding,
        "prescored_shards": scored_here,
        "mask_stats": collator.cumulative_stats(),
    }


def main(out_dir: str, model_dir: str, raw_dir: str, scored_dir: str, routes: str) -> None:
    import functools
    import os

    import trl_pplmask.hub.shards as shards

    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Shards of 2 rows, so that the pre-scoring of 8 rows is split across the processes
    shards.score_in_shards = functools.partial(shards.score_in_shards, shard_rows=2)
    if num_processes > 1:
        fsdp_on_cpu()
    out = Path(out_dir)
    for route in routes.split(","):
        data = scored_dir if route == "columns" else raw_dir
        result = train_route(out / route, model_dir, data, route, num_processes)
        (out / route).mkdir(parents=True, exist_ok=True)
        (out / route / f"rank{result['process_index']}.json").write_text(json.dumps(result))
    if num_processes > 1:  # as trl_pplmask.sft.cli: leave without the destructors that can hang a gloo launch
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:6])
