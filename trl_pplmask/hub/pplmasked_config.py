"""Settings of a `<task>-pplmasked` build ([`BuildConfig`])."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..constants import EMBEDDED_MODEL_ALIAS
from ..masking import mask_field
from .builder import FolderSettings, folder_field
from .folder import check_config_name
from .shards import DEFAULT_SHARD_ROWS
from .source import FORMATS
from .stream_input import INPUT_MODE_HELP, INPUT_MODES, check_input_mode


PPLMASKED_CARD_TEMPLATE = "pplmasked_dataset_card.md.jinja"  # the card's template by default, in cards/


@dataclass
class BuildConfig(FolderSettings):
    """Settings of [`~trl_pplmask.hub.build_pplmasked`]: which data, which scoring models, how to mask, where to write.

    Args:
        dataset (`str`):
            A task name (`gsm8k`, `mbpp`, `math`, `arc_challenge`), a Hub dataset id, or a local `.jsonl`/`.json`/
            `.parquet`/`.csv` file or dataset folder, in one of TRL's dataset formats.
        output_dir (`str`, *optional*):
            The Hub-layout folder to write. Defaults to `<dataset name>-pplmasked` in the current directory. An
            existing folder built by this function keeps its other configs; the card is re-rendered from all of them.
        models (`list[str]`, *optional*, defaults to `["smollm2-135m-instruct"]`):
            Scoring models (Hub ids, local paths or the embedded alias): one config per model.
        config_names (`list[str]`, *optional*):
            Config name of each model, in the same order. Defaults to the slug of the model name
            (`meta-llama/Llama-3.1-8B-Instruct` -> `llama-3.1-8b-instruct`).
        splits (`list[str]`, *optional*, defaults to `["train"]`):
            Splits to build. A local file holds a single split, named by the one entry of this list.
        dataset_config (`str`, *optional*):
            Config of a Hub dataset.
        format (`str`, *optional*, defaults to `"auto"`):
            TRL dataset format every row must follow: `prompt_completion` (plain or conversational), `messages`,
            `conversations` (ShareGPT) or `text`; `auto` detects it from the first row. Every row is then checked.
        threshold (`float`, *optional*, defaults to `2.5`):
            Perplexity threshold of the stored `labels` (the paper's value). Must be above 1: a token's perplexity
            is always >= 1, so 1 or less masks everything.
        unmasked_splits (`list[str]`, *optional*, defaults to `["test"]`):
            Splits kept unmasked (strategy `none`): their labels are the ground truth, for evaluation. They are still
            scored, so `token_nll` is there for re-thresholding.
        limit (`int`, *optional*):
            Keep only the first `limit` rows of each split (for tests and quick looks).
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            `SFTConfig.max_length` of the tokenization; train with the same value so that SFTTrainer does not
            truncate `input_ids`/`labels` away from `token_nll`.
        drop_empty (`bool`, *optional*, defaults to `False`):
            Drop examples left with no trainable token after masking. Kept by default; counted in the card either way.
        input_mode (`str`, *optional*, defaults to `"auto"`):
            How the source is read: `stream` (its parquet files, each shard's row groups when that shard is built:
            nothing is downloaded or converted whole; see [`~trl_pplmask.hub.stream_input`]), `download`
            (`datasets.load_dataset`: a Hub split downloaded and converted to Arrow, then memory-mapped) or `auto`
            (stream a Hub dataset stored as parquet, download anything else). The shards are the same either way.
        shard_rows (`int`, *optional*, defaults to `4096`):
            Rows of the source per parquet shard. A split is built shard by shard (read, tokenized, scored, masked,
            written, freed: memory does not grow with the number of rows), each process of an `accelerate launch`
            taking its own shards; a killed build resumes from the shards it had written (see
            [`~trl_pplmask.hub.shards`]). The number of shards is fixed by the row count, so the file names
            `<split>-0000k-of-0000n.parquet` are known from the start.
        max_shard_size (`int` or `str`, *optional*, defaults to `"500MB"`):
            Size (in memory) a shard should stay under: a build whose shards exceed it warns, naming `shard_rows`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Discard the shards of an unfinished earlier build with other settings or another model, instead of
            refusing to mix them in.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype of the scoring models (`auto`, `float32`, `bfloat16`, `float16`).
        max_tokens_per_batch (`int`, *optional*):
            Token budget of a scoring batch, see [`~trl_pplmask.scoring.ScoringConfig`].
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse the scores of an identical earlier run (same tokens, same weights).
        cache_dir (`str`, *optional*):
            Where scores are cached (defaults to the trl-pplmask cache).
        repo_id (`str`, *optional*):
            Hub repo the folder is meant for; used in the card's usage snippets and as the default of
            [`~trl_pplmask.hub.push_folder`]. Defaults to `your-org/<folder name>` in the snippets.
        pretty_name (`str`, *optional*):
            Card title. Defaults to `<dataset name> (perplexity-masked)`.
        license (`str`, *optional*):
            License of the source data. Known for the tasks; pass it for other data (`unknown` otherwise).
        language (`list[str]`, *optional*, defaults to `["en"]`):
            Languages of the data, for the card metadata.
        template_path (`str`, *optional*):
            Jinja template of the card; defaults to `cards/pplmasked_dataset_card.md.jinja`.
        command (`str`, *optional*):
            The command line that ran the build, recorded in the card. Set by the CLI.
    """

    # The help strings are `trl-pplmask build`'s (its options are these fields, see `commands._args`)
    dataset: str = field(
        metadata={
            "help": "Task (gsm8k, mbpp, math, arc_challenge), Hub dataset id, or local .jsonl/.parquet file or folder."
        }
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write (default: <dataset>-pplmasked)."})
    models: list[str] = field(
        default_factory=lambda: [EMBEDDED_MODEL_ALIAS], metadata={"help": "Scoring models: one config each."}
    )
    config_names: list[str] | None = folder_field("config_names")
    splits: list[str] = field(
        default_factory=lambda: ["train"], metadata={"help": "Splits to build (default: train)."}
    )
    dataset_config: str | None = folder_field("dataset_config")
    format: str = field(default="auto", metadata={"help": "TRL format every row must follow.", "choices": FORMATS})
    threshold: float = mask_field("threshold")
    unmasked_splits: list[str] = field(
        default_factory=lambda: ["test"], metadata={"help": "Splits left unmasked (default: test).", "nargs": "*"}
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows of each split."})
    max_length: int | None = field(default=1024, metadata={"help": "SFTConfig.max_length used for training."})
    drop_empty: bool = field(default=False, metadata={"help": "Drop examples left with no trainable token."})
    input_mode: str = field(default="auto", metadata={"help": INPUT_MODE_HELP, "choices": INPUT_MODES})
    shard_rows: int = field(
        default=DEFAULT_SHARD_ROWS,
        metadata={
            "help": f"Source rows per parquet shard (default {DEFAULT_SHARD_ROWS}): built one at a time, each process "
            "of a launch its own, resumed after a kill."
        },
    )
    max_shard_size: int | str = field(
        default="500MB",
        metadata={"help": "Warn when a shard is larger than this in memory (default: 500MB).", "type": str},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Discard an unfinished earlier build with other settings or model, and replace a card edited by "
            "hand inside its generated part, instead of refusing (text outside the card's markers is always kept)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Scoring dtype: auto, float32, bfloat16 or float16."})
    max_tokens_per_batch: int | None = field(default=None, metadata={"help": "Scoring token budget per batch."})
    use_cache: bool = field(
        default=True, metadata={"help": "Rescore even if identical scores are cached.", "option": "--no-cache"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where scores are cached (default: the trl-pplmask cache)."}
    )
    repo_id: str | None = folder_field("repo_id")
    pretty_name: str | None = folder_field("pretty_name")
    license: str | None = folder_field("license")
    language: list[str] = folder_field("language")
    template_path: str | None = folder_field("template_path", card_template=PPLMASKED_CARD_TEMPLATE)
    command: str | None = folder_field("command")
    default_config: str | None = field(
        default=None,
        metadata={
            "help": "Config that load_dataset(repo) loads without a config name (default: the one the card already "
            "marks, else the first built)."
        },
    )

    folder_suffix = "pplmasked"

    def __post_init__(self):
        if not math.isfinite(self.threshold):
            raise ValueError(
                f"threshold must be a finite perplexity, got {self.threshold}. Use a value above 1 (the paper: 2.5)."
            )
        if not self.threshold > 1.0:
            raise ValueError(
                f"threshold={self.threshold} masks every completion token (a perplexity is always >= 1). Use a value "
                "above 1; the paper uses 2.5."
            )
        if not self.models:
            raise ValueError("models is empty: name at least one scoring model.")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be a non-empty list of distinct split names, got {self.splits!r}.")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if self.shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {self.shard_rows}.")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {self.max_length}.")
        check_input_mode(self.input_mode)
        if self.format not in FORMATS:
            raise ValueError(f"Unknown format {self.format!r}; choose one of {', '.join(FORMATS)}.")
        if self.config_names is not None and len(self.config_names) != len(self.models):
            raise ValueError(
                f"config_names has {len(self.config_names)} entries for {len(self.models)} models; give one per model."
            )
        names = self.resolved_config_names()
        for name in names:
            check_config_name(name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Several models map to the config name(s) {duplicates}; pass distinct `config_names` "
                "(--config-names)."
            )
        from .._compat import convert_file_size_to_int  # imports datasets: not on the `--help` path

        self.max_shard_size_bytes = convert_file_size_to_int(self.max_shard_size)
        if self.max_shard_size_bytes <= 0:
            raise ValueError(f"max_shard_size must be positive, got {self.max_shard_size!r}.")
