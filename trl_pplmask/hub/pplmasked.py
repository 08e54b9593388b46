"""The `<task>-pplmasked` builder: one config per scoring model, every split tokenized, scored and masked, and the
card with the masking statistics ([`build_pplmasked`], [`render_card`])."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from ..models import load_model
from .builder import FolderBuilder
from .card import fmt_number
from .folder import read_build_infos, write_parquet_shards
from .pplmasked_config import BuildConfig
from .pplmasked_split import build_split, completion_perplexities, plot_ppl_histogram
from .source import (
    FORMAT_FIELDS,
    check_chat_templates,
    describe_source,
    load_source_splits,
    resolve_format,
    source_short_name,
    validate_rows,
)


if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

PPLMASKED_KIND = "pplmasked"  # `kind` of our build_info.json; the self-output builder writes its own
PPLMASKED_CARD_TEMPLATE = "pplmasked_dataset_card.md.jinja"
# Settings that do not change the data (or are recorded elsewhere in the build info)
_UNRECORDED_SETTINGS = ("output_dir", "models", "config_names", "template_path", "command", "cache_dir", "use_cache")


class PplMaskedBuilder(FolderBuilder):
    """Builds a `<dataset>-pplmasked` folder from a [`BuildConfig`] (see [`build_pplmasked`])."""

    kind = PPLMASKED_KIND
    description = "perplexity-masked"
    card_template = PPLMASKED_CARD_TEMPLATE
    action = "scoring"
    command_hint = " (build_info.json); run `trl-pplmask build` first."
    size_statistic = "examples"

    config: BuildConfig

    def describe_source(self) -> dict[str, Any]:
        return describe_source(self.config.dataset, self.config.dataset_config, self.config.license)

    def prepare(self) -> None:
        """Check the default config, load and validate every split, and load each model's tokenizer."""
        from accelerate import PartialState  # imports torch: not on the `--help` path

        config, output = self.config, self.output
        if config.default_config is not None:
            known = set(config.resolved_config_names()) | set(read_build_infos(output) if output.is_dir() else {})
            if config.default_config not in known:
                raise ValueError(
                    f"--default-config {config.default_config!r} is not a config of {output}: after this build it "
                    f"holds {sorted(known)}. Name one of those."
                )
        self.splits: dict[str, Dataset] = load_source_splits(config)
        fmt, conversational = None, False
        for split, dataset in self.splits.items():
            where = f"{config.dataset} split {split!r}"
            split_format = resolve_format(dataset, config.format if fmt is None else fmt, where)
            fmt = split_format
            conversational = validate_rows(dataset, fmt, where) or conversational
        self.source["format"], self.source["conversational"] = fmt, conversational
        self.tokenizers = check_chat_templates(config.models, conversational)
        self.state = PartialState()

    def load_model(self, name: str) -> tuple[Any, Any]:
        model, _ = load_model(name, dtype=self.config.dtype)
        return model, self.tokenizers[name]  # the tokenizer whose chat template was checked

    def is_main_process(self) -> bool:
        return self.state.is_main_process

    def build_config(self, model, tokenizer, name: str, config_name: str, directory: Path, figure: Path) -> dict:
        """Score and mask every split with one model: the parquet shards, the histogram, settings and split infos."""
        config = self.config
        conversation_columns = FORMAT_FIELDS[self.source["format"]]
        split_infos, histogram_ppl = {}, []
        for split, dataset in self.splits.items():
            strategy = "none" if split in config.unmasked_splits else "threshold"
            try:
                built, info = build_split(dataset, model, tokenizer, config, strategy, conversation_columns)
            except ValueError as err:
                raise ValueError(f"Config {config_name!r}, split {split!r}: {err}") from err
            shards = write_parquet_shards(built, directory, split, config.max_shard_size_bytes)
            info["files"] = [f"{config_name}/{shard}" for shard in shards]
            info["download_size"] = sum((directory / shard).stat().st_size for shard in shards)
            split_infos[split] = info
            if strategy != "none":
                histogram_ppl.append(completion_perplexities(built))
        if not histogram_ppl:  # only unmasked splits: still show where the threshold would fall
            histogram_ppl = [completion_perplexities(built)]
        plot_ppl_histogram(
            np.concatenate(histogram_ppl),
            config.threshold,
            figure,
            f"{source_short_name(self.source['dataset'])}: completion tokens scored by {config_name}",
        )
        settings = asdict(config)
        for key in _UNRECORDED_SETTINGS:
            settings.pop(key)
        if self.is_main_process():
            logger.info("config %s: %s", config_name, json.dumps(split_infos))
        return {"settings": settings, "splits": split_infos}

    def render(self, folder: Path, template_path: Path) -> None:
        self.render_card(folder, template_path, self.config.default_config)

    @classmethod
    def default_title(cls, name: str, infos: dict[str, dict[str, Any]]) -> str:
        return f"{name} (perplexity-masked)"

    @classmethod
    def card_tags(cls, name: str, infos: dict[str, dict[str, Any]]) -> list[str]:
        return ["trl", "sft", "perplexity-masking", "selective-token-masking", "catastrophic-forgetting", name]

    @classmethod
    def add_dataset_info(cls, folder: Path, infos: dict[str, dict[str, Any]], card_data: DatasetCardData) -> None:
        dataset_infos(folder, infos).to_dataset_card_data(card_data)

    @classmethod
    def card_variables(cls, infos: dict[str, dict[str, Any]], latest: dict[str, Any], default: str) -> dict:
        unmasked = {s for info in infos.values() for s, si in info["splits"].items() if si["strategy"] == "none"}
        return {
            "stats_rows": _card_rows(infos),
            "unmasked_splits": sorted(unmasked),
            "threshold": latest["settings"]["threshold"],
            "default_config": default,
        }


