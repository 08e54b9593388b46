"""Log-likelihood ARC-Challenge accuracy of a model (the embedded SmolLM2-135M-Instruct by default) and its run time.

Runs the `arc_challenge_mc` task of `trl-pplmask eval` (zero-shot, lm-evaluation-harness's prompt
`"Question: {question}\\nAnswer:"` and continuation `" {choice}"`, every choice scored by its summed NLL) on the
1,172 test questions, and prints `acc`, `acc_norm` (log-likelihood per character of the choice), their 95% bootstrap
intervals, and the seconds it took (model loading excluded and printed separately), with the machine it ran on.

Usage: python benchmarks/bench_arc_loglik.py [--model NAME_OR_PATH] [--adapter PATH] [--limit N] [--split test]
       [--device cpu|cuda] [--dtype float32] [--max-tokens-per-batch N] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="First N questions only (default: the whole split).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens-per-batch", type=int, help="Default: 2048 on CPU, 32768 on GPU.")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy machine).")
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from trl_pplmask.evaluation import EvalConfig, evaluate_multiple_choice, load_eval_rows, resolve_task
    from trl_pplmask.metrics.forgetting.forgetting import bootstrap_ci
    from trl_pplmask.models import load_model

    task = resolve_task("arc_challenge_mc", {"arc_challenge": args.split})
    rows = load_eval_rows(task, args.limit)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    load_seconds = time.perf_counter() - start
    config = EvalConfig(tasks=[task.name], max_tokens_per_batch=args.max_tokens_per_batch, use_cache=False)

    start = time.perf_counter()
    items, stats = evaluate_multiple_choice(model, tokenizer, task, rows, config, label=args.model)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens = sum(len(tokenizer(item["prompt"])["input_ids"]) for item in items)  # context tokens, once per question
    figures = {
        "model": args.model,
        "adapter": args.adapter,
        "split": args.split,
        "questions": len(items),
        "choices": stats["choices"],
        "acc": sum(i["scores"]["acc"] for i in items) / len(items),
        "acc_norm": sum(i["scores"]["acc_norm"] for i in items) / len(items),
        "acc_ci95": bootstrap_ci([i["scores"]["acc"] for i in items]),
        "acc_norm_ci95": bootstrap_ci([i["scores"]["acc_norm"] for i in items]),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "questions_per_second": len(items) / seconds,
        "context_tokens": tokens,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
    }
    print(f"ARC-Challenge {args.split}, log-likelihood, {len(items)} questions, {stats['choices']} choices")
    print(f"acc       {figures['acc']:.4f}  95% CI [{figures['acc_ci95'][0]:.4f}, {figures['acc_ci95'][1]:.4f}]")
    print(
        f"acc_norm  {figures['acc_norm']:.4f}  95% CI [{figures['acc_norm_ci95'][0]:.4f}, "
        f"{figures['acc_norm_ci95'][1]:.4f}]"
    )
    print(
        f"seconds   {seconds:.1f} ({figures['questions_per_second']:.2f} questions/s; model load {load_seconds:.1f} s)"
    )
    print(f"machine   {figures['machine']}; device {args.device}, {args.dtype}, {figures['torch_threads']} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
