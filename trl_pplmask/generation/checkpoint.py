"""The resumable store of finished rows: [`GenerationCheckpoint`]."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "trl-pplmask-self-output-checkpoint"
CHECKPOINT_VERSION = 1


class GenerationCheckpoint:
    """Append-only JSONL store of finished rows, keyed by row id; in memory when `path` is `None`.

    The first line is a header with the settings the responses depend on; a rerun with other settings is refused
    rather than mixing two kinds of data (a checkpoint without any finished row simply starts over). Each record is
    flushed and fsynced as soon as its row is done. A partial last line (a crash mid-write) is cut off on open; its
    row is generated again. An exclusive lock keeps two runs from writing the same file.

    Args:
        path (`str` or `None`): The JSONL file (created with its parent directories when missing).
        header (`dict`): Settings to record, or to check against an existing file.
    """

    def __init__(self, path: str | os.PathLike | None, header: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.header = json.loads(json.dumps(header, default=str))
        self.records: dict[Any, dict[str, Any]] = {}
        self._file = None
        if self.path is not None:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise ValueError(
                f"Checkpoint {self.path} is in use by another run (it is locked). Wait for that run, or use another "
                "checkpoint path."
            ) from None
        self._file.seek(0)
        data = self._file.read()
        if data and not data.endswith(b"\n"):
            complete = data[: data.rfind(b"\n") + 1]
            logger.warning(
                "Checkpoint %s ends with a partial record (interrupted write); it will be redone.", self.path
            )
            self._file.truncate(len(complete))
            data = complete
        lines = data.decode("utf-8").splitlines()
        if len(lines) <= 1 and (not lines or self._is_checkpoint_header(lines[0])):
            # New, or a run that stopped before finishing any row: nothing to keep, so other settings may start over
            self._file.truncate(0)
            self._write({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": self.header})
            return
        self._check_header(lines[0])
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"Checkpoint {self.path}, line {number} is not valid JSON ({err}). The file was modified outside "
                    "trl-pplmask; remove that line (its row is then generated again) or start a new checkpoint."
                ) from None
            self.records.setdefault(record["row_id"], record)

    @staticmethod
    def _parse_header(line: str) -> dict[str, Any] | None:
        try:
            header = json.loads(line)
        except json.JSONDecodeError:
            return None
        return header if isinstance(header, dict) and header.get("format") == CHECKPOINT_FORMAT else None

    def _is_checkpoint_header(self, line: str) -> bool:
        return self._parse_header(line) is not None

    def _check_header(self, line: str) -> None:
        header = self._parse_header(line)
        if header is None:
            raise ValueError(f"{self.path} is not a trl-pplmask generation checkpoint; choose another path.")
        stored = header.get("settings", {})
        keys = sorted(set(stored) | set(self.header))
        differ = {k: (stored.get(k), self.header.get(k)) for k in keys if stored.get(k) != self.header.get(k)}
        if differ:
            details = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in differ.items())
            raise ValueError(
                f"Checkpoint {self.path} was written with other generation settings ({details}). Rerun with the same "
                "settings to resume, or use a new checkpoint path (or delete this one) to start over."
            )

    def _write(self, payload: dict[str, Any]) -> None:
        self._file.write((json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())  # a finished row survives a crash or power loss right after

    def add(self, record: dict[str, Any]) -> None:
        """Store a finished row (written through to the file at once)."""
        self.records[record["row_id"]] = record
        if self._file is not None:
            self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # also releases the lock
            self._file = None

    def __enter__(self) -> GenerationCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
