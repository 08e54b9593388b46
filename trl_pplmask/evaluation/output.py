"""The report folder: checked before any work ([`check_output_dir`]), written at the end ([`write_report`])."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text, raise_if_termination_requested
from .markdown import render_markdown
from .plot import plot_report


REPORT_FILES = ("report.json", "report.md", "report.png")


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse a report folder that cannot be written (a file, under a file, read-only) before any work starts."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"The report folder {str(path)!r} (--output-dir) is a file; pass a new or existing folder for "
            "report.json, report.md and report.png."
        )
    for name in REPORT_FILES:
        if (path / name).is_dir():
            raise ValueError(
                f"{str(path / name)!r} is a folder, so the report cannot be written there; remove it or pass another "
                "--output-dir."
            )
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"The report folder {str(path)!r} (--output-dir) cannot be created: {str(existing)!r} is a file; pass a "
            "folder path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"The report folder {str(path)!r} (--output-dir) cannot be written: {str(existing)!r} is not writable; "
            "pass a writable folder."
        )


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write `report.json`, `report.md` and `report.png` into `output_dir` (created if needed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in REPORT_FILES}
    raise_if_termination_requested()
    atomic_write_text(paths["report.json"], json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write_text(paths["report.md"], render_markdown(report))
    plot_report(report, paths["report.png"])
    return paths


__all__ = ["REPORT_FILES", "check_output_dir", "write_report"]
