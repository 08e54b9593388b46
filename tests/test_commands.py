"""Options generated from the commands' config dataclasses, and TRL-style YAML `--config FILE`."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from trl_pplmask.commands import build, demo, eval as eval_command, mask, push, score, self_output


def _option_classes():
    from trl_pplmask.evaluation import EvalConfig

    classes = [(m, [m.COMMAND.config_class]) for m in (score, mask, demo, build, push, self_output)]
    return [*classes, (eval_command, [eval_command.EvalArguments, EvalConfig])]


def _option_fields(config: type) -> list[dataclasses.Field]:
    """The fields of the dataclass `config`, those of a field that is itself a dataclass (self-output's `generation`)
    in its place."""
    hints = typing.get_type_hints(config)
    fields = []
    for item in dataclasses.fields(config):
        kind = hints[item.name]
        fields += _option_fields(kind) if dataclasses.is_dataclass(kind) else [item]
    return fields


@pytest.mark.parametrize(("module", "classes"), _option_classes(), ids=lambda m: getattr(m, "__name__", ""))
def test_every_field_is_an_option_with_its_help(module, classes):
    """Each field of the command's config classes is an option with the field's help and default, but those that say
    they are none (`option: None`: set by the command, e.g. the build's recorded command line); a field that is a
    dataclass (self-output's `generation`) stands for its fields' options."""
    parser = module.make_parser()
    actions = {action.dest: action for action in parser._actions}
    for config in classes:
        for item in _option_fields(config):
            action = actions.get(item.name)
            if item.metadata.get("option", "") is None:
                assert action is None, f"{module.__name__}: {item.name} is an option"
                continue
            assert action is not None, f"{module.__name__}: field {item.name} has no option"
            assert action.help == item.metadata["help"], item.name
            if item.default is not dataclasses.MISSING:
                assert action.default == item.default, item.name
            elif item.default_factory is not dataclasses.MISSING:
                assert action.default == item.default_factory(), item.name


def test_yaml_config_sets_options_and_flags_override_it(tmp_path):
    path = tmp_path / "mask.yaml"
    path.write_text("input: scored\noutput: masked\nstrategy: random\nthreshold: 5.0\noverwrite: true\n")
    args = mask.make_parser().parse_args(["--config", str(path)])
    assert (args.input, args.output, args.strategy, args.threshold, args.overwrite) == (
        "scored",
        "masked",
        "random",
        5.0,
        True,
    )
    args = mask.make_parser().parse_args(["--config", str(path), "--threshold", "3", "--output-dir", "other"])
    assert (args.threshold, args.output, args.strategy) == (3.0, "other", "random")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input: a\noutput: b\nthreshhold: 3\n", "unknown setting 'threshhold'"),
        ("input: a\noutput: b\nstrategy: bogus\n", "invalid choice: 'bogus'"),
        ("input: a\noutput: b\noverwrite: maybe\n", "overwrite"),
        ("- input\n- a\n", "must map settings to values"),
        ("input: [a\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_config_is_one_clear_error(text, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        mask.make_parser().parse_args(["--config", str(path)])
    assert exit.value.code == 2
    assert expected in capsys.readouterr().err


def test_missing_yaml_config_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mask.make_parser().parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "--config" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, data_dir, capsys):
    """`make demo` in small: the embedded model scores, masks and trains (one step) with the collator."""
    from trl_pplmask.cli import main

    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--num-examples", "4", "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] Summary" in out and "masked fraction" in out
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("module", [score, mask, demo, eval_command], ids=lambda m: m.__name__)
def test_output_dir_is_the_output_option_and_output_still_works_with_one_warning(module, monkeypatch, capsys):
    """Every command spells its output folder `--output-dir` (as build, self-output and study do); `--output`, the
    old spelling, sets the same setting and says once on stderr that it is deprecated."""
    from trl_pplmask.commands import _args

    monkeypatch.setattr(_args, "_WARNED", set())
    required = {score: ["--dataset", "d"], mask: ["--input", "i"]}.get(module, [])
    parser = module.make_parser()
    new = vars(parser.parse_args([*required, "--output-dir", "out"]))
    assert capsys.readouterr().err == ""
    assert vars(parser.parse_args([*required, "--output", "out"])) == new
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--output is deprecated; use --output-dir" in err
    assert vars(module.make_parser().parse_args([*required, "--output", "out"])) == new
    assert capsys.readouterr().err == ""  # once per process


def test_build_options_are_build_config(tmp_path):
    """`build`'s options are BuildConfig's fields: the defaults parse to BuildConfig's own, `--no-cache` and
    `--card-template` set `use_cache` and `template_path`, and YAML settings are named like the option or the field."""
    from trl_pplmask.commands._args import from_namespace
    from trl_pplmask.hub import BuildConfig

    parser = build.make_parser()
    assert from_namespace(BuildConfig, parser.parse_args(["--dataset", "gsm8k"])) == BuildConfig(dataset="gsm8k")
    args = parser.parse_args(["--dataset", "gsm8k", "--no-cache", "--card-template", "card.jinja", "--limit", "3"])
    config = build.build_config_from_args(args)
    assert (config.use_cache, config.template_path, config.limit) == (False, "card.jinja", 3)
    assert config.command.startswith("trl-pplmask build --dataset gsm8k ") and "--limit 3" in config.command
    assert "--no-cache" not in config.command and "card.jinja" not in config.command
    path = tmp_path / "build.yaml"
    for text, use_cache in (("no_cache: true", False), ("use_cache: false", False), ("use_cache: true", True)):
        path.write_text(f"dataset: gsm8k\n{text}\ncard_template: t.jinja\n")
        args = parser.parse_args(["--config", str(path)])
        assert (args.use_cache, args.template_path) == (use_cache, "t.jinja"), text


def test_self_output_options_are_its_configs(tmp_path):
    """`self-output`'s options are SelfOutputBuildConfig's fields and, in the place of its `generation`,
    SelfOutputConfig's: the defaults parse to their own, `--num-samples` sets `generation.num_samples`,
    `--card-template` sets `template_path`, the recorded command spells the settings (the card template, the output
    folder and the batching left out), and YAML settings are named like the option or the field."""
    from trl_pplmask.commands._args import from_namespace
    from trl_pplmask.generation import SelfOutputConfig
    from trl_pplmask.hub.self_output_config import SelfOutputBuildConfig

    parser = self_output.make_parser()
    defaults = from_namespace(SelfOutputBuildConfig, parser.parse_args(["--dataset", "gsm8k"]))
    assert defaults == SelfOutputBuildConfig(dataset="gsm8k") and defaults.generation == SelfOutputConfig()
    argv = ["--dataset", "gsm8k", "--num-samples", "2", "--select-truncated", "--card-template", "card.jinja"]
    argv += ["--max-tokens-per-batch", "64", "--output-dir", "out", "--language", "en", "fr"]
    config = self_output.build_config_from_args(parser.parse_args(argv))
    assert (config.generation.num_samples, config.generation.select_truncated) == (2, True)
    assert (config.generation.max_tokens_per_batch, config.template_path, config.output_dir) == (
        64,
        "card.jinja",
        "out",
    )
    assert config.command.startswith("trl-pplmask self-output --dataset gsm8k --split train --models ")
    assert " --num-samples 2 " in config.command and " --select-truncated " in config.command
    assert config.command.endswith(" --language en fr")
    for left_out in ("card.jinja", "--max-tokens-per-batch", "--output-dir", "--overwrite"):
        assert left_out not in config.command, left_out
    path = tmp_path / "self_output.yaml"
    for key in ("card_template", "template_path"):
        path.write_text(f"dataset: mbpp\nnum_samples: 3\nselect_truncated: true\n{key}: t.jinja\n")
        config = from_namespace(SelfOutputBuildConfig, parser.parse_args(["--config", str(path), "--seed", "5"]))
        assert (config.dataset, config.template_path) == ("mbpp", "t.jinja"), key
        assert (config.generation.num_samples, config.generation.select_truncated, config.generation.seed) == (
            3,
            True,
            5,
        )


@dataclasses.dataclass
class _Sampling:
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed."})
    workers: int | None = dataclasses.field(default=None, metadata={"option": None})


@dataclasses.dataclass
class _Settings:
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"], metadata={"help": "Names."})
    sampling: _Sampling = dataclasses.field(default_factory=_Sampling)
    n_resamples: int = dataclasses.field(default=10, metadata={"help": "Resamples.", "option": "--bootstrap"})
    cache: bool = dataclasses.field(default=True, metadata={"help": "Rescore.", "option": "--no-cache"})
    verbose: bool = dataclasses.field(default=False, metadata={"help": "Say more."})
    output_dir: str | None = dataclasses.field(default=None, metadata={"help": "Where."})


def test_command_line_spells_a_config_back_as_the_options_that_parse_to_it():
    """`command_line` gives each option of a config (those of a nested dataclass in its place, under their option
    names, a flag only when set), leaves out what is None, no option or unrecorded, and parses back to the config."""
    import argparse

    from trl_pplmask.commands._args import add_dataclass_arguments, command_line, from_namespace

    config = _Settings(names=["x", "y"], sampling=_Sampling(seed=3, workers=2), cache=False, output_dir="out")
    command = command_line(config, "prog sub")
    assert command == "prog sub --names x y --seed 3 --bootstrap 10 --no-cache"
    assert (
        command_line(_Settings(verbose=True), "prog", frozenset())
        == "prog --names a --seed 0 --bootstrap 10 --verbose"
    )
    parser = add_dataclass_arguments(argparse.ArgumentParser(), _Settings, config_option=False)
    parsed = from_namespace(_Settings, parser.parse_args(command.split()[2:]))
    assert parsed == dataclasses.replace(config, sampling=_Sampling(seed=3), output_dir=None)


def test_eval_options_are_eval_config():
    """`eval`'s options are EvalConfig's fields (and EvalArguments'): the defaults parse to EvalConfig's own;
    `--tasks` is comma-separated, `--bootstrap` is `n_resamples`, `--no-cache` turns `use_cache` off, and the
    repeatable `--split DATASET=SPLIT` fills `splits`."""
    from trl_pplmask.commands._args import from_namespace
    from trl_pplmask.evaluation import EvalConfig

    parser = eval_command.make_parser()
    assert from_namespace(EvalConfig, parser.parse_args([])) == EvalConfig()
    argv = ["--tasks", "gsm8k, mbpp_nll", "--bootstrap", "10", "--no-cache", "--split", "mbpp=train"]
    args = parser.parse_args(argv)
    config = from_namespace(EvalConfig, args, splits={"mbpp": "train"})
    assert (config.tasks, config.n_resamples, config.use_cache) == (["gsm8k", "mbpp_nll"], 10, False)
    assert args.split == ["mbpp=train"] and config.splits == {"mbpp": "train"}
