"""The GPU user's path in one prepared run: scoring speed and MFU, `trl-pplmask sft` arms in bf16, bf16 mask agreement.

Run by `benchmarks/gpu_check.sh` (which first installs what an offline GPU machine lacks and places the embedded
checkpoint); on its own:

    python benchmarks/gpu_check.py --out gpu_check_results [--budget-s 540] [--study]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check   # CPU, tiny sizes: keeps this script working

Sections, each written to `<out>/<section>.json` and printed as it finishes:

(a) `scoring`: `benchmarks/bench_scoring.py` (speed section: `score_dataset` against the paper's per-example loop,
    side by side) at the embedded SmolLM2-135M (real weights) and a Llama-3.2-1B shape (random weights), float32 and
    bfloat16, with model FLOPs utilisation: forward FLOPs per token `2 * N + 2 * layers * hidden * mean_len` (N: the
    parameters of every matmul, the LM head included, the input embedding lookup excluded; the second term is causal
    attention's QK^T and AV at the mean sequence length), over the GPU's dense peak for the dtype (`--peak-tflops` or
    the table below).
(b) `sft`: `trl-pplmask sft` for `--steps` steps on the embedded model, LoRA r16, per arm: plain SFT (strategy
    none), STM on the fly, STM pre-scored, anchored STM, and each `pplmask_loss` objective the installed package has;
    the step time (`train_runtime / steps`) and its ratio to plain SFT.
(c) `mask_agreement`: the same GSM8K rows scored in float32 and in bfloat16; how many label tokens change sides of
    the threshold (mask flips), how far each flipped token's float32 NLL sits from log(threshold), and the
    distribution of |dNLL| over all label tokens, so "the flips all sit within bf16 noise of the threshold" is
    checked rather than assumed.
(d) `study` (only with `--study` and when the budget has time left): `trl-pplmask study` on `--study-config`.

Every section records the machine, the command and the time it took. The run stops starting new sections when the
budget is spent, and says which ones it skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent

# Dense (no sparsity) peak throughput in TFLOP/s, from the vendors' data sheets (SXM parts). float32 means plain
# FP32 on CUDA cores (the scoring path runs float32 matmuls without TF32 unless the user enables it).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float32": 91.6},
}

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
# The dry run keeps the 1B shape's vocabulary (the LM head is what the scoring path optimises) but not its depth
DRY_RUN_SHAPE = {**LLAMA_1B_SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip

BASE_ARMS = {
    "sft": ["--pplmask_strategy", "none"],
    "stm_online": [],
    "stm_prescored": ["--pplmask_prescore"],
    "stm_anchor": ["--pplmask_prescore", "--pplmask_anchor"],
}


def objective_arms() -> dict[str, list[str]]:
    """One arm per `pplmask_loss` objective of the installed package (none when it has no such setting)."""
    import dataclasses

    from trl_pplmask.sft import PplMaskArguments

    fields = {f.name: f for f in dataclasses.fields(PplMaskArguments)}
    if "pplmask_loss" not in fields:
        return {}
    choices = fields["pplmask_loss"].metadata.get("choices") or ("eaft", "asft", "soft_stm")
    # As the study's arms: each objective on its own, no hard mask (soft_stm refuses one; its weights need the
    # reference NLLs, scored once before training as the pre-scored arm does)
    arms = {name: ["--pplmask_loss", name, "--pplmask_strategy", "none"] for name in choices if name != "nll"}
    if "soft_stm" in arms:
        arms["soft_stm"].append("--pplmask_prescore")
    return arms


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_tflops(device: str, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def flops_per_token(config_path: Path, mean_len: float) -> float:
    """Forward FLOPs per scored token of the model whose `config.json` is in `config_path` (see the module doc)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = config.vocab_size * config.hidden_size
    tied = getattr(config, "tie_word_embeddings", False)
    # An untied head is among `total` already; a tied one shares the embedding's tensor, counted once in `total`
    matmul = total - embedding + (head if tied else 0)
    return 2.0 * matmul + 2.0 * config.num_hidden_layers * config.hidden_size * mean_len


