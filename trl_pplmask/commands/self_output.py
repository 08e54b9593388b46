"""`trl-pplmask self-output` (and `hub_scripts/build_self_output.py`): verified self-output or rephrase SFT data in a
Hub-layout `<task>-self-output` folder.

The options are defined without importing torch, so that `--help` answers fast; the build
([`~trl_pplmask.hub.self_output.build_self_output`]) is imported when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..constants import DEFAULT_THRESHOLD, EMBEDDED_MODEL_ALIAS
from ..generation.config import BACKENDS, FALLBACKS, MODES, SELECTIONS, SelfOutputConfig
from ._args import from_namespace
from ._command import Command
from .build import folder_settings


if TYPE_CHECKING:
    from ..hub.self_output import SelfOutputBuildConfig

HELP = "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder."
DESCRIPTION = (
    HELP + " For every row, sample --num-samples responses, keep a verified one (or the ground truth), and write one "
    "config per generating model; interrupted runs resume from --checkpoint-dir."
)
PROG = "trl-pplmask self-output"


@dataclass(kw_only=True)
class SelfOutputArguments:
    """Settings of `trl-pplmask self-output`, one command-line option each (`num_samples` is `--num-samples`); the
    build runs on the [`~trl_pplmask.hub.self_output.SelfOutputBuildConfig`] and
    [`~trl_pplmask.generation.SelfOutputConfig`] made of them, which document each."""

    dataset: str = field(
        metadata={"help": "Task (gsm8k, mbpp, math, arc_challenge, humaneval), or prompt/completion data."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config of a Hub dataset."})
    split: str = field(default="train", metadata={"help": "Split to generate for (default: train)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    verifier: str | None = field(
        default=None, metadata={"help": "Verifier: task name or module:function (default: the task's)."}
    )
    models: list[str] = field(
        default_factory=lambda: [EMBEDDED_MODEL_ALIAS], metadata={"help": "Generating models: one config each."}
    )
    config_names: list[str] | None = field(
        default=None, metadata={"help": "Config name per model (default: slug of the model name)."}
    )
    mode: str = field(
        default="self-output",
        metadata={
            "help": "self-output: the model answers the task prompt. rephrase: it rewrites the reference answer in "
            "its own words. Either way the response is verified against the task (default: self-output).",
            "choices": MODES,
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Responses sampled per row (paper: 32)."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; 0 is greedy decoding (default: 0.7)."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling probability (default: 0.95)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest response in tokens (default: 512)."})
    selection: str = field(
        default="lowest_ppl",
        metadata={
            "help": "Correct response a row keeps: lowest_ppl (the paper's: lowest sequence perplexity), first, or "
            "random (seeded) (default: lowest_ppl).",
            "choices": SELECTIONS,
        },
    )
    fallback: str = field(
        default="ground_truth",
        metadata={
            "help": "Row with no correct response: keep its ground truth (marked) or skip it (default: ground_truth).",
            "choices": FALLBACKS,
        },
    )
    select_truncated: bool = field(default=False, metadata={"help": "Allow choosing responses cut at the limit."})
    backend: str = field(
        default="transformers",
        metadata={
            "help": "transformers (any device) or vllm (needs the vllm extra and a CUDA GPU) (default: transformers).",
            "choices": BACKENDS,
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling and of --selection random."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generation batch (default: 8, vLLM 256)."}
    )
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "transformers: token budget of a generation batch."}
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    ppl_threshold: float = field(
        default=DEFAULT_THRESHOLD, metadata={"help": "Token perplexity counted as high (2.5)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder to write (default: <dataset>-self-output)."}
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Resumable checkpoints (default: <output-dir>-checkpoints)."}
    )
    max_shard_size: str = field(default="500MB", metadata={"help": "Largest parquet shard (default: 500MB)."})
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo the folder is for (usage snippets, default of push)."}
    )
    pretty_name: str | None = field(default=None, metadata={"help": "Card title."})
    license: str | None = field(default=None, metadata={"help": "License of the source data (known for the tasks)."})
    language: list[str] = field(
        default_factory=lambda: ["en"], metadata={"help": "Languages listed in the card (default: en)."}
    )
    card_template: str | None = field(
        default=None,
        metadata={"help": "Jinja template of the card (default: cards/self_output.md.jinja)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace a card edited by hand inside its generated part instead of refusing (text outside the "
            "card's markers is always kept)."
        },
    )


def build_config(arguments: SelfOutputArguments, prog: str = PROG) -> SelfOutputBuildConfig:
    """The [`~trl_pplmask.hub.self_output.SelfOutputBuildConfig`] of the settings, recording the command line."""
    from ..hub.self_output import SelfOutputBuildConfig  # imports torch: only when a build runs

    generation = SelfOutputConfig(
        mode=arguments.mode,
        num_samples=arguments.num_samples,
        temperature=arguments.temperature,
        top_p=arguments.top_p,
        max_new_tokens=arguments.max_new_tokens,
        selection=arguments.selection,
        fallback=arguments.fallback,
        select_truncated=arguments.select_truncated,
        backend=arguments.backend,
        seed=arguments.seed,
        batch_size=arguments.batch_size,
        max_tokens_per_batch=arguments.max_tokens_per_batch,
        tensor_parallel_size=arguments.tensor_parallel_size,
    )
    return SelfOutputBuildConfig(
        **folder_settings(arguments, prog),
        split=arguments.split,
        verifier=arguments.verifier,
        generation=generation,
        ppl_threshold=arguments.ppl_threshold,
        checkpoint_dir=arguments.checkpoint_dir,
        overwrite=arguments.overwrite,
    )


def build_config_from_args(args: argparse.Namespace, prog: str = PROG) -> SelfOutputBuildConfig:
    """The [`~trl_pplmask.hub.self_output.SelfOutputBuildConfig`] of parsed `self-output` arguments."""
    return build_config(from_namespace(SelfOutputArguments, args), prog)


def run(arguments: SelfOutputArguments, prog: str = PROG) -> int:
    """Run a build and print a summary per config."""
    from ..hub.card import fmt_percent
    from ..hub.folder import read_build_infos
    from ..hub.self_output import build_self_output  # imports torch: only when a build runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = build_self_output(build_config(arguments, prog))
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


COMMAND = Command(
    name="self-output", help=HELP, description=DESCRIPTION, config_class=SelfOutputArguments, run=run, pass_prog=True
)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
