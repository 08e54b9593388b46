"""The `<task>-self-output` builder: the models' own verified answers (or rephrasings), one config per generating
model, and the card with the sample accuracy and the perplexity comparison ([`build_self_output`]).

Generation itself is [`~trl_pplmask.generation.generate_records`]; this module stages its output as a Hub-layout
folder (see [`~trl_pplmask.hub.builder.FolderBuilder`]).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData

from ..data import load_any_dataset, load_task
from ..generation.backends import check_vllm_available
from ..generation.config import SelfOutputConfig
from ..generation.loop import generate_records, verifier_name
from ..generation.prompts import prepare_rows
from ..generation.selection import assemble_dataset
from ..models import resolve_model_path
from ..tasks import TASKS
from ..verifiers import check_rows, get_verifier
from .builder import FolderBuilder
from .card import fmt_number, fmt_percent
from .folder import write_parquet_shards
from .self_output_config import SELF_OUTPUT_CARD_TEMPLATE, SelfOutputBuildConfig
from .self_output_stats import plot_ppl_comparison, self_output_statistics
from .source import describe_source


logger = logging.getLogger(__name__)

SELF_OUTPUT_KIND = "self-output"  # `kind` of our build_info.json
# Generation settings that do not change the data (or are recorded elsewhere in the build info)
_UNRECORDED_SETTINGS = ("checkpoint_path", "show_progress", "verify_workers", "score_max_tokens_per_batch")
_VLLM_SETTINGS = ("tensor_parallel_size", "vllm_model", "vllm_gpu_memory_utilization")


def _load_source(config: SelfOutputBuildConfig) -> Dataset:
    if config.dataset in TASKS:
        return load_task(config.dataset, config.split, config.limit)
    return load_any_dataset(config.dataset, config.split, config.dataset_config, config.limit)


class SelfOutputBuilder(FolderBuilder):
    """Builds a `<dataset>-self-output` folder from a [`SelfOutputBuildConfig`] (see [`build_self_output`])."""

    kind = SELF_OUTPUT_KIND
    description = "self-output"
    card_template = SELF_OUTPUT_CARD_TEMPLATE
    action = "generating"
    command_hint = "; run `trl-pplmask self-output` first."
    size_statistic = "rows"

    config: SelfOutputBuildConfig

    def describe_source(self) -> dict[str, Any]:
        config = self.config
        described = describe_source(config.dataset, license=config.license)
        return {**described, "hub_config": config.dataset_config or described.get("hub_config"), "split": config.split}

    def prepare(self) -> None:
        """Load the source rows and check them, the verifier and the backend."""
        self.dataset = _load_source(self.config)
        prepare_rows(self.dataset)  # malformed rows fail before any model is loaded
        self.verifier = self.config.resolved_verifier()
        get_verifier(self.verifier)
        check_rows(self.verifier, self.dataset.to_list())  # rows lacking the checker's fields: before any model
        if self.config.generation.backend == "vllm":
            check_vllm_available()  # before any model is loaded

    def build_config(self, model, tokenizer, name: str, config_name: str, directory: Path, figure: Path) -> dict:
        """Generate with one model (resuming from its checkpoint): the parquet shards, the figure, the settings and the
        statistics."""
        config = self.config
        checkpoint = config.resolved_checkpoint_dir() / f"{config_name}-{config.split}.jsonl"
        generation = SelfOutputConfig(**{**asdict(config.generation), "checkpoint_path": str(checkpoint)})
        if generation.backend == "vllm" and generation.vllm_model is None:
            generation.vllm_model = resolve_model_path(name)
        logger.info("checkpoint: %s (rerun the same command to resume)", checkpoint)
        rows, records = generate_records(self.dataset, model, tokenizer, self.verifier, generation)
        built, skipped = assemble_dataset(rows, records, generation, self.dataset.features)
        if len(built) == 0:
            raise ValueError(
                f"Every one of the {len(rows)} rows had no correct response, so fallback='skip' left nothing. The "
                f"responses are kept in {checkpoint}: rerun with fallback ground_truth (--fallback ground_truth) to "
                "build from them without generating again."
            )
        files = write_parquet_shards(built, directory, config.split, config.max_shard_size_bytes)
        download_size = sum((directory / f).stat().st_size for f in files)
        stats = self_output_statistics(built, config.ppl_threshold, skipped)
        title = f"{self.source['dataset']}: {name} ({generation.mode})"
        plot_ppl_comparison(built, config.ppl_threshold, figure, title)
        settings = asdict(generation)
        for key in _UNRECORDED_SETTINGS:
            settings.pop(key)
        if settings["backend"] != "vllm":
            for key in _VLLM_SETTINGS:
                settings.pop(key)
        return {
            "verifier": verifier_name(self.verifier),
            "generation": settings,
            "settings": {
                "repo_id": config.repo_id,
                "pretty_name": config.pretty_name,
                "language": config.language,
                "limit": config.limit,
                "dtype": config.dtype,
                "ppl_threshold": config.ppl_threshold,
            },
            "splits": {config.split: {"files": [f"{config_name}/{f}" for f in files], "stats": stats}},
            "dataset_info": dataset_info_yaml(built, config_name, config.split, download_size),
        }

    @classmethod
    def default_title(cls, name: str, infos: dict[str, dict[str, Any]]) -> str:
        return f"{name} ({' / '.join(_modes(infos))} data)"

    @classmethod
    def card_tags(cls, name: str, infos: dict[str, dict[str, Any]]) -> list[str]:
        tags = ["trl", "sft", *_modes(infos), "self-distillation", "catastrophic-forgetting", name]
        return list(dict.fromkeys(tags))

    @classmethod
    def add_dataset_info(cls, folder: Path, infos: dict[str, dict[str, Any]], card_data: DatasetCardData) -> None:
        card_data["dataset_info"] = [infos[c]["dataset_info"] for c in sorted(infos) if "dataset_info" in infos[c]]

    @classmethod
    def card_variables(cls, infos: dict[str, dict[str, Any]], latest: dict[str, Any], default: str) -> dict:
        return {"tables": card_rows(infos), "threshold": latest["settings"]["ppl_threshold"]}


def _modes(infos: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({info["generation"]["mode"] for info in infos.values()})


def build_self_output(config: SelfOutputBuildConfig) -> Path:
    """Generate self-output (or rephrase) data with each model and write a `<task>-self-output` Hub-layout folder.

    Layout (like the `-pplmasked` folders of [`~trl_pplmask.hub.build_pplmasked`], so `load_dataset(folder, config)`,
    `trl sft` and `trl-pplmask push` use it unchanged):

    ```
    gsm8k-self-output/
      README.md                              card: YAML configs, settings, statistics, figure, usage, citation
      assets/<config>-ppl-hist.png           token perplexity: chosen responses vs ground truth
      <config>/<split>-0000i-of-0000n.parquet
      <config>/build_info.json               what the card is rendered from
    ```

    Generation resumes from the checkpoints in `checkpoint_dir`. Results are staged and moved into the folder only
    when every model is done, so a failure leaves an existing folder as it was.

    Args:
        config (`SelfOutputBuildConfig`): What to build.

    Returns:
        `Path`: the output folder.
    """
    return SelfOutputBuilder(config).build()


def render_self_output_card(folder: str | Path, template_path: str | Path | None = None) -> DatasetCard:
    """Render `README.md` of a self-output folder from the build info of all its configs, and save it."""
    return SelfOutputBuilder.render_card(folder, template_path)


def dataset_info_yaml(dataset: Dataset, config_name: str, split: str, download_size: int) -> dict[str, Any]:
    """The card's `dataset_info` entry of a config (features, split sizes), as `Dataset.push_to_hub` writes it.

    Besides documenting the schema, it keeps `load_dataset` honest: `datasets` caches a local folder under its name
    and a hash of the card's YAML, not of the files, so without sizes in the YAML a rebuilt folder of the same name
    would load the previous build's cached rows.
    """
    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=dataset.data.nbytes, num_examples=len(dataset)))
    info = DatasetInfo(
        features=dataset.features,
        config_name=config_name,
        splits=splits,
        download_size=download_size,
        dataset_size=dataset.data.nbytes,
    )
    card_data = DatasetCardData()
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)
    return card_data["dataset_info"]


def card_rows(infos: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The card's tables, formatted: generation outcome and perplexity comparison per config and split."""
    outcome, perplexity = [], []
    for name, info in sorted(infos.items()):
        for split, split_info in info["splits"].items():
            s = split_info["stats"]
            outcome.append(
                {
                    "config": name,
                    "split": split,
                    "rows": f"{s['rows']:,}",
                    "rows_generated": f"{s['rows_generated']:,}",
                    "samples": f"{s['samples']:,}",
                    "correct": f"{s['correct_samples']:,}",
                    "accuracy": fmt_percent(s["sample_accuracy"]),
                    "truncated": f"{s['truncated_samples']:,}",
                    "self": f"{s['rows_self']:,}",
                    "ground_truth": f"{s['rows_ground_truth']:,}",
                    "skipped": f"{s['rows_skipped']:,}",
                }
            )
            for key, label in (
                ("chosen", "chosen responses (all rows)"),
                ("self_only", "self-generated responses"),
                ("ground_truth_same_rows", "ground truth, same rows"),
                ("ground_truth", "ground truth (all rows)"),
                ("all_samples", "every sampled response, correct or not"),
            ):
                t = s[key]
                perplexity.append(
                    {
                        "config": name,
                        "split": split,
                        "what": label,
                        "sequences": f"{t['sequences']:,}",
                        "tokens": f"{t['tokens']:,}" if "tokens" in t else "n/a",
                        "high_share": fmt_percent(t.get("high_ppl_share")),
                        "median_token_ppl": fmt_number(t.get("median_token_ppl")),
                        "median_seq_ppl": fmt_number(t["median_seq_ppl"]),
                    }
                )
    return {"outcome": outcome, "perplexity": perplexity}
