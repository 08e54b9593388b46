"""Hub datasets `<task>-pplmasked` (and `<task>-self-output`): build a Hub-layout folder, render its dataset card,
publish it.

A built folder is laid out exactly like a Hub dataset repo, so `datasets.load_dataset(folder_or_repo, config)` and a
stock `trl sft --dataset_name ... --dataset_config ...` use it unchanged:

```
gsm8k-pplmasked/
  README.md                                   dataset card: YAML `configs:` + how it was built + statistics + usage
  assets/<config>-ppl-hist.png                completion-token perplexity histogram, threshold marked
  <config>/<split>-00000-of-00001.parquet     one config per scoring model (slug of its name)
  <config>/build_info.json                    what the card is rendered from (settings, versions, statistics)
```

Columns: the original conversation (`prompt`/`completion`, `messages`, `conversations` or `text`), `row_id`,
`input_ids`, `labels` (masked at the build threshold), `token_nll`, `trainable_mask` (what lets
[`~trl_pplmask.collator.PplMaskCollator`] re-threshold upwards: tokens masked at 2.5 are restored from `input_ids`),
`num_completion_tokens`, `num_masked`, `masked_fraction`.

Modules: `source` (loading and checking the source data), `pplmasked_config`, `pplmasked_split` (scoring, masking,
statistics) and `pplmasked` (the builder and its card); `self_output_config` (its settings), `self_output` and
`self_output_stats` (the `<task>-self-output` builder, which imports torch and is not imported here); `builder` (what
both builders share: [`FolderBuilder`], and the settings fields of [`folder_field`]), `folder` (shards, build records,
staging: its staging steps are `FolderBuilder`'s alone and not exported here), `card` (shared card pieces) and
`publish` (push). The commands (`trl-pplmask build`, `push`, `self-output`) are in `trl_pplmask.commands`.

This package imports neither torch nor transformers, trl or datasets, so that `trl-pplmask push` and `--help` start
fast; the functions that need them import them.
"""

from ..constants import EMBEDDED_MODEL_ALIAS, PAPER_ARXIV_ID, ROW_ID_COLUMN
from .builder import FolderBuilder, FolderSettings
from .card import card_configs, card_template_path, default_config_name, size_category
from .folder import (
    ASSETS_DIR,
    BUILD_INFO_FILE,
    build_versions,
    describe_model,
    hub_commit,
    read_build_infos,
    release_accelerator_memory,
    write_parquet_shards,
)
from .pplmasked import PPLMASKED_KIND, PplMaskedBuilder, build_pplmasked, render_card
from .pplmasked_config import PPLMASKED_CARD_TEMPLATE, BuildConfig
from .pplmasked_split import OUTPUT_COLUMNS, build_split, completion_perplexities, split_statistics
from .publish import PushError, default_repo_id, list_upload_files, push_folder
from .source import FORMAT_FIELDS, FORMATS, describe_source, load_source_splits, source_short_name, validate_rows


__all__ = [
    "ASSETS_DIR",
    "BUILD_INFO_FILE",
    "EMBEDDED_MODEL_ALIAS",
    "FORMATS",
    "FORMAT_FIELDS",
    "OUTPUT_COLUMNS",
    "PAPER_ARXIV_ID",
    "PPLMASKED_CARD_TEMPLATE",
    "PPLMASKED_KIND",
    "ROW_ID_COLUMN",
    "BuildConfig",
    "FolderBuilder",
    "FolderSettings",
    "PplMaskedBuilder",
    "PushError",
    "build_pplmasked",
    "build_split",
    "build_versions",
    "card_configs",
    "card_template_path",
    "completion_perplexities",
    "default_config_name",
    "default_repo_id",
    "describe_model",
    "describe_source",
    "hub_commit",
    "list_upload_files",
    "load_source_splits",
    "push_folder",
    "read_build_infos",
    "release_accelerator_memory",
    "render_card",
    "size_category",
    "source_short_name",
    "split_statistics",
    "validate_rows",
    "write_parquet_shards",
]