def write_shapes(workdir: Path, dry_run: bool) -> dict[str, Path]:
    """Weightless model folders: the embedded model's config and tokenizer, and the same tokenizer with a 1B config."""
    from trl_pplmask.models import embedded_model_path

    source = embedded_model_path()
    shapes = {}
    for name in ("smollm2", "llama1b"):
        target = workdir / "shapes" / name
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.suffix != ".safetensors" and path.is_file():
                shutil.copy(path, target / path.name)
        shapes[name] = target
    config_path = shapes["llama1b"] / "config.json"
    config = json.loads(config_path.read_text())
    config.update(DRY_RUN_SHAPE if dry_run else LLAMA_1B_SHAPE)
    config_path.write_text(json.dumps(config, indent=1))
    return shapes


def run_logged(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd`, teeing nothing: its output goes to `log`; a failure raises with the log's tail."""
    with open(log, "w") as handle:
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return result


def section_scoring(args, workdir: Path, shapes: dict[str, Path]) -> dict:
    rows = []
    dtypes = ("float32", "bfloat16")
    for shape in ("smollm2", "llama1b"):
        for dtype in dtypes:
            out = workdir / f"scoring_{shape}_{dtype}.json"
            model = "smollm2-135m-instruct" if shape == "smollm2" else str(shapes[shape])
            cmd = [sys.executable, str(HERE / "bench_scoring.py"), "--device", args.device, "--dtype", dtype,
                   "--model", model, "--examples", str(args.scoring_examples), "--rounds", str(args.scoring_rounds),
                   "--skip-memory", "--skip-entropy", "--json", str(out)]  # fmt: skip
            if shape != "smollm2":
                cmd.append("--random-init")
            run_logged(cmd, workdir / f"scoring_{shape}_{dtype}.log", timeout=args.budget_s)
            speed = json.loads(out.read_text())["speed"]
            mean_len = speed["tokens"] / speed["examples"]
            per_token = flops_per_token(shapes[shape], mean_len)
            peak = peak_tflops(args.device, dtype, args.peak_tflops)
            row = {
                "shape": shape,
                "dtype": dtype,
                "tokens": speed["tokens"],
                "ours_tok_per_s": speed["score_dataset_tok_per_s"],
                "reference_tok_per_s": speed["reference_tok_per_s"],
                "speedup": speed["speedup"],
                "max_abs_nll_diff": speed["max_abs_nll_diff"],
                "gflops_per_token": per_token / 1e9,
                "peak_tflops": peak,
                "mfu": per_token * speed["score_dataset_tok_per_s"] / (peak * 1e12) if peak else None,
                "reference_mfu": per_token * speed["reference_tok_per_s"] / (peak * 1e12) if peak else None,
            }
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (no peak known)"
            print(f"  scoring {shape:8s} {dtype:9s} {row['ours_tok_per_s']:10.0f} tok/s "
                  f"({row['speedup']:.2f}x the loop)  MFU {mfu}  max|dNLL| {row['max_abs_nll_diff']:.2e}")  # fmt: skip
    return {"rows": rows}


def prepare_rows(workdir: Path, rows: int) -> Path:
    from trl_pplmask.data import load_task

    path = workdir / "gsm8k_rows"
    if not path.exists():
        load_task("gsm8k", "train", limit=rows).save_to_disk(str(path))
    return path


def sft_argv(args, workdir: Path, data: Path, arm: str, extra: list[str]) -> list[str]:
    device = ["--use_cpu", "--bf16", "false", "--dtype", "float32"] if args.device == "cpu" else [
        "--bf16", "true", "--dtype", "bfloat16"]  # fmt: skip
    return [
        "--model_name_or_path", "smollm2-135m-instruct", "--dataset_name", str(data),
        "--output_dir", str(workdir / "sft" / arm), "--max_length", "384", "--use_peft", "--lora_r", "16",
        "--lora_alpha", "32", "--lora_target_modules", "all-linear", "--per_device_train_batch_size",
        str(args.batch_size), "--learning_rate", "2e-5", "--max_steps", str(args.steps), "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0", *device, *extra,
    ]  # fmt: skip


def section_sft(args, workdir: Path) -> dict:
    data = prepare_rows(workdir, args.steps * args.batch_size)
    arms = {**BASE_ARMS, **objective_arms()}
    if args.arms:
        unknown = set(args.arms) - set(arms)
        if unknown:
            raise SystemExit(f"--arms: unknown arm(s) {', '.join(sorted(unknown))} (known: {', '.join(arms)})")
        arms = {arm: extra for arm, extra in arms.items() if arm in args.arms or arm == "sft"}
    rows = {}
    cli = shutil.which("trl-pplmask") or str(Path(sys.executable).with_name("trl-pplmask"))
    for arm, extra in arms.items():
        argv = sft_argv(args, workdir, data, arm, extra)
        start = time.perf_counter()
        run_logged([cli, "sft", *argv], workdir / f"sft_{arm}.log", timeout=args.budget_s)
        record = json.loads((workdir / "sft" / arm / "pplmask_config.json").read_text())
        runtime = record["train_runtime"]
        rows[arm] = {
            "step_s": runtime / args.steps,
            "train_runtime_s": runtime,
            "wall_s": time.perf_counter() - start,
            "masked_fraction": record["mask_stats"].get("masked_fraction"),
            "train_loss": record["train_loss"],
            "command": "trl-pplmask sft " + " ".join(argv),
        }
    base = rows["sft"]["step_s"]
    for arm, row in rows.items():
        row["vs_sft"] = row["step_s"] / base
        print(f"  sft {arm:14s} {row['step_s']:7.3f} s/step  {row['vs_sft']:.2f}x plain SFT  "
              f"masked {row['masked_fraction'] or 0:.3f}  loss {row['train_loss']:.4f}")  # fmt: skip
    return {"steps": args.steps, "batch_size": args.batch_size, "arms": rows}


def section_mask_agreement(args, workdir: Path) -> dict:
    """Mask flips between a float32 and a bfloat16 scoring of the same rows, at the paper's threshold."""
    import numpy as np
    import torch

    from trl_pplmask.data import load_task, tokenize_dataset
    from trl_pplmask.masking import PplMaskConfig, compute_mask
    from trl_pplmask.models import load_model
    from trl_pplmask.scoring import score_dataset

    threshold = PplMaskConfig().threshold
    config = PplMaskConfig(strategy="threshold", threshold=threshold)
    nll = {}
    data = None
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model("smollm2-135m-instruct", dtype=dtype, device=args.device)
        if data is None:
            data = tokenize_dataset(load_task("gsm8k", "train", limit=args.agreement_rows), tokenizer, max_length=1024)
        scored = score_dataset(data, model, tokenizer, use_cache=False, show_progress=False)
        nll[dtype] = [np.asarray(x, dtype=np.float64) for x in scored["token_nll"]]
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    log_t = math.log(threshold)
    flips, flip_distance, diffs, label_tokens = 0, [], [], 0
    for labels, a, b in zip(data["labels"], nll["float32"], nll["bfloat16"]):
        mask_a = compute_mask(a, labels, config)
        mask_b = compute_mask(b, labels, config)
        trainable = np.asarray(labels) != -100
        label_tokens += int(trainable.sum())
        diffs.append(np.abs(a - b)[trainable])
        flipped = mask_a != mask_b
        flips += int(flipped.sum())
        flip_distance.extend(np.abs(a[flipped] - log_t).tolist())
    diff = np.concatenate(diffs) if diffs else np.zeros(0)
    p999 = float(np.quantile(diff, 0.999)) if diff.size else 0.0
    result = {
        "rows": len(data),
        "label_tokens": label_tokens,
        "threshold": threshold,
        "flips": flips,
        "flip_fraction": flips / label_tokens if label_tokens else 0.0,
        "max_flip_distance_nats": max(flip_distance, default=0.0),
        "abs_dnll_median": float(np.median(diff)) if diff.size else 0.0,
        "abs_dnll_p999": p999,
        "abs_dnll_max": float(diff.max()) if diff.size else 0.0,
        "flips_within_p999_of_threshold": all(d <= p999 for d in flip_distance),
    }
    print(f"  mask agreement: {flips} of {label_tokens} label tokens flip ({result['flip_fraction']:.2%}); flipped "
          f"tokens sit at most {result['max_flip_distance_nats']:.4f} nats from log({threshold}); |dNLL| median "
          f"{result['abs_dnll_median']:.2e}, p99.9 {p999:.2e}, max {result['abs_dnll_max']:.2e}")  # fmt: skip
    return result


def section_study(args, workdir: Path, remaining: float) -> dict:
    cli = shutil.which("trl-pplmask") or str(Path(sys.executable).with_name("trl-pplmask"))
    cmd = [cli, "study", "--config", args.study_config]
    if args.dry_run:
        cmd.append("--plan")
    start = time.perf_counter()
    try:
        run_logged(cmd, workdir / "study.log", timeout=max(remaining, 1.0))
        status = "finished" if not args.dry_run else "planned"
    except subprocess.TimeoutExpired:
        status = "stopped at the budget; rerun the same command to resume"
    print(f"  study: {status} ({time.perf_counter() - start:.0f} s); log {workdir / 'study.log'}")
    return {"command": " ".join(cmd), "status": status, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the section JSON files and logs.")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing.")
    parser.add_argument("--device", help="cuda or cpu (default: cuda, cpu with --dry-run).")
    parser.add_argument("--budget-s", type=float, default=540.0, help="Start no section after this many seconds.")
    parser.add_argument("--peak-tflops", type=float, help="Dense peak of this GPU for the MFU (default: the table).")
    parser.add_argument("--steps", type=int, help="sft steps per arm (default 20; 2 with --dry-run).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--arms",
        type=lambda s: s.split(","),
        help="Comma-separated sft arms (default: all; `sft`, the reference of the ratios, always runs).",
    )
    parser.add_argument("--scoring-examples", type=int, help="GSM8K examples per scoring run (default 512; 4).")
    parser.add_argument("--scoring-rounds", type=int, default=2)
    parser.add_argument("--agreement-rows", type=int, help="GSM8K rows of the mask agreement (default 512; 4).")
    parser.add_argument("--sections", default="scoring,sft,mask_agreement", help="Comma-separated sections.")
    parser.add_argument("--study", action="store_true", help="Also run the study when time is left.")
    parser.add_argument("--study-config", default=str(HERE.parent / "studies" / "gsm8k-smollm2-135m-gpu.yaml"))
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    small = args.dry_run
    args.steps = args.steps or (2 if small else 20)
    args.batch_size = 2 if small else args.batch_size
    args.scoring_examples = args.scoring_examples or (4 if small else 512)
    args.agreement_rows = args.agreement_rows or (4 if small else 512)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device is visible; run on a GPU machine, or pass --dry-run to check the script")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=out))
    start = time.perf_counter()
    header = {"machine": machine(args.device), "device": args.device, "dry_run": args.dry_run,
              "command": " ".join([sys.executable, *sys.argv])}  # fmt: skip
    print(f"gpu_check on {header['machine']} ({'dry run' if args.dry_run else 'measuring'}), budget {args.budget_s} s")
    shapes = write_shapes(workdir, args.dry_run)
    sections = {
        "scoring": lambda: section_scoring(args, workdir, shapes),
        "sft": lambda: section_sft(args, workdir),
        "mask_agreement": lambda: section_mask_agreement(args, workdir),
    }
    skipped = []
    for name in [s for s in args.sections.split(",") if s]:
        if name not in sections:
            parser.error(f"--sections: unknown section {name!r} (known: {', '.join(sections)})")
        if time.perf_counter() - start > args.budget_s:
            skipped.append(name)
            continue
        print(f"[{name}]")
        t0 = time.perf_counter()
        result = {**header, **sections[name](), "section_s": time.perf_counter() - t0}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    remaining = args.budget_s - (time.perf_counter() - start)
    if args.study:
        if remaining > 60 or args.dry_run:
            print("[study]")
            (out / "study.json").write_text(json.dumps({**header, **section_study(args, workdir, remaining)}))
        else:
            skipped.append("study")
    if skipped:
        print(f"skipped at the budget ({args.budget_s} s): {', '.join(skipped)}")
    print(f"done in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
