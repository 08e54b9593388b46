"""Data stages of a study: the training rows (once), and the self-output probe and data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from typing import Any

from ..constants import DPF_NLL_COLUMN
from ..utils import atomic_write_text, json_safe
from .config import StudyConfig
from .layout import StudyPaths, read_json
from .train import check_data_columns


# --------------------------------------------------------------------------------------------------------------------
# Stage: prepare data
# --------------------------------------------------------------------------------------------------------------------
def _source_descriptor(config: StudyConfig) -> dict[str, Any]:
    return {"task": config.data.task, "path": config.data.path, "split": config.data.split, "limit": config.data.limit}


def _rows_fingerprint(dataset) -> str:
    h = hashlib.sha256()
    for row in dataset:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def prepared_data_info(config: StudyConfig, paths: StudyPaths) -> dict[str, Any] | None:
    """The `data/info.json` of an `output_dir` whose data is prepared (`None` when it is not), refused when it was
    prepared from other data than the YAML names: the check that [`prepare_data`] and `study --plan` share."""
    source = _source_descriptor(config)
    info = read_json(paths.data_info)
    if info is not None and info["source"] != source:
        raise ValueError(
            f"{paths.root} holds a study prepared from other data ({info['source']}, the YAML says {source}); "
            "its arms were trained on that data. Use a new output_dir, or delete the old one."
        )
    return info


def training_rows_fingerprint(config: StudyConfig, paths: StudyPaths) -> str:
    """The fingerprint of the rows the arms train on: the prepared data's, or that of the rows [`prepare_data`] would
    prepare (loaded, nothing written): what a finished arm's record is compared with."""
    info = prepared_data_info(config, paths)
    return info["fingerprint"] if info is not None else _rows_fingerprint(_load_rows(config)[1])


def _load_rows(config: StudyConfig):
    """`(every column, the training columns, the TRL format)` of the YAML's data, checked."""
    from ..data import ROW_ID_COLUMN, detect_format, load_any_dataset, load_task

    source = _source_descriptor(config)
    if config.data.task is not None and config.data.path is None:
        dataset = load_task(config.data.task, config.data.split, config.data.limit)
    else:
        dataset = load_any_dataset(config.data.path, config.data.split, limit=config.data.limit)
    if len(dataset) == 0:
        raise ValueError(f"data: no rows in {source}.")
    check_data_columns(config, dataset.column_names)
    kind = detect_format(dataset[0])
    keep = {
        "prompt_completion": ["prompt", "completion"],
        "prompt_completion_conversational": ["prompt", "completion"],
        "messages": ["messages"],
        "conversations": ["conversations"],
        "text": ["text"],
    }[kind]
    if ROW_ID_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    keep.append(ROW_ID_COLUMN)
    scored = ("token_nll", "token_entropy", DPF_NLL_COLUMN, "input_ids", "labels")
    keep += [c for c in scored if c in dataset.column_names]
    return dataset, dataset.select_columns(keep), kind


def prepare_data(config: StudyConfig, paths: StudyPaths) -> tuple[dict[str, Any], bool]:
    """Load the training rows once into `data/train` (and `data/rows`); returns (info, reused)."""
    from datasets import load_from_disk

    info = prepared_data_info(config, paths)
    if info is not None:
        check_data_columns(config, load_from_disk(str(paths.rows)).column_names)
        return info, True
    dataset, train, kind = _load_rows(config)
    source = _source_descriptor(config)
    paths.data.mkdir(parents=True, exist_ok=True)
    for folder, ds in ((paths.rows, dataset), (paths.train, train)):
        shutil.rmtree(folder, ignore_errors=True)
        ds.save_to_disk(str(folder))
    info = {
        "source": source,
        "rows": len(train),
        "format": kind,
        "columns": train.column_names,
        "fingerprint": _rows_fingerprint(train),
    }
    atomic_write_text(paths.data_info, json.dumps(info, indent=1))  # last: its presence means the data is complete
    return info, False


# --------------------------------------------------------------------------------------------------------------------
# Stage: self-output
# --------------------------------------------------------------------------------------------------------------------
def _self_output_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "transformers"


def run_self_output(config: StudyConfig, paths: StudyPaths, data_info: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Measure the base model's acceptance rate on the target; build the self-output data when it is high enough."""
    from datasets import load_from_disk

    from ..generation import SelfOutputConfig, generate_self_outputs, self_output_statistics
    from ..hub import release_accelerator_memory
    from ..models import load_model

    so = config.self_output
    settings = {**dataclasses.asdict(so), "model": config.model, "data": data_info["fingerprint"]}
    info = read_json(paths.self_output_info)
    if info is not None:
        if info["settings"] != json_safe(settings):
            raise ValueError(
                f"{paths.self_output_info} was made with other settings ({info['settings']}); the YAML now says "
                f"{settings}. Delete {paths.self_output_dir} and {paths.self_output_data} to redo it, or use a new "
                "output_dir."
            )
        return info, True
    rows = load_from_disk(str(paths.rows))
    generation = SelfOutputConfig(
        num_samples=so.num_samples,
        temperature=so.temperature,
        max_new_tokens=so.max_new_tokens,
        fallback=so.fallback,
        backend=_self_output_backend(so.backend),
        seed=so.seed,
        checkpoint_path=str(paths.self_output_dir / "generations.jsonl"),
    )
    model, tokenizer = load_model(config.model, dtype=so.dtype)
    probe = rows.select(range(min(so.probe_rows, len(rows))))
    probed = generate_self_outputs(probe, model, tokenizer, config.data.task, generation)
    stats = self_output_statistics(probed)
    rate = stats["rows_with_correct"] / max(stats["rows_generated"], 1)
    info = {"settings": settings, "acceptance_rate": rate, "probe_rows": stats["rows_generated"], "probe": stats}
    if rate < so.min_acceptance:
        info["status"] = "skipped"
        info["reason"] = (
            f"acceptance rate {rate:.1%} on {stats['rows_generated']} training rows is below min_acceptance "
            f"{so.min_acceptance:.0%}: the model solves too little of the target for self-output training"
        )
    else:
        full = generate_self_outputs(rows, model, tokenizer, config.data.task, generation)  # the probe's rows resume
        info["status"] = "ready"
        info["full"] = self_output_statistics(full)
        shutil.rmtree(paths.self_output_data, ignore_errors=True)
        full.select_columns(["prompt", "completion", "row_id"]).save_to_disk(str(paths.self_output_data))
    del model
    release_accelerator_memory()  # the next stages train and evaluate in this machine's memory
    info = json_safe(info)
    atomic_write_text(paths.self_output_info, json.dumps(info, indent=1))
    return info, False
