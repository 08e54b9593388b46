"""Results cached on disk per (model files, task, split, limit, rows, settings, backend), so that adding a model
to a report evaluates only that model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models import cache_dir, resolve_model_path
from ..utils import atomic_write_text, file_sha256, package_version
from ..verifiers import CODE_TASKS
from .config import EvalConfig, ModelSpec
from .results import TaskResult
from .tasks import EvalTask


_CACHE_VERSION = "2"  # 2: full content hashes of the model files; entries carry their key and item count


def _file_identity(path: Path, h) -> None:
    # Every byte of every file (a weight file edited in the middle must miss), hashed once per file version: the hash
    # is remembered by path, size, mtime, ctime and inode under `<TRL_PPLMASK_CACHE>/file-hashes`
    h.update(f"{path.name}:{path.stat().st_size}:".encode())
    h.update(file_sha256(path, cache_dir() / "file-hashes").encode())


def path_identity(name_or_path: str) -> str:
    """A content identity of a model or adapter: hashes of its local files, or the Hub id and the cached snapshot's
    commit (pass `use_cache=False` after a Hub model changed without a local snapshot)."""
    resolved = Path(resolve_model_path(name_or_path))
    h = hashlib.sha256()
    if resolved.is_dir():
        for file in sorted(p for p in resolved.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(file.relative_to(resolved)).encode())
            _file_identity(file, h)
        return h.hexdigest()
    h.update(str(name_or_path).encode())
    try:
        from huggingface_hub import try_to_load_from_cache  # only for Hub ids; inside the try on purpose

        found = try_to_load_from_cache(str(name_or_path), "config.json")
        if isinstance(found, str):
            h.update(Path(found).parent.name.encode())  # snapshots/<commit>/config.json
    except Exception:  # an id that is not a valid repo name: the name alone identifies it
        pass
    return h.hexdigest()


def model_identity(spec: ModelSpec) -> str:
    """Identity of a model spec's weights and tokenizer (base files, plus adapter files)."""
    parts = [path_identity(spec.name_or_path)]
    if spec.adapter:
        parts.append(path_identity(spec.adapter))
    return hashlib.sha256("+".join(parts).encode()).hexdigest()


def rows_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """Hash of the evaluated rows (prompts, references, raw fields)."""
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()


def task_settings(task: EvalTask, config: EvalConfig, device: str) -> dict[str, Any]:
    """The settings that change `task`'s results (part of its cache key and of the report's record of the run).

    Args:
        task (`EvalTask`): The task evaluated.
        config (`EvalConfig`): The evaluation's settings; only those this task's kind reads are kept.
        device (`str`): The device it runs on.
    """
    settings = {"dtype": config.dtype, "device": device, "max_tokens_per_batch": config.max_tokens_per_batch}
    if task.kind == "generate":
        settings.update(max_new_tokens=config.max_new_tokens, max_batch_size=config.max_batch_size)
        if task.name in CODE_TASKS:
            settings["code_timeout"] = config.code_timeout
    if task.kind == "nll":
        settings["nll_max_length"] = config.nll_max_length
    if task.kind == "instruct":
        settings.update(
            max_new_tokens=config.instruction_max_new_tokens,
            max_batch_size=config.max_batch_size,
            checker=package_version("if-verifiable"),
        )
    if task.kind == "drift":
        settings.update(drift_max_new_tokens=config.drift_max_new_tokens, max_batch_size=config.max_batch_size)
    return settings


def eval_cache_root(config: EvalConfig) -> Path:
    """The folder of cached results: `config.cache_dir`, else `<TRL_PPLMASK_CACHE>/eval`."""
    return Path(config.cache_dir) if config.cache_dir else cache_dir() / "eval"


class ResultCache:
    """JSON files of [`TaskResult`]s keyed by a hash of (model identity, task, split, limit, rows, settings).

    Args:
        root (`str` or `Path`): Cache folder.
        enabled (`bool`, *optional*, defaults to `True`): A disabled cache misses and stores nothing.
    """

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    @staticmethod
    def key(identity: str, task: EvalTask, limit: int | None, rows: str, settings: dict, backend: str) -> str:
        payload = [_CACHE_VERSION, identity, task.name, task.split, limit, rows, settings, backend]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, key: str) -> TaskResult | None:
        """The cached result under `key`, or `None` (a miss, which the caller evaluates again and replaces) when there
        is none or the entry does not hold exactly what it was saved with: its own key, as many well-formed items
        as it recorded, numeric metrics."""
        path = self.root / f"{key}.json"
        if not self.enabled or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            result = TaskResult.from_dict(entry["result"])
        except (OSError, ValueError, TypeError, KeyError):  # empty, truncated, or not an entry of this version
            return None
        return result if entry.get("key") == key and _consistent(result, entry.get("items")) else None

    def save(self, key: str, result: TaskResult) -> None:
        if not self.enabled:
            return
        entry = {"key": key, "items": len(result.items), "result": result.to_dict()}
        atomic_write_text(self.root / f"{key}.json", json.dumps(entry))


def _consistent(result: TaskResult, n_items: Any) -> bool:
    """Whether a loaded result has the recorded number of items, each with its scores, and numeric metrics."""
    if not isinstance(result.items, list) or n_items != len(result.items) or not isinstance(result.metrics, dict):
        return False
    if not all(isinstance(item, dict) and isinstance(item.get("scores"), dict) for item in result.items):
        return False
    return all(isinstance(v, (int, float)) or v is None for v in result.metrics.values())


__all__ = ["ResultCache", "eval_cache_root", "model_identity", "path_identity", "rows_fingerprint"]
