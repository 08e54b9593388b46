"""Dataset card pieces that every kind of folder shares: the packaged templates, the YAML `configs:` and size
category, the default config, how numbers are written in the tables, and the generated part of a card that a rebuild
replaces while keeping the text written around it ([`write_card`], [`check_card_edits`])."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard

from ..utils import atomic_write_text


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


# --------------------------------------------------------------------------------------------------------------------
# The generated part of a card: the YAML header and the text between two markers, replaced by every build; the text
# around the markers is the user's, kept as written
# --------------------------------------------------------------------------------------------------------------------
CARD_FILE = "README.md"
CARD_END = "<!-- end of the trl-pplmask card -->"
_BEGIN_TEMPLATE = (
    "<!-- trl-pplmask card {digest}: the YAML header and the text from here to the end marker are generated from "
    "build_info.json and replaced by every build; write your own text below the end marker. -->"
)
_BEGIN = re.compile(r"<!-- trl-pplmask card ([0-9a-f]{64}):[^\n]*?-->\n?")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)
# Build times (`built_at`, UTC to the second) do not count in the digest: two builds of the same data give the same
# card up to their times, digest included (a rerun after a kill equals an uninterrupted run)
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


@dataclass
class CardParts:
    """A card split into its generated part (`header`, `block`) and the user's text around it.

    Args:
        header (`str`): The YAML front matter, `---` lines included (empty when there is none).
        before (`str`): The user's text between the header and the begin marker.
        block (`str`): The generated text between the markers.
        after (`str`): The user's text after the end marker.
        recorded (`str`, *optional*): The digest the begin marker recorded; `None` for a card without markers.
    """

    header: str
    before: str
    block: str
    after: str
    recorded: str | None = None

    @property
    def edited(self) -> bool:
        """Whether the generated part differs from what the build that wrote it recorded (or has no markers)."""
        return self.recorded != _digest(self.header, self.block)


def _digest(header: str, block: str) -> str:
    normalised = [_TIMESTAMP.sub("<time>", part.replace("\r\n", "\n").strip()) for part in (header, block)]
    return hashlib.sha256("\0".join(normalised).encode("utf-8")).hexdigest()


def split_card(text: str) -> CardParts:
    """The parts of a card's text; a card without (both) markers is all generated, with `recorded=None`."""
    text = text.replace("\r\n", "\n")
    front = _FRONT_MATTER.match(text)
    header = front.group(0) if front else ""
    rest = text[len(header) :]
    begin = _BEGIN.search(rest)
    end = rest.find(CARD_END, begin.end()) if begin else -1
    if begin is None or end < 0:
        return CardParts(header=header, before="", block=rest, after="")
    after = rest[end + len(CARD_END) :]
    return CardParts(
        header=header,
        before=rest[: begin.start()],
        block=rest[begin.end() : end].strip("\n"),
        after=after[1:] if after.startswith("\n") else after,
        recorded=begin.group(1),
    )


def card_edit_problem(folder: str | Path) -> str | None:
    """What a rebuild would lose of the folder's card, or `None` (no card, or its generated part as written)."""
    readme = Path(folder) / CARD_FILE
    if not readme.is_file():
        return None
    try:
        parts = split_card(readme.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{readme} is not UTF-8 text"
    if parts.recorded is None:
        return f"{readme} has no trl-pplmask card markers (written by hand, or by an older trl-pplmask)"
    if parts.edited:
        return f"{readme} was edited inside its generated part (the YAML header or the text between the markers)"
    return None


def check_card_edits(folder: str | Path, overwrite: bool = False) -> None:
    """Before any work: refuse to rebuild a folder whose card was edited where a build rewrites it (unless
    `overwrite`). Text outside the markers is always kept, so only edits of the generated part are at stake."""
    problem = card_edit_problem(folder)
    if problem and not overwrite:
        raise ValueError(
            f"{problem}: a build would replace those edits. Move your text below the `{CARD_END}` line (text "
            "outside the markers is kept by every build), or pass --overwrite to replace the generated part."
        )


def write_card(folder: str | Path, rendered: str) -> str:
    """Write `README.md` of `folder`: the freshly `rendered` card as its generated part, marked with its digest, and
    the user's text around the markers of the card there before, kept as written. Returns the text written."""
    readme = Path(folder) / CARD_FILE
    kept = CardParts("", "", "", "")
    if readme.is_file():
        try:
            kept = split_card(readme.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            pass  # refused before the build unless --overwrite: replaced whole
        if kept.recorded is None:
            kept = CardParts("", "", "", "")  # no markers: the whole old card was generated (or is replaced)
    new = split_card(rendered)
    block = new.block.strip("\n")
    begin = _BEGIN_TEMPLATE.format(digest=_digest(new.header, block))
    text = f"{new.header}{kept.before}{begin}\n\n{block}\n\n{CARD_END}\n{kept.after}"
    atomic_write_text(readme, text)
    return text
