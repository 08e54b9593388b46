"""`trl-pplmask --help` and every subcommand's `--help` answer fast: they import neither torch nor its kin."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from trl_pplmask.cli import COMMANDS, build_parser


HEAVY = ("torch", "transformers", "datasets", "trl", "accelerate", "peft")

PROBE = """
import sys
from trl_pplmask.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = [name for name in {heavy!r} if name in sys.modules]
print("HEAVY", ",".join(heavy))
sys.exit(code)
"""


def _help(*argv: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    command = [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv, "--help"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    out, _, heavy = run.stdout.rpartition("HEAVY ")
    return out, [name for name in heavy.strip().split(",") if name]


def test_top_level_help_lists_every_command_without_importing_torch():
    out, heavy = _help()
    assert heavy == []
    for name in ("score", "mask", "demo", *COMMANDS):
        assert name in out


@pytest.mark.parametrize(
    "command",
    [
        "score",
        "mask",
        "demo",
        "build",
        "push",
        "self-output",
        "study",
        "eval",
    ],
)
def test_subcommand_help_does_not_import_torch(command):
    out, heavy = _help(command)
    assert f"usage: trl-pplmask {command}" in out
    assert heavy == [], f"`trl-pplmask {command} --help` imported {heavy}"


def test_every_option_has_help():
    parser = build_parser(["score"])
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("score", "mask", "demo"):
        sub = subparsers.choices[command]
        assert sub.description, command
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help text"
    for command in ("self-output", "eval"):
        sub = build_parser([command])._actions[-1].choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_eval_help_lists_the_tasks_evaluation_accepts():
    """`eval`'s help names the tasks `trl_pplmask.evaluation` accepts, the registered tasks (`trl_pplmask.tasks`, as
    `trl_pplmask.data` loads them) first."""
    from trl_pplmask.data import TASKS
    from trl_pplmask.evaluation import available_tasks, resolve_task, tasks

    assert available_tasks()[: len(TASKS)] == list(TASKS) == ["gsm8k", "mbpp", "math", "arc_challenge", "humaneval"]
    sub = build_parser(["eval"])._actions[-1].choices["eval"]
    listed = next(action.help for action in sub._actions if "--tasks" in action.option_strings)
    assert listed == f"Comma-separated: {available_tasks()}."
    for name in [*tasks.DEFAULT_TASKS, *available_tasks()]:
        resolve_task(name)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_listed_help_is_the_modules_own(command):
    """The help listed by `trl-pplmask --help` (from COMMANDS) is the one the module registers."""
    module, listed = COMMANDS[command]
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    importlib.import_module(module).register_cli(subparsers)
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered[command] == listed


def test_sft_help_is_trls_parser(capsys):
    """`trl-pplmask sft --help` is answered by TRL's parser (every trl sft flag plus the pplmask_* ones)."""
    from trl_pplmask.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["sft", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--pplmask_strategy" in out and "--learning_rate" in out


def test_sft_help_is_made_once_then_answered_without_torch(tmp_path):
    """TRL's parser needs torch, transformers and peft to print `sft --help`; the text is kept, so the next call
    answers from it without them, and says the same."""
    env = {**os.environ, "TRL_PPLMASK_CACHE": str(tmp_path), "COLUMNS": "100"}
    first, heavy = _help("sft", env=env)
    assert "torch" in heavy and "--pplmask_strategy" in first and "--learning_rate" in first
    second, heavy = _help("sft", env=env)
    assert heavy == [] and second == first
    wider, _ = _help("sft", env={**env, "COLUMNS": "160"})  # argparse wraps to the terminal: another text, made anew
    assert wider != first and max(map(len, wider.splitlines())) > 100


# Every option each command had when its options were first generated from one definition (issue 20): a refactoring
# may add options or spellings, never drop one. `sft` is TRL's parser (test_sft_help_is_trls_parser).
OPTIONS = {
    "score": "--model --adapter --dtype --dataset --dataset-config --split --limit --output --overwrite --no-cache "
    "--max-length --max-tokens-per-batch --score-all-tokens --disable-adapter --output-column --layout --shard-rows "
    "--worker --config",
    "mask": "--input --dataset-config --split --output --overwrite --strategy --threshold --fraction --seed "
    "--dpf-nll-column --entropy-threshold --drop-empty --config",
    "demo": "--output --num-examples --max-steps --config",
    "build": "--dataset --dataset-config --format --models --config-names --default-config --splits --unmasked-splits "
    "--threshold --limit --max-length --drop-empty --shard-rows --max-shard-size --overwrite --dtype "
    "--max-tokens-per-batch --no-cache --cache-dir --output-dir --repo-id --pretty-name --license --language "
    "--card-template --config",
    "push": "folder --repo-id --private --revision --create-pr --token --commit-message --dry-run --config",
    "self-output": "--dataset --dataset-config --split --limit --verifier --models --config-names --mode "
    "--num-samples --temperature --top-p --max-new-tokens --selection --fallback --select-truncated --backend "
    "--tensor-parallel-size --seed --batch-size --max-tokens-per-batch --dtype --ppl-threshold --output-dir "
    "--checkpoint-dir --max-shard-size --repo-id --pretty-name --license --language --card-template --overwrite "
    "--config",
    "eval": "--base --base-label --adapter --model --tasks --target --limit --split --output --overwrite "
    "--max-new-tokens --instruction-max-new-tokens --drift-max-new-tokens --max-tokens-per-batch --max-batch-size "
    "--dtype --device --nll-max-length --code-timeout --bootstrap --confidence --seed --reference --backend "
    "--cache-dir --no-cache",
    "study": "--config --output-dir --plan --dry-run",
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser([command])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_option_is_still_accepted(command):
    """Each command still has every option (and positional argument) listed in OPTIONS."""
    names = set()
    for action in _command_parser(command)._actions:
        names.update(action.option_strings or [action.dest])
    missing = sorted(set(OPTIONS[command].split()) - names)
    assert not missing, f"trl-pplmask {command} lost {missing}"