def build_pplmasked(config: BuildConfig) -> Path:
    """Build (or add configs to) a `<dataset>-pplmasked` Hub-layout folder and render its card.

    Every check (source rows, formats, chat templates, empty splits, the output folder) runs before any model is
    loaded; scoring results are staged next to the output and moved in only when every model is done, so a failure
    leaves an existing folder as it was.

    Args:
        config (`BuildConfig`): What to build.

    Returns:
        `Path`: the output folder.
    """
    return PplMaskedBuilder(config).build()


def render_card(
    folder: str | Path, template_path: str | Path | None = None, default_config: str | None = None
) -> DatasetCard:
    """Render `README.md` of a built pplmasked folder from the build info of all its configs, and save it.

    Folder-wide fields (repo id, title, license, source) come from the most recent build. One config is marked as
    the default (see [`~trl_pplmask.hub.card.default_config_name`]), so that `load_dataset(repo)` works without a
    config name.
    """
    return PplMaskedBuilder.render_card(folder, template_path, default_config)


def dataset_infos(folder: Path, infos: dict[str, dict[str, Any]]):
    """The card's YAML `dataset_info:` of every config (see [`FolderBuilder.add_dataset_info`])."""
    import pyarrow.parquet as pq
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo  # not on the `--help` path
    from datasets.info import DatasetInfosDict

    result = {}
    for name, info in sorted(infos.items()):
        splits = SplitDict()
        for split, split_info in info["splits"].items():
            splits.add(
                SplitInfo(name=split, num_bytes=split_info["num_bytes"], num_examples=split_info["stats"]["examples"])
            )
        first_shard = next(iter(info["splits"].values()))["files"][0]
        result[name] = DatasetInfo(
            config_name=name,
            features=Features.from_arrow_schema(pq.read_schema(Path(folder) / first_shard)),
            splits=splits,
            download_size=sum(s["download_size"] for s in info["splits"].values()),
            dataset_size=sum(s["num_bytes"] for s in info["splits"].values()),
        )
    return DatasetInfosDict(result)


def _card_rows(infos: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(infos.items()):
        for split, split_info in info["splits"].items():
            stats = split_info["stats"]
            empty = stats["examples_without_trainable_token"]
            dropped = split_info.get("examples_dropped_empty", 0)
            rows.append(
                {
                    "config": name,
                    "split": split,
                    "strategy": split_info["strategy"],
                    "examples": f"{stats['examples']:,}",
                    "completion_tokens": f"{stats['completion_tokens']:,}",
                    "masked": f"{100 * stats['masked_fraction']:.2f}%",
                    "median_ppl": fmt_number(stats["median_ppl"]),
                    "p90_ppl": fmt_number(stats["p90_ppl"]),
                    "empty": f"{empty} kept" + (f", {dropped} dropped" if dropped else ""),
                    "truncated": split_info.get("rows_dropped_by_truncation", 0),
                }
            )
    return rows
