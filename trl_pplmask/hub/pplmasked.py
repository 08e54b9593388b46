"""The `<task>-pplmasked` builder: one config per scoring model, every split tokenized, scored and masked, and the
card with the masking statistics ([`build_pplmasked`], [`render_card`])."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from ..constants import NLL_COLUMN, TRAINABLE_COLUMN
from ..models import load_model
from .builder import FolderBuilder
from .card import fmt_number
from .folder import BUILD_INFO_FILE, read_build_infos
from .pplmasked_config import PPLMASKED_CARD_TEMPLATE, BuildConfig
from .pplmasked_split import (
    build_split,
    plot_ppl_histogram_of_chunks,
    raise_empty_split,
    shard_statistics,
    table_statistics,
)
from .shards import ShardFolder, ShardPlan, count_tokens, current_workers, process_shards
from .source import (
    FORMAT_FIELDS,
    check_chat_templates,
    describe_source,
    load_source_splits,
    resolve_format,
    source_short_name,
    validate_rows,
)
from .stream_input import with_row_ids


if TYPE_CHECKING:
    from datasets import Dataset

    from .stream_input import ParquetSplit

logger = logging.getLogger(__name__)

PPLMASKED_KIND = "pplmasked"  # `kind` of our build_info.json; the self-output builder writes its own
# Settings that do not change the data (or are recorded elsewhere in the build info)
_UNRECORDED_SETTINGS = (
    "output_dir",
    "models",
    "config_names",
    "template_path",
    "command",
    "cache_dir",
    "use_cache",
    "overwrite",
    "input_mode",  # streamed or downloaded, the rows and so the shards are the same
)
# Settings that shape the card only: a resumed build may change them
_CARD_SETTINGS = ("repo_id", "pretty_name", "license", "language", "default_config", "max_shard_size")
# The build's resumable work folder beside the output, and where it keeps the shard manifests of each config
WORK_SUFFIX = "-pplmask-work"
MANIFESTS_DIR = ".manifests"


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
        config, output = self.config, self.output
        if config.default_config is not None:
            known = set(config.resolved_config_names()) | set(read_build_infos(output) if output.is_dir() else {})
            if config.default_config not in known:
                raise ValueError(
                    f"--default-config {config.default_config!r} is not a config of {output}: after this build it "
                    f"holds {sorted(known)}. Name one of those."
                )
        self.splits: dict[str, Dataset | ParquetSplit] = {
            split: with_row_ids(dataset) for split, dataset in load_source_splits(config).items()
        }
        fmt, conversational = None, False
        for split, dataset in self.splits.items():
            where = f"{config.dataset} split {split!r}"
            split_format = resolve_format(dataset, config.format if fmt is None else fmt, where)
            fmt = split_format
            for start in range(0, len(dataset), config.shard_rows):  # a shard at a time: memory stays flat
                chunk = dataset.select(range(start, min(start + config.shard_rows, len(dataset))))
                conversational = validate_rows(chunk, fmt, where) or conversational
        self.source["format"], self.source["conversational"] = fmt, conversational
        self.tokenizers = check_chat_templates(config.models, conversational)
        self.workers = current_workers()
        self.plans = {split: ShardPlan(len(d), config.shard_rows, split) for split, d in self.splits.items()}
        self.shard_folders = {}
        for name, config_name in zip(config.models, config.resolved_config_names()):
            folder = ShardFolder(
                self.work / config_name,
                list(self.plans.values()),
                self._shard_record(name, config_name),
                manifest=self.work / MANIFESTS_DIR / f"{config_name}.json",
                allowed=[BUILD_INFO_FILE],
                overwrite=config.overwrite,
            )
            folder.check(what=f"The unfinished build of config {config_name!r} in")
            self.shard_folders[config_name] = folder

    @property
    def work(self) -> Path:
        """The resumable work folder beside the output: `.<name>-pplmask-work`, kept until the build is committed."""
        return self.output.parent.resolve() / f".{self.output.name}{WORK_SUFFIX}"

    def _shard_record(self, name: str, config_name: str) -> dict[str, Any]:
        """What decides a config's shards: the data settings and the model (its fingerprint is added once loaded)."""
        settings = asdict(self.config)
        for key in (*_UNRECORDED_SETTINGS, *_CARD_SETTINGS):
            settings.pop(key)
        return {"command": "build", "model_name": name, "config_name": config_name, "settings": settings}

    def open_staging(self) -> Path:
        """The work folder, resumed when a killed run left it (its shards are checked in `prepare`)."""
        stale = self.work / "folder"  # a commit of a new folder that was killed midway: assembled again
        if self.workers.main and stale.exists():
            shutil.rmtree(stale)
        (self.work / MANIFESTS_DIR).mkdir(parents=True, exist_ok=True)
        return self.work

    def close_staging(self, staging: Path, finished: bool) -> None:
        """Remove the work folder once the build is committed; keep it (to resume) otherwise."""
        if finished and self.workers.main:
            shutil.rmtree(staging, ignore_errors=True)

    def load_model(self, name: str) -> tuple[Any, Any]:
        model, _ = load_model(name, dtype=self.config.dtype)
        return model, self.tokenizers[name]  # the tokenizer whose chat template was checked

    def is_main_process(self) -> bool:
        return self.workers.main

    def build_config(self, model, tokenizer, name: str, config_name: str, directory: Path, figure: Path) -> dict:
        """Score and mask every split with one model, shard by shard (each process its own shards, finished shards
        of a killed run kept); then, on the main process, the histogram, settings and split infos."""
        from ..scoring import model_fingerprint

        folder = self.shard_folders[config_name]
        folder.check_model(model_fingerprint(model), what=f"The unfinished build of config {config_name!r} in")
        self.workers.barrier()  # every process checked the work folder before anyone writes to it
        if self.workers.main:
            folder.start()
        self.workers.barrier()
        for split, dataset in self.splits.items():
            work = self._shard_work(model, tokenizer, config_name, split)
            process_shards(folder, self.plans[split], dataset, self.workers, work)
        self.workers.barrier()  # all shards written
        if not self.workers.main:
            return {}
        return self._summarise(config_name, directory, figure)

    def _strategy(self, split: str) -> str:
        return "none" if split in self.config.unmasked_splits else "threshold"

    def _shard_work(self, model, tokenizer, config_name: str, split: str):
        """Rows of one shard -> (its built rows, the figures of its split info that add up over shards)."""
        config, columns = self.config, FORMAT_FIELDS[self.source["format"]]
        strategy = self._strategy(split)

        def work(rows):
            try:
                built, info = build_split(
                    rows, model, tokenizer, config, strategy, columns, split_across_processes=False
                )
            except ValueError as err:
                raise ValueError(f"Config {config_name!r}, split {split!r}: {err}") from err
            counts = {key: info[key] for key in _SUMMED_INFO}
            counts["tokens"] = count_tokens(built)
            return built, counts

        return work

    def _summarise(self, config_name: str, directory: Path, figure: Path) -> dict:
        """The split infos of a config from its shards (read one at a time), its histogram and settings."""
        import pyarrow.parquet as pq

        config = self.config
        folder = self.shard_folders[config_name]
        columns = ["labels", NLL_COLUMN, TRAINABLE_COLUMN]

        def tables(splits):  # the shards of `splits`, read one at a time (memory stays that of one shard)
            return lambda: (
                pq.read_table(directory / shard, columns=columns) for s in splits for shard in self.plans[s].names()
            )

        split_infos = {}
        for split, plan in self.plans.items():
            strategy = self._strategy(split)
            counts = folder.shard_infos(plan)
            stats = shard_statistics(tables([split]))
            if stats["examples"] == 0:
                try:
                    raise_empty_split(config)
                except ValueError as err:
                    raise ValueError(f"Config {config_name!r}, split {split!r}: {err}") from None
            info = {"strategy": strategy, "threshold": config.threshold if strategy != "none" else None}
            info.update({key: sum(c[key] for c in counts) for key in _SUMMED_INFO if key != "num_bytes"})
            info["stats"] = stats
            info["num_bytes"] = sum(c["num_bytes"] for c in counts)
            info["files"] = [f"{config_name}/{shard}" for shard in plan.names()]
            info["download_size"] = sum((directory / shard).stat().st_size for shard in plan.names())
            largest = max(c["num_bytes"] for c in counts)
            if largest > config.max_shard_size_bytes:
                logger.warning(
                    "config %s, split %s: a shard holds %d bytes, more than --max-shard-size %s; lower --shard-rows "
                    "(now %d) for smaller files.",
                    config_name,
                    split,
                    largest,
                    config.max_shard_size,
                    config.shard_rows,
                )
            split_infos[split] = info
        masked = [split for split in self.plans if self._strategy(split) != "none"]
        shards = tables(masked or list(self.plans)[-1:])  # only unmasked splits: the last, to show the threshold
        plot_ppl_histogram_of_chunks(
            lambda: (np.exp(table_statistics(table)["nll"].astype(np.float64)) for table in shards()),
            config.threshold,
            figure,
            f"{source_short_name(self.source['dataset'])}: completion tokens scored by {config_name}",
        )
        settings = asdict(config)
        for key in _UNRECORDED_SETTINGS:
            settings.pop(key)
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


# Figures of a split's info that are sums over its shards (stored in each shard's metadata)
_SUMMED_INFO = ("rows_loaded", "rows_dropped_by_truncation", "examples_dropped_empty", "num_bytes")


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
