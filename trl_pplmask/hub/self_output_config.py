"""Settings of a `<task>-self-output` build ([`SelfOutputBuildConfig`]).

Imports nothing heavy (the checks that need the data libraries import them when a config is made), so that
`trl-pplmask self-output --help`, whose options are these fields, stays fast.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import DEFAULT_THRESHOLD, EMBEDDED_MODEL_ALIAS
from ..generation.config import SelfOutputConfig
from ..verifiers import VERIFIERS, Verifier
from .builder import FolderSettings, folder_field
from .folder import check_config_name


SELF_OUTPUT_CARD_TEMPLATE = "self_output.md.jinja"  # the card's template by default, in cards/


@dataclass
class SelfOutputBuildConfig(FolderSettings):
    """Settings of [`~trl_pplmask.hub.self_output.build_self_output`]: which data and models, how to generate, where
    to write.

    Args:
        dataset (`str`):
            A task name (`gsm8k`, `mbpp`, `math`, `arc_challenge`, `humaneval`), or a local file/folder or Hub id of
            TRL conversational prompt/completion data (then pass `verifier`).
        dataset_config (`str`, *optional*):
            Config of a Hub dataset.
        split (`str`, *optional*, defaults to `"train"`):
            Source split to generate for (written as the config's split of the same name).
        limit (`int`, *optional*):
            Only the first `limit` rows.
        verifier (`str`, *optional*):
            Task verifier name, or `module:function` naming a callable `(row, response) -> bool`. Defaults to the
            task's own verifier.
        models (`list[str]`, *optional*, defaults to `["smollm2-135m-instruct"]`):
            Generating models (Hub ids, local paths or the embedded alias): one config per model.
        config_names (`list[str]`, *optional*):
            Config name per model; defaults to the slug of the model name.
        generation (`SelfOutputConfig`, *optional*):
            Sampling, selection and backend settings (its `checkpoint_path` is set per model). Its fields are options
            of `trl-pplmask self-output` in its place (`--num-samples`, ...).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype of the models.
        ppl_threshold (`float`, *optional*, defaults to `2.5`):
            Token perplexity the card counts as high (the paper's STM threshold).
        output_dir (`str`, *optional*):
            Folder to write; defaults to `<dataset name>-self-output`. An existing self-output folder of the same
            data keeps its other configs.
        checkpoint_dir (`str`, *optional*):
            Where the per-model JSONL checkpoints live; defaults to `<output_dir>-checkpoints` next to the folder (not
            inside it, so that a push does not upload them). Rerunning the same command resumes from them.
        max_shard_size (`int` or `str`, *optional*, defaults to `"500MB"`):
            Largest parquet shard.
        repo_id (`str`, *optional*):
            Hub repo the folder is meant for (usage snippets, default of `trl-pplmask push`).
        pretty_name (`str`, *optional*):
            Card title.
        license (`str`, *optional*):
            License of the source data (known for the tasks).
        language (`list[str]`, *optional*, defaults to `["en"]`):
            Languages, for the card metadata.
        template_path (`str`, *optional*):
            Jinja card template; defaults to `cards/self_output.md.jinja`.
        command (`str`, *optional*):
            Command line that ran the build, recorded in the card. Set by the CLI.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the generated part of a card that was edited by hand (the YAML header or the text between the
            card's markers) instead of refusing to build; text outside the markers is kept either way.
    """

    # The help strings are `trl-pplmask self-output`'s (its options are these fields, see `commands._args`); the
    # order of the fields is that of its options
    dataset: str = field(
        metadata={"help": "Task (gsm8k, mbpp, math, arc_challenge, humaneval), or prompt/completion data."}
    )
    dataset_config: str | None = folder_field("dataset_config")
    split: str = field(default="train", metadata={"help": "Split to generate for (default: train)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    verifier: str | None = field(
        default=None, metadata={"help": "Verifier: task name or module:function (default: the task's)."}
    )
    models: list[str] = field(
        default_factory=lambda: [EMBEDDED_MODEL_ALIAS], metadata={"help": "Generating models: one config each."}
    )
    config_names: list[str] | None = folder_field("config_names")
    generation: SelfOutputConfig = field(default_factory=SelfOutputConfig)
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    ppl_threshold: float = field(
        default=DEFAULT_THRESHOLD, metadata={"help": f"Token perplexity counted as high ({DEFAULT_THRESHOLD:g})."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder to write (default: <dataset>-self-output)."}
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Resumable checkpoints (default: <output-dir>-checkpoints)."}
    )
    max_shard_size: int | str = field(
        default="500MB", metadata={"help": "Largest parquet shard (default: 500MB).", "type": str}
    )
    repo_id: str | None = folder_field("repo_id")
    pretty_name: str | None = folder_field("pretty_name")
    license: str | None = folder_field("license")
    language: list[str] = folder_field("language")
    template_path: str | None = folder_field("template_path", card_template=SELF_OUTPUT_CARD_TEMPLATE)
    command: str | None = folder_field("command")
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace a card edited by hand inside its generated part instead of refusing (text outside the "
            "card's markers is always kept)."
        },
    )

    folder_suffix = "self-output"

    def __post_init__(self):
        from .._compat import convert_file_size_to_int  # imports datasets: not on the `--help` path
        from ..data import check_dataset_spec  # imports torch: not on the `--help` path

        check_dataset_spec(self.dataset)  # a misspelt task or a missing file, before the verifier is looked up
        if not self.models:
            raise ValueError("models is empty: name at least one generating model.")
        if self.config_names is not None and len(self.config_names) != len(self.models):
            raise ValueError(f"config_names has {len(self.config_names)} entries for {len(self.models)} models.")
        names = self.resolved_config_names()
        for name in names:
            check_config_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"Several models map to the same config name in {names}; pass distinct config_names.")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if not math.isfinite(self.ppl_threshold) or not self.ppl_threshold > 1.0:
            raise ValueError(
                f"ppl_threshold must be a finite value above 1 (perplexities are >= 1), got {self.ppl_threshold}."
            )
        if self.verifier is None:
            if self.dataset not in VERIFIERS:
                raise ValueError(
                    f"No built-in verifier for {self.dataset!r}: pass verifier='module:function' (--verifier) naming "
                    "a callable (row, response) -> bool."
                )
        self.max_shard_size_bytes = convert_file_size_to_int(self.max_shard_size)
        if self.max_shard_size_bytes <= 0:  # as the pplmasked builder: 0 would write no shard at all
            raise ValueError(f"max_shard_size must be positive, got {self.max_shard_size!r}.")

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir).expanduser()
        output = self.resolved_output_dir()
        return output.parent / f"{output.name}-checkpoints"

    def resolved_verifier(self) -> str | Verifier:
        return resolve_verifier(self.verifier or self.dataset)


def resolve_verifier(spec: str | Verifier) -> str | Verifier:
    """A task name stays a name; `module:function` is imported (the callable must take `(row, response)`)."""
    if callable(spec) or ":" not in spec:
        return spec
    module_name, _, attribute = spec.partition(":")
    try:
        verifier = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import the verifier {spec!r}: {err}.") from err
    if not callable(verifier):
        raise ValueError(f"Verifier {spec!r} is not callable.")
    return verifier
