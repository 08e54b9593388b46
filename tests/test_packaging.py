"""What the wheel ships: every subpackage, and the dataset-card templates of the top-level `cards/` folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from setuptools import find_packages


tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    """pyproject lists the packages (a mapped folder needs it); a subpackage missing there would be missing from the
    wheel while every test of a source checkout still passed."""
    found = set(find_packages(str(ROOT), include=["trl_pplmask*"]))
    assert set(_setuptools()["packages"]) == found | {"trl_pplmask.cards"}


def test_card_templates_ship_from_the_top_level_cards_folder():
    from trl_pplmask.hub.card import card_template_path, cards_dir
    from trl_pplmask.hub.pplmasked import PplMaskedBuilder
    from trl_pplmask.hub.self_output import SelfOutputBuilder

    settings = _setuptools()
    assert settings["package-dir"]["trl_pplmask.cards"] == "cards"
    assert settings["package-data"]["trl_pplmask.cards"] == ["*.jinja"]
    assert not (ROOT / "trl_pplmask" / "cards").exists()  # one copy of the templates
    for builder in (PplMaskedBuilder, SelfOutputBuilder):
        template = card_template_path(None, builder.card_template)
        assert template.parent.resolve() == cards_dir().resolve()
        assert template.read_text() == (ROOT / "cards" / builder.card_template).read_text()


def test_wheel_metadata_carries_the_license(tmp_path):
    """pyproject says Apache-2.0; the wheel ships the LICENSE file and names it in its metadata (PEP 639)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources, which must not touch the checkout
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "outputs", "*.egg-info", "__pycache__", "gpu_check_results"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(source),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("trl_pplmask-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        shipped = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert archive.read(shipped) == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    # package data beyond the card templates: the lm-eval task YAMLs that `--backend lm-eval` renders for the mirror
    yamls = {p.relative_to(ROOT).as_posix() for p in (ROOT / "trl_pplmask/evaluation/lm_eval_tasks").glob("*.yaml")}
    assert yamls and yamls <= set(names)
