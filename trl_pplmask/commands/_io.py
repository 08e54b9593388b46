"""The dataset in and out of `score` and `mask`: load and check the input, refuse a bad output folder, and save
atomically, never writing beside the input."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..utils import OutputLock, check_writable, make_staging_dir, raise_if_termination_requested, swap_in


def check_positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}.")


def check_output_folder(output: str, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an output that is a file, a non-empty folder (without --overwrite), or overlaps the input."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {output} is a file; give a folder path (new, or empty).")
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise ValueError(
            f"--output-dir {output} is the current directory or holds it; the output is swapped in whole, which "
            "cannot replace the folder a command runs in. Give a new folder inside it, e.g. --output-dir ./scored."
        )
    if path.is_dir() and os.path.ismount(path):
        raise ValueError(
            f"--output-dir {output} is a mount point; the output is swapped in whole (renamed into place), which "
            f"cannot replace a mount point. Give a new folder inside it, e.g. --output-dir {path / 'scored'}."
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"--output-dir {output} is not empty. Choose a new or empty folder, or pass --overwrite to replace it "
            "(the new dataset is written beside it first and swapped in only once complete)."
        )
    if source is not None and Path(source).expanduser().exists():
        source_path, resolved = Path(source).expanduser().resolve(), path.resolve()
        if source_path == resolved or resolved in source_path.parents or source_path in resolved.parents:
            raise ValueError(
                f"--output-dir {output} overlaps the input {source}; writing there would change or delete the input. "
                "Choose a folder outside it."
            )
    check_writable(path.absolute().parent, f"--output-dir {output}")  # staged beside it; said now, not after the work
    return path


def save_atomically(dataset, output: Path) -> None:
    """`save_to_disk` into a staging folder beside `output`, then swap it in: a crash never leaves a partial output."""
    staging = make_staging_dir(output)  # also removes those of runs that were killed
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        raise_if_termination_requested()
        swap_in(staging / "dataset", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def output_lock(output: Path, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The advisory lock of `output` ([`~trl_pplmask.utils.OutputLock`], beside it: the output is swapped in whole),
    held from before the work until the output is saved; a second writer is refused naming the holder's PID.

    Args:
        output (`Path`): The output folder.
        enabled (`bool`, *optional*, defaults to `True`): `False` (processes other than the main one, which write
            nothing) takes no lock.
    """
    return OutputLock(output, what="--output-dir") if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def no_cache_beside_input():
    """Maps write their results to a temporary folder, never as cache-*.arrow files into the input's folder."""
    import datasets

    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def load_input(spec: str, split: str, config: str | None = None, limit: int | None = None, mode: str = "download"):
    """The input rows: a `Dataset`, or with `mode` `stream`/`auto` a [`~trl_pplmask.hub.stream_input.ParquetSplit`]
    read a shard at a time."""
    from ..hub.stream_input import load_split

    dataset = load_split(spec, split, config, limit, mode)
    if len(dataset) == 0:
        raise ValueError(f"{spec} (split {split!r}) has no rows; there is nothing to process.")
    return dataset


def check_aligned(dataset, columns: Sequence[str]) -> None:
    """Every per-token column has one value per token of `input_ids`; name the first row and column that has not."""
    if "input_ids" not in dataset.column_names:
        return
    lengths = [len(ids) for ids in dataset["input_ids"]]
    for column in columns:
        for row, (values, length) in enumerate(zip(dataset[column], lengths)):
            if values is None or len(values) != length:
                got = "no value" if values is None else f"{len(values)} values"
                raise ValueError(
                    f"Row {row}: `{column}` has {got} but `input_ids` has {length} tokens; per-token columns must be "
                    "aligned with `input_ids`. Rebuild the dataset (`trl-pplmask score` on the raw data)."
                )
