"""Step time of `trl-pplmask sft` arms on the same batches, side by side in one process, and peak memory per arm.

Arms (all LoRA on the same model, same rows, same batches):
- `sft`: plain SFT (`pplmask_strategy none`), what `trl sft` trains;
- `stm_prescored`: STM from a pre-scored training set (the mask is read from columns);
- `stm_online`: STM scored on the fly per batch by the adapter-disabled model (one extra no-grad forward);
- `stm_anchor`: anchored STM, pre-scored (one extra no-grad backbone pass + the KL on the masked tokens);
- `eaft`: `--pplmask_loss eaft`, no mask (one extra no-grad LM-head pass for the top-20 entropy);
- `asft`: `--pplmask_loss asft`, no mask (one extra no-grad backbone pass + the KL on every trainable token);
- `soft_stm`: `--pplmask_loss soft_stm`, pre-scored (the weights are read from the `token_nll` column).

A step is the collator call plus `trainer.training_step` (forward, backward), what the Trainer does per batch. Arms
alternate round by round so that machine load hits all of them alike; the medians and their ratio to `sft` are
printed. With `--memory`, each arm also runs alone in a child process that reports its peak RSS.

    python benchmarks/bench_sft_step.py --rows 8 --rounds 3 --batch-size 4 --max-length 384 [--memory]
    python benchmarks/bench_sft_step.py --arms sft eaft asft soft_stm    # a subset (`sft` is always run: the baseline)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ARMS = {
    "sft": ["--pplmask_strategy", "none"],
    "stm_prescored": ["--pplmask_prescore"],
    "stm_online": [],
    "stm_anchor": ["--pplmask_prescore", "--pplmask_anchor"],
    "eaft": ["--pplmask_strategy", "none", "--pplmask_loss", "eaft"],
    "asft": ["--pplmask_strategy", "none", "--pplmask_loss", "asft"],
    "soft_stm": ["--pplmask_strategy", "none", "--pplmask_loss", "soft_stm", "--pplmask_prescore"],
}


def arm_argv(workdir: Path, data: Path, model: str, args: argparse.Namespace, arm: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--dtype", "float32", "--dataset_name", str(data),
        "--output_dir", str(workdir / arm), "--max_length", str(args.max_length),
        "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear",
        "--per_device_train_batch_size", str(args.batch_size), "--use_cpu", "--bf16", "false",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--max_steps", "1",
        "--activation_checkpointing", "false", *ARMS[arm],
    ]  # fmt: skip


def build(workdir: Path, data: Path, model: str, args: argparse.Namespace, arm: str):
    from trl_pplmask.sft import build_trainer, parse_args

    trainer, collator, _, _ = build_trainer(*parse_args(arm_argv(workdir, data, model, args, arm)))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark bypasses
    # The optimizer is not part of the comparison; training_step needs the accelerator-prepared model only
    return trainer, collator


def one_step(trainer, collator, rows) -> tuple[float, float]:
    """Wall and CPU seconds of one step. With one torch thread, CPU time is what the step itself used, so it is
    far less sensitive than wall time to other jobs on a shared machine."""
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = collator(rows)
    trainer.training_step(trainer.model, batch)
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu_start


def prepare_data(workdir: Path, rows: int) -> Path:
    from trl_pplmask.data import load_task

    path = workdir / "data"
    load_task("gsm8k", "train", limit=rows).save_to_disk(str(path))
    return path


def child(args: argparse.Namespace) -> None:
    """Run one arm alone for 2 steps and print its peak RSS (MiB)."""
    workdir = Path(args.workdir)
    trainer, collator = build(workdir, workdir / "data", args.model, args, args.child)
    rows = [trainer.train_dataset[i] for i in range(args.batch_size)]
    for _ in range(2):
        one_step(trainer, collator, rows)
    print(json.dumps({"arm": args.child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--memory", action="store_true", help="Also measure each arm's peak RSS in a child process.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="Arms to compare.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    data = prepare_data(workdir, args.rows)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}, model {args.model}")
    arms = ["sft", *(arm for arm in args.arms if arm != "sft")]
    trainers = {arm: build(workdir, data, args.model, args, arm) for arm in arms}
    batches = [list(range(i, i + args.batch_size)) for i in range(0, args.rows - args.batch_size + 1, args.batch_size)]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    tokens = 0
    for round_index in range(args.rounds + 1):  # round 0 warms up every arm
        for indices in batches:
            for arm, (trainer, collator) in trainers.items():
                rows = [trainer.train_dataset[i] for i in indices]
                elapsed, used = one_step(trainer, collator, rows)
                if round_index:
                    times[arm].append(elapsed)
                    cpu[arm].append(used)
                    tokens += sum(len(r["input_ids"]) for r in rows) if arm == "sft" else 0
        medians = ", ".join(f"{a} {statistics.median(t or [0]):.2f}s" for a, t in cpu.items())
        print(f"round {round_index} (CPU time): {medians}")
    base, cpu_base = statistics.median(times["sft"]), statistics.median(cpu["sft"])
    print(f"\n{len(times['sft'])} steps per arm, {tokens / max(len(times['sft']), 1):.0f} tokens per batch")
    print("| arm | median step, CPU (s) | vs sft | median step, wall (s) | vs sft |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arm in arms:
        c, w = statistics.median(cpu[arm]), statistics.median(times[arm])
        print(f"| {arm} | {c:.2f} | {c / cpu_base:.2f}x | {w:.2f} | {w / base:.2f}x |")
    print(f"load average after: {os.getloadavg()}")
    if args.memory:
        print("\n| arm | peak RSS (MiB), alone, 2 steps |")
        print("| --- | ---: |")
        for arm in arms:
            out = subprocess.run(
                [sys.executable, __file__, "--child", arm, "--workdir", str(workdir), "--model", args.model,
                 "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {arm} | {result['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
