"""Where a study keeps its files under `output_dir`, and how it reads and writes its JSON records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..constants import PPLMASK_CONFIG_FILE


STATE_FILE = "study_state.json"
STUDY_FILE = "study.json"
FINISHED_FILE = PPLMASK_CONFIG_FILE  # written last by `trl-pplmask sft`: its presence means the arm finished
ARM_FILE = "arm.json"  # what the study launched the arm with (settings and data fingerprint)


class StudyPaths:
    """Where a study keeps its files under `output_dir`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.data = self.root / "data"
        self.train = self.data / "train"  # what every arm trains on: TRL-format columns and row_id
        self.rows = self.data / "rows"  # the same rows with the task's raw fields (verifiers of self_output)
        self.data_info = self.data / "train_info.json"
        self.self_output_dir = self.root / "self_output"
        self.self_output_data = self.data / "self_output"
        self.self_output_info = self.self_output_dir / "self_output.json"
        self.arms = self.root / "arms"
        self.state = self.root / STATE_FILE
        self.study = self.root / STUDY_FILE

    def arm(self, label: str) -> Path:
        return self.arms / label


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON record at `path`, or `None` when there is none yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
