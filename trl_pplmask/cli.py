"""The `trl-pplmask` command: score, mask, demo (and the Hub/data pipelines when installed)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from .masking import STRATEGIES, TRAINABLE_COLUMN, PplMaskConfig, trainable_positions


DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local path or the embedded alias (default).")
    parser.add_argument("--adapter", help="PEFT adapter (Hub id or path) loaded on top of --model.")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16.")


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="Task name (gsm8k, mbpp, math, arc_challenge, humaneval), saved dataset folder, .jsonl/.parquet file, "
        "or Hub dataset id.",
    )
    parser.add_argument("--dataset-config", help="Config of a Hub dataset.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, help="Use only the first N rows.")


def _add_mask_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="threshold", choices=STRATEGIES)
    parser.add_argument("--threshold", type=float, default=2.5, help="Perplexity threshold (paper: 2.5).")
    parser.add_argument("--fraction", type=float, help="Fraction of completion tokens to mask (strategy fraction).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of strategy random.")
    parser.add_argument("--dpf-nll-column", default="token_nll_dpf", help="NLLs under a first fine-tuned model.")
    parser.add_argument(
        "--entropy-threshold", type=float, default=1.0, help="Entropy bound in nats of strategy stm_entropy."
    )
    parser.add_argument("--drop-empty", action="store_true", help="Drop examples left with no trainable token.")


def _mask_config(args: argparse.Namespace) -> PplMaskConfig:
    return PplMaskConfig(
        strategy=args.strategy,
        threshold=args.threshold,
        fraction=args.fraction,
        seed=args.seed,
        dpf_nll_column=args.dpf_nll_column,
        entropy_threshold=args.entropy_threshold,
    )


def _score(args: argparse.Namespace, dataset):
    from .data import tokenize_dataset
    from .models import load_model
    from .scoring import ScoringConfig, distributed_state, score_dataset

    state = distributed_state()
    model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=state.device)
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=args.max_length)
    config = ScoringConfig(
        max_tokens_per_batch=args.max_tokens_per_batch,
        score_all_tokens=args.score_all_tokens,
        disable_adapter=args.disable_adapter,
        output_column=args.output_column,
    )
    return score_dataset(tokenized, model, tokenizer, config), tokenizer


def cmd_score(args: argparse.Namespace) -> int:
    from .data import load_any_dataset
    from .scoring import distributed_state

    dataset = load_any_dataset(args.dataset, args.split, args.dataset_config, args.limit)
    scored, _ = _score(args, dataset)
    if distributed_state().is_main_process:
        scored.save_to_disk(args.output)
        print(f"Scored {len(scored)} examples -> {args.output}")
        _print_summary(scored, PplMaskConfig(threshold=2.5), args.output_column)
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    from .data import load_any_dataset
    from .masking import mask_dataset

    dataset = load_any_dataset(args.input, args.split)
    masked, stats = mask_dataset(dataset, _mask_config(args), drop_empty=args.drop_empty)
    masked.save_to_disk(args.output)
    print(json.dumps(stats, indent=2))
    print(f"Masked dataset -> {args.output}")
    return 0


PPL_BINS = (1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 100.0, math.inf)


def text_histogram(ppl: np.ndarray, threshold: float, width: int = 40) -> str:
    """A small text histogram of token perplexities, bins marked above the threshold."""
    counts, _ = np.histogram(ppl, bins=np.array(PPL_BINS))
    total = max(int(counts.sum()), 1)
    lines = []
    for lo, hi, n in zip(PPL_BINS[:-1], PPL_BINS[1:], counts):
        label = f"[{lo:g}, {hi:g})" if math.isfinite(hi) else f"[{lo:g}, inf)"
        bar = "#" * int(round(width * n / total))
        flag = "  masked" if lo >= threshold else ""
        lines.append(f"  {label:>12} {n:7d} {100 * n / total:5.1f}% {bar}{flag}")
    return "\n".join(lines)


def completion_ppl(dataset, nll_column: str = "token_nll") -> np.ndarray:
    """Perplexities of all completion (trainable) tokens of a scored dataset."""
    values = []
    masks = dataset[TRAINABLE_COLUMN] if TRAINABLE_COLUMN in dataset.column_names else dataset["labels"]
    for nll, mask in zip(dataset[nll_column], masks):
        trainable = trainable_positions(mask, mask if TRAINABLE_COLUMN in dataset.column_names else None)
        values.append(np.exp(np.asarray(nll, dtype=np.float64)[trainable]))
    return np.concatenate(values) if values else np.zeros(0)


def _print_summary(dataset, config: PplMaskConfig, nll_column: str) -> None:
    ppl = completion_ppl(dataset, nll_column)
    if ppl.size == 0:
        print("No completion tokens.")
        return
    print(f"Completion tokens: {ppl.size}; median perplexity {np.median(ppl):.2f}; ")
    print(f"above {config.threshold:g} (masked by STM): {100 * np.mean(ppl > config.threshold):.1f}%")
    print(text_histogram(ppl, config.threshold))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(output_dir=args.output, num_examples=args.num_examples, max_steps=args.max_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-pplmask",
        description="Selective Token Masking for TRL: score, mask and fine-tune without catastrophic forgetting.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="Tokenize a dataset like SFTTrainer and add per-token NLLs (token_nll).")
    _add_model_args(score)
    _add_dataset_args(score)
    score.add_argument("--output", required=True, help="Folder for Dataset.save_to_disk.")
    score.add_argument("--max-length", type=int, default=1024, help="SFTConfig.max_length used for training.")
    score.add_argument("--max-tokens-per-batch", type=int, help="Token budget per batch (default: by device).")
    score.add_argument("--score-all-tokens", action="store_true", help="Score prompt tokens too.")
    score.add_argument("--disable-adapter", action="store_true", help="Score with the PEFT adapter disabled.")
    score.add_argument("--output-column", default="token_nll")
    score.set_defaults(func=cmd_score)

    mask = sub.add_parser("mask", help="Mask the labels of a scored dataset and add mask statistics.")
    mask.add_argument("--input", required=True, help="Scored dataset (folder from `trl-pplmask score`).")
    mask.add_argument("--split", default="train")
    mask.add_argument("--output", required=True)
    _add_mask_args(mask)
    mask.set_defaults(func=cmd_mask)

    demo = sub.add_parser("demo", help="Score, mask and fine-tune the embedded model on GSM8K, on CPU.")
    demo.add_argument("--output", default="demo_output")
    demo.add_argument("--num-examples", type=int, default=64)
    demo.add_argument("--max-steps", type=int, default=10)
    demo.set_defaults(func=cmd_demo)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands of the Hub and generation pipelines, registered by their modules."""
    registrars = []
    for module_name in ("hub", "generation", "evaluation"):
        try:
            module = __import__(f"trl_pplmask.{module_name}", fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(module, "register_cli"):
            registrars.append(module.register_cli)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, TypeError) as err:  # OSError: files, network (ConnectionError)
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
