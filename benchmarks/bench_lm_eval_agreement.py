"""Agreement of the two `trl-pplmask eval` backends on ARC-Challenge: the builtin `arc_challenge_mc` against
lm-evaluation-harness's own `arc_challenge` task (`--backend lm-eval`), item for item, on one loaded model.

Both run on the same model object and the same first `--limit` test rows of the local data mirror
(`TRL_PPLMASK_DATA_DIR`, which lm-eval reads through `trl_pplmask/evaluation/lm_eval_tasks/arc_challenge.yaml`).
Prints, per metric (`acc`, `acc_norm`), how many items both backends score the same, the accuracies, the largest
difference of a choice's log-likelihood, how many items have two choices closer than that (where batching noise could
flip a prediction), and each backend's seconds, with the machine it ran on.

Usage: TRL_PPLMASK_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_lm_eval_agreement.py
       [--model NAME_OR_PATH] [--limit 100] [--device cpu|cuda] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=100, help="First N test questions.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="Also write the figures here.")
    args = parser.parse_args()
    if not os.environ.get("TRL_PPLMASK_DATA_DIR"):
        parser.error("set TRL_PPLMASK_DATA_DIR to the local data mirror (both backends read it)")

    from trl_pplmask.evaluation.config import EvalConfig
    from trl_pplmask.evaluation.harness import run_lm_eval
    from trl_pplmask.evaluation.loglik import evaluate_multiple_choice
    from trl_pplmask.evaluation.tasks import load_eval_rows, resolve_task
    from trl_pplmask.models import load_model
    from trl_pplmask.utils import package_version

    task = resolve_task("arc_challenge_mc")
    rows = load_eval_rows(task, args.limit)
    config = EvalConfig(tasks=[task.name], limit=args.limit, backend="lm-eval", dtype=args.dtype, show_progress=False)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    start = time.perf_counter()
    builtin, _ = evaluate_multiple_choice(model, tokenizer, task, rows, config, "builtin")
    builtin_s = time.perf_counter() - start
    start = time.perf_counter()
    harnessed, stats = run_lm_eval(model, tokenizer, task, rows, config, "lm-eval")
    lm_eval_s = time.perf_counter() - start

    ours = [np.array(item["loglik"]) for item in builtin]
    theirs = [np.array(item["loglik"]) for item in harnessed]
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    closest = [float(np.min(np.diff(np.sort(a)))) for a in ours]
    figures = {
        "model": args.model,
        "items": len(rows),
        "lm_eval": package_version("lm_eval"),
        "lm_eval_task": stats["lm_eval_task"],
        "data": stats["data"],
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "max_abs_loglik_diff": max_diff,
        "items_with_choices_closer_than_that": sum(gap <= max_diff for gap in closest),
        "builtin_s": round(builtin_s, 1),
        "lm_eval_s": round(lm_eval_s, 1),
    }
    for metric in ("acc", "acc_norm"):
        a = [item["scores"][metric] for item in builtin]
        b = [item["scores"][metric] for item in harnessed]
        figures[metric] = {
            "agree": sum(x == y for x, y in zip(a, b)),
            "builtin": float(np.mean(a)),
            "lm_eval": float(np.mean(b)),
            "disagreeing_rows": [item["row_id"] for item, x, y in zip(builtin, a, b) if x != y],
        }
    for metric in ("acc", "acc_norm"):
        f = figures[metric]
        print(
            f"{metric}: {f['agree']}/{len(rows)} items agree; builtin {f['builtin']:.4f}, lm-eval {f['lm_eval']:.4f}"
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
