"""benchmarks/study_summary.py: the README table, and one table from a study run in parts."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
from conftest import REPO


REPORT = REPO / "benchmarks" / "results" / "study-gsm8k-smollm2-135m-cpu" / "report.json"


@pytest.fixture(scope="module")
def summary_module():
    spec = importlib.util.spec_from_file_location("study_summary", REPO / "benchmarks" / "study_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parts() -> tuple[dict, dict]:
    """The committed report split into two runs that share the base and gt, as a partial rerun would."""
    full = json.loads(REPORT.read_text())
    first, second = copy.deepcopy(full), copy.deepcopy(full)
    for label in ("dft", "stm_anchor"):
        del first["results"][label], first["forgetting"][label]
    for label in ("stm", "random", "lowest", "stm_entropy"):
        del second["results"][label], second["forgetting"][label]
    return full, first, second


def test_parts_merge_into_the_full_table(summary_module, parts):
    full, first, second = parts
    merged = summary_module.summary(summary_module.merge([first, second]))
    rows = [line.split(" | ")[0] for line in merged.splitlines()[2:]]
    assert rows == ["| base", "| gt", "| stm", "| random", "| lowest", "| stm_entropy", "| dft", "| stm_anchor"]
    by_arm = {line.split(" | ")[0]: line for line in summary_module.summary(full).splitlines()}
    assert all(by_arm[line.split(" | ")[0]] == line for line in merged.splitlines())


def test_a_shared_model_that_differs_is_refused(summary_module, parts):
    _, first, second = parts
    changed = copy.deepcopy(second)
    changed["results"]["base"]["gsm8k"]["items"][3]["output"] += " (another answer)"
    with pytest.raises(ValueError, match=r"base/gsm8k"):
        summary_module.merge([first, changed])
    changed = copy.deepcopy(second)
    changed["results"]["gt"]["mbpp_nll"]["metrics"]["nll"] = 0.0
    with pytest.raises(ValueError, match=r"gt/mbpp_nll"):
        summary_module.merge([first, changed])
