"""Command line: `trl-pplmask self-output` (registered by `trl_pplmask.cli`) and `hub_scripts/build_self_output.py`.

The arguments are defined without importing torch, so that `--help` answers fast; the build
([`~trl_pplmask.hub.self_output.build_self_output`]) is imported when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..constants import EMBEDDED_MODEL_ALIAS
from .config import BACKENDS, FALLBACKS, MODES, SELECTIONS, SelfOutputConfig


if TYPE_CHECKING:
    from ..hub.self_output import SelfOutputBuildConfig

HELP = "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder."


def add_self_output_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `trl-pplmask self-output` (also used by `hub_scripts/build_self_output.py`)."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="Task (gsm8k, mbpp, math, arc_challenge, humaneval), or prompt/completion data.",
    )
    parser.add_argument("--dataset-config", help="Config of a Hub dataset.")
    parser.add_argument("--split", default="train", help="Split to generate for (default: train).")
    parser.add_argument("--limit", type=int, help="Use only the first N rows.")
    parser.add_argument("--verifier", help="Verifier: task name or module:function (default: the task's).")
    parser.add_argument(
        "--models", nargs="+", default=[EMBEDDED_MODEL_ALIAS], help="Generating models: one config each."
    )
    parser.add_argument("--config-names", nargs="+", help="Config name per model (default: slug of the model name).")
    parser.add_argument(
        "--mode",
        default="self-output",
        choices=MODES,
        help="self-output: the model answers the task prompt. rephrase: it rewrites the reference answer in its own "
        "words. Either way the response is verified against the task (default: self-output).",
    )
    parser.add_argument("--num-samples", type=int, default=4, help="Responses sampled per row (paper: 32).")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="Sampling temperature; 0 is greedy decoding (default: 0.7)."
    )
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling probability (default: 0.95).")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Longest response in tokens (default: 512).")
    parser.add_argument(
        "--selection",
        default="lowest_ppl",
        choices=SELECTIONS,
        help="Correct response a row keeps: lowest_ppl (the paper's: lowest sequence perplexity), first, or random "
        "(seeded) (default: lowest_ppl).",
    )
    parser.add_argument(
        "--fallback",
        default="ground_truth",
        choices=FALLBACKS,
        help="Row with no correct response: keep its ground truth (marked) or skip it (default: ground_truth).",
    )
    parser.add_argument("--select-truncated", action="store_true", help="Allow choosing responses cut at the limit.")
    parser.add_argument(
        "--backend",
        default="transformers",
        choices=BACKENDS,
        help="transformers (any device) or vllm (needs the vllm extra and a CUDA GPU) (default: transformers).",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling and of --selection random.")
    parser.add_argument("--batch-size", type=int, help="Prompts per generation batch (default: 8, vLLM 256).")
    parser.add_argument("--max-tokens-per-batch", type=int, help="transformers: token budget of a generation batch.")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16.")
    parser.add_argument("--ppl-threshold", type=float, default=2.5, help="Token perplexity counted as high (2.5).")
    parser.add_argument("--output-dir", help="Folder to write (default: <dataset>-self-output).")
    parser.add_argument("--checkpoint-dir", help="Resumable checkpoints (default: <output-dir>-checkpoints).")
    parser.add_argument("--max-shard-size", default="500MB", help="Largest parquet shard (default: 500MB).")
    parser.add_argument("--repo-id", help="Hub repo the folder is for (usage snippets, default of push).")
    parser.add_argument("--pretty-name", help="Card title.")
    parser.add_argument("--license", help="License of the source data (known for the tasks).")
    parser.add_argument("--language", nargs="+", default=["en"], help="Languages listed in the card (default: en).")
    parser.add_argument(
        "--card-template", help="Jinja template of the card (default: trl_pplmask/cards/self_output.md.jinja)."
    )
    return parser


def build_config_from_args(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> SelfOutputBuildConfig:
    """The [`~trl_pplmask.hub.self_output.SelfOutputBuildConfig`] of parsed `add_self_output_args` arguments."""
    from ..hub.cli import folder_settings_from_args
    from ..hub.self_output import SelfOutputBuildConfig  # imports torch: only when a build runs

    generation = SelfOutputConfig(
        mode=args.mode,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        selection=args.selection,
        fallback=args.fallback,
        select_truncated=args.select_truncated,
        backend=args.backend,
        seed=args.seed,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    return SelfOutputBuildConfig(
        **folder_settings_from_args(args, prog),
        split=args.split,
        verifier=args.verifier,
        generation=generation,
        ppl_threshold=args.ppl_threshold,
        checkpoint_dir=args.checkpoint_dir,
    )


def cmd_self_output(args: argparse.Namespace, prog: str = "trl-pplmask self-output") -> int:
    """Run a build from parsed arguments and print a summary per config."""
    from ..hub.card import fmt_percent
    from ..hub.folder import read_build_infos
    from ..hub.self_output import build_self_output  # imports torch: only when a build runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = build_self_output(build_config_from_args(args, prog))
    for name, info in read_build_infos(output).items():
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            print(
                f"{name}/{split}: {s['rows']} rows ({s['rows_self']} self, {s['rows_ground_truth']} ground truth, "
                f"{s['rows_skipped']} skipped); sample accuracy {fmt_percent(s['sample_accuracy'])}; tokens with "
                f"ppl > {s['threshold']:g}: chosen {fmt_percent(s['chosen']['high_ppl_share'])}, ground truth "
                f"{fmt_percent(s['ground_truth']['high_ppl_share'])}"
            )
    print(f"Built {output} (load it with datasets.load_dataset({str(output)!r}, <config>))")
    return 0


def register_cli(subparsers) -> None:
    """Add `self-output` to the `trl-pplmask` command (called by `trl_pplmask.cli`)."""
    parser = subparsers.add_parser(
        "self-output",
        help=HELP,
        description=HELP + " For every row, sample --num-samples responses, keep a verified one (or the ground "
        "truth), and write one config per generating model; interrupted runs resume from --checkpoint-dir.",
    )
    add_self_output_args(parser)
    parser.set_defaults(func=cmd_self_output)


def main(argv: Sequence[str] | None = None, prog: str = "trl-pplmask self-output") -> int:
    """Entry point of `hub_scripts/build_self_output.py`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    description = sys.modules[__package__].__doc__.splitlines()[0]  # the summary line of `trl_pplmask.generation`
    parser = add_self_output_args(argparse.ArgumentParser(prog=prog, description=description))
    args = parser.parse_args(argv)
    try:
        return cmd_self_output(args, prog=prog)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
