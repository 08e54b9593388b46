"""Dataset card templates (Jinja, rendered through `huggingface_hub.DatasetCard`).

This folder is installed as the package `trl_pplmask.cards` (see `[tool.setuptools.package-dir]` in pyproject.toml),
so that a wheel and a source checkout render the same cards.
"""
