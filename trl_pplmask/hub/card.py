"""Dataset card pieces that every kind of folder shares: the packaged templates, the YAML `configs:` and size
category, the default config, and how numbers are written in the tables."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard


_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


def cards_dir() -> Path:
    """The project's `cards/` folder, installed as the package `trl_pplmask.cards` (inside the package in a wheel; the
    source folder itself in an editable install)."""
    return Path(str(importlib.resources.files("trl_pplmask.cards")))


def card_template_path(path: str | Path | None, default_name: str) -> Path:
    """The card template at `path`, or `<default_name>` of the project's `cards/` folder ([`cards_dir`])."""
    template = Path(path) if path else cards_dir() / default_name
    if not template.is_file():
        raise FileNotFoundError(
            f"Dataset card template {template} not found. Reinstall trl-pplmask (it ships the templates of `cards/`), "
            "or pass template_path (--card-template)."
        )
    return template


def size_category(num_examples: int) -> str:
    """The Hub's `size_categories` value for a number of examples."""
    for bound, label in _SIZE_CATEGORIES:
        if num_examples < bound:
            return label
    return "n>1M"


def card_configs(infos: dict[str, dict[str, Any]], default: str | None = None) -> list[dict[str, Any]]:
    """The card's YAML `configs:`: one entry per config, a `data_files` pattern per split; `default` is marked
    `default: true`, the config that `load_dataset(repo)` loads when no config name is given."""
    configs = []
    for name, info in sorted(infos.items()):
        entry = {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*"} for s in info["splits"]]}
        if name == default:
            entry["default"] = True
        configs.append(entry)
    return configs


def default_config_name(folder: Path, infos: dict[str, dict[str, Any]], requested: str | None = None) -> str:
    """The folder's default config: `requested` (--default-config), else the one its card already marks (stable
    when configs are added), else the first built."""
    if requested is not None:
        if requested not in infos:
            raise ValueError(f"--default-config {requested!r} is not a config of {folder}; it has {sorted(infos)}.")
        return requested
    readme = Path(folder) / "README.md"
    if readme.is_file():
        try:
            configs = DatasetCard.load(readme).data.to_dict().get("configs") or []
        except Exception:  # an unreadable card is rewritten below; fall back to the first built
            configs = []
        marked = [c.get("config_name") for c in configs if isinstance(c, dict) and c.get("default")]
        if marked and marked[0] in infos:
            return marked[0]
    return min(infos, key=lambda name: (infos[name]["built_at"], name))


def fmt_number(value: float | None) -> str:
    """A perplexity (or other statistic) for a card table: three decimals, `n/a` when missing or not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def fmt_percent(value: float | None) -> str:
    """A share as a percentage with two decimals, `n/a` when missing or not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"
