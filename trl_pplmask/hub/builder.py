"""What every Hub-layout dataset builder does, whatever it writes into the configs: [`FolderBuilder`].

A build checks the existing output folder and its inputs, stages one config per model in a hidden
`.<folder>-staging-*` folder beside the output (parquet shards, `build_info.json`, a figure in `assets/`), moves the
finished configs in only once every model is done, and renders the card from the `build_info.json` of every config
in the folder. A failure at any point leaves an existing folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub import DatasetCard, DatasetCardData

from ..constants import PAPER_ARXIV_ID
from ..models import load_model, model_slug
from ..utils import OutputLock, atomic_write_text, make_staging_dir, raise_if_termination_requested, swap_in
from .card import card_configs, card_template_path, check_card_edits, default_config_name, size_category, write_card
from .folder import (
    ASSETS_DIR,
    BUILD_INFO_FILE,
    build_versions,
    check_existing_folder,
    commit_staging,
    describe_model,
    read_build_infos,
    release_accelerator_memory,
    utc_timestamp,
)
from .source import source_short_name


logger = logging.getLogger(__name__)


class FolderSettings:
    """What the settings dataclasses of the builders share: `dataset`, `models` (one config each, named by
    `config_names` or the model's slug), `output_dir` (default `<dataset name>-<folder_suffix>`), `dtype`,
    `template_path` and `command`."""

    folder_suffix: ClassVar[str]

    def resolved_config_names(self) -> list[str]:
        """The config name of each model."""
        return list(self.config_names) if self.config_names is not None else [model_slug(m) for m in self.models]

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir).expanduser()
        return Path(f"{source_short_name(self.dataset)}-{self.folder_suffix}")


class FolderBuilder:
    """Base of the `<task>-pplmasked` and `<task>-self-output` builders: [`build`] runs the steps they share and calls
    the hooks below for what differs; the classmethod [`render_card`] renders a folder's card.

    Subclasses set the class attributes and implement [`describe_source`] and [`build_config`]; the other hooks have
    defaults. The `build_info.json` of a config is `kind`, `config_name`, the model
    ([`~trl_pplmask.hub.folder.describe_model`]), `source`, what [`build_config`] returns, then `histogram`,
    `versions`, `command` and `built_at`.

    Args:
        config: The builder's settings (a [`FolderSettings`] dataclass).
    """

    kind: ClassVar[str]  # `kind` of the builder's build_info.json
    description: ClassVar[str]  # how messages name this kind of data
    card_template: ClassVar[str]  # default card template, in cards/
    action: ClassVar[str]  # what each model does, for the progress log ("scoring", "generating")
    command_hint: ClassVar[str]  # end of the error on a folder without build, after "holds no built config"
    size_statistic: ClassVar[str]  # statistic of a split that counts its rows, for the card's size category

    def __init__(self, config: FolderSettings):
        self.config = config
        self.output = config.resolved_output_dir()
        self.source: dict[str, Any] = {}

    # Hooks ----------------------------------------------------------------------------------------------------------

    def describe_source(self) -> dict[str, Any]:
        """The `source` of the build info: where the data comes from (its `dataset` must match the folder's)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Every check of the inputs that needs no model (the output folder is checked already)."""

    def load_model(self, name: str) -> tuple[Any, Any]:
        """The model `name` and the tokenizer to build its config with."""
        return load_model(name, dtype=self.config.dtype)

    def build_config(self, model, tokenizer, name: str, config_name: str, directory: Path, figure: Path) -> dict:
        """Build one config into `directory` (parquet shards) and draw its figure at `figure`; return the entries of
        its build info between `source` and `histogram`."""
        raise NotImplementedError

    def is_main_process(self) -> bool:
        """Whether this process writes the folder (the others of a distributed run only compute)."""
        return True

    def open_staging(self) -> Path:
        """The folder the configs are staged in, beside the output: by default a new one, removed at the end."""
        return make_staging_dir(self.output)  # also removes those of runs that were killed

    def close_staging(self, staging: Path, finished: bool) -> None:
        """Remove the staging folder (`finished`: the configs were committed); a resumable builder keeps it else."""
        shutil.rmtree(staging, ignore_errors=True)

    def render(self, folder: Path, template_path: Path) -> None:
        """Render the card of `folder` (the output folder, or its staged copy of the same name)."""
        self.render_card(folder, template_path)

    # Card hooks -----------------------------------------------------------------------------------------------------

    @classmethod
    def default_title(cls, name: str, infos: dict[str, dict[str, Any]]) -> str:
        """The card's title without `pretty_name`; `name` is the short name of the source data."""
        raise NotImplementedError

    @classmethod
    def card_tags(cls, name: str, infos: dict[str, dict[str, Any]]) -> list[str]:
        raise NotImplementedError

    @classmethod
    def add_dataset_info(cls, folder: Path, infos: dict[str, dict[str, Any]], card_data: DatasetCardData) -> None:
        """Set the card's YAML `dataset_info:` (features, split sizes), as `Dataset.push_to_hub` writes it.

        Besides informing the Hub viewer, it makes `datasets` check the number of examples, and its sizes are part of
        the key under which `load_dataset` caches a local folder (the data files' paths and dates are not), so a
        rebuilt folder is not served from a stale cache.
        """
        raise NotImplementedError

    @classmethod
    def card_variables(cls, infos: dict[str, dict[str, Any]], latest: dict[str, Any], default: str) -> dict:
        """The template's own variables (tables, threshold, ...); `latest` is the most recent build info."""
        raise NotImplementedError

    # The shared steps -----------------------------------------------------------------------------------------------

    def build(self) -> Path:
        """Check everything, build every config in a staging folder, move them in and render the card.

        The main process holds the output's advisory lock ([`~trl_pplmask.utils.OutputLock`], `.<name>.lock`
        beside it) from before the first check until the card is written: a second build into the same folder is
        refused, naming this one's PID.

        Returns:
            `Path`: the output folder.
        """
        from ..scoring import distributed_state  # `is_main_process` may need what `prepare` sets up

        main = distributed_state().is_main_process
        with OutputLock(self.output, what="output folder") if main else contextlib.nullcontext():
            return self._build()

    def _build(self) -> Path:
        if self.config.repo_id is not None:  # it goes into the card's snippets and is push's default
            from .publish import check_repo_id

            check_repo_id(self.config.repo_id)
        self.source = self.describe_source()
        check_existing_folder(self.output, self.source, self.kind, self.description)
        check_card_edits(self.output, getattr(self.config, "overwrite", False))  # hand edits a render would replace
        self.prepare()
        template_path = card_template_path(self.config.template_path, self.card_template)
        names = self.config.resolved_config_names()
        staging = self.open_staging()  # every check passed: from here on, writing is expected
        finished = False
        try:
            (staging / ASSETS_DIR).mkdir(exist_ok=True)
            for index, (name, config_name) in enumerate(zip(self.config.models, names)):
                logger.info("[%d/%d] %s with %s -> config %s", index + 1, len(names), self.action, name, config_name)
                model, tokenizer = self.load_model(name)
                self._stage_config(model, tokenizer, name, config_name, staging)
                del model
                release_accelerator_memory()
            if self.is_main_process():
                raise_if_termination_requested()
                self._commit(staging, names, template_path)
            finished = True
        finally:
            self.close_staging(staging, finished)
        return self.output

    def _commit(self, staging: Path, names: list[str], template_path: Path) -> None:
        """Move the staged configs into the output folder and render its card.

        A new folder is assembled whole in the staging folder (under its final name, which the card quotes) and
        renamed into place in one step, so that a run killed at any point leaves either nothing or a complete folder.
        Configs added to an existing folder replace their namesakes one by one and the card is rendered last: an
        error there (a full disk) moves them back out and the replaced ones back in, so configs and card are
        committed together; a kill -9 in between leaves the previous card, and the rerun completes the folder.
        """
        if self.output.exists() and any(self.output.iterdir()):
            # The card is rendered with the configs in; if that fails (a full disk), they are moved back out
            commit_staging(staging, self.output, names, then=lambda: self.render(self.output, template_path))
            return
        whole = staging / "folder" / self.output.name  # in a folder of its own: the name may be a config's
        whole.parent.mkdir()
        commit_staging(staging, whole, names)
        self.render(whole, template_path)
        swap_in(whole, self.output)  # replaces an empty folder of that name

    def _stage_config(self, model, tokenizer, name: str, config_name: str, staging: Path) -> dict[str, Any]:
        """Stage `<config>/` (data and `build_info.json`) and `assets/<config>-ppl-hist.png`."""
        directory = staging / config_name
        directory.mkdir(exist_ok=True)  # a resumable builder's folder may hold the shards of a killed run
        histogram = f"{ASSETS_DIR}/{config_name}-ppl-hist.png"
        built = self.build_config(model, tokenizer, name, config_name, directory, staging / histogram)
        if not self.is_main_process():
            return {}  # the main process writes the record
        info = {
            "kind": self.kind,
            "config_name": config_name,
            **describe_model(name, model, tokenizer),
            "source": self.source,
            **built,
            "histogram": histogram,
            "versions": build_versions(),
            "command": self.config.command,
            "built_at": utc_timestamp(),
        }
        atomic_write_text(directory / BUILD_INFO_FILE, json.dumps(info, indent=2) + "\n")
        return info

    @classmethod
    def render_card(
        cls, folder: str | Path, template_path: str | Path | None = None, default_config: str | None = None
    ) -> DatasetCard:
        """Render `README.md` of a built folder from the build info of all its configs, and save it.

        Folder-wide fields (repo id, title, license, source) come from the most recent build. The YAML header and the
        text between the card's markers are replaced; text the user wrote outside the markers is kept (see
        [`~trl_pplmask.hub.card.write_card`]; builds refuse a card edited inside them before any work, unless
        `overwrite`). One config is marked as the default (see [`~trl_pplmask.hub.card.default_config_name`]), so
        that `load_dataset(repo)` works without a config name.
        """
        folder = Path(folder)
        infos = read_build_infos(folder)
        if not infos:
            raise ValueError(f"{folder} holds no built config{cls.command_hint}")
        default = default_config_name(folder, infos, default_config)
        latest = max(infos.values(), key=lambda info: info["built_at"])
        source, settings = latest["source"], latest["settings"]
        name = source_short_name(source["dataset"])
        pretty_name = settings.get("pretty_name") or cls.default_title(name, infos)
        largest = max(sum(s["stats"][cls.size_statistic] for s in i["splits"].values()) for i in infos.values())
        card_data = DatasetCardData(
            license=source["license"],
            language=settings.get("language") or ["en"],
            task_categories=["text-generation"],
            tags=cls.card_tags(name, infos),
            size_categories=[size_category(largest)],
            source_datasets=[source["hub_id"]] if source.get("hub_id") else ["original"],
            pretty_name=pretty_name,
            configs=card_configs(infos, default),
        )
        cls.add_dataset_info(folder, infos, card_data)
        first = sorted(infos)[0]
        card = DatasetCard.from_template(
            card_data,
            template_path=str(card_template_path(template_path, cls.card_template)),
            repo_id=settings.get("repo_id") or f"your-org/{folder.resolve().name}",
            title=pretty_name,
            source=source,
            source_name=name,
            builds=[infos[c] for c in sorted(infos)],
            example=infos[first],
            example_split=next(iter(infos[first]["splits"])),
            arxiv_id=PAPER_ARXIV_ID,
            **cls.card_variables(infos, latest, default),
        )
        write_card(folder, str(card))  # the text written around the generated part is kept
        return card
